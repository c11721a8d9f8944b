"""lm-eval's `custom_dataset` for the ACIP Studio offline tasks: the items of one task from the jsonl
beside this file (its name is the YAML's `dataset_kwargs: data_file`), so a folder of task YAMLs works
wherever it is copied. lm-eval 0.4.13 finds this module next to the YAML (`!function acip_data.load`)."""

from pathlib import Path

import datasets


def load(data_file: str, **_metadata):
    """{"test": the task's items} as a datasets.DatasetDict (lm-eval also passes the task's metadata)."""
    path = Path(__file__).resolve().parent / data_file
    if Path(data_file).name != data_file or not path.is_file():
        raise FileNotFoundError(f"{data_file!r} is not a file beside {Path(__file__).name} in {path.parent}")
    return datasets.load_dataset("json", data_files={"test": str(path)})

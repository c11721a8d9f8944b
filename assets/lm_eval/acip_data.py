"""lm-eval's `custom_dataset` for the ACIP Studio offline tasks: the items of one task from the jsonl
beside this file (its name is the YAML's `dataset_kwargs: data_file`), so a folder of task YAMLs works
wherever it is copied. lm-eval 0.4.13 finds this module next to the YAML (`!function acip_data.load`)."""

import json
from pathlib import Path

import datasets


def load(data_file: str, **_metadata):
    """{"test": the task's items} as a datasets.DatasetDict (lm-eval also passes the task's metadata)."""
    path = Path(__file__).resolve().parent / data_file
    if Path(data_file).name != data_file or not path.is_file():
        raise FileNotFoundError(f"{data_file!r} is not a file beside {Path(__file__).name} in {path.parent}")
    # in memory: load_dataset("json") would add a cache folder per path to ~/.cache/huggingface/datasets
    # at every run (the app writes the task folder anew each time), never removed
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

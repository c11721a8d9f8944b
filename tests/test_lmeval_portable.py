"""`python -m acip_core lm-eval-tasks --out DIR` writes a folder that lm-eval's own loader reads on any
machine: the data lies beside the YAMLs and is named relative to them, so a copy of the folder,
elsewhere, with the original removed and another working directory, still loads every task's items."""

import json
import shutil
from pathlib import Path

from acip_core.cli import main
from acip_core.evaluation.lmeval import OFFLINE_TASKS
from acip_core.evaluation.tasks_build import ASSET_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_written_tasks_load_through_lm_eval_from_a_copy_elsewhere(tmp_path, monkeypatch, capsys):
    from lm_eval.tasks import TaskManager

    written = tmp_path / "machine-a" / "tasks"
    assert main(["lm-eval-tasks", "--out", str(written), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tasks"] == OFFLINE_TASKS
    for path in written.iterdir():  # nothing names a place on the machine that wrote it
        text = path.read_text(encoding="utf-8")
        assert str(ROOT) not in text and str(tmp_path) not in text, path.name
    copy = tmp_path / "machine-b" / "elsewhere"
    shutil.copytree(written, copy)
    shutil.rmtree(tmp_path / "machine-a")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # relative to the YAML, not to the working directory
    loaded = TaskManager(include_path=[str(copy)], include_defaults=False).load(OFFLINE_TASKS)
    tasks = loaded["tasks"]
    assert set(tasks) == set(OFFLINE_TASKS)
    for name, task in tasks.items():
        items = [json.loads(line) for line in (ASSET_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        docs = list(task.test_docs())
        assert len(docs) == len(items) and docs[0]["context"] == items[0]["context"], name
        assert docs[-1]["choices"] == items[-1]["choices"] and docs[-1]["label"] == items[-1]["label"], name

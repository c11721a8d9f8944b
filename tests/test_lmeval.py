import json
import os
import time

import pytest
import torch

from acip_core.evaluation.evaluate import Cancelled
from acip_core.evaluation.lmeval import (OFFLINE_TASKS, PAPER_TASKS, TaskUnavailableError, check_tasks,
                              run_lm_eval)
from acip_core.sources.models import load_base
from acip_core.evaluation.tasks_build import ASSET_DIR, N_CHOICES, TASK_SPECS, build_task, to_jsonl

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_base(tiny_llama)


@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_task_files_are_complete_and_reproducible(task):
    path = ASSET_DIR / f"{task}.jsonl"
    text = path.read_text(encoding="utf-8")
    items = [json.loads(line) for line in text.splitlines()]
    assert 150 <= len(items) <= 300 and len({it["id"] for it in items}) == len(items)
    for it in items:
        assert set(it) == {"id", "source", "context", "choices", "label", "answer"}
        assert it["source"] == TASK_SPECS[task][1] and it["context"]
        assert len(it["choices"]) == N_CHOICES == len(set(it["choices"]))
        assert it["choices"][it["label"]] == it["answer"]
    assert {it["label"] for it in items} == set(range(N_CHOICES))  # the answer moves around
    assert text == to_jsonl(build_task(task))  # the committed items are what the builder makes
    assert "@DATA_FILE@" in (ASSET_DIR / f"{task}.yaml").read_text()


def test_offline_tasks_run_through_lm_eval(tiny):
    model, tok = tiny
    out = run_lm_eval(model, tok, ["acip_next_sentence", "acip_last_word"], limit=4, batch_size=8)
    assert set(out) == {"acip_next_sentence", "acip_last_word"}
    for r in out.values():
        assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 and r["samples"] == 4
        assert r["acc_stderr"] is not None


def test_a_materialized_size_runs_and_can_be_cancelled(tiny_llama):
    from acip_core.engine.materialize import AnySizeModel
    from helpers import model_and_basis

    model, tok, _, basis = model_and_basis(tiny_llama)
    g = torch.Generator().manual_seed(0)
    any_size = AnySizeModel(model, tok, basis, {n: torch.randn(len(f.s), generator=g) for n, f in basis.items()})
    small = any_size.materialize(any_size.size_for_ratio(0.5))
    out = run_lm_eval(small, tok, ["acip_last_word_domain"], limit=2, batch_size=4)
    assert 0 <= out["acip_last_word_domain"]["acc"] <= 1
    with pytest.raises(Cancelled):
        run_lm_eval(small, tok, ["acip_next_sentence"], limit=2, should_stop=lambda: True)
    assert not small._forward_pre_hooks  # the stop hook is removed again


def test_unknown_and_unreachable_tasks_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="unknown lm-eval task.*'nope'.*acip_next_sentence.*piqa"):
        check_tasks(["acip_last_word", "nope"])
    with pytest.raises(ValueError, match="no task"):
        check_tasks([" "])
    assert set(PAPER_TASKS) == {"piqa", "hellaswag", "winogrande", "arc_challenge", "arc_easy",
                                "openbookqa", "mathqa"}
    model, tok = tiny
    start = time.perf_counter()
    with pytest.raises(TaskUnavailableError, match="piqa.*baber/piqa.*hub.*offline tasks"):
        run_lm_eval(model, tok, ["piqa"], limit=2)  # HF offline in the tests: no dataset
    assert time.perf_counter() - start < 20


def test_cli_lm_eval(tiny_llama, monkeypatch, capsys):
    from acip_core import cli
    from acip_core.evaluation import baselines  # where open_sized finds open_method
    from acip_core.engine.materialize import AnySizeModel
    from helpers import model_and_basis

    model, tok, _, basis = model_and_basis(tiny_llama)
    scores = {n: torch.linspace(1, 0, len(f.s)) for n, f in basis.items()}
    opened = []

    def open_method(folder, method="acip"):
        opened.append(method)
        return AnySizeModel(model, tok, basis, scores), None

    monkeypatch.setattr(baselines, "open_method", open_method)
    rc = cli.main(["lm-eval", "--artifact", "unused", "--size-ratio", "0.6", "--tasks",
                   "acip_next_sentence,acip_last_word", "--limit", "2", "--method", "uniform-whitened", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["size_ratio"] >= 0.6 and set(out["tasks"]) == {"acip_next_sentence", "acip_last_word"}
    assert opened == ["uniform-whitened"] and out["method"] == "uniform-whitened"
    rc = cli.main(["lm-eval", "--artifact", "unused", "--size-ratio", "0.6", "--tasks", "bogus", "--json"])
    assert rc == 2 and "unknown lm-eval task" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]


def test_task_files_for_lm_evals_own_cli(tmp_path, capsys):
    """`lm-eval-tasks --out DIR` writes tasks lm-eval's task loader (what its CLI uses) runs as they are."""
    import json

    from lm_eval.tasks import TaskManager

    from acip_core.cli import main
    from acip_core.evaluation.lmeval import OFFLINE_TASKS

    assert main(["lm-eval-tasks", "--out", str(tmp_path / "tasks"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert f"--include_path {tmp_path / 'tasks'}" in result["run"]
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    assert set(OFFLINE_TASKS) <= set(manager.all_tasks)
    loaded = manager.load(["acip_last_word"])
    (task,) = loaded["tasks"].values()
    assert len(task.eval_docs) > 10


def test_an_emb8_size_of_a_tied_model_runs(tiny_llama_tied):
    """lm-eval's HFLM calls tie_weights(); +emb8's int8 embedding has no weight parameter to tie
    (it raised AttributeError before any item was scored)."""
    from acip_core.engine.materialize import AnySizeModel
    from helpers import model_and_basis

    model, tok, _, basis = model_and_basis(tiny_llama_tied)
    assert model.config.tie_word_embeddings
    scores = {n: torch.linspace(1, 0, len(f.s)) for n, f in basis.items()}
    any_size = AnySizeModel(model, tok, basis, scores)
    small = any_size.materialize(any_size.size_for_ratio(0.6), "int8+emb8")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = small(input_ids=ids).logits
        out = run_lm_eval(small, tok, ["acip_last_word"], limit=2, batch_size=4)
        after = small(input_ids=ids).logits
    assert out["acip_last_word"]["samples"] == 2
    assert torch.equal(before, after) and "tie_weights" not in vars(small)  # nothing left changed


def test_cli_task_line_without_acc_norm():
    from acip_core import cli

    line = cli._task_line("winogrande", dict(acc=0.5, acc_stderr=None, acc_norm=None, samples=3))
    assert line == "winogrande: acc 0.5000 ± n/a, acc_norm n/a (3 items)"


def test_task_items_are_read_without_growing_the_datasets_cache(tmp_path):
    """The app writes the task folder anew for every run: a cached load_dataset("json") added a
    cache folder per run to ~/.cache/huggingface/datasets that nothing removed."""
    import importlib.util
    from pathlib import Path

    import datasets

    from acip_core.evaluation.lmeval import write_task_configs

    cache = Path(datasets.config.HF_DATASETS_CACHE) / "json"
    before = sorted(cache.iterdir()) if cache.is_dir() else []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        write_task_configs(["acip_last_word"], folder)
        spec = importlib.util.spec_from_file_location(f"acip_data_{run}", folder / "acip_data.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        items = module.load("acip_last_word.jsonl")["test"]
        lines = (folder / "acip_last_word.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(items) == len(lines) and items[0] == json.loads(lines[0])
    assert (sorted(cache.iterdir()) if cache.is_dir() else []) == before

"""Zero-shot multiple-choice accuracy through lm-eval's own harness, on an in-memory model.

Two kinds of task names are accepted:
- OFFLINE_TASKS: 4-way tasks built from held-out text (acip_core/evaluation/tasks_build.py), stored as jsonl in
  assets/lm_eval/ with YAML templates and their loader (acip_data.py) beside them; they need no network.
- PAPER_TASKS: the paper's tasks (piqa, hellaswag, ...; 0-shot, metric acc) from lm-eval's own task
  folders; their datasets come from the Hugging Face hub, so they need the internet (or a local
  datasets cache with HF_DATASETS_OFFLINE=1). Offline they fail at once with a clear message.

The model is any transformers causal LM module, e.g. AnySizeModel.materialize(size); it is wrapped in
lm-eval's HFLM as is (no hub access: the tokenizer object is passed too).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from acip_core.evaluation.evaluate import Cancelled
from acip_core.evaluation.tasks_build import ASSET_DIR, TASK_SPECS
from acip_core.sources.models import datasets_offline, hub_reachable

log = logging.getLogger(__name__)

OFFLINE_TASKS = list(TASK_SPECS)  # acip_next_sentence, acip_last_word, and their *_domain variants
# the paper's zero-shot tasks -> lm-eval's folder that defines each, and its hub dataset
PAPER_TASKS = {
    "piqa": ("piqa", "baber/piqa"),
    "hellaswag": ("hellaswag", "Rowan/hellaswag"),
    "winogrande": ("winogrande", "allenai/winogrande"),
    "arc_challenge": ("arc", "allenai/ai2_arc"),
    "arc_easy": ("arc", "allenai/ai2_arc"),
    "openbookqa": ("openbookqa", "allenai/openbookqa"),
    "mathqa": ("mathqa", "regisss/math_qa"),
}


class TaskUnavailableError(RuntimeError):
    """A task that cannot run here (its dataset needs the internet), with a message that says why."""


def check_tasks(tasks: list[str]) -> list[str]:
    """The task names, validated (ValueError for an unknown or an empty list)."""
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise ValueError("no task given; choose from " + ", ".join(OFFLINE_TASKS + list(PAPER_TASKS)))
    unknown = [t for t in names if t not in TASK_SPECS and t not in PAPER_TASKS]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}; offline: "
                         f"{', '.join(OFFLINE_TASKS)}; the paper's (need the internet): "
                         f"{', '.join(PAPER_TASKS)}")
    return list(dict.fromkeys(names))




def _unavailable(tasks: list[str], why: str) -> TaskUnavailableError:
    datasets = ", ".join(sorted({PAPER_TASKS[t][1] for t in tasks}))
    return TaskUnavailableError(
        f"{', '.join(tasks)} need(s) the dataset(s) {datasets} from the Hugging Face hub: {why}. "
        f"Run online once (the datasets cache then works with HF_DATASETS_OFFLINE=1), or use the "
        f"offline tasks {', '.join(OFFLINE_TASKS)}")


LOADER = "acip_data.py"  # lm-eval's custom_dataset for our tasks (assets/lm_eval/acip_data.py)


def write_task_configs(tasks: list[str], folder: str | Path) -> None:
    """Writes each offline task's YAML into `folder` with its jsonl and the loader beside it: the YAML
    names its data relative to itself, so the folder works on any machine and wherever it is copied."""
    folder = Path(folder)
    for task in tasks:
        data = ASSET_DIR / f"{task}.jsonl"
        template = ASSET_DIR / f"{task}.yaml"
        if not data.is_file() or not template.is_file():
            raise FileNotFoundError(f"{data} or {template} is missing: run python -m acip_core.evaluation.tasks_build")
        text = template.read_text(encoding="utf-8").replace("@DATA_FILE@", json.dumps(data.name))
        shutil.copyfile(data, folder / data.name)
        (folder / f"{task}.yaml").write_text(text, encoding="utf-8")
    if tasks:
        shutil.copyfile(ASSET_DIR / LOADER, folder / LOADER)


def _counter(lm, on_progress):
    """Counts the requests lm-eval hands to `lm.loglikelihood` and the rows each forward scores:
    on_progress(rows, requests) after every forward (None: nothing to count)."""
    if on_progress is None:
        return None
    seen = dict(requests=0, rows=0)
    loglikelihood = lm.loglikelihood

    def counted(requests, *args, **kwargs):
        seen["requests"] += len(requests)
        return loglikelihood(requests, *args, **kwargs)

    lm.loglikelihood = counted

    def count(ids):
        seen["rows"] = min(seen["rows"] + (ids.shape[0] if ids is not None else 0), seen["requests"])
        on_progress(seen["rows"], seen["requests"])
    return count


def _stop_hook(should_stop, count=None):
    def hook(module, args, kwargs):
        if should_stop():
            raise Cancelled("lm-eval evaluation cancelled")
        if count is not None:
            count(args[0] if args else kwargs.get("input_ids"))
    return hook


def _wrap(HFLM, model, tokenizer, batch_size):
    """HFLM over the model as it is. HFLM calls model.tie_weights(); a materialized size is tied already
    (a tied head shares the embedding's tensor, or under +emb8 its int8 QWeight, which has no `weight`
    parameter for transformers to tie: it raised AttributeError), so the call is skipped here."""
    model.tie_weights = lambda *args, **kwargs: None  # an instance attribute, removed right after
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=int(batch_size))
    finally:
        del model.tie_weights


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 16,
                should_stop=None, on_progress=None) -> dict:
    """Zero-shot accuracy of an in-memory causal LM on lm-eval tasks.

    Args:
        model: a transformers causal LM module (on its device, in its dtype), e.g. a materialized size.
        tokenizer: its tokenizer object.
        tasks: names from OFFLINE_TASKS or PAPER_TASKS.
        limit: at most this many items per task (the first ones; the offline items are shuffled).
        should_stop: a callable; when it returns True the evaluation raises Cancelled.
        on_progress: called as on_progress(rows scored, requests) after each forward pass (a
            request is one answer option of one item; a forward scores `batch_size` of them).
    Returns:
        {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, samples}}
    """
    names = check_tasks(tasks)
    paper = [t for t in names if t in PAPER_TASKS]
    if paper and not datasets_offline() and not hub_reachable():
        raise _unavailable(paper, "the hub is not reachable (no internet?)")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    if should_stop is not None and should_stop():
        raise Cancelled("lm-eval evaluation cancelled")

    import lm_eval
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if getattr(tokenizer, "pad_token", None) is None:  # HFLM would set one on the caller's object
        tokenizer = copy.deepcopy(tokenizer)
    hook = None
    with tempfile.TemporaryDirectory(prefix="acip-lmeval-") as folder:
        write_task_configs([t for t in names if t in TASK_SPECS], folder)
        task_root = Path(lm_eval.__file__).parent / "tasks"
        include = [folder] + sorted({str(task_root / PAPER_TASKS[t][0]) for t in paper})
        # only our folder and the paper tasks' folders: indexing all of lm-eval's tasks takes ~15 s
        manager = TaskManager(include_path=include, include_defaults=False)
        try:
            loaded = manager.load(names)
        except ConnectionError as err:  # a hub dataset, offline and not in the local cache
            raise _unavailable(paper or names, f"{str(err).splitlines()[0][:200]}") from None
        except Exception as err:
            if paper and "offline" in str(err).lower():
                raise _unavailable(paper, f"{str(err).splitlines()[0][:200]}") from None
            raise
        for task in loaded["tasks"].values():  # what simple_evaluate does: 0-shot unless a YAML says
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)
        lm = _wrap(HFLM, model, tokenizer, batch_size)
        if should_stop is not None or on_progress is not None:
            hook = model.register_forward_pre_hook(_stop_hook(should_stop or (lambda: False),
                                                              _counter(lm, on_progress)), with_kwargs=True)
        start = time.perf_counter()
        try:
            # evaluate(), not simple_evaluate(): the latter also collects environment info
            # (pip, nvidia-smi, git: seconds) and asks the hub for the model's sha
            results = evaluate(lm=lm, task_dict=loaded, limit=limit,
                               bootstrap_iters=1000, log_samples=False)
        finally:
            if hook is not None:
                hook.remove()
    seconds = time.perf_counter() - start
    out = {}
    for task in names:
        r = results["results"][task]
        out[task] = dict(acc=r["acc,none"], acc_stderr=r.get("acc_stderr,none"),
                         acc_norm=r.get("acc_norm,none"), acc_norm_stderr=r.get("acc_norm_stderr,none"),
                         samples=results["n-samples"][task]["effective"])
    log.info("lm-eval %s in %.1f s", ", ".join(names), seconds)
    return out

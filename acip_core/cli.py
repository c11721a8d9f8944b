"""`python -m acip_core <command>`: score, size, eval, generate. `--json` prints one JSON object."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import fields

from acip_core.sources.data import DEFAULT_DATA
from acip_core.training.score import ScoreConfig
from acip_core.training.train import OBJECTIVES
from acip_core.evaluation.selftext import HELD_OUT_DOMAIN

COMMANDS = {}


def command(fn):
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


def _emit(args, result: dict, text: str) -> None:
    print(json.dumps(result) if args.json else text)


def _format_args(p, default="float32"):
    from acip_core.formats.registry import FORMAT_NAMES, FAMILIES, EMBEDDING_CHOICES, LAYOUTS, parse_format

    groups = sorted({g for f in FAMILIES.values() for g in f.group_sizes})

    def key(text: str) -> str:  # a family name or a full key (formats/registry.py, the key grammar)
        try:
            parse_format(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    p.add_argument("--format", default=default, type=key, metavar="KEY",
                   help=f"how the weights are stored: {', '.join(FORMAT_NAMES)}, or a full key such as "
                        "int4-g32+fast or int8+emb8 (the options below, in one word); "
                        "default float32, or a tuned size's own format")
    p.add_argument("--group-size", type=int, default=None, choices=groups,
                   help="int4 only: group length along the input axis (default 32, chosen by measurement)")
    p.add_argument("--embeddings", default=None, choices=EMBEDDING_CHOICES,
                   help="quantized formats: int8 quantizes the embedding / LM head too (+emb8; default: "
                        "the compute dtype)")
    p.add_argument("--layout", default=None, choices=LAYOUTS,
                   help="quantized formats: small (fewest bytes, the default) or fast (+fast: a layer "
                        "factorized only where two kernel calls beat one: never slower than the original, "
                        "more bytes)")


def _format(args):
    """The Format of --format (a key) and its option flags, or None when --format was not given."""
    from acip_core.formats.registry import parse_format

    if args.format is None:
        if args.layout == "fast":
            raise ValueError("only the quantized formats have a fast layout: give --format int8 or --format int4")
        return None
    grouped = bool(parse_format(args.format).family.group_sizes)  # --group-size means nothing to the others
    return parse_format(args.format, args.group_size if grouped else None, args.embeddings, args.layout)


def _windows(text: str) -> int:
    """--eval-windows: a count ≥ 0 (a negative one failed only after the whole run, at its curve)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of windows >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a whole number of windows >= 0, got {text!r}")
    return value


def _size_args(p, budget=True, format_default=None):
    p.add_argument("--artifact", required=True, help="artifact folder (e.g. precomputed/smollm2-135m-instruct), "
                                                     "or a tuned size's folder (its size is its own)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--size-ratio", "--compression-ratio", dest="size_ratio", type=float,
                       help="kept fraction of the target layers, in [0, 1] (--compression-ratio: the "
                            "official ACIP code's first name for it, the same value)")
    if budget:
        group.add_argument("--budget-gb", type=float, help="memory budget in GB (1e9 bytes) for the weights")
    _format_args(p, format_default)


def _size_dict(size, target) -> dict:
    return dict(target=target, format=size.format.key, size_ratio=round(size.size_ratio, 5), params=size.params,
                bytes=size.nbytes, gb=size.gigabytes, dense_layers=size.dense_layers, layers=len(size.ranks))


@command
def cmd_score(args):
    from acip_core.training.pipeline import run_scoring

    cfg = ScoreConfig(**{f.name: getattr(args, f.name) for f in fields(ScoreConfig)
                         if getattr(args, f.name, None) is not None})

    def on_step(e):
        if not args.json:
            print(f"step {e['step']:5d} {e['phase']:9s} loss {e['loss']:.4f} nll {e['nll']:.4f} "
                  f"λ {e['reg_weight']:.3g} size {e['size_ratio']:.3f} {e['seconds']:.0f}s", flush=True)

    from acip_core.training.distributed import DistContext

    from acip_core.sources.data import load_text

    for option, source in (("--data", args.data), ("--eval-data", args.eval_data)):  # read now, not hours in
        if source is not None:
            try:
                load_text(source)
            except (ValueError, OSError) as err:
                raise ValueError(f"{option} {source!r}: {err}") from None
    dist = DistContext.from_env(fsdp=args.fsdp)  # set up by torchrun / accelerate launch
    if args.fsdp and dist is None:
        logging.getLogger(__name__).warning("--fsdp needs more than one process (torchrun / accelerate launch); running unsharded")
    if dist is None and not args.force:  # a run that cannot fit is refused before it loads anything
        from acip_core.training.plan import check_fits, plan_for_config

        check_fits(plan_for_config(args.model, cfg, args.basis, targets=_targets(args.targets)))
    try:
        artifact = run_scoring(args.model, args.data, args.out, args.basis, cfg, args.resume,
                               on_step if dist is None or dist.rank == 0 else None,
                               eval_data=args.eval_data, eval_windows=args.eval_windows, dist=dist,
                               targets=_targets(args.targets))
    finally:
        if dist:
            dist.close()
    if dist is None or dist.rank == 0:
        meta = artifact.meta
        _emit(args, dict(out=args.out, result=meta.result.to_json(), targets=list(meta.targets),
                         target_layers=len(meta.layers)),
              f"wrote {args.out}: {json.dumps(meta.result.to_json())}\ntargets ({meta.targets_chosen_by or '?'}): "
              f"{len(meta.layers)} layers named {','.join(meta.targets)}")


def _targets(value: str | None):
    """--targets a,b,c as names (None: discover the targets)."""
    names = [t.strip() for t in (value or "").split(",") if t.strip()]
    return names or None


@command
def cmd_plan(args):
    from acip_core.sources.models import pick_device
    from acip_core.training.plan import plan_scoring

    plan = plan_scoring(args.model, args.batch_size, args.seq_len, args.base_format, fsdp=args.fsdp,
                        device=args.device or pick_device().type, precision=args.precision, lora_rank=args.lora_rank, basis=args.basis,
                        probe=not args.no_probe, objective=args.objective, targets=_targets(args.targets))
    _emit(args, plan.to_dict(), plan.table())


@command
def cmd_size(args):
    from acip_core.artifacts.open import open_folder
    from acip_core.evaluation.curve import best_for_budget

    if args.budget_gb is not None and args.format is None:  # the best (size, format) by the measured curve
        opened = open_folder(args.artifact)
        if opened.tuned is not None:
            raise ValueError(f"{args.artifact} is a tuned size with its own size; leave out --budget-gb")
        model = opened.any_size
        pick = best_for_budget(model, opened.artifact.curve, args.budget_gb, args.eval_set)
        size = pick["size"]
        result = dict(_size_dict(size, args.budget_gb), **{k: v for k, v in pick.items() if k != "size"})
    else:  # no --format: float32, or a tuned size's own format (open_sized)
        model, size = _open_method_size(args)
        result = _size_dict(size, args.size_ratio if args.size_ratio is not None else args.budget_gb)
    if args.budget_gb is not None:
        result["budget_left_gb"] = args.budget_gb - size.gigabytes
    if getattr(model, "size_rule", None) == "official":  # their ratio (size_ratio) and what is held
        result.update(size_rule="official", materialized_ratio=round(model.materialized_ratio(size), 5))
    _emit(args, result, "\n".join(f"{k}: {v}" for k, v in result.items()))


def _open_method_size(args):
    """The model of --method and its size for --size-ratio / --budget-gb (or a tuned size's own)."""
    from acip_core.evaluation.baselines import open_sized

    return open_sized(args.artifact, args.size_ratio, getattr(args, "budget_gb", None), _format(args),
                      getattr(args, "method", "acip"))


@command
def cmd_import_acip(args):
    from acip_core.artifacts.artifact import load_artifact
    from acip_core.artifacts.official import import_official

    def on_progress(stage, done, total):
        if not args.json and (done == total or done % 50 == 0):
            print(f"{stage}: {done} / {total} layers", file=sys.stderr, flush=True)

    artifact = import_official(args.source, args.out, args.base, on_progress)
    artifact = load_artifact(args.out)  # as every later command reads it (checksums verified)
    official = artifact.meta.official
    ours = {p.name: p.stat().st_size for p in sorted(artifact.path.iterdir()) if p.is_file()}
    result = dict(out=str(args.out), source=args.source, storage=official.storage,
                  base=artifact.meta.model.source, layers=len(artifact.scores),
                  lora=artifact.meta.lora.to_json(), size_rule=artifact.size_rule,
                  checkpoint_bytes=sum(official.bytes.values()), artifact_bytes=sum(ours.values()))
    _emit(args, result, f"wrote {args.out} from {args.source} ({official.storage} storage, "
                        f"{len(artifact.scores)} layers, base {result['base']}): "
                        f"{result['checkpoint_bytes'] / 1e6:.1f} MB of theirs -> {result['artifact_bytes'] / 1e6:.1f} MB; "
                        f"next: python -m acip_core curve --artifact {args.out}")


@command
def cmd_eval(args):
    from acip_core.sources.data import load_text, token_windows
    from acip_core.evaluation.evaluate import perplexity

    model, size = _open_method_size(args)
    windows = token_windows(model.tokenizer, load_text(args.data), args.seq_len, args.max_windows)
    result = perplexity(model.materialize(size, size.format), windows, args.batch_size)
    result.update(method=args.method, size_ratio=round(size.size_ratio, 5), params=size.params, data=args.data)
    _emit(args, result, f"{args.method}: perplexity {result['perplexity']:.3f} on {result['tokens']} tokens "
                        f"({result['windows']} windows, nll std {result['nll_std']:.3f}) in "
                        f"{result['seconds']:.1f} s at size {size.size_ratio:.4f}")


@command
def cmd_generate(args):
    from acip_core.evaluation.evaluate import generate_text

    model, size = _open_method_size(args)
    text = generate_text(model.materialize(size, size.format), model.tokenizer, args.prompt,
                         args.max_new_tokens, chat=not args.no_chat)
    _emit(args, dict(size_ratio=round(size.size_ratio, 5), prompt=args.prompt, text=text), text)


@command
def cmd_size_latency(args):
    """Median time of size_for_ratio + materialize for random ratios (in-process)."""
    import random

    from acip_core.artifacts.open import open_artifact

    model = open_artifact(args.artifact)
    rng, times = random.Random(0), []
    for _ in range(args.n):
        r = rng.uniform(0.3, 1.0)
        start = time.perf_counter()
        model.materialize(model.size_for_ratio(r, _format(args)), _format(args))
        times.append(time.perf_counter() - start)
    result = dict(n=args.n, median_ms=1e3 * statistics.median(times), max_ms=1e3 * max(times))
    _emit(args, result, f"size + materialize: median {result['median_ms']:.1f} ms over {args.n}")


@command
def cmd_self_text(args):
    from pathlib import Path

    from acip_core.artifacts.artifact import atomic_write_bytes
    from acip_core.sources.models import load_base
    from acip_core.evaluation.selftext import sample_text

    out = Path(args.out).expanduser()  # checked before minutes of sampling, not after
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"--out {args.out}: name a file in an existing folder")
    model, tokenizer = load_base(args.model, torch_dtype(args.dtype))
    text = sample_text(model, tokenizer, args.prompts, args.max_new_tokens, args.batch_size, args.seed,
                       drop=args.drop)
    atomic_write_bytes(args.out, text.encode())
    _emit(args, dict(out=args.out, characters=len(text)), f"wrote {len(text)} characters to {args.out}")


@command
def cmd_curve(args):
    import pandas as pd

    from acip_core.artifacts.artifact import load_artifact, write_curve
    from acip_core.evaluation.baselines import METHODS
    from acip_core.evaluation.baselines import method_curve
    from acip_core.evaluation.curve import curve_frame
    from acip_core.sources.data import load_text, token_windows
    from acip_core.formats.registry import parse_format
    from acip_core.sources.models import load_base

    # every option checked before anything is loaded or any row dropped (an empty plan rewrote the
    # curve with the original's row alone)
    methods = METHODS if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown or methods}; choose from all, {', '.join(METHODS)}")
    sizes = _size_grid(args.sizes)
    formats = [parse_format(f.strip()) for f in args.formats.split(",") if f.strip()]
    pairs = [(f, m) for f in formats for m in methods if m == "acip" or not f.quantized]
    if not pairs:
        raise ValueError("nothing to measure: the baselines are measured in float formats only "
                         "(quantization is ACIP's second axis); add acip or a float format")
    for spec in args.eval:
        name, eq, source = spec.partition("=")
        if not (name.strip() and eq and source.strip()):
            raise ValueError(f"--eval takes NAME=SOURCE (e.g. heldout=corpus:heldout), got {spec!r}")
    artifact = load_artifact(args.artifact)
    _, tokenizer = load_base(artifact.meta.model.source)  # (the tokenizer only: the methods open the folder)
    evals = {}
    for spec in args.eval:
        name, _, source = spec.partition("=")
        evals[name] = token_windows(tokenizer, load_text(source), args.seq_len, args.windows)
    calib = token_windows(tokenizer, load_text("corpus:train"), 128, 4)  # block-removal order: small, like IteRABRe
    remeasured = list(methods) + (["original"] if "acip" in methods else [])  # acip's rows bring the original's
    frames = [] if args.replace or artifact.curve is None else [curve_frame(artifact.curve)]
    if frames:  # only the (method, format) pairs measured now are replaced
        old = frames[0]
        keep = ~(old.method.isin(remeasured) & old.format.isin([f.key for f in formats]))
        frames = [old[keep]]
    for format, method in pairs:  # baselines in float formats only: quantization is ACIP's second axis
        start = time.perf_counter()
        frames.append(method_curve(args.artifact, method, evals, sizes, format, args.batch_size, calib))
        print(f"{method} {format.key}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        curve = pd.concat(frames, ignore_index=True)
        curve.attrs = {}
        write_curve(args.artifact, curve)  # after every line: an interrupted run keeps what it measured
    _emit(args, dict(rows=len(curve), methods=list(methods)), curve.to_string())


def _size_grid(text: str) -> list[float]:
    """--sizes LO:HI:STEP as sizes in [0, 1], smallest first (a ValueError that says what is wrong)."""
    try:
        lo, hi, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--sizes takes LO:HI:STEP, e.g. 0.30:1.00:0.05; got {text!r}") from None
    if not (0 <= lo <= hi <= 1 and step > 0):
        raise ValueError(f"--sizes {text!r}: need 0 <= LO <= HI <= 1 and STEP > 0")
    count = round((hi - lo) / step) + 1
    if count > 1000:
        raise ValueError(f"--sizes {text!r}: {count} sizes; at most 1000")
    return [round(lo + i * step, 4) for i in range(count)]


def _curve_of(folder):
    """The artifact's measured curve, for an export's card (a tuned size's folder has none of its own)."""
    from acip_core.artifacts.artifact import load_artifact
    from acip_core.artifacts.tuned import is_tuned

    return None if is_tuned(folder) else load_artifact(folder).curve


@command
def cmd_export(args):
    from pathlib import Path

    from acip_core.export.card import card_from_curve
    from acip_core.export.folder import saved_params
    from acip_core.export.sized import export_dense, export_lowrank

    if args.any_size:
        return _export_any_size(args)
    if args.dtype is not None or args.curve_png is not None or args.formats is not None:
        raise ValueError("--dtype, --formats and --curve-png belong to --any-size (one size takes --format)")
    model, size = _open_method_size(args)
    export = export_dense if args.dense else export_lowrank
    curve = _curve_of(args.artifact)
    card = dict(card_from_curve(curve, size.size_ratio, size.format.key),
                artifact=Path(args.artifact).name)  # measured quality: the artifact's curve
    out = export(model, size, args.out, size.format, card=card)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    result = dict(out=str(out), kind="dense" if args.dense else "lowrank", format=size.format.key,
                  size_ratio=round(size.size_ratio, 5), params=saved_params(out), runtime_params=size.params,
                  bytes_claimed=size.nbytes, files=files)
    load = "" if args.dense else ", trust_remote_code=True"
    _emit(args, result, f"wrote {out} ({sum(files.values()) / 1e6:.1f} MB, size {size.size_ratio:.4f}); "
                        f"load with AutoModelForCausalLM.from_pretrained({str(out)!r}{load})")


def _export_any_size(args):
    from pathlib import Path

    from acip_core.export.anysize import export_anysize, folder_bytes
    from acip_core.artifacts.open import open_folder
    from acip_core.artifacts.tuned import is_tuned

    if args.dense or args.size_ratio is not None or args.format is not None:
        raise ValueError("--any-size holds every size and format: drop --dense, --size-ratio and --format")
    if is_tuned(args.artifact):
        raise ValueError("a tuned size is one size: export it without --any-size")
    opened = open_folder(args.artifact)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats is not None else None
    if formats == []:
        raise ValueError("--formats: name at least one format key")
    out = export_anysize(opened.any_size, args.out, args.dtype or "float32", curve=opened.artifact.curve,
                         card=dict(artifact=Path(args.artifact).name), curve_png=args.curve_png, formats=formats)
    on_disk = folder_bytes(out)
    info = json.loads((out / "acip_export.json").read_text())
    result = dict(out=str(out), kind="anysize", dtype=info["dtype"], formats=info["formats"],
                  weights_bytes=on_disk["weights"], folder_bytes=on_disk["total"],
                  original_float32_bytes=info["original_float32_bytes"],
                  official_layout_bytes=info["official_layout_bytes"], files=on_disk["files"])
    _emit(args, result, f"wrote {out} ({on_disk['total'] / 1e6:.1f} MB; the original in float32: "
                        f"{info['original_float32_bytes'] / 1e6:.1f} MB); load with AutoModelForCausalLM."
                        f"from_pretrained({str(out)!r}, trust_remote_code=True, size_ratio=0.6, format='int4')")


@command
def cmd_push(args):
    from acip_core.export.push import push_folder

    url = push_folder(args.folder, args.repo_id, args.token, args.private)
    _emit(args, dict(url=url, repo_id=args.repo_id, private=args.private), f"uploaded {args.folder} to {url}")


@command
def cmd_bench(args):
    from acip_core.evaluation.bench import compare_speed

    model, size = _open_method_size(args)
    format = size.format  # --format, or float32, or a tuned size's own
    result = compare_speed(model, size.size_ratio, format, args.prompt_tokens,
                           args.new_tokens, args.rounds)
    lines = [f"size {result['size_ratio']:.3f} vs original, {format.key}, {result['threads']} threads, batch 1:",
             f"  decode  {result['decode_tok_s_compressed']:8.1f} vs {result['decode_tok_s_original']:8.1f} tok/s"
             f"  = {result['decode_speedup']:.2f}x",
             f"  prefill {result['prefill_tok_s_compressed']:8.1f} vs {result['prefill_tok_s_original']:8.1f} tok/s"
             f"  = {result['prefill_speedup']:.2f}x"]
    if "decode_tok_s_original_float32" in result:  # float32 itself has no separate float32 original
        lines.append(f"  decode vs the float32 original ({result['decode_tok_s_original_float32']:.1f} tok/s)"
                     f" = {result['decode_speedup_vs_float32']:.2f}x")
    _emit(args, result, "\n".join(lines))


@command
def cmd_finetune(args):
    from acip_core.training.distributed import DistContext
    from acip_core.training.finetune import FinetuneConfig, run_finetune

    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)
                            if f.name != "format" and getattr(args, f.name, None) is not None},
                         format=_format(args).key)
    clock = []  # (time, step) of this process's first step: the ETA leaves out loading and warm-up

    def on_step(e):
        if not clock:
            clock.append((time.perf_counter(), e["step"]))
        t0, s0 = clock[0]
        done = e["step"] - s0
        eta = f"{(time.perf_counter() - t0) / done * (cfg.steps - e['step']):.0f}s" if done else "-"
        if not args.json:
            print(f"step {e['step']:5d}/{cfg.steps} loss {e['loss']:.4f} nll {e['nll']:.4f}"
                  + (f" kd {e['kd']:.4f}" if "kd" in e else "") + f" {e['seconds']:.0f}s eta {eta}",
                  flush=True)

    dist = DistContext.from_env(cpu=True)  # set up by torchrun / accelerate launch; fine-tuning runs on the CPU
    try:
        tuned = run_finetune(args.artifact, args.size_ratio, args.data, args.out, cfg, args.resume,
                             on_step if dist is None or dist.rank == 0 else None,
                             eval_windows=args.eval_windows, dist=dist)
    finally:
        if dist:
            dist.close()
    if tuned is not None:
        m = tuned.meta
        lines = [f"wrote {args.out}: size {m.size.size_ratio:.4f} in {m.format}, {m.finetune['objective']}, "
                 f"{m.result['steps']} steps in {m.result['seconds']:.0f} s, peak RSS "
                 f"{m.result['peak_rss_mib']} MiB"]
        lines += [f"  {name}: perplexity {f['untuned']['perplexity']:.2f} untuned -> {f['tuned']['perplexity']:.2f} tuned"
                  for name, f in m.perplexity.items()]
        _emit(args, dict(out=args.out, size=m.size.to_json(), result=m.result, perplexity=m.perplexity),
              "\n".join(lines))


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@command
def cmd_lm_eval(args):
    from acip_core.evaluation.lmeval import check_tasks, run_lm_eval

    tasks = check_tasks(args.tasks.split(","))  # a bad name fails before the model loads
    model, size = _open_method_size(args)
    start = time.perf_counter()
    scores = run_lm_eval(model.materialize(size, size.format), model.tokenizer, tasks, args.limit,
                         args.batch_size)
    result = dict(method=args.method, size_ratio=round(size.size_ratio, 5), params=size.params, limit=args.limit,
                  tasks=scores, seconds=time.perf_counter() - start)
    _emit(args, result, "\n".join(_task_line(t, r) for t, r in scores.items())
          + f"\nat size {size.size_ratio:.4f} in {result['seconds']:.1f} s")


def _task_line(task: str, r: dict) -> str:
    """One task's accuracy in words; a task without acc_norm (winogrande) or a stderr says so."""
    def value(key):
        return "n/a" if r.get(key) is None else f"{r[key]:.4f}"
    return f"{task}: acc {value('acc')} ± {value('acc_stderr')}, acc_norm {value('acc_norm')} ({r['samples']} items)"


@command
def cmd_lm_eval_tasks(args):
    from pathlib import Path

    from acip_core.evaluation.lmeval import OFFLINE_TASKS, write_task_configs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_task_configs(OFFLINE_TASKS, out)
    run = f"lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True --include_path {out} " \
          f"--tasks {','.join(OFFLINE_TASKS)}"
    _emit(args, dict(out=str(out), tasks=OFFLINE_TASKS, run=run),
          f"wrote {len(OFFLINE_TASKS)} task files to {out}; run them with lm-eval's own CLI:\n  {run}")


def build_parser() -> argparse.ArgumentParser:
    from acip_core.evaluation.baselines import METHODS
    from acip_core.engine.basis import BASIS_KINDS
    from acip_core.sources.models import EMBEDDED

    parser = argparse.ArgumentParser(prog="python -m acip_core", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="run ACIP scoring and write an artifact")
    p.add_argument("--model", default=EMBEDDED, help=f"{EMBEDDED}, a local directory, a local .gguf file, or a hub id")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"{DEFAULT_DATA}, a text file, or hf:NAME[:CONFIG][:SPLIT]")
    p.add_argument("--out", required=True, help="output folder of the artifact")
    p.add_argument("--basis", default="whitened", choices=BASIS_KINDS)
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun/accelerate: shard the frozen tensors across processes (FSDP) "
                        "instead of holding the whole model on each (also: accelerate launch --use_fsdp)")
    p.add_argument("--force", action="store_true",
                   help="start even when the memory plan (python -m acip_core plan) says it cannot fit")
    p.add_argument("--eval-data", default="corpus:heldout", help="text for the artifact's quick curve")
    p.add_argument("--eval-windows", type=_windows, default=8, help="256-token windows for that curve (0: none)")
    p.add_argument("--targets", default=None,
                   help="comma-separated layer names to compress (leaf names like q_proj,o_proj or FQN "
                        "suffixes like mlp.c_proj); default: every linear projection of the decoder blocks")
    from acip_core.formats.registry import FAMILIES

    quantized = ", ".join(n for n, f in FAMILIES.items() if f.quantized)  # int4 takes -g32|-g64|-g128
    defaults = ScoreConfig()
    notes = dict(objective="lm (next-token NLL) | kd (distil the original) | lm+kd",
                 base_format=f"{quantized} (a format key): score on quantized frozen factors (less memory); "
                             "the score map and adapters then apply to the full-precision model")
    for f in fields(ScoreConfig):
        note = notes.get(f.name)
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)), default=None,
                       help=(note + "; " if note else "") + f"default {getattr(defaults, f.name)}")

    p = sub.add_parser("plan", help="memory (and step time) a scoring run needs, from the model's config alone")
    p.add_argument("--model", default=EMBEDDED,
                   help=f"{EMBEDDED}, a local directory, a local .gguf file (its header), or a hub id (config.json only)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch (rows)")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--base-format", default="float32", help=f"float32 or a quantized format key ({quantized})")
    p.add_argument("--fsdp", type=int, default=1, help="N: per process of a run sharded over N processes")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: this machine's")
    p.add_argument("--precision", default=defaults.precision, choices=["auto", "bf16", "fp32"])
    p.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    p.add_argument("--basis", default="whitened", choices=BASIS_KINDS)
    p.add_argument("--no-probe", action="store_true", help="no timed matrix product (no step-time estimate)")
    p.add_argument("--objective", default=defaults.objective, choices=list(OBJECTIVES),
                   help="kd / lm+kd hold the teacher's logits through a step")
    p.add_argument("--targets", default=None, help="as score's --targets (default: every linear projection)")

    from acip_core.training.finetune import FinetuneConfig

    p = sub.add_parser("finetune", help="fine-tune one size (LoRA, factors frozen) into a tuned size")
    p.add_argument("--artifact", required=True, help="the artifact whose size is tuned")
    p.add_argument("--size-ratio", "--compression-ratio", dest="size_ratio", type=float, required=True,
                   help="the size, in (0, 1)")
    p.add_argument("--data", default=DEFAULT_DATA, help="training text (never an evaluation set)")
    p.add_argument("--out", required=True, help="output folder of the tuned size")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--eval-windows", type=_windows, default=32,
                   help="256-token windows of corpus:heldout and corpus:domain measured untuned and tuned")
    _format_args(p)  # the frozen size's format: int8 / int4 train a LoRA over quantized factors
    ft_defaults = FinetuneConfig()
    for f in fields(FinetuneConfig):
        if f.name == "format":
            continue
        kw = dict(choices=OBJECTIVES) if f.name == "objective" else {}
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(ft_defaults, f.name)), default=None,
                       help=f"default {getattr(ft_defaults, f.name)}", **kw)

    p = sub.add_parser("size", help="the size for a ratio or a memory budget")
    _size_args(p, format_default=None)
    p.add_argument("--eval-set", default="heldout",
                   help="with --budget-gb and no --format: the curve's eval set that ranks the candidates")
    p = sub.add_parser("import-acip", help="convert an official ACIP checkpoint (hub or folder) into an artifact")
    p.add_argument("--from", dest="source", required=True,
                   help="a hub id like MerantixMomentum/acip_llama31_8b, or the checkpoint's folder")
    p.add_argument("--out", required=True, help="output folder of the artifact")
    p.add_argument("--base", default=None, help="the base model (folder or hub id) instead of the one "
                                                "the checkpoint's config names")
    p = sub.add_parser("eval", help="perplexity of one size on a text")
    _size_args(p, budget=True)
    p.add_argument("--data", default="corpus:heldout")
    p.add_argument("--method", default="acip", choices=METHODS)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p = sub.add_parser("generate", help="greedy generation at one size")
    _size_args(p, budget=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-chat", action="store_true", help="plain continuation, no chat template")
    p = sub.add_parser("size-latency", help="median time to choose and materialize a new size")
    p.add_argument("--artifact", required=True)
    p.add_argument("--n", type=int, default=100)
    _format_args(p)
    p = sub.add_parser("curve", help="measure every method at every size; writes the artifact's curve.csv")
    p.add_argument("--artifact", required=True)
    p.add_argument("--methods", default="all", help="all, or a comma list of acip,svd-magnitude,...")
    p.add_argument("--sizes", default="0.30:1.00:0.05", help="LO:HI:STEP")
    p.add_argument("--eval", action="append", default=None,
                   help="NAME=SOURCE, repeatable (default heldout=corpus:heldout, domain=corpus:domain)")
    p.add_argument("--windows", type=int, default=32, help="windows per eval set")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--formats", default="bfloat16",
                   help="comma list of format keys (float32,bfloat16,int8,int4-g32,int8+emb8,...); "
                        "baselines are measured in the float ones only")
    p.add_argument("--replace", action="store_true", help="drop the other methods' rows")

    p = sub.add_parser("bench", help="decode/prefill tokens/s of a size vs the original, one process")
    p.add_argument("--artifact", required=True, help="artifact folder, or a tuned size's folder")
    p.add_argument("--size-ratio", "--compression-ratio", dest="size_ratio", type=float,
                   help="not needed for a tuned size")
    _format_args(p, None)  # None: float32, or a tuned size's own format
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)

    p = sub.add_parser("self-text", help="sample calibration text from the model itself")
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--drop", default=HELD_OUT_DOMAIN,
                   help="leave out paragraphs matching this regex (default: about/in Python, the held-out domain)")
    p = sub.add_parser("lm-eval", help="zero-shot accuracy of one size on lm-eval tasks")
    _size_args(p, budget=True)
    p.add_argument("--tasks", default="acip_next_sentence,acip_last_word",
                   help="comma-separated: acip_next_sentence, acip_last_word (+ _domain; offline) or "
                        "the paper's piqa, hellaswag, winogrande, arc_challenge, arc_easy, openbookqa, "
                        "mathqa (need the internet)")
    p.add_argument("--method", default="acip", choices=METHODS)
    p.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    p.add_argument("--batch-size", type=int, default=16)
    p = sub.add_parser("lm-eval-tasks", help="write the offline tasks as YAMLs lm-eval's own CLI runs as they are")
    p.add_argument("--out", required=True, help="folder for the task files (then lm_eval --include_path OUT)")
    p = sub.add_parser("export", help="write one size as a Hugging Face model folder")
    p.add_argument("--artifact", required=True, help="artifact folder, or a tuned size's folder (its LoRA merged)")
    p.add_argument("--size-ratio", "--compression-ratio", dest="size_ratio", type=float,
                   help="kept fraction of the target layers, in [0, 1] (not needed for a tuned size)")
    p.add_argument("--out", required=True, help="output folder (new, empty, or a previous export)")
    p.add_argument("--dense", action="store_true",
                   help="multiply the factors out: a plain base-architecture folder (no remote code, full size)")
    p.add_argument("--any-size", action="store_true",
                   help="every size and format in one folder: choose with from_pretrained(..., size_ratio=, "
                        "format=) or model.set_size(...) after loading")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="--any-size: the stored weights (bfloat16: half the bytes, no float32 sizes)")
    p.add_argument("--formats", default=None,
                   help="--any-size: comma list of the format keys it holds (default: each of float32, bfloat16, "
                        "int8, float8, int4-g32 the weights allow, but float8 in a bfloat16 folder only when "
                        "named: there it stores its codes)")
    p.add_argument("--curve-png", default=None, help="--any-size: a plot of the curve for the model card")
    _format_args(p, None)  # None: float32, or a tuned size's own format
    p = sub.add_parser("push", help="upload an export folder to the Hugging Face hub")
    p.add_argument("folder", help="an export folder (python -m acip_core export ...)")
    p.add_argument("--repo-id", required=True, help="user/name (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="a write token (default: HF_TOKEN)")
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def _quiet_progress_bars() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "eval", "x") is None:
        args.eval = ["heldout=corpus:heldout", "domain=corpus:domain"]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.json:  # one JSON object and nothing else: no loading/saving progress bars on stderr either
        _quiet_progress_bars()
    try:
        COMMANDS[args.command](args)
    except (ValueError, OSError, RuntimeError, ArithmeticError) as err:  # OSError: FileExistsError, IsADirectoryError, ...
        # ArithmeticError: a loss that turned NaN (train.train_loop's FloatingPointError)
        if args.json:
            print(json.dumps({"error": str(err)}))
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

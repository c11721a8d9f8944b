"""The tables of benchmarks/RESULTS.md, generated from the results in benchmarks/results/.

    python -m benchmarks tables           # rewrite every table between its markers
    python -m benchmarks tables --check   # exit 1 when a table differs from its result file

A table NAME sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; `TABLES` says which
result file and which rendering make it. A figure in a generated table is the result file's, rounded
as the table shows it: to change a figure, run its benchmark (`--json`), then this."""

from __future__ import annotations

import argparse
import re
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from common import BENCHMARKS, ROOT, read_result

RESULTS_MD = BENCHMARKS / "RESULTS.md"
# the superseded figures kept in docs/HISTORY.md come from result files too
DOCUMENTS = (RESULTS_MD, ROOT / "docs" / "HISTORY.md")


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _head(*names) -> list[str]:
    return [_row(*names), "|" + "---|" * len(names)]


def _seconds(x: float) -> str:
    """Seconds as the latency tables show them: 2 decimals below 10 s, 1 from there."""
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def _half_up(x: float, digits: int) -> str:
    """`x` rounded half up as written in its result file (app_latency.json holds figures already rounded
    to 2 digits: 4.85 s is shown 4.9 s, as the table showed it before it was generated)."""
    return str(Decimal(str(x)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def figures(name: str):
    return read_result(name)["figures"]


# ---- speed of a size against the original (benchmarks/speed.py) ----

_SPEED_TARGETS = {("float32", 0.5): "decode ≥ 1.5× (missed), prefill ≥ 1× (met)",
                  ("float32", 0.7): "decode ≥ 1.2× (missed)",
                  ("float32", 0.9): "never slower (met, at parity)",
                  ("bfloat16", 0.5): "decode missed, prefill ≥ 1× (met this run)",
                  ("bfloat16", 0.7): "missed", ("bfloat16", 0.9): "missed"}


def speed() -> list[str]:
    out = _head("dtype", "size", "params", "decode tok/s (size vs original)", "decode ratio", "prefill tok/s",
                "prefill ratio", "target")
    for r in figures("speed")["decode"]:
        size = round(r["size_ratio"], 1)
        out.append(_row(r["dtype"], size, f"{r['params_compressed'] / 1e6:.1f} M",
                        f"{r['decode_tok_s_compressed']:.1f} vs {r['decode_tok_s_original']:.1f}",
                        f"**{r['decode_speedup']:.2f}×**",
                        f"{r['prefill_tok_s_compressed']:.0f} vs {r['prefill_tok_s_original']:.0f}",
                        f"{r['prefill_speedup']:.2f}×", _SPEED_TARGETS.get((r["dtype"], size), "")))
    return out


def speed_engine() -> list[str]:
    f = figures("speed")
    ppl, step = f["ppl_eval_tokens_per_s"], f["scoring_step"]
    return _head("what", "figure") + [
        _row("perplexity evaluation at 0.5 against the original (fp32, tokens/s)",
             f"{ppl['size_0.5']:.0f} vs {ppl['original']:.0f} = **{ppl['ratio']:.2f}×**"),
        _row("a new size (threshold search + materialize), median of 100 random ratios",
             f"**{f['any_size_median_ms']:.1f} ms**"),
        _row("threshold search on a LLaMA-7B-shaped score map, per query / one-time sort",
             f"**{f['llama7b_threshold_median_ms']:.2f} ms** / {f['llama7b_sort_once_ms']:.0f} ms"),
        _row(f"a scoring step ({step['batch']} × {step['seq_len']} tokens, bf16 autocast), ACIP vs a plain LoRA",
             f"{step['acip_step_s']:.2f} s vs {step['lora_step_s']:.2f} s = **{step['acip_over_lora']:.2f}×**"),
    ]


# ---- the engine (benchmarks/engine_numbers.py) ----

def engine() -> list[str]:
    f = figures("engine_numbers")
    same = "same"
    return _head("what", "figure", "command") + [
        _row("SmolLM2 first load: GGUF → cached safetensors, fresh cache, new process (interpreter + imports "
             "included)", f"{f['load_cold_s']:.1f} s", "`python benchmarks/engine_numbers.py`"),
        _row("SmolLM2 cached load, new process (interpreter + imports included)", f"{f['load_cached_s']:.1f} s", same),
        _row("SmolLM2 cached load in a process that has not imported transformers yet / has",
             f"{f['load_cached_in_process_first_s']:.2f} s / **{f['load_cached_in_process_s']:.2f} s**", same),
        _row("opening the shipped artifact (model + cached basis + checks + merged factors)",
             f"{f['open_artifact_s']:.2f} s", same),
        _row("`size` for a new ratio: threshold search alone, median of 100 random ratios",
             f"**{f['size_search_median_ms_float32']:.2f} ms**", same),
        _row("`size` + materialize, median of 100 random ratios, fp32 / bf16",
             f"**{f['size_and_materialize_median_ms_float32']:.1f} ms** / "
             f"{f['size_and_materialize_median_ms_bfloat16']:.1f} ms", same),
        _row("threshold search on a LLaMA-7B-shaped map (224 layers, 917,504 entries), per query / one-time sort",
             f"{f['llama7b_threshold_median_ms']:.2f} ms / {f['llama7b_sort_once_ms']:.0f} ms", same),
    ]


# ---- the app from outside (benchmarks/app_latency.py) ----

def app_latency() -> list[str]:
    f = figures("app_latency")
    out = _head("what", "figure") + [
        _row("cold start, caches filled (process start → the page's `/start` answered: model loaded, views drawn)",
             f"**{_half_up(f['cold_start_s'], 1)} s** (server up after {_half_up(f['server_up_s'], 1)} s)"),
        _row("warm start (a new browser session on the running app)", f"**{f['warm_start_s']:.2f} s**"),
        _row("slider release → new summary, layer table, heatmap and curve marker (`/size`, median / max of 10)",
             f"**{f['size_release_median_s']:.2f} s** / {f['size_release_max_s']:.2f} s")]
    for c in f["chat"]:
        out.append(_row(f"chat at {c['size_ratio']:.2f}: first token / tokens per second",
                        f"{c['first_token_s']:.2f} s / {c['tokens_per_s']:.1f} tok/s"))
    return out


# ---- concurrent users of the app (benchmarks/load_test.py) ----

def load_test() -> list[str]:
    f = figures("load_test")
    s = f["settings"]
    labels = dict(start="start (page load)", size="size (slider)", budget="budget",
                  chat=f"chat ({s['max_new_tokens']} tokens)", chat_pair="chat side by side",
                  perplexity=f"perplexity ({s['ppl_windows']} windows)", export="export")
    out = _head("kind", "requests", "errors", "mismatches with the lone user", "p50", "p95", "max")
    for kind, k in f["per_kind"].items():
        out.append(_row(labels.get(kind, kind), k["requests"], k["errors"], k["mismatches"], _seconds(k["p50_s"]),
                        _seconds(k["p95_s"]), _seconds(k["max_s"])))
    return out


# ---- concurrent requests, with and without the compute gate (benchmarks/concurrency.py) ----

def concurrency() -> list[str]:
    out = _head("gate", "chats", "beside perplexity", "aggregate tok/s", "per chat tok/s", "perplexity job s")
    for r in figures("concurrency")["rows"]:
        out.append(_row("one pass at a time" if r["slots"] == 1 else "none", r["chats"],
                        f"{r['ppl_windows']} windows" if r["ppl_windows"] else "—", r["aggregate_tok_s"],
                        ", ".join(str(x) for x in r["per_chat_tok_s"]),
                        "—" if r["ppl_seconds"] is None else r["ppl_seconds"]))
    return out


# ---- against llama.cpp (benchmarks/llamacpp_speed.py) ----

def llamacpp_speed() -> list[str]:
    rows = figures("llamacpp_speed")["rows"]
    base = rows["app float32 original"]["decode_tok_s"]
    out = _head("runner", "decode tok/s", "prefill tok/s", "decode vs the app's float32 original")
    for name, r in rows.items():
        out.append(_row(name, f"{r['decode_tok_s']:.1f}", f"{r['prefill_tok_s']:.0f}",
                        f"{r['decode_tok_s'] / base:.2f}×"))
    return out


# ---- a decode step's own overheads, off and on (benchmarks/decode_overhead.py) ----

def decode_overhead() -> list[str]:
    out = _head("format", "model", "prompt tokens", "decode tok/s: transformers' SDPA, QWeight.matmul",
                "decode attention, bound kernels", "×")
    for r in figures("decode_overhead")["rows"]:
        out.append(_row(r["format"], r["size"], r["prompt_tokens"], f"{r['decode_tok_s_before']:.1f}",
                        f"{r['decode_tok_s_after']:.1f}", f"{r['speedup']:.2f}"))
    return out


# ---- formats: decode speed (benchmarks/format_speed.py) ----

def _format_speed(name: str, *, new_size=False, originals=False) -> list[str]:
    cols = ["format", "size", "GB", "decode tok/s"]
    cols += ["same-format original"] if originals else []
    cols += ["× same-format original", "× float32 original"]
    cols += ["float32 original"] if originals else []
    cols += ["a new size"] if new_size else []
    out = _head(*cols)
    for r in figures(name)["rows"]:
        cells = [r["format"], round(r["size_ratio"], 1), f"{r['gb_compressed']:.3f}",
                 f"{r['decode_tok_s_compressed']:.1f}"]
        cells += [f"{r['decode_tok_s_original']:.1f}"] if originals else []
        cells += [f"{r['decode_speedup']:.2f}", f"{r['decode_speedup_vs_float32']:.2f}"]
        cells += [f"{r['decode_tok_s_original_float32']:.1f}"] if originals else []
        cells += [f"{r['new_size_median_ms']:.1f} ms"] if new_size else []
        out.append(_row(*cells))
    return out


# ---- lm-eval sweeps (benchmarks/lmeval_sweep.sh; the rendering is benchmarks/lmeval_table.py's) ----

def lmeval_sweep() -> list[str]:
    from lmeval_table import table

    return table(figures("lmeval_sweep"))


TABLES = {
    "speed": speed,
    "speed_engine": speed_engine,
    "engine": engine,
    "app_latency": app_latency,
    "load_test": load_test,
    "concurrency": concurrency,
    "llamacpp_speed": llamacpp_speed,
    "decode_overhead": decode_overhead,
    "format_speed": lambda: _format_speed("format_speed"),
    "format_speed_avx512": lambda: _format_speed("format_speed_avx512", new_size=True),
    "format_speed_avx512_int8": lambda: _format_speed("format_speed_avx512_int8", new_size=True, originals=True),
    "format_speed_layouts": lambda: _format_speed("format_speed_layouts", originals=True),
    "format_speed_fast": lambda: _format_speed("format_speed_fast", originals=True),
    "format_speed_bf16": lambda: _format_speed("format_speed_bf16", originals=True),
    "format_speed_layouts_07": lambda: _format_speed("format_speed_layouts_07", new_size=True, originals=True),
    "lmeval_sweep": lmeval_sweep,
}

# the result file of a table whose name is not its file's
TABLE_SOURCES = {"speed_engine": "speed", "engine": "engine_numbers"}


def source(name: str) -> str:
    """The line under a generated table: where its figures come from, when, on what machine."""
    record = read_result(name)
    if "command" not in record:  # a .jsonl sweep: its lines carry no machine of their own
        return f"<sub>from `benchmarks/results/{name}.jsonl`</sub>"
    m = record["machine"]
    where = m.get("recorded") or f"{m.get('cpu')}, {m.get('cores')} cores"
    flags = f", flags `{m['cpu_flags']}`" if m.get("cpu_flags") else ""
    return (f"<sub>`{record['command']}`, {record['date']}; {where}{flags}, torch {m.get('torch')}, "
            f"{m.get('torch_threads')} threads (`benchmarks/results/{name}.json`)</sub>")


_BLOCK = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table:\2 -->)", re.S)


def regenerate(text: str) -> tuple[str, list[str]]:
    """`text` with every marked table rendered anew, and the names of the tables that changed."""
    changed = []

    def render(m):
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"RESULTS.md marks a table {name!r} that benchmarks/tables.py does not know")
        body = "\n".join(TABLES[name]() + ["", source(TABLE_SOURCES.get(name, name))]) + "\n"
        if body != m.group(3):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return _BLOCK.sub(render, text), changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    parser.add_argument("files", nargs="*", default=[str(p) for p in DOCUMENTS],
                        help="the documents (default: RESULTS.md and docs/HISTORY.md)")
    args = parser.parse_args(argv)
    differ = False
    for path in map(Path, args.files):
        text, changed = regenerate(path.read_text())
        differ = differ or bool(changed)
        if args.check:
            for name in changed:
                print(f"{path}: table {name} differs from benchmarks/results/ (python -m benchmarks tables)")
            continue
        path.write_text(text)
        print(f"{path}: {len(changed)} table(s) rewritten" + (f": {', '.join(changed)}" if changed else ""))
    return 1 if args.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())

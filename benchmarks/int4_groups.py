"""Which int4 group size: perplexity and GB of ACIP sizes with groups of 32 / 64 / 128 (the default is
the one with the best perplexity per byte; 576-wide inputs take groups of 64 when 128 is asked).

    .venv/bin/python benchmarks/int4_groups.py [--sizes 0.5,0.7,1.0] [--windows 16]
"""

import argparse

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.sources.data import load_text, token_windows  # noqa: E402
from acip_core.evaluation.evaluate import perplexity  # noqa: E402
from acip_core.artifacts.open import open_artifact  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    common.add_artifact(p)
    p.add_argument("--sizes", default="0.5,0.7,1.0")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--data", default="corpus:heldout")
    args = p.parse_args()
    model = open_artifact(args.artifact)
    windows = token_windows(model.tokenizer, load_text(args.data), 256, args.windows)
    print(f"| size | format | GB | perplexity ({args.data}, {args.windows} x 256) |\n|---|---|---|---|")
    for r in (float(x) for x in args.sizes.split(",")):
        for key in ("float32", "int4-g32", "int4-g64", "int4-g128"):
            size = model.size_for_ratio(r, key)
            ppl = perplexity(model.materialize(size, key), windows, 4)["perplexity"]
            print(f"| {r:.2f} | {key} | {size.gigabytes:.4f} | {ppl:.3f} |", flush=True)


if __name__ == "__main__":
    main()

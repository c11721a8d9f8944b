"""How the score map prunes: share of singular values pruned per module type and per depth, at a size.

    .venv/bin/python benchmarks/score_map.py [--artifact precomputed/smollm2-135m-instruct] [--size-ratio R]
Needs only the artifact's scores and the layer shapes in acip.json (no model, no basis). Without
--size-ratio: the size the scoring run stopped at.
"""

import argparse
import re
from collections import defaultdict

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.artifacts.artifact import load_artifact  # noqa: E402
from acip_core.engine.prune import RankIndex  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    common.add_artifact(parser)
    parser.add_argument("--size-ratio", type=float, default=None)
    args = parser.parse_args()
    artifact = load_artifact(args.artifact)
    shapes = {n: artifact.shapes[n] for n in artifact.scores}  # [out, in, bias]
    index = RankIndex(artifact.scores, shapes)
    ratio = args.size_ratio or artifact.meta.result.size_ratio_reached
    ranks = index.ranks_at(index.prefix_for_ratio(ratio))
    by_type, by_depth = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    blocks = 1 + max(int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in ranks)
    band = max(1, blocks // 5)
    for n, r in ranks.items():
        block, kind = int(re.search(r"layers\.(\d+)\.", n).group(1)), n.rsplit(".", 1)[-1].replace("_proj", "")
        lo = block // band * band
        for table, key in ((by_type, kind), (by_depth, lo)):
            table[key][0] += shapes[n].full_rank - r
            table[key][1] += shapes[n].full_rank
    print(f"size ratio {index.ratio_at(index.prefix_for_ratio(ratio)):.4f}: share of singular values pruned")
    print("per module type: " + ", ".join(f"{k} {p / t:.2f}" for k, (p, t) in
                                          sorted(by_type.items(), key=lambda kv: -kv[1][0] / kv[1][1])))
    print("per depth: " + ", ".join(f"blocks {lo}–{min(lo + band, blocks) - 1} {p / t:.2f}"
                                    for lo, (p, t) in sorted(by_depth.items())))


if __name__ == "__main__":
    main()

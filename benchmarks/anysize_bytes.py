"""Bytes on disk of any-size folders against the original and the official ACIP hub layout.

    .venv/bin/python -m acip_core export --artifact precomputed/smollm2-135m-instruct --any-size --out out/any-f32
    .venv/bin/python -m acip_core export --artifact precomputed/smollm2-135m-instruct --any-size --dtype bfloat16 --out out/any-bf16
    .venv/bin/python benchmarks/anysize_bytes.py out/any-f32 out/any-bf16 \
        [--original ~/.cache/acip-studio/models/smollm2-135m-instruct/model.safetensors]

Per folder: model.safetensors and the whole folder; the tensor bytes split by kind (float weights of
the compressed layers, their factor rows, int8 and int4 codes + scales, everything else, the index);
the original's safetensors (float32) and the official layout's estimate (acip_export.json: the base
model plus the full-rank factors U, s, Vh of every compressed layer, float32)."""
import argparse
import json
import os
from pathlib import Path

from safetensors import safe_open


def kinds(path: Path, layers: list) -> dict:
    """Tensor bytes by kind (names as export_anysize writes them)."""
    out = {}
    prefixes = tuple(n + "." for n in layers)
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            shape, dtype = sl.get_shape(), sl.get_dtype()
            size = {"F32": 4, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}[dtype]
            n = size
            for d in shape:
                n *= d
            if key.startswith("acip_index."):
                kind = "index"
            elif key.startswith(prefixes):
                leaf = key.rsplit(".", 1)[1]
                kind = ("int4" if "int4" in leaf else "int8" if "int8" in leaf else
                        "factors" if leaf in ("down", "up_t") else "dense weights" if leaf in ("weight", "bias") else leaf)
            else:
                kind = "other (embeddings, norms)"
            out[kind] = out.get(kind, 0) + n
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--original", default=os.path.expanduser("~/.cache/acip-studio/models/smollm2-135m-instruct/model.safetensors"))
    args = parser.parse_args()
    original = os.path.getsize(args.original)
    result = dict(original_file=original)
    print(f"original safetensors ({args.original}): {original / 1e6:.1f} MB")
    for folder in map(Path, args.folders):
        info = json.loads((folder / "acip_export.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        weights = (folder / "model.safetensors").stat().st_size
        total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        split = kinds(folder / "model.safetensors", config["acip_anysize"]["layer_names"])
        official = info["official_layout_bytes"]
        result[str(folder)] = dict(dtype=info["dtype"], weights_file=weights, folder=total, split=split,
                                   official_estimate=official, vs_original=weights / original,
                                   vs_official=weights / official)
        print(f"{folder} ({info['dtype']}): model.safetensors {weights / 1e6:.1f} MB = {weights / original:.2f}x the "
              f"original, {weights / official:.2f}x the official layout ({official / 1e6:.1f} MB); folder {total / 1e6:.1f} MB")
        for k, v in sorted(split.items(), key=lambda kv: -kv[1]):
            print(f"    {k:>28}: {v / 1e6:8.1f} MB  ({v / original:.3f}x the original)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

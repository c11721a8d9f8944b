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
            size = {"F32": 4, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "F8_E4M3": 1}[dtype]
            n = size
            for d in shape:
                n *= d
            if key.startswith("acip_index."):
                kind = "index"
            elif key.startswith(prefixes):
                leaf = key.rsplit(".", 1)[1]
                kind = ("int4" if "int4" in leaf else "int8" if "int8" in leaf else "float8" if "float8" in leaf else
                        "factors" if leaf in ("down", "up_t") else "dense weights" if leaf in ("weight", "bias") else leaf)
            else:
                kind = "other (embeddings, norms)"
            out[kind] = out.get(kind, 0) + n
    return out


def planned(artifact: str) -> dict:
    """The tensor bytes an any-size folder of `artifact` will hold, by kind, from its layers' shapes
    alone (export_anysize.layer_plan; the base's parameter count from the curve's original row)."""
    import types

    import pandas as pd

    from acip_core.export.anysize import FORMATS, ROW_SCALED, layer_plan
    from acip_core.formats.registry import parse_format
    from acip_core.engine.prune import LayerShape

    meta = json.loads((Path(artifact) / "acip.json").read_text())
    curve = pd.read_csv(Path(artifact) / "curve.csv")
    base_params = int(curve[curve.method == "original"].params.iloc[0])
    shapes = {n: LayerShape(*v) for n, v in meta["layers"].items()}
    fake = types.SimpleNamespace(lora_rank=meta["lora"]["rank"], shapes=shapes, targets=list(shapes))
    targets = sum(s.dense_params for s in shapes.values())
    entries = sum(s.full_rank for s in shapes.values())
    out = {}
    folders = {"float32": FORMATS["float32"], "bfloat16": FORMATS["bfloat16"],
               "bfloat16+float8": FORMATS["bfloat16"] + ("float8",)}  # float8 named: its codes stored
    for name, keys in folders.items():
        dtype = name.split("+")[0]
        size = 4 if dtype == "float32" else 2
        formats = [parse_format(f) for f in keys]
        plan = layer_plan(fake, formats, dtype)
        split = {"dense weights": targets * size, "factors": sum(p["rows"] * (p["in"] + p["out"]) for p in plan.values()) * size,
                 "other (embeddings, norms)": (base_params - targets) * size,
                 "index": 4 * entries + 8 * (entries + 1) * (1 + len(formats))}
        for f in formats:
            if not f.quantized:
                continue
            stored = dtype != "float32"
            total = 0
            for p in plan.values():
                r, i, o = p["quant_rows"][f.key], p["in"], p["out"]
                if f.name in ROW_SCALED and not stored:
                    total += f.weight_bytes(o, 0)  # up's scales
                    continue
                total += f.weight_bytes(r, i) + (f.weight_bytes(o, r) if r else 0) + (f.weight_bytes(o, i) if stored else 0)
            split[f.name] = total
        out[name] = dict(split=split, total=sum(split.values()))
    full = sum(s.full_rank * (s.in_features + s.out_features + 1) for s in shapes.values())
    out["official_estimate"] = (base_params + full) * 4
    out["original"] = base_params * 4
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="*")
    parser.add_argument("--plan", default=None, help="an artifact: the bytes its any-size folders will hold, "
                                                      "computed from its shapes (no export)")
    parser.add_argument("--original", default=os.path.expanduser("~/.cache/acip-studio/models/smollm2-135m-instruct/model.safetensors"))
    args = parser.parse_args()
    if args.plan:
        plan = planned(args.plan)
        for dtype in ("float32", "bfloat16", "bfloat16+float8"):
            t = plan[dtype]["total"]
            print(f"{dtype}: {t / 1e6:.1f} MB of tensors = {t / plan['original']:.2f}x the original's float32 params, "
                  f"{t / plan['official_estimate']:.2f}x the official layout ({plan['official_estimate'] / 1e6:.1f} MB)")
            for k, v in sorted(plan[dtype]["split"].items(), key=lambda kv: -kv[1]):
                print(f"    {k:>28}: {v / 1e6:8.1f} MB")
        print(json.dumps(plan))
        return
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

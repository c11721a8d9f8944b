"""The per-call floor of torch's low-bit CPU kernels: time of one product (batch 1, bf16 activations,
weights cold: cycling over ~300 MB of copies) for SmolLM2's factor and layer shapes, against its bytes.
Fitting time ≈ a + bytes / bandwidth gives the floor a; a · bandwidth is what one more call costs in
bytes read — `formats.CALL_BYTES`, the charge of the `fast` layout (benchmarks/RESULTS.md).

    .venv/bin/python benchmarks/call_floor.py      # run alone: it measures memory bandwidth
"""

import time

import torch

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.formats.registry import Format, parse_format  # noqa: E402

SHAPES = [(64, 576), (128, 576), (256, 576), (192, 576), (576, 576), (1536, 576),  # down factors, k/q/gate
          (576, 64), (576, 128), (576, 256), (1536, 256), (576, 1536)]  # up factors, down_proj


def per_call_us(fmt: Format, out: int, k: int) -> float:
    copies = [fmt.pack(torch.randn(out, k)) for _ in range(min(400, max(2, int(300e6 // fmt.weight_bytes(out, k)))))]
    x = torch.randn(1, k, dtype=torch.bfloat16)
    for w in copies[:20]:
        w.matmul(x)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for w in copies:
            w.matmul(x)
        best = min(best, (time.perf_counter() - start) / len(copies))
    return best * 1e6


def main():
    torch.set_num_threads(2)
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx2", "avx512f", "avx512_bf16", "amx"))})
    print(f"CPU flags {' '.join(flags)}, torch {torch.__version__}, 2 threads")
    for key in ("int8", "int4-g32"):
        fmt = parse_format(key)
        points = [(fmt.weight_bytes(o, k), per_call_us(fmt, o, k), o, k) for o, k in SHAPES]
        for nbytes, us, o, k in points:
            print(f"  {key} {o}x{k}: {nbytes / 1e3:.0f} KB {us:.1f} µs")
        xs = torch.tensor([p[0] for p in points], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in points], dtype=torch.float64)
        slope = ((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()
        floor = float(ys.mean() - slope * xs.mean())
        bandwidth = 1 / float(slope) * 1e6  # bytes per second
        print(f"{key}: floor a = {floor:.1f} µs, bandwidth {bandwidth / 1e9:.1f} GB/s, a·bandwidth = {floor * 1e-6 * bandwidth / 1e3:.0f} KB")


if __name__ == "__main__":
    main()

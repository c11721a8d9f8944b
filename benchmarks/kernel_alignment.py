"""Does torch's CPU int8 / int4 weight-only kernel survive a weight that is not 64-byte aligned?
Each probe runs in its own process (a crash is an exit code, not the end of this script): the weight
starts 0, 4, 8, 16 or 24 bytes past a 64-byte boundary (a tensor made from a bytes buffer at that
offset), 1 or 32 rows of bf16 activations; then the same through acip_core's QWeight, which copies
misaligned storage to an aligned one (formats.aligned). Prints one JSON line per probe: the exit
code (-11: SIGSEGV) and the max |difference| to the dequantized product. Reported with the CPU flags.
Run: .venv/bin/python benchmarks/kernel_alignment.py"""
import json
import subprocess
import sys

PROBE = r"""
import sys, torch
from acip_core.formats.int8 import quantize_int8
from acip_core.formats.qweight import QWeight
from acip_core.formats.registry import parse_format
kind, offset, rows, through = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "qweight"
g = torch.Generator().manual_seed(0)
w = torch.randn(256, 512, generator=g)
q = quantize_int8(w) if kind == "int8" else parse_format("int4-g32").pack(w)
def at(t, off):
    n = t.numel() * t.element_size()
    buf = bytearray(n + 128)
    base = torch.frombuffer(buf, dtype=torch.uint8)
    s = (-base.data_ptr()) % 64 + off
    out = base[s:s + n]
    out.copy_(t.contiguous().view(-1).view(torch.uint8))
    out = out.view(t.dtype).view(t.shape)
    out._buf = buf
    return out
data, scales = at(q.data, offset), at(q.scales, offset)
x = torch.randn(rows, 512, generator=g).to(torch.bfloat16)
ref = x.float() @ q.dequantize().t()
if through:
    y = QWeight(kind, data, scales, q.shape, q.group_size, q.q).matmul(x)
elif kind == "int8":
    y = torch.ops.aten._weight_int8pack_mm(x, data, scales)
else:
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, data, q.group_size, scales)[:, :256]
print((y.float() - ref).abs().max().item())
"""

if __name__ == "__main__":
    sys.path.insert(0, ".")
    from acip_core.evaluation.bench import cpu_flags
    import torch

    print(json.dumps(dict(torch=torch.__version__, cpu_flags=cpu_flags(),
                          capability=torch.backends.cpu.get_cpu_capability())))
    for kind in ("int8", "int4"):
        for through in ("kernel", "qweight"):
            for offset in (0, 4, 8, 16, 24):
                for rows in (1, 32):
                    p = subprocess.run([sys.executable, "-c", PROBE, kind, str(offset), str(rows), through],
                                       capture_output=True, text=True, timeout=300, env=None)
                    diff = float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
                    print(json.dumps(dict(kind=kind, via=through, offset=offset, rows=rows,
                                          exit=p.returncode, max_abs_diff=diff,
                                          error=p.stderr.strip().splitlines()[-1][:160] if p.returncode else None)))

"""Every int8/int4 weight torch's CPU kernels read starts on a 64-byte boundary, in the app (QWeight) and
in an export's remote code (modeling_acip.QuantLinear), whatever storage it came from: torch's int8
kernel crashes the process on AVX-512 CPUs when it does not (formats.qweight.ALIGNMENT). This CPU may not
crash, so the tests build deliberately misaligned storage (a tensor made from a bytes buffer at an
offset), assert the alignment of what reaches the kernel (a wrapper that refuses anything else, so a
lapse fails the test instead of crashing it) and that the product from that storage is right."""

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

from acip_core.formats import int4, int8
from acip_core.export.folder import TEMPLATE
from acip_core.formats.qweight import ALIGNMENT, QWeight, aligned
from acip_core.formats.registry import parse_format

OFFSETS = (4, 8, 16, 24)  # bytes past a 64-byte boundary (16 is misaligned too: 64 is what is promised)


def misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of `t` whose data starts `offset` bytes past a 64-byte boundary."""
    nbytes = t.numel() * t.element_size()
    raw = t.contiguous().view(-1).view(torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    buf = bytearray(nbytes + 2 * ALIGNMENT)
    base = torch.frombuffer(buf, dtype=torch.uint8)
    start = (-base.data_ptr()) % ALIGNMENT + offset
    out = base[start:start + nbytes]
    out.copy_(raw)
    out = out.view(t.dtype).view(t.shape)
    assert out.data_ptr() % ALIGNMENT == offset and torch.equal(out, t)
    out._keepalive = buf  # noqa: SLF001  (the bytearray owns the memory)
    return out


def checked(kernel, weight_arg=1, seen=None):
    """`kernel`, refusing (AssertionError) a weight or scales that are not 64-byte aligned."""
    def run(*args):
        for t in (args[weight_arg], args[-1]):
            assert t.data_ptr() % ALIGNMENT == 0, f"a kernel got storage at {t.data_ptr() % ALIGNMENT} mod 64"
        if seen is not None:
            seen.append(args[weight_arg].data_ptr())
        return kernel(*args)
    return run


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bfloat16])
def test_aligned_copies_misaligned_storage_and_keeps_aligned_storage(offset, dtype):
    t = torch.randint(0, 100, (48, 64)).to(dtype)
    bad = misaligned(t, offset)
    good = aligned(bad)
    assert good.data_ptr() % ALIGNMENT == 0 and good.is_contiguous() and torch.equal(good, t)
    assert aligned(good) is good  # no copy when nothing is wrong


def _int8_weight(rows=64, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return int8.quantize_int8(torch.randn(rows, k, generator=g), torch.bfloat16)


@pytest.mark.parametrize("offset", OFFSETS)
def test_qweight_int8_from_misaligned_storage_reaches_the_kernel_aligned(monkeypatch, offset):
    seen = []
    monkeypatch.setattr(int8, "_INT8_CPU", checked(int8._INT8_CPU, seen=seen))
    ref = _int8_weight()
    q = QWeight("int8", misaligned(ref.data, offset), misaligned(ref.scales, offset), ref.shape)
    assert q.data.data_ptr() % ALIGNMENT == 0 and q.scales.data_ptr() % ALIGNMENT == 0
    x = torch.randn(32, 64).to(torch.bfloat16)  # >= 16 rows: the product that crashed
    y = q.matmul(x)
    assert seen
    torch.testing.assert_close(y.float(), (x.float() @ ref.dequantize().t()), atol=0.05, rtol=0.02)
    for part in (q.rows(32), q.cols(32)):  # a size's prefixes stay aligned
        assert part.data.data_ptr() % ALIGNMENT == 0 and part.scales.data_ptr() % ALIGNMENT == 0


@pytest.mark.parametrize("offset", OFFSETS)
def test_qweight_int4_from_misaligned_storage_reaches_the_kernel_aligned(monkeypatch, offset):
    seen = []
    monkeypatch.setattr(int4, "_INT4_CPU", checked(int4._INT4_CPU, seen=seen))
    fmt = parse_format("int4-g32")
    ref = fmt.pack(torch.randn(64, 128, generator=torch.Generator().manual_seed(1)))
    q = QWeight("int4", misaligned(ref.data, offset), misaligned(ref.scales, offset), ref.shape,
                ref.group_size, ref.q)
    assert q.data.data_ptr() % ALIGNMENT == 0
    x = torch.randn(32, 128).to(torch.bfloat16)
    y = q.matmul(x)
    assert seen
    torch.testing.assert_close(y.float(), (x.float() @ ref.dequantize().t()), atol=0.05, rtol=0.02)
    for part in (q.rows(32), q.cols(64)):
        assert part.data.data_ptr() % ALIGNMENT == 0 and part.scales.data_ptr() % ALIGNMENT == 0


@pytest.fixture(scope="module")
def template():
    spec = importlib.util.spec_from_file_location("acip_template_under_test", TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_export_quant_linear_aligns_loaded_buffers_before_the_kernel(template, monkeypatch, offset, kind):
    """As from_pretrained may leave them: buffers at any offset into the file, and a row-prefix view."""
    seen = []
    monkeypatch.setattr(template, "_INT8_MM", checked(template._INT8_MM, seen=seen))
    monkeypatch.setattr(template, "_INT4_MM", checked(template._INT4_MM, seen=seen))
    layer = template.QuantLinear(128, 64, {"kind": kind, "group_size": 32})
    if kind == "int8":
        ref = _int8_weight(64, 128)
        qweight, scales = ref.data, ref.scales
    else:
        ref = parse_format("int4-g32").pack(torch.randn(64, 128, generator=torch.Generator().manual_seed(2)))
        portable = ref.portable()
        qweight, scales = portable["qweight"], portable["scales"]
    layer.qweight, layer.scales = misaligned(qweight, offset), misaligned(scales, offset)
    x = torch.randn(32, 128).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert seen and layer.qweight.data_ptr() % ALIGNMENT == 0 and layer.scales.data_ptr() % ALIGNMENT == 0
    torch.testing.assert_close(y.float(), x.float() @ ref.dequantize().t(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(layer.dequantize(), ref.dequantize()[:, :128].to(layer.dequantize().dtype))


def test_a_quantized_export_runs_full_logits_from_its_loaded_files_in_a_fresh_process(tiny_llama_wide, tmp_path):
    """int4-g32+emb8 (the export that crashed: its head's codes started 24 bytes into a boundary) and
    int8, loaded by from_pretrained in a fresh process (a crash there cannot take the test run down),
    then a full-logits forward of 32 rows: every buffer a kernel read is aligned and the logits are the app's."""
    import json

    from acip_core.export.sized import export_lowrank
    from helpers import random_any_size, random_ids

    any_size = random_any_size(tiny_llama_wide)[0]
    ids = random_ids(len(any_size.tokenizer), (1, 32), seed=5)
    cases = {}
    for key in ("int4-g32+emb8", "int8"):
        size = any_size.size_for_ratio(0.5, parse_format(key))
        with torch.no_grad():
            app = any_size.materialize(size, key)(ids).logits.float()
        folder = export_lowrank(any_size, size, tmp_path / key.replace("+", "_"))
        torch.save(app, folder.parent / f"{folder.name}.pt")
        cases[str(folder)] = str(folder.parent / f"{folder.name}.pt")
    code = textwrap.dedent("""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        ids = torch.tensor(json.loads(sys.argv[2]))
        for folder, ref in json.loads(sys.argv[1]).items():
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
            layers = [m for m in model.modules() if type(m).__name__ == "QuantLinear"]
            with torch.no_grad():
                logits = model(ids).logits.float()
            bad = [m.qweight.data_ptr() % 64 for m in layers if m.qweight.data_ptr() % 64 or m.scales.data_ptr() % 64]
            print(json.dumps(dict(layers=len(layers), misaligned=bad,
                                  diff=(logits - torch.load(ref)).abs().max().item())))
    """)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cases), json.dumps(ids.tolist())],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    for line in proc.stdout.strip().splitlines()[-2:]:
        result = json.loads(line)
        assert result["layers"] > 0 and result["misaligned"] == [] and result["diff"] == 0.0, result

"""A local .gguf as --model: converted once to a cached safetensors folder keyed by the file."""

import os
import shutil

import pytest
import torch

from acip_core import models
from acip_core.models import EMBEDDED, ModelSourceError, embedded_gguf, gguf_key, load_base
from acip_core.parametrize import target_linears


@pytest.mark.embedded
def test_the_embedded_gguf_given_as_a_path_loads_as_the_embedded_model(tmp_path, monkeypatch):
    reference, _ = load_base(EMBEDDED)
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight")
    want = {n: reference.get_parameter(n).detach().clone() for n in names}
    del reference
    gguf = tmp_path / "copy" / "smol.gguf"  # a copy elsewhere: any path, not the wheel's
    gguf.parent.mkdir()
    shutil.copyfile(embedded_gguf(), gguf)
    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))
    model, tok = load_base(str(gguf))
    assert type(model).__name__ == "LlamaForCausalLM" and len(target_linears(model)) == 210
    for n in names:
        assert torch.equal(model.get_parameter(n), want[n])
    assert tok("Debian").input_ids
    folder = tmp_path / "cache" / "models" / gguf_key(gguf)
    assert (folder / "model.safetensors").is_file() and not list(folder.parent.glob("*.tmp"))

    def no_conversion(*a):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    load_base(str(gguf))  # the cache is used
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewritten file is another model
    assert gguf_key(gguf) != folder.name
    with pytest.raises(AssertionError, match="converted again"):
        load_base(str(gguf))


def test_a_file_that_is_no_gguf_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSourceError, match="broken.gguf: transformers cannot read this GGUF"):
        load_base(str(bad))
    assert not list((tmp_path / "cache" / "models").glob("*"))  # nothing half-written stays
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="is a file; give a model directory, a .gguf file"):
        load_base(str(other))

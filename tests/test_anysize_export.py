"""The any-size folder (export_anysize.py): every size and format from one folder, as the app runs them."""

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from acip_core import cli
from acip_core.export import push
from acip_core.evaluation.curve import best_for_budget, best_in_format
from acip_core.export.anysize import export_anysize, layer_plan
from acip_core.formats.registry import parse_format
from helpers import random_any_size, random_ids

SIZES, FORMATS = (0.5, 0.8, 1.0), ("float32", "bfloat16", "int8", "float8", "int4-g32")
OTHER_USER = "acip-anysize-test"
# the interpreter of the fresh process: this one, or one another user can run where this one lives under
# a private home (e.g. a script that sets PYTHONHOME and PYTHONPATH for a copy of it, then execs it)
PYTHON = os.environ.get("ACIP_TEST_PYTHON", sys.executable)


def _curve(any_size) -> pd.DataFrame:
    """A measured-looking curve: each format worse than the one before it, 0.9 better than 1.0 in
    float32 (a curve need not be monotone), one window count for all, with a spread that makes close
    sizes ties (the budget rule then takes the larger) and leaves far ones apart."""
    rows = [dict(method="original", format="float32", size_ratio=1.0, ppl_heldout=10.0, windows=16)]
    for i, key in enumerate(FORMATS):
        for r in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
            ppl = 10.0 * (1 + 2 * (1 - r) ** 2) * (1 + 0.05 * i) + (0.5 if key == "float32" and r == 1.0 else 0)
            size = any_size.size_for_ratio(r, key)
            rows.append(dict(method="acip", format=key, size_ratio=round(size.size_ratio, 5), ppl_heldout=ppl,
                             nll_std_heldout=0.2 + 0.3 * r, gb=size.gigabytes, windows=16))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def wide(tiny_llama_wide):
    """The wide tiny Llama (int4 layers factorize) with random scores and LoRA: its sizes really differ."""
    any_size = random_any_size(tiny_llama_wide)[0]
    return any_size, _curve(any_size)


@pytest.fixture(scope="module")
def folder(wide, tmp_path_factory):
    any_size, curve = wide
    return export_anysize(any_size, tmp_path_factory.mktemp("anysize") / "f32", curve=curve,
                          card=dict(artifact="tiny"))


def _greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, repetition_penalty=1.0, pad_token_id=0)


CHILD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    folder, out, sizes, formats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    ids = torch.load(out + "/ids.pt")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True,
                                                 size_ratio=0.6, format="int4").eval()
    result = {"loaded_at": dict(model.acip_size, ranks=None)}
    for fmt in formats:
        for r in sizes:
            info = model.set_size(r, fmt)
            with torch.no_grad():
                logits = model(ids).logits.float()
                tokens = model.generate(ids[:1, :8], attention_mask=torch.ones_like(ids[:1, :8]), max_new_tokens=8,
                                        min_new_tokens=8, do_sample=False, repetition_penalty=1.0, pad_token_id=0)
            result[f"{fmt}@{r}"] = dict(logits=logits, tokens=tokens, ranks=info["ranks"], dense=info["dense_layers"],
                                        bytes=info["bytes"])
    torch.save(result, out + "/result.pt")
""")


def _as_other_user() -> list:
    """runuser into a system user of its own where this process may create one (root) and that user can
    run this interpreter (not where it lives under a private home, e.g. pyenv in /root); else []."""
    if os.geteuid() != 0 or not shutil.which("runuser") or not shutil.which("useradd"):
        return []
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
                       check=True, capture_output=True)
    prefix = ["runuser", "-u", OTHER_USER, "--"]
    probe = subprocess.run([*prefix, PYTHON, "-c", "import torch, transformers"], capture_output=True, cwd="/",
                           env=dict(os.environ, PYTHONPATH=""))
    return prefix if probe.returncode == 0 else []


def test_every_size_and_format_from_one_folder_in_a_fresh_process(wide, folder):
    """Three sizes x four formats: the folder, loaded in a fresh process (as another unix user where the
    test may create one, from a copy only that user owns), gives the app's logits and greedy tokens."""
    any_size, _ = wide
    prefix = _as_other_user()
    work = Path(tempfile.mkdtemp(prefix="anysize-"))
    try:
        copy = work / "model"
        shutil.copytree(folder, copy)
        ids = random_ids(len(any_size.tokenizer))
        torch.save(ids, work / "ids.pt")
        env = dict(os.environ, HF_HOME=str(work / "hf"), HOME=str(work), HF_HUB_OFFLINE="1", PYTHONPATH="")
        if prefix:
            uid = pwd.getpwnam(OTHER_USER).pw_uid
            for path in [work, *work.rglob("*")]:
                os.chown(path, uid, -1)
            os.chmod(work, 0o700)  # nobody else's: the other user reads its own copy
        proc = subprocess.run([*prefix, PYTHON, "-c", CHILD, str(copy), str(work), json.dumps(SIZES),
                               json.dumps(FORMATS)], capture_output=True, text=True, timeout=600, env=env,
                              cwd=str(work))
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = torch.load(work / "result.pt")
        if prefix:  # the other user wrote it
            assert (work / "result.pt").stat().st_uid == pwd.getpwnam(OTHER_USER).pw_uid
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert result["loaded_at"]["format"] == "int4-g32"
    assert result["loaded_at"]["size_ratio"] == pytest.approx(any_size.size_for_ratio(0.6).size_ratio)
    for fmt in FORMATS:
        got = {r: result[f"{fmt}@{r}"] for r in SIZES}
        for r in SIZES:
            size = any_size.size_for_ratio(r, fmt)
            app = any_size.materialize(size, fmt)
            with torch.no_grad():
                want = app(ids).logits.float()
            assert got[r]["ranks"] == size.ranks and got[r]["dense"] == size.dense_layers
            assert got[r]["bytes"] == size.nbytes
            assert torch.equal(got[r]["logits"], want), (fmt, r, (got[r]["logits"] - want).abs().max())
            assert torch.equal(got[r]["tokens"], _greedy(app, ids[:1, :8])), (fmt, r)
        # the sizes really differ: more layers factorized and fewer bytes at 0.5 than at 0.8
        assert got[0.5]["dense"] < len(any_size.targets) and got[0.5]["ranks"] != got[0.8]["ranks"]
        assert got[0.5]["bytes"] < got[0.8]["bytes"] < got[1.0]["bytes"]
        assert not torch.equal(got[0.5]["logits"], got[0.8]["logits"])


def test_set_size_by_budget_is_the_apps_answer(wide, folder):
    any_size, curve = wide
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True).eval()
    assert model.acip_size["size_ratio"] == 1.0 and model.acip_size["format"] == "float32"
    full = any_size.full_size().gigabytes
    smallest = min(any_size.size_at(0, f).gigabytes for f in FORMATS)
    budgets = [smallest * 1.05] + [full * x for x in (0.3, 0.38, 0.45, 0.55, 0.62, 0.7, 0.85, 1.0, 1.5)]
    noiseless = curve.drop(columns=["nll_std_heldout"])
    differs = 0  # budgets where the noise rule answers otherwise than the lowest perplexity alone
    for budget in budgets:
        try:
            want = best_for_budget(any_size, curve, budget, formats=list(FORMATS))
            plain = best_for_budget(any_size, noiseless, budget, formats=list(FORMATS))
            differs += (plain["format"], plain["size"].prefix) != (want["format"], want["size"].prefix)
        except ValueError as err:  # e.g. no measured size fits: the same refusal
            with pytest.raises(ValueError, match=str(err).split(" GB ")[1][:20]):
                model.set_size(budget_gb=budget)
            want = None
        if want is None:
            continue
        got = model.set_size(budget_gb=budget)
        assert (got["format"], got["prefix"]) == (want["format"], want["size"].prefix), budget
        assert got["gb"] <= budget and got["perplexity"] == pytest.approx(want["perplexity"])
        for key in FORMATS:  # one format named: that format's answer
            try:
                want = best_in_format(any_size, curve[curve.method == "acip"], budget, key)
            except ValueError:
                with pytest.raises(ValueError, match="smaller than the smallest"):
                    model.set_size(budget_gb=budget, format=key)
                continue
            got = model.set_size(budget_gb=budget, format=key)
            assert (got["format"], got["prefix"]) == (key, want["size"].prefix)
    assert differs, "the test curve's spread should decide some budget"
    # the model runs the size it reports
    ids = random_ids(len(any_size.tokenizer))
    info = model.set_size(budget_gb=full * 0.45)
    with torch.no_grad():
        want = any_size.materialize(any_size.size_at(info["prefix"], info["format"]), info["format"])(ids).logits
        assert torch.equal(model(ids).logits, want)
    with pytest.raises(ValueError, match="smaller than the smallest"):
        model.set_size(budget_gb=smallest * 0.5)
    with pytest.raises(ValueError, match="positive"):
        model.set_size(budget_gb=-1)
    with pytest.raises(ValueError, match="one of size_ratio or budget_gb"):
        model.set_size(0.5, budget_gb=1.0)
    with pytest.raises(ValueError, match="not in this folder"):
        model.set_size(0.5, format="float16")
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        model.set_size(1.5)


def test_bytes_stay_below_twice_the_original_and_the_official_layout(wide, folder):
    any_size, _ = wide
    info = json.loads((folder / "acip_export.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    plan = config["acip_anysize"]["layers"]
    from safetensors import safe_open

    floats = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.dtype == torch.float32:
                floats += t.numel() * 4
    # factor rows only up to each layer's crossover: the float part is below twice the original
    assert floats < 2 * info["original_float32_bytes"]
    assert info["tensor_bytes"] < info["official_layout_bytes"]
    for n, p in plan.items():
        sh = any_size.shapes[n]
        assert p["rows"] * (sh.in_features + sh.out_features) <= sh.in_features * sh.out_features + \
            16 * (sh.in_features + sh.out_features)  # int8's rank step may read up to 15 rows past it
    assert layer_plan(any_size, [parse_format(f) for f in FORMATS], "float32") == plan
    card = (folder / "README.md").read_text()
    assert "download once, choose the size later" in card and "set_size(budget_gb=" in card
    assert "## Budgets" in card and "| 0.50 |" in card and "license: other" in card
    assert "license_link: LICENSE" in card and "licence applies" in (folder / "LICENSE").read_text()


def test_a_known_licence_is_named_by_its_id_in_the_any_size_card(wide, monkeypatch):
    from acip_core.export import card
    from acip_core.export.card import anysize_card, license_text
    from acip_core.export.folder import public_name

    any_size, curve = wide
    monkeypatch.setattr(card, "LICENSES", {public_name(any_size): ("apache-2.0", "Apache License, Version 2.0",
                                                                   "https://www.apache.org/licenses/LICENSE-2.0")})
    info = dict(tensor_bytes=1, original_float32_bytes=2, official_layout_bytes=3, dtype="float32", created="now")
    text = anysize_card(any_size, info, [parse_format("float32")], None, {}, False)
    front = text.split("---")[1]
    assert "license: apache-2.0\n" in front and "license_link: LICENSE" in front and "(" not in front
    assert "Apache License, Version 2.0" in text and "SPDX-License-Identifier: Apache-2.0" in license_text(any_size)


def test_a_bfloat16_folder_holds_half_and_gives_the_apps_numbers(wide, tmp_path):
    any_size, curve = wide
    plain = json.loads((export_anysize(any_size, tmp_path / "plain", "bfloat16") / "acip_export.json").read_text())
    assert plain["formats"] == ["bfloat16", "int8", "int4-g32"]  # float8's stored codes only when named
    assert plain["tensor_bytes"] < plain["original_float32_bytes"] * 1.6
    out = export_anysize(any_size, tmp_path / "bf16", "bfloat16", curve=curve,
                         formats=["bfloat16", "int8", "float8", "int4-g32"])
    info = json.loads((out / "acip_export.json").read_text())
    assert plain["tensor_bytes"] < info["tensor_bytes"] < plain["tensor_bytes"] * 1.3
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, local_files_only=True,
                                                 size_ratio=0.5, format="bfloat16").eval()
    ids = random_ids(len(any_size.tokenizer))
    for fmt in info["formats"]:
        for r in (0.5, 0.8):
            model.set_size(r, fmt)
            with torch.no_grad():
                want = any_size.materialize(any_size.size_for_ratio(r, fmt), fmt)(ids).logits
                assert torch.equal(model(ids).logits, want), (fmt, r)
    with pytest.raises(ValueError, match="float32"):
        model.set_size(0.5, "float32")
    with pytest.raises(ValueError, match="float32 weights"):
        export_anysize(any_size, tmp_path / "bad", "bfloat16", formats=["float32"])


class _FakeApi:
    calls = []

    def __init__(self, **kwargs):
        self.calls.append(("HfApi", kwargs))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", dict(kwargs, repo_id=repo_id)))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


def test_push_creates_the_repo_and_uploads_the_folder(folder, monkeypatch):
    """The upload path without a network: HfApi replaced by a recorder, so the exact calls are checked
    (a local stand-in for the hub's commit and LFS protocol would test a mock of our own making)."""
    monkeypatch.setattr(push, "HfApi", _FakeApi)
    monkeypatch.setattr(push, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    _FakeApi.calls = []
    url = push.push_folder(folder, "someone/tiny-anysize", private=True)
    assert url == "https://hub.example/someone/tiny-anysize"
    assert [c[0] for c in _FakeApi.calls] == ["HfApi", "create_repo", "upload_folder"]
    assert _FakeApi.calls[1][1] == dict(repo_id="someone/tiny-anysize", token="hf_env_token", private=True,
                                        repo_type="model", exist_ok=True)
    upload = _FakeApi.calls[2][1]
    assert upload["folder_path"] == str(folder) and upload["repo_id"] == "someone/tiny-anysize"
    assert upload["repo_type"] == "model" and upload["token"] == "hf_env_token"
    _FakeApi.calls = []  # --token wins over HF_TOKEN; the CLI passes it through
    assert cli.main(["push", str(folder), "--repo-id", "someone/x", "--token", "hf_cli"]) == 0
    assert _FakeApi.calls[1][1]["token"] == "hf_cli" and _FakeApi.calls[1][1]["private"] is False

    _FakeApi.calls = []
    with pytest.raises(ValueError, match="user/name"):
        push.push_folder(folder, "no-slash")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="token"):
        push.push_folder(folder, "someone/x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        push.push_folder(folder, "someone/x", token="t")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(push, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(RuntimeError, match="cannot be reached"):
        push.push_folder(folder, "someone/x", token="t")
    assert _FakeApi.calls == []  # offline: nothing was attempted
    with pytest.raises(FileNotFoundError):
        push.push_folder(folder / "nope", "someone/x", token="t")


def test_cli_any_size_refuses_one_size_options(tmp_path, capsys):
    assert cli.main(["export", "--artifact", str(tmp_path), "--any-size", "--size-ratio", "0.5",
                     "--out", str(tmp_path / "o")]) == 2
    assert "--any-size holds every size" in capsys.readouterr().err
    assert cli.main(["export", "--artifact", str(tmp_path), "--size-ratio", "0.5", "--dtype", "bfloat16",
                     "--out", str(tmp_path / "o")]) == 2
    assert cli.main(["export", "--artifact", str(tmp_path), "--size-ratio", "0.5", "--formats", "int8",
                     "--out", str(tmp_path / "o")]) == 2
    assert "--formats" in capsys.readouterr().err


def test_cli_any_size_holds_the_formats_named(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["export", "--artifact", str(tiny_artifact), "--any-size", "--dtype", "bfloat16",
                     "--formats", "float8, int8", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["formats"] == ["float8", "int8"]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, local_files_only=True,
                                                 size_ratio=0.7).eval()
    assert model.acip_size["format"] == "float8"  # the first named is the default
    assert cli.main(["export", "--artifact", str(tiny_artifact), "--any-size", "--formats", "int8+emb8",
                     "--out", str(tmp_path / "bad")]) == 2
    assert "plain formats" in capsys.readouterr().err


def test_the_apps_export_tab_writes_an_any_size_zip(tiny_artifact, tmp_path):
    """The Export tab's "any size" choice: a zip whose folder loads at any size with the app's numbers."""
    import zipfile

    import app_handlers
    from acip_core.serving.studio import Studio, StudioConfig

    studio = Studio(StudioConfig(default_artifact=str(tiny_artifact), precomputed=tmp_path / "precomputed",
                                 runs=tmp_path / "runs", artifact_dirs=[str(tiny_artifact)],
                                 downloads=tmp_path / "downloads"))
    h = app_handlers.Handlers(studio)
    assert app_handlers.ANY_SIZE_KIND in app_handlers.EXPORT_KINDS
    message, zip_path = h.export(str(tiny_artifact), 0.6, app_handlers.ANY_SIZE_KIND, "bfloat16", [],
                                 progress=lambda *a, **k: None)
    assert "every size" in message and "set_size" in message
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path / "unzipped")
    (folder,) = [p for p in (tmp_path / "unzipped").iterdir() if p.is_dir()]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True,
                                                 size_ratio=0.7, format="int8").eval()
    ex = h.explorer(str(tiny_artifact))
    ids = random_ids(len(ex.tokenizer))
    size = ex.any_size.size_for_ratio(0.7, "int8")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ex.any_size.materialize(size, "int8")(ids).logits)


def test_the_apps_share_button_uploads_an_export_locally_only(tiny_artifact, tmp_path, monkeypatch):
    import app_handlers
    from acip_core.serving.studio import Studio, StudioConfig

    seen = []

    class Recorder(_FakeApi):
        def upload_folder(self, **kwargs):  # the folder exists while it is uploaded
            seen.append(sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()))
            super().upload_folder(**kwargs)

    monkeypatch.setattr(push, "HfApi", Recorder)
    monkeypatch.setattr(push, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("ACIP_PUBLIC", "0")
    studio = Studio(StudioConfig(default_artifact=str(tiny_artifact), precomputed=tmp_path / "precomputed",
                                 runs=tmp_path / "runs", artifact_dirs=[str(tiny_artifact)],
                                 downloads=tmp_path / "downloads"))
    h = app_handlers.Handlers(studio)
    quiet = dict(progress=lambda *a, **k: None)
    Recorder.calls = []
    kind = next(iter(app_handlers.EXPORT_KINDS))  # low-rank, one size
    message = h.share(str(tiny_artifact), 0.6, kind, "float32", "someone/tiny-60", "hf_typed", True, **quiet)
    assert "Uploaded to the hub as `someone/tiny-60`" in message
    assert Recorder.calls[1][1]["token"] == "hf_typed" and Recorder.calls[1][1]["private"] is True
    assert "modeling_acip.py" in seen[0] and "config.json" in seen[0]
    assert not [p for p in (tmp_path / "downloads").rglob("*") if p.is_file()]  # nothing left behind
    Recorder.calls = []
    assert h.share(str(tiny_artifact), 0.6, kind, "float32", "someone/x", "", True, **quiet) is not None
    monkeypatch.setenv("ACIP_PUBLIC", "1")
    h.share(str(tiny_artifact), 0.6, kind, "float32", "someone/x", "hf_typed", True, **quiet)
    assert Recorder.calls == []  # no token, then public mode: refused before any work


def test_an_official_size_rule_travels_with_the_folder_ties_included(tiny_llama, tmp_path):
    """An imported official checkpoint keeps the official code's size rule in its any-size folder
    (strictly above the target, scores tied at the threshold pruned together): with scores made of
    four values, so ties are everywhere, the folder picks the app's prefix at every size, and at some
    sizes that differs from ACIP Studio's own rule (so the rule is really the official one)."""
    from acip_core.engine.materialize import AnySizeModel
    from helpers import model_and_basis

    model, tok, _, basis = model_and_basis(tiny_llama)
    g = torch.Generator().manual_seed(3)
    scores = {n: torch.randint(0, 4, (len(f.s),), generator=g).float() for n, f in basis.items()}
    adapters = {}
    for n, f in basis.items():
        adapters[f"{n}.lora_A"] = 0.1 * torch.randn(4, f.Vh.shape[1], generator=g)
        adapters[f"{n}.lora_B"] = 0.1 * torch.randn(f.U.shape[0], 4, generator=g)
    official = AnySizeModel(model, tok, basis, scores, adapters, 4, 8.0, size_rule="official")
    studio = AnySizeModel(model, tok, basis, scores, adapters, 4, 8.0)
    out = export_anysize(official, tmp_path / "any", "float32")
    net = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, local_files_only=True).eval()
    targets = [i / 40 for i in range(1, 40)]
    assert [net.prefix_for_ratio(t) for t in targets] == [official.index.prefix_for_ratio(t) for t in targets]
    assert any(official.index.prefix_for_ratio(t) != studio.index.prefix_for_ratio(t) for t in targets)
    ids = random_ids(official.base.config.vocab_size)
    net.set_size(0.5, "float32")
    with torch.no_grad():
        assert torch.equal(net(ids).logits, official.materialize(official.size_for_ratio(0.5))(ids).logits)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_groups_that_do_not_divide_a_width_load_as_the_app_runs_them(tiny_tokenizer, tmp_path, dtype):
    """int4-g128 on 96-wide inputs runs groups of 32 there (formats.int4 group_for), 64 on 192-wide ones:
    the folder's buffers take the same groups, so it loads and gives the app's logits."""
    from conftest import _tiny

    base = _tiny("llama", tmp_path / "odd", tiny_tokenizer, hidden_size=96, intermediate_size=192,
                 num_attention_heads=4, num_key_value_heads=2)
    any_size = random_any_size(base)[0]
    out = export_anysize(any_size, tmp_path / "any", dtype, formats=["bfloat16", "int4-g128"])
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, local_files_only=True,
                                                 size_ratio=1.0, format="int4").eval()
    ids = random_ids(len(any_size.tokenizer))
    for r in (0.3, 0.6, 1.0):
        model.set_size(r, "int4-g128")
        with torch.no_grad():
            want = any_size.materialize(any_size.size_for_ratio(r, "int4-g128"), "int4-g128")(ids).logits
            assert torch.equal(model(ids).logits, want), r


def test_to_moves_every_tensor_a_size_runs_and_computed_codes_want_float32(wide, folder):
    """.to(device) moves the size's own modules, the formats' tensors and the other parameters' stored
    copies with the model (`meta` stands in for a GPU here: a tensor left behind fails the forward);
    codes computed at load come from float32 weights only."""
    any_size, _ = wide
    ids = random_ids(len(any_size.tokenizer))
    for fmt in FORMATS:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True,
                                                     size_ratio=0.6, format=fmt).eval()
        model.to("cpu")  # a no-op move rebuilds the size: the same numbers
        with torch.no_grad():
            want = any_size.materialize(any_size.size_for_ratio(0.6, fmt), fmt)(ids).logits
            assert torch.equal(model(ids).logits, want), fmt
            model.to("meta")
            assert model(ids.to("meta")).logits.device.type == "meta", fmt
            model.set_size(0.8, fmt)  # sizes change where the model now is
            assert model(ids.to("meta")).logits.device.type == "meta", fmt
    bf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True,
                                              size_ratio=0.6, format="bfloat16").eval().to(torch.bfloat16)
    with torch.no_grad():  # the bf16 size runs on (.to(bf16) casts the rotary tables too, as on any model)
        assert bf(ids).logits.dtype == torch.bfloat16 and torch.isfinite(bf(ids).logits).all()
    for fmt in ("int8", "float8", "int4-g32"):
        with pytest.raises(ValueError, match="computes its codes from this folder's float32 weights"):
            bf.set_size(0.5, fmt)
    with pytest.raises(ValueError, match="holds bfloat16 weights"):
        bf.set_size(0.5, "float32")

"""Official ACIP checkpoints (official.py) against the fixtures written by the official code:
../shared/fixtures/official-acip/ beside the repository (README.md there: layout, expected.json, expected.safetensors)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acip_core.artifacts.official import OfficialCheckpointError, import_official, read_checkpoint
from acip_core.engine.prune import LayerShape, RankIndex

# shared/ lies beside the repository (as CI lays it out); ACIP_OFFICIAL_FIXTURES points elsewhere
FIXTURES = Path(os.environ.get("ACIP_OFFICIAL_FIXTURES",
                              Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official-acip"))
FAMILIES = ("llama", "opt")
# Max |logit difference| against the official logits. Measured (torch 2.13 CPU vs their 2.5.1):
# full storage <= 3.4e-7 (their own factors), compact <= 1.1e-5 (our float64 SVD of the base against
# their float32 one); the logits of neighbouring sizes differ by 0.1 or more.
TOLERANCE = {"full": 2e-6, "compact": 3e-5}

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"{FIXTURES} not present")


def _tokenizer(folder: Path):
    """A tokenizer for the fixture's base (it has none; ids must stay below its 256-token vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from acip_core.sources.data import load_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([load_text("corpus:handbook")[:50_000]],
                            trainers.BpeTrainer(vocab_size=200, limit_alphabet=100,
                                                special_tokens=["<unk>", "<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>").save_pretrained(folder)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Each family's fixture folder copied, with a tokenizer added to base/."""
    out = {}
    for fam in FAMILIES:
        dst = tmp_path_factory.mktemp("official") / fam
        shutil.copytree(FIXTURES / fam, dst)
        _tokenizer(dst / "base")
        out[fam] = dst
    return out


@pytest.fixture(scope="module")
def imported(families, tmp_path_factory):
    """(family, storage) -> (artifact folder, AnySizeModel), each import with its own basis cache, so
    the compact one really computes an SVD and the full one really uses the stored factors."""
    from acip_core.artifacts.open import open_artifact

    out, previous = {}, os.environ.get("ACIP_STUDIO_CACHE")
    try:
        for fam in FAMILIES:
            for storage in ("full", "compact"):
                os.environ["ACIP_STUDIO_CACHE"] = str(tmp_path_factory.mktemp(f"cache-{fam}-{storage}"))
                source = families[fam] if storage == "full" else families[fam] / "compact"
                folder = tmp_path_factory.mktemp("art") / f"{fam}-{storage}"
                import_official(str(source), folder)
                out[fam, storage] = folder, open_artifact(folder)
    finally:
        if previous is None:
            os.environ.pop("ACIP_STUDIO_CACHE", None)
        else:
            os.environ["ACIP_STUDIO_CACHE"] = previous
    return out


def _expected(fam):
    return json.loads((FIXTURES / fam / "expected.json").read_text()), load_file(FIXTURES / fam / "expected.safetensors")


def _logits(net, ids):
    with torch.no_grad():
        return net(ids).logits


@pytest.mark.parametrize("storage", ["full", "compact"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_sizes_reproduce_the_official_ratios_ranks_and_logits(imported, fam, storage):
    folder, model = imported[fam, storage]
    expected, logits = _expected(fam)
    ids = torch.tensor(expected["input_ids"])
    assert model.size_rule == "official" and json.loads((folder / "acip.json").read_text())["size_rule"] == "official"
    previous = None
    for key, want in expected["ratios"].items():
        size = model.size_for_ratio(float(key))
        assert size.ranks == {n.removesuffix(".base_layer"): r for n, r in want["ranks"].items()}
        # their table: num_params_compressed / num_params, and get_size_ratio() bit for bit
        assert int(model.index.paper_cum[size.prefix]) == want["num_params_compressed"]
        assert model.index.dense_total == want["num_params"]
        assert size.size_ratio == want["size_ratio"]
        # their full count (full=True) caps a layer at its dense size; ours holds what runs (factors +
        # LoRA). Outside the target layers theirs counts a tied LM head twice (OPT: 256 x 64 more)
        head = model.base.get_output_embeddings().weight
        tied = head is model.base.get_input_embeddings().weight
        lora = sum(model.lora_rank * (s.in_features + s.out_features) for s in model.shapes.values())
        assert want["num_params_full"] - want["num_params"] == \
            model.index.other_params + lora + (head.numel() if tied else 0)
        theirs = want["num_params_compressed_full"] - (head.numel() if tied else 0)
        capped = any(r * (s.in_features + s.out_features) >= s.in_features * s.out_features
                     for s, r in ((model.shapes[n], r) for n, r in size.ranks.items()))
        assert (size.params > theirs) if capped else (size.params == theirs)
        assert size.dense_layers == 0  # no dense fallback: every layer factorized with its LoRA
        got = _logits(model.materialize(size), ids)
        assert (got - logits[f"logits_{key}"]).abs().max() <= TOLERANCE[storage], key
        if previous is not None:  # the sizes are far apart next to the tolerance: a wrong size fails
            assert (logits[f"logits_{key}"] - previous).abs().max() > 100 * TOLERANCE[storage]
        previous = logits[f"logits_{key}"]
    assert (_logits(model.materialize(model.full_size()), ids) - logits["logits_as_loaded"]).abs().max() \
        <= TOLERANCE[storage]
    # the original (curve's reference, the app's original) is the base model, not the full size
    original = model.original_size()
    assert original.original and original.dense_layers == len(model.targets)
    assert (_logits(model.materialize(original), ids) - logits["logits_base"]).abs().max() <= 1e-5
    assert original.params < model.full_size().params


@pytest.mark.parametrize("fam", FAMILIES)
def test_compact_storage_imports_the_same_artifact_as_the_full_one(imported, fam):
    from acip_core.artifacts.artifact import load_artifact

    full, compact = (load_artifact(imported[fam, s][0]) for s in ("full", "compact"))
    assert full.meta.official.storage == "full" and compact.meta.official.storage == "compact"
    for key in ("model", "targets", "layers", "lora", "size_rule"):
        assert getattr(full.meta, key) == getattr(compact.meta, key), key
    assert full.meta.extra["mask_scale"] == compact.meta.extra["mask_scale"]
    assert all(torch.equal(full.scores[n], compact.scores[n]) for n in full.scores)
    assert all(torch.equal(full.adapters[n], compact.adapters[n]) for n in full.adapters)
    # the basis: their stored factors vs our SVD of the base, the same singular values
    for n, (total, top) in full.meta.basis.check.items():
        assert compact.meta.basis.check[n] == pytest.approx([total, top], rel=1e-5)
    assert full.meta.official.factor_error < 1e-5  # U·diag(s)·Vh of their factors is the base weight
    expected, _ = _expected(fam)
    ids = torch.tensor(expected["input_ids"])
    for key in expected["ratios"]:
        a, b = (imported[fam, s][1] for s in ("full", "compact"))
        diff = (_logits(a.materialize(a.size_for_ratio(float(key))), ids)
                - _logits(b.materialize(b.size_for_ratio(float(key))), ids)).abs().max()
        assert diff <= TOLERANCE["compact"], key


@pytest.mark.parametrize("fam", FAMILIES)
def test_targets_are_the_checkpoints_own(imported, fam):
    folder, model = imported[fam, "full"]
    config = json.loads((FIXTURES / fam / "config.json").read_text())
    targets = config["parametrization_config"]["target_modules"]
    meta = json.loads((folder / "acip.json").read_text())
    assert meta["targets"] == targets
    assert {n.rsplit(".", 1)[-1] for n in model.targets} == set(targets)
    assert len(model.targets) == len(_expected(fam)[0]["module_shapes"])
    assert meta["lora"] == dict(rank=8, alpha=16.0, dropout=0.05)


def test_an_imported_artifact_reads_what_the_import_adds_as_typed_fields(imported):
    from acip_core.artifacts.artifact import load_artifact

    folder, model = imported["llama", "compact"]
    meta = load_artifact(folder).meta
    assert meta.size_rule == "official" and meta.result.imported and meta.result.steps is None
    assert meta.official.storage == "compact" and meta.official.source.endswith("compact")
    assert meta.official.bytes and meta.official.factor_error is None  # no stored factors to compare
    assert meta.lora.rank == 8 and model.meta.official == meta.official
    assert json.dumps(meta.to_json(), indent=1) == (folder / "acip.json").read_text()


def test_official_rule_prunes_ties_at_the_threshold_together_and_ours_is_unchanged():
    shapes = {"a": LayerShape(8, 8), "b": LayerShape(8, 8)}
    scores = {"a": torch.tensor([5., 4., 3., 2., 2., 2., 1., 0.]), "b": torch.tensor([9., 8., 2., 2., 1., 0., 0., 0.])}
    official = RankIndex(scores, shapes, size_rule="official")
    ours = RankIndex(scores, shapes)
    for target in (0.2, 0.45, 0.5, 0.6, 0.9):
        p = official.prefix_for_ratio(target)
        assert official.ratio_at(p) > target  # strictly above
        threshold = torch.cat(list(scores.values())).sort(descending=True).values
        assert p == len(threshold) or threshold[p - 1] > threshold[p]  # never splits a tie
        q = ours.prefix_for_ratio(target)
        assert ours.ratio_at(q) >= target - 1e-9 and (q == 0 or ours.ratio_at(q - 1) < target)
    # ratio exactly 0.5 after 4 entries: ours meets it there, theirs must stay strictly above
    assert ours.prefix_for_ratio(0.5) == 4 and official.prefix_for_ratio(0.5) == 5
    # at 0.9 (8 entries already give 1.0: both layers capped at dense) theirs prunes the 6 lowest
    # (0, 0, 0, 0, 1, 1: the two 1s together) and keeps 10; ours stops at the first prefix that meets it
    assert official.prefix_for_ratio(0.9) == 10 and ours.prefix_for_ratio(0.9) == 8
    assert official.prefix_for_ratio(1.0) == 16
    plain, kept = LayerShape(8, 8), LayerShape(8, 8, dense_fallback=False)
    assert plain.runs_dense(4, 2) and not kept.runs_dense(4, 2)
    assert kept.materialized_params(8, 2) == 10 * 16 > plain.materialized_params(8, 2) == 64


def test_cli_imports_and_shows_both_ratios(families, tmp_path, monkeypatch):
    from acip_core.cli import main

    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "llama-art"
    run = subprocess.run([sys.executable, "-m", "acip_core", "import-acip", "--from", str(families["llama"]),
                          "--out", str(out), "--json"], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["storage"] == "full" and result["layers"] == 14 and result["size_rule"] == "official"
    assert result["artifact_bytes"] < result["checkpoint_bytes"]
    assert main(["import-acip", "--from", str(families["llama"]), "--out", str(out)]) == 2  # never overwrites
    for flag in ("--size-ratio", "--compression-ratio"):  # the first hub release's name for the same value
        run = subprocess.run([sys.executable, "-m", "acip_core", "size", "--artifact", str(out), flag, "0.9",
                              "--json"], capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
        size = json.loads(run.stdout)
        assert size["size_ratio"] == round(0.90234375, 5) and size["size_rule"] == "official"
        assert size["materialized_ratio"] > 1.0  # layers near full rank hold factors + LoRA beyond dense


def test_export_of_an_imported_size_loads_in_a_fresh_process(imported, tmp_path):
    from acip_core.export.sized import export_lowrank

    _, model = imported["llama", "full"]
    size = model.size_for_ratio(0.5)
    out = export_lowrank(model, size, tmp_path / "export")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        net = model.materialize(size)
        tokens = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                              do_sample=False, repetition_penalty=1.0, pad_token_id=0)
        logits = net(ids).logits
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, local_files_only=True).eval()
ids = torch.tensor({ids.tolist()})
with torch.no_grad():
    t = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                   do_sample=False, repetition_penalty=1.0, pad_token_id=0)
    print(json.dumps(dict(tokens=t.tolist(), logits=m(ids).logits.tolist())))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    fresh = json.loads(run.stdout.strip().splitlines()[-1])
    assert fresh["tokens"] == tokens.tolist()
    assert (torch.tensor(fresh["logits"]) - logits).abs().max() <= 1e-5


@pytest.mark.parametrize("fam", FAMILIES)
def test_an_imported_checkpoint_exported_any_size_gives_the_official_logits_at_every_size(imported, fam, tmp_path):
    """Download once, choose later, for an official checkpoint too: the any-size folder of an imported
    one, loaded with plain from_pretrained, gives the official code's logits at each recorded size
    (their size rule travels with it) and the app's exactly."""
    from transformers import AutoModelForCausalLM

    from acip_core.artifacts.artifact import load_artifact
    from acip_core.export.anysize import export_anysize

    folder, model = imported[fam, "full"]
    out = export_anysize(model, tmp_path / "any", "float32", curve=load_artifact(folder).curve)
    net = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, local_files_only=True).eval()
    expected, logits = _expected(fam)
    ids = torch.tensor(expected["input_ids"])
    for key in expected["ratios"]:
        net.set_size(float(key), "float32")
        got = _logits(net, ids)
        assert (got - logits[f"logits_{key}"]).abs().max() <= TOLERANCE["full"], key
        assert torch.equal(got, _logits(model.materialize(model.size_for_ratio(float(key))), ids)), key


def test_offline_hub_id_is_refused_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    start = time.perf_counter()
    with pytest.raises(OfficialCheckpointError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        read_checkpoint("MerantixMomentum/acip_llama31_8b")
    assert time.perf_counter() - start < 5
    with pytest.raises(OfficialCheckpointError, match="neither a folder nor a hub id"):
        read_checkpoint(str(tmp_path / "no" / "such" / "folder"))


def test_a_cached_snapshot_without_its_weights_is_not_taken_for_the_checkpoint(tmp_path, monkeypatch):
    """A snapshot holding config.json alone (fetched by something else) goes on to the download;
    offline, that says so instead of "has neither model.safetensors nor index"."""
    from acip_core.artifacts.official import locate

    hub = tmp_path / "hub"
    repo = hub / "models--MerantixMomentum--acip_tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    with pytest.raises(OfficialCheckpointError, match="not in the local Hugging Face cache"):
        locate("MerantixMomentum/acip_tiny")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(OfficialCheckpointError, match="not in the local Hugging Face cache"):
        locate("MerantixMomentum/acip_tiny")  # a shard missing
    (snap / "model-1.safetensors").write_bytes(b"x")
    assert locate("MerantixMomentum/acip_tiny") == snap


def _broken(families, tmp_path, edit) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(families["llama"], folder, ignore=shutil.ignore_patterns("base"))
    config = json.loads((folder / "config.json").read_text())
    text = edit(config)
    (folder / "config.json").write_text(text if isinstance(text, str) else json.dumps(config))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda c: "{not json", "is not valid JSON"),
    (lambda c: c.update(model_type="llama"), "model_type is 'llama', not 'acip_model'"),
    (lambda c: c["base_model_config"]["pretrained_model_kwargs"].clear(),
     "pretrained_model_name_or_path must be a str, got None"),
    (lambda c: c["parametrization_config"]["module_factory_kwargs"].update(mask_func="sigmoid"),
     "mask_func 'sigmoid'"),
    (lambda c: c["parametrization_config"].update(module_factory_cls="qr"), "only 'svd'"),
    (lambda c: c["adapter_config"]["peft_config"]["default"].update(r=0), "LoRA r must be positive"),
    (lambda c: c.update(size_ratio=0.5, compression_ratio=0.4), "disagree"),
    (lambda c: c.update(compression_ratio=1.5), "compression_ratio must be a number in"),
])
def test_a_malformed_config_is_refused_with_a_clear_message(families, tmp_path, edit, message):
    folder = _broken(families, tmp_path, edit)
    with pytest.raises(OfficialCheckpointError, match=message):
        read_checkpoint(str(folder), base=str(families["llama"] / "base"))


def test_the_ratio_under_either_name_is_recorded_and_the_base_is_resolved(families, tmp_path):
    old = read_checkpoint(str(_broken(families, tmp_path, lambda c: c.update(compression_ratio=0.4))),
                          base=str(families["llama"] / "base"))
    assert old.size_ratio == 0.4
    ckpt = read_checkpoint(str(families["llama"] / "compact"))  # "base" beside compact/, as the official loader finds it
    assert ckpt.base == str((families["llama"] / "base").resolve()) and ckpt.storage == "compact"
    assert read_checkpoint(str(families["opt"])).storage == "full"
    missing = _broken(families, tmp_path / "m", lambda c: c["base_model_config"]["pretrained_model_kwargs"]
                      .update(pretrained_model_name_or_path="gone"))
    with pytest.raises(OfficialCheckpointError, match="pass it with --base"):
        read_checkpoint(str(missing))


def test_a_wrong_base_model_is_refused(families, tmp_path, monkeypatch):
    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OfficialCheckpointError, match="layers do not match the base model"):
        import_official(str(families["llama"]), tmp_path / "a", base=str(families["opt"] / "base"))
    other = tmp_path / "other-base"  # same architecture, other weights: their factors do not reproduce it
    shutil.copytree(families["llama"] / "base", other)
    weights = load_file(other / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.flip(0).contiguous() if v.dim() == 2 else v for k, v in weights.items()},
              other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OfficialCheckpointError, match="another base model"):
        import_official(str(families["llama"]), tmp_path / "b", base=str(other))
    assert not (tmp_path / "b" / "acip.json").exists()


def test_the_app_lists_and_opens_an_imported_artifact(imported, tmp_path, monkeypatch):
    from acip_core.serving.explorer import Explorer
    from acip_core.serving.registry import find_artifacts

    # a fresh basis cache (another machine): the basis is the SVD of the base, as for the compact storage
    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))

    folder, model = imported["opt", "full"]
    shelf = tmp_path / "precomputed"
    shutil.copytree(folder, shelf / "acip-opt-tiny")
    assert find_artifacts(precomputed=shelf) == [("acip-opt-tiny (precomputed)", str(shelf / "acip-opt-tiny"))]
    explorer = Explorer.open(shelf / "acip-opt-tiny")
    from acip_core.serving.texts import describe_text

    line = describe_text(explorer.describe())  # the app's status line: where it came from, no "None steps"
    assert "imported from the official ACIP checkpoint" in line and "None" not in line
    summary = explorer.size_for(0.5)
    assert summary["size_ratio"] == _expected("opt")[0]["ratios"]["0.50"]["size_ratio"]
    assert summary["dense_layers"] == 0 and summary["original_params"] == model.original_size().params
    _, logits = _expected("opt")
    ids = torch.tensor(_expected("opt")[0]["input_ids"])
    assert (_logits(explorer.model(0.5), ids) - logits["logits_0.50"]).abs().max() <= TOLERANCE["compact"]


def test_the_app_import_box_writes_an_artifact_the_list_shows(families, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from acip_core.serving.studio import Studio, StudioConfig
    from app import build_demo
    from app_handlers import official_import

    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))
    config = StudioConfig(default_artifact=str(tmp_path / "none"), precomputed=tmp_path / "precomputed",
                          runs=tmp_path / "runs", downloads=tmp_path / "downloads")
    app = Studio(config)
    note = official_import(app, str(families["opt"]), "acip-opt", lambda *a, **k: None)
    assert note.startswith("Imported") and "acip\\-opt" in note  # Markdown-escaped
    assert (str(config.precomputed / "acip-opt")) in [f for _, f in app.artifacts()]
    warned = []
    monkeypatch.setattr("app_handlers.gr.Warning", lambda m, **k: warned.append(m))
    official_import(app, str(families["opt"]), "../escape", lambda *a, **k: None)
    assert warned and "use letters, digits" in warned[0]
    assert "official_import" in str(build_demo(config).config)  # the box is there locally


def test_a_hub_id_is_fetched_with_snapshot_download(families, monkeypatch):
    """The hub path, proven with a local folder standing in for the download (no internet here)."""
    import huggingface_hub

    from acip_core.sources import models

    calls = []

    def fake(repo_id, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not cached")  # first the local cache, then the download
        assert "*.safetensors" in allow_patterns and "config.json" in allow_patterns
        return str(families["llama"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    ckpt = read_checkpoint("MerantixMomentum/acip_tiny_llama")
    assert calls == [("MerantixMomentum/acip_tiny_llama", True), ("MerantixMomentum/acip_tiny_llama", False)]
    assert ckpt.folder == families["llama"] and ckpt.storage == "full"
    assert ckpt.base == str((families["llama"] / "base").resolve())
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(OfficialCheckpointError, match="cannot be reached"):
        read_checkpoint("MerantixMomentum/acip_other")


def test_an_unknown_size_rule_is_refused_and_ours_stays_the_default(imported, tmp_path, monkeypatch):
    from acip_core.artifacts.artifact import ArtifactError, load_artifact

    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))

    folder = tmp_path / "art"
    shutil.copytree(imported["llama", "compact"][0], folder)
    meta = json.loads((folder / "acip.json").read_text())
    (folder / "acip.json").write_text(json.dumps(dict(meta, size_rule="newer")))
    with pytest.raises(ArtifactError, match="unknown size_rule 'newer'"):
        load_artifact(folder)
    meta.pop("size_rule")  # an artifact of ours: no rule recorded, ours applies
    (folder / "acip.json").write_text(json.dumps(meta))
    assert load_artifact(folder).size_rule == "acip-studio"
    from acip_core.artifacts.open import open_artifact

    ours = open_artifact(folder)  # the same scores under our rule: size 1.0 is the original, dense
    assert ours.size_rule == "acip-studio" and ours.original_size() == ours.full_size()
    expected, logits = _expected("llama")
    full = _logits(ours.materialize(ours.full_size()), torch.tensor(expected["input_ids"]))
    assert (full - logits["logits_base"]).abs().max() <= 1e-5

"""Fine-tuning a chosen size (paper §3.3) and distillation from the original, on the tiny Llama."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from acip_core.artifacts.artifact import ArtifactError, load_artifact, save_artifact
from acip_core.training.finetune import FinetuneConfig, run_finetune
from acip_core.artifacts.open import open_artifact, open_folder
from acip_core.evaluation.baselines import open_sized
from acip_core.training.train import vocab_loss
from acip_core.artifacts.tuned import TUNED_FILE, load_tuned, tuned_sizes


def kd_loss(student, teacher, t):
    """The kd term alone (train.vocab_loss with lm off; targets unused)."""
    return vocab_loss(student, torch.zeros(student.shape[:-1], dtype=torch.long), teacher, t, lm=False, kd=True)[0]


def test_kd_loss_is_zero_for_the_teacher_itself_and_its_gradient_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(2, 5, 11, generator=g)
    for t in (1.0, 2.5):
        same = teacher.clone().requires_grad_(True)
        loss = kd_loss(same, teacher, t)
        loss.backward()
        assert loss.item() == 0.0 and same.grad.abs().max().item() < 1e-7
        student = torch.randn(2, 5, 11, generator=g).requires_grad_(True)
        loss = kd_loss(student, teacher, t)
        loss.backward()
        # reference: T²·KL(p_t ‖ p_s) per token, from torch's kl_div; gradient T·(p_s − p_t)/tokens
        ref = t * t * F.kl_div(F.log_softmax(student.detach() / t, -1).reshape(-1, 11),
                               F.log_softmax(teacher / t, -1).reshape(-1, 11), log_target=True,
                               reduction="batchmean")
        grad = t * (F.softmax(student.detach() / t, -1) - F.softmax(teacher / t, -1)) / 10
        torch.testing.assert_close(loss.detach(), ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(student.grad, grad, atol=1e-7, rtol=1e-5)
        assert loss.item() > 0


def test_vocab_loss_equals_cross_entropy_plus_kl_in_value_and_gradient():
    """The chunked loss (train._VocabLoss: 16 rows a chunk, gradient formed in forward) against
    torch's own cross_entropy and log_softmax composition, over 2 × 19 rows (not a chunk multiple)."""
    g = torch.Generator().manual_seed(1)
    teacher, ids = 3 * torch.randn(2, 20, 13, generator=g), torch.randint(0, 13, (2, 20), generator=g)
    start = torch.randn(2, 20, 13, generator=g)
    for t in (1.0, 2.5):
        for lm, kd in ((True, False), (False, True), (True, True)):
            ref_in = start.clone().requires_grad_(True)
            logits = ref_in[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, 13), ids[:, 1:].reshape(-1))
            log_s, log_t = F.log_softmax(logits / t, -1), F.log_softmax(teacher[:, :-1] / t, -1)
            kl = t * t * (log_t.exp() * (log_t - log_s)).sum(-1).mean()
            ref = (nll if lm else 0) + (kl if kd else 0)
            ref.backward()
            x = start.clone().requires_grad_(True)
            loss, got_nll, got_kd = vocab_loss(x[:, :-1], ids[:, 1:], teacher[:, :-1], t, lm=lm, kd=kd)
            (2 * loss).backward()  # the upstream gradient scales the kept one
            torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got_nll, nll.detach(), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got_kd, kl.detach() if kd else torch.tensor(0.0), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(x.grad, 2 * ref_in.grad, atol=1e-7, rtol=1e-5)
            assert x.grad[:, -1].abs().max() == 0  # the last position predicts nothing
    with pytest.raises(ValueError, match="teacher"):
        vocab_loss(start, ids, None, kd=True)


def _cfg(**kw):
    base = dict(steps=12, batch_size=2, seq_len=32, lr=5e-3, objective="lm", lora_dropout=0.0,
                checkpoint_every=5, precision="fp32")
    base.update(kw)
    return FinetuneConfig(**base)


EVAL = {"heldout": "corpus:heldout"}
SIZE = 0.35  # the shared tiny artifact's rank-2 LoRA: most layers run factorized here


@pytest.fixture(scope="module")
def tuned(tiny_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "t"
    run_finetune(tiny_artifact, SIZE, "corpus:train", out, _cfg(objective="lm+kd"), eval_sets=EVAL, eval_windows=4)
    return out


def test_a_few_steps_lower_the_loss_and_write_a_small_tuned_size(tuned, tiny_artifact):
    meta = json.loads((tuned / TUNED_FILE).read_text())
    fig = meta["perplexity"]["heldout"]
    assert fig["tuned"]["perplexity"] < fig["untuned"]["perplexity"]
    log = [json.loads(l) for l in (tuned / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 13)) and {"nll", "kd", "loss"} <= set(log[0])
    assert sum(e["loss"] for e in log[-4:]) < sum(e["loss"] for e in log[:4])
    assert not list(tuned.glob("checkpoint*")) and not (tuned / ".lock").exists()
    parent = load_artifact(tiny_artifact)
    # only the layers factorized at that size are stored, in bf16: smaller than the parent's adapters
    assert (tuned / "adapters.safetensors").stat().st_size < (tiny_artifact / "adapters.safetensors").stat().st_size / 2
    assert meta["size"]["tuned_layers"] <= len(parent.shapes)
    listed = tuned_sizes(tiny_artifact, [tuned])
    assert [d["size_ratio"] for d in listed] == [meta["size"]["size_ratio"]]


def test_the_tuned_size_opens_with_its_own_size_and_its_figures_reproduce(tuned, tiny_artifact):
    from acip_core.sources.data import load_text, token_windows
    from acip_core.evaluation.evaluate import perplexity

    model, size = open_sized(tuned)
    meta = json.loads((tuned / TUNED_FILE).read_text())
    assert size.prefix == meta["size"]["prefix"]
    w = token_windows(model.tokenizer, load_text("corpus:heldout"), 256, 4)
    ppl = perplexity(model.materialize(size), w)["perplexity"]
    assert ppl == pytest.approx(meta["perplexity"]["heldout"]["tuned"]["perplexity"], rel=1e-4)
    with pytest.raises(ValueError, match="its own size"):
        open_sized(tuned, size_ratio=0.9)
    with pytest.raises(ValueError, match="--size-ratio or --budget-gb"):
        open_sized(tiny_artifact)


def test_a_size_tuned_in_int8_trains_over_quantized_factors_and_is_served_in_int8(tiny_artifact, tmp_path, capsys):
    """ACIP → int8 → FT (the paper's Table A4 order): the frozen factors are int8 QWeights while the
    LoRA trains; the tuned size opens in int8 by default and its recorded figures are the served ones."""
    from acip_core.sources.data import load_text, token_windows
    from acip_core.evaluation.evaluate import perplexity
    from acip_core.training.finetune import tunable_model
    from acip_core.formats.qweight import QuantLowRankLinear
    from acip_core.formats.registry import Format
    from acip_core.evaluation.baselines import open_method

    any_size, artifact = open_method(tiny_artifact)
    _, layers = tunable_model(any_size, any_size.size_for_ratio(SIZE), artifact.adapters, 8.0, 0.0, Format("int8"))
    assert layers and all(isinstance(l.frozen.inner, QuantLowRankLinear) for l in layers.values())
    out = tmp_path / "q8"
    t = run_finetune(tiny_artifact, SIZE, "corpus:train", out, _cfg(format="int8"), eval_sets=EVAL, eval_windows=4)
    assert t.format == "int8" and t.meta.finetune["format"] == "int8"
    fig = t.meta.perplexity["heldout"]
    assert fig["tuned"]["perplexity"] < fig["untuned"]["perplexity"]
    model, size = open_sized(out)
    assert size.format.key == "int8"
    w = token_windows(model.tokenizer, load_text("corpus:heldout"), 256, 4)
    assert perplexity(model.materialize(size, size.format), w)["perplexity"] == \
        pytest.approx(fig["tuned"]["perplexity"], rel=1e-4)
    assert open_sized(out, format="float32")[1].format.key == "float32"  # any format may still be asked for
    from acip_core import cli  # every command opens it in its own format unless --format asks for another

    capsys.readouterr()
    for argv, key in ((["size"], "int8"), (["size", "--format", "bfloat16"], "bfloat16"),
                      (["export", "--out", str(tmp_path / "x")], "int8")):
        assert cli.main(argv + ["--artifact", str(out), "--json"]) == 0, argv
        result = json.loads(capsys.readouterr().out)
        assert result["format"] == key, (argv, result)

def test_resume_after_an_interruption_equals_the_uninterrupted_run(tiny_artifact, tmp_path):
    cfg = _cfg(objective="kd", temperature=2.0, lora_dropout=0.1)
    full = run_finetune(tiny_artifact, SIZE, "corpus:train", tmp_path / "full", cfg, eval_sets={})
    calls = {"n": 0}

    def stop_after_7():
        calls["n"] += 1
        return calls["n"] >= 7

    part = tmp_path / "part"
    assert run_finetune(tiny_artifact, SIZE, "corpus:train", part, cfg, should_stop=stop_after_7, eval_sets={}) is None
    assert json.loads((part / "checkpoint.json").read_text())["step"] == 7
    before = (part / "checkpoint.json").read_bytes()
    # another run's settings do not resume it (nor does a new run overwrite it): both refused, nothing touched
    with pytest.raises(ValueError, match=r"a run with lr=.*resume it with its own settings"):
        run_finetune(tiny_artifact, SIZE, "corpus:train", part, _cfg(objective="kd", temperature=2.0,
                                                                      lora_dropout=0.1, lr=cfg.lr * 2),
                     resume=True, eval_sets={})
    with pytest.raises(ValueError, match="data="):
        run_finetune(tiny_artifact, SIZE, "corpus:heldout", part, cfg, resume=True, eval_sets={})
    with pytest.raises(FileExistsError, match="checkpoint of an unfinished run"):
        run_finetune(tiny_artifact, SIZE, "corpus:train", part, cfg, eval_sets={})
    assert (part / "checkpoint.json").read_bytes() == before
    resumed = run_finetune(tiny_artifact, SIZE, "corpus:train", part, cfg, resume=True, eval_sets={})
    assert set(resumed.adapters) == set(full.adapters)
    for k in full.adapters:
        assert torch.equal(resumed.adapters[k], full.adapters[k])
    assert [json.loads(l)["step"] for l in (part / "log.jsonl").read_text().splitlines()] == list(range(1, 13))


def test_a_tuned_size_refuses_a_parent_with_another_checksum(tuned, tiny_artifact, tmp_path):
    parent, child = tmp_path / "parent", tmp_path / "parent" / "tuned" / str(SIZE)
    shutil.copytree(tiny_artifact, parent)
    shutil.copytree(tuned, child)
    meta = json.loads((child / TUNED_FILE).read_text())
    meta["parent"]["path"] = ".."  + os.sep + ".."
    (child / TUNED_FILE).write_text(json.dumps(meta))
    open_folder(child)  # the same content elsewhere is fine
    assert len(tuned_sizes(parent)) == 1
    art = load_artifact(parent)
    name = next(iter(art.adapters))
    art.adapters[name] = art.adapters[name] + 0.01  # another scoring run's LoRA
    save_artifact(parent, art)
    with pytest.raises(ArtifactError, match="tuned on another artifact"):
        open_folder(child)
    assert tuned_sizes(parent) == []  # listing skips it instead of failing


def test_bad_requests_are_refused(tiny_artifact, tmp_path):
    with pytest.raises(ValueError, match="evaluation set"):
        run_finetune(tiny_artifact, SIZE, "corpus:heldout", tmp_path / "a", _cfg())
    with pytest.raises(ValueError):
        _cfg(objective="mse")
    with pytest.raises(ValueError):
        _cfg(steps=0)
    with pytest.raises(ValueError, match="size_ratio"):
        run_finetune(tiny_artifact, 1.5, "corpus:train", tmp_path / "b", _cfg())


def test_the_tuned_export_merges_the_tuned_lora_and_loads_in_a_fresh_process(tuned, tiny_artifact, tmp_path):
    out = tmp_path / "export"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "acip_core", "export", "--artifact", str(tuned), "--out", str(out),
                           "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval(); "
            f"ids = torch.load({str(tmp_path / 'ids.pt')!r}); "
            f"torch.save(m(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = torch.load(tmp_path / "logits.pt")
    model, size = open_sized(tuned)
    untuned = open_artifact(tiny_artifact)
    with torch.no_grad():
        tuned_logits = model.materialize(size)(input_ids=ids).logits
        untuned_logits = untuned.materialize(untuned.size_at(size.prefix))(input_ids=ids).logits
    torch.testing.assert_close(exported, tuned_logits, atol=1e-4, rtol=1e-4)
    assert (exported - untuned_logits).abs().max() > 1e-3  # the tuned LoRA is in the export


def test_scoring_with_distillation_runs_and_its_teacher_shares_the_weights(tiny_llama, tmp_path):
    from acip_core import ScoreConfig, run_scoring
    from acip_core.training.pipeline import original_model
    from helpers import parametrized_copy

    model, _, _, originals = parametrized_copy(tiny_llama, "svd")
    teacher = original_model(model, originals)
    for n, lin in originals.items():
        assert teacher.get_submodule(n) is lin and lin.weight.data_ptr() == model.get_submodule(n).weight.data_ptr()
    cfg = ScoreConfig(steps=6, batch_size=2, seq_len=32, lr=2e-3, reg_init=1e-2, stop_ratio=0.4,
                      post_tune_steps=2, precision="fp32", objective="lm+kd", temperature=2.0)
    art = run_scoring(tiny_llama, "corpus:train", tmp_path / "kd", "svd", cfg, eval_windows=0, curve_sizes=[0.5])
    log = [json.loads(l) for l in (tmp_path / "kd" / "log.jsonl").read_text().splitlines()]
    assert art.meta.scoring["objective"] == "lm+kd" and min(e["kd"] for e in log) > -1e-6
    assert max(e["kd"] for e in log) > 0  # the student drifts from the original as it prunes


def test_a_finetune_runs_as_a_background_job(tiny_artifact, tmp_path):
    import time

    from acip_core.serving.jobs import ScoringJobs

    jobs = ScoringJobs(tmp_path / "runs")
    with pytest.raises(ValueError, match="not an artifact"):
        jobs.start_finetune("x", str(tmp_path), SIZE)
    jobs.start_finetune("ft", str(tiny_artifact), SIZE, objective="kd", steps=4, batch_size=2, seq_len=32,
                        precision="fp32", format="int8")  # the format travels as the CLI's flags
    deadline = time.time() + 600
    while time.time() < deadline and jobs.status("ft")["state"] in ("starting", "running", "evaluating"):
        time.sleep(0.5)
    status = jobs.status("ft")
    assert status["state"] == "finished", jobs.output_tail("ft")
    assert jobs.tuned() == [tmp_path / "runs" / "ft"] and jobs.artifacts() == []
    assert list(jobs.history("ft").phase)[-1] == "done"
    assert json.loads((tmp_path / "runs" / "ft" / TUNED_FILE).read_text())["format"] == "int8"


def test_finetune_under_torchrun_equals_a_single_process(tuned, tiny_artifact, tmp_path):
    out = tmp_path / "ddp"
    cfg = _cfg(objective="lm+kd")
    args = ["finetune", "--artifact", str(tiny_artifact), "--size-ratio", str(SIZE), "--data", "corpus:train",
            "--out", str(out), "--eval-windows", "2", "--json"]
    for key in ("steps", "batch_size", "seq_len", "lr", "objective", "lora_dropout", "precision"):
        args += ["--" + key.replace("_", "-"), str(getattr(cfg, key))]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "acip_core", *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / TUNED_FILE).read_text())["finetune"]["processes"] == 2
    ta, tb = load_tuned(tuned).adapters, load_tuned(out).adapters
    assert set(ta) == set(tb)
    for k in ta:  # bf16 files: equal up to a rounding step where fp reduction orders differ
        torch.testing.assert_close(ta[k].float(), tb[k].float(), atol=1e-2, rtol=1e-2)


def test_the_app_lists_opens_draws_and_starts_tuned_sizes(tuned, tiny_artifact, tmp_path, monkeypatch):
    """A parent's tuned/ sizes are in the artifact list, open at their own size and format, are drawn
    on the parent's curve as their own markers, and "fine-tune this size" starts one in the background."""
    import gradio as gr

    import app
    from acip_core.serving.studio import StudioConfig

    parent = tmp_path / "art"
    shutil.copytree(tiny_artifact, parent)
    shutil.copytree(tuned, parent / "tuned" / str(SIZE))
    fresh = json.loads((tuned / TUNED_FILE).read_text())
    (parent / "tuned" / "junk").mkdir()  # not a tuned size: never listed, never an error
    demo = app.build_demo(StudioConfig(default_artifact=str(parent), precomputed=tmp_path / "none",
                                       runs=tmp_path / "runs", artifact_dirs=[str(parent)],
                                       downloads=tmp_path / "downloads"))
    h = demo.handlers
    choices = dict((f, label) for label, f in h.app.artifacts())
    folder = str(parent / "tuned" / str(SIZE))
    assert list(choices) == [str(parent), folder] and "tuned 0.35" in choices[folder] and "lm+kd" in choices[folder]
    updates = list(h.artifact(folder, 1.0, "size ratio", "bfloat16", progress=None))
    status, _, ratio, dtype = updates[-1][:4]
    assert ratio == pytest.approx(fresh["size"]["target"]) and dtype == "float32" and "tuned size" in status
    curve = updates[-1][7]
    marker = [t for t in curve.data if t.name == "tuned sizes"]
    assert marker and marker[0].y[0] == pytest.approx(fresh["perplexity"]["heldout"]["tuned"]["perplexity"])
    # the parent's curve shows it too; the slider of the parent stays where the user put it
    parent_curve = list(h.artifact(str(parent), 0.5, "size ratio", "float32", progress=None))[-1]
    assert parent_curve[2] == gr.skip() and [t for t in parent_curve[7].data if t.name == "tuned sizes"]
    assert h.artifact_b(folder) == pytest.approx(fresh["size"]["target"]) and h.artifact_b(str(parent)) == gr.skip()
    monkeypatch.setattr(h.app.jobs, "start_finetune", lambda *a, **k: started.append((a, k)))
    started = []
    h.finetune_start(str(parent), SIZE, "int8", "kd", 3)
    (name, art, ratio), kw = started[0]
    assert art == str(parent) and ratio == SIZE and kw["format"] == "int8" and kw["steps"] == 3 and name.startswith("ft-")

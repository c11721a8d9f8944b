import json

import pytest
import torch

from acip_core import ScoreConfig, load_artifact, run_scoring
from acip_core.training.score import update_scores


def test_algorithm_1_on_a_hand_made_mask_trajectory():
    trajectory = [torch.tensor([0.03, 0.02, 0.01, 0.02]),
                  torch.tensor([0.04, -0.01, 0.005, 0.02]),  # entry 1 pruned at step 2
                  torch.tensor([0.05, -0.02, -0.001, 0.0]),  # entries 2, 3 pruned at step 3
                  torch.tensor([0.06, -0.03, -0.002, -0.01])]
    scores = None
    for masks in trajectory:
        scores = update_scores(scores, {"l": masks})
    # alive: its mask value; pruned at step t of T=4: -(T - t + 1); same step -> same score
    assert torch.equal(scores["l"], torch.tensor([0.06, -3.0, -2.0, -2.0]))
    assert scores["l"].dtype == torch.float32


def _cfg(**kw):
    base = dict(steps=400, batch_size=2, seq_len=32, lr=2e-3, reg_init=1e-2, reg_growth=1.05,
                stop_ratio=0.4, post_tune_steps=5, checkpoint_every=7, precision="fp32")
    base.update(kw)
    return ScoreConfig(**base)


def test_tiny_run_reaches_its_stop_ratio_and_writes_a_valid_artifact(tiny_artifact):
    art = load_artifact(tiny_artifact)
    result = art.meta.result
    assert result.stopped_by == "stop_ratio" and result.size_ratio_reached <= 0.4
    assert result.extra["post_tune_steps"] == 5
    log = [json.loads(l) for l in (tiny_artifact / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, result.steps + 1))
    assert {"loss", "nll", "reg_weight", "size_ratio", "seconds"} <= set(log[0])
    assert not list(tiny_artifact.glob("checkpoint*"))
    # pruned entries have negative integer scores, alive ones their positive mask value
    s = torch.cat(list(art.scores.values()))
    assert (s < 0).any() and (s > 0).any() and torch.equal(s[s < 0], s[s < 0].round())
    assert set(art.curve.method) == {"original", "acip"}


def test_resume_after_interruption_equals_uninterrupted_run(tiny_llama, tmp_path):
    cfg = _cfg(steps=12, post_tune_steps=3)
    full = run_scoring(tiny_llama, "corpus:train", tmp_path / "full", "svd", cfg, eval_windows=0,
                       curve_sizes=[0.5])
    calls = {"n": 0}

    def stop_after_8():
        calls["n"] += 1
        return calls["n"] >= 8

    part = tmp_path / "part"
    assert run_scoring(tiny_llama, "corpus:train", part, "svd", cfg, should_stop=stop_after_8,
                       eval_windows=0, curve_sizes=[0.5]) is None
    assert json.loads((part / "checkpoint.json").read_text())["step"] == 8
    with pytest.raises(ValueError, match="data='corpus:train'"):  # another run's settings: refused
        run_scoring(tiny_llama, "corpus:heldout", part, "svd", cfg, resume=True, eval_windows=0, curve_sizes=[0.5])
    with pytest.raises(FileExistsError, match="unfinished run"):  # nor overwritten by a new run
        run_scoring(tiny_llama, "corpus:train", part, "svd", cfg, eval_windows=0, curve_sizes=[0.5])
    resumed = run_scoring(tiny_llama, "corpus:train", part, "svd", cfg, resume=True, eval_windows=0,
                          curve_sizes=[0.5])
    for n in full.scores:
        torch.testing.assert_close(resumed.scores[n], full.scores[n], atol=1e-6, rtol=0)
    for n in full.adapters:
        torch.testing.assert_close(resumed.adapters[n], full.adapters[n], atol=1e-6, rtol=1e-5)
    steps = [json.loads(l)["step"] for l in (part / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 16))


def test_a_second_run_into_a_finished_folder_is_refused(tiny_artifact, tiny_llama):
    with pytest.raises(FileExistsError, match="already holds an artifact"):
        run_scoring(tiny_llama, "corpus:train", tiny_artifact, "svd", _cfg())


def test_a_live_run_locks_its_folder(tiny_llama, tmp_path):
    from acip_core.training.pipeline import RunLock, RunLockedError

    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match="already writing"):
            run_scoring(tiny_llama, "corpus:train", tmp_path, "svd", _cfg())
    (tmp_path / ".lock").write_text("999999")  # a killed run's stale lock is taken over
    with RunLock(tmp_path):
        pass


@pytest.mark.parametrize("bad", [dict(stop_ratio=1.5), dict(steps=0), dict(lr=-1.0), dict(precision="fp8"),
                                 dict(base_format="int3"), dict(base_format="bfloat16"),
                                 dict(base_format="int8+emb8"), dict(base_format="int8+fast"),
                                 dict(base_format="int4", objective="kd"), dict(mask_scale=0.0),
                                 dict(mask_scale=-0.02), dict(reg_init=float("nan")), dict(reg_growth=float("nan")),
                                 dict(lr=float("nan")), dict(lr=float("inf")), dict(lora_rank=-3),
                                 dict(lora_alpha=float("nan")), dict(lora_dropout=1.5), dict(steps=10**12),
                                 dict(post_tune_steps=10**12)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        _cfg(**bad)


def test_a_save_killed_before_the_state_swap_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    from acip_core.training import score
    from acip_core.training import train
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    score.save_checkpoint(tmp_path, score.RunState(step=4), {"p": p}, opt, None)
    with torch.no_grad():
        p.fill_(7.0)
    real_write = train.atomic_write_bytes

    def die_on_state(path, data):
        if path.name == score.CHECKPOINT_STATE:
            raise KeyboardInterrupt("killed")  # the new tensors are on disk, the state is not
        real_write(path, data)

    monkeypatch.setattr(train, "atomic_write_bytes", die_on_state)
    with pytest.raises(KeyboardInterrupt):
        score.save_checkpoint(tmp_path, score.RunState(step=8), {"p": p}, opt, None)
    monkeypatch.undo()
    state, _ = score.load_checkpoint(tmp_path, {"p": p}, opt)
    assert state.step == 4 and torch.equal(p.detach(), torch.ones(3))
    (tmp_path / ".checkpoint-0123456789abcdef.safetensors.x1y2.tmp").write_bytes(b"half")  # a killed write's
    score.save_checkpoint(tmp_path, score.RunState(step=8), {"p": p}, opt, None)
    assert len(list(tmp_path.glob(score.CHECKPOINT_GLOB))) == 1  # the stale tensor file is gone
    assert not list(tmp_path.glob(".checkpoint*.tmp"))  # and the killed write's leftover
    score.remove_checkpoint(tmp_path)
    assert not list(tmp_path.glob("checkpoint*"))


@pytest.mark.parametrize("fmt", ["int8", "int4-g32"])
def test_a_quantized_base_layer_runs_the_low_bit_factors_and_trains_masks_and_lora(fmt):
    from acip_core.formats.registry import parse_format
    from acip_core.engine.layers import ACIPLinear

    torch.manual_seed(0)
    w = torch.randn(64, 32)
    U, s, Vh = torch.linalg.svd(w, full_matrices=False)
    layer = ACIPLinear(w, U, s, Vh, bias=torch.randn(64), lora_rank=4)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.mask[::3] = -1.0  # a third of the directions pruned
    layer.quantize_base_(parse_format(fmt))
    assert layer.weight is None and layer.U is None and layer.Vh is None  # nothing float is held
    x = torch.randn(3, 5, 32, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        layer.dropout.p = 0.0
        y = layer(x)
        ref = torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)  # dequantized-factor oracle
        assert (y - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 activations in the kernels
    y.sum().backward()
    assert layer.mask.grad.abs().sum() > 0 and layer.lora_A.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0  # gradients pass the frozen low-bit factors to the layers below
    assert (layer.mask.grad[::3] == 0).all()  # the straight-through estimator: pruned entries get none


def test_scoring_on_a_quantized_base_transfers_to_the_full_precision_model(tiny_llama, tiny_llama_wide, tmp_path):
    from acip_core.evaluation.baselines import open_method

    cfg = _cfg(steps=12, post_tune_steps=2, base_format="int4")
    with pytest.raises(ValueError, match="does not fit layer .*k_proj.*multiple of 32"):  # 16-wide k_proj
        run_scoring(tiny_llama, "corpus:train", tmp_path / "narrow", "svd", cfg, eval_windows=0)
    art = run_scoring(tiny_llama_wide, "corpus:train", tmp_path / "q", "svd", cfg, eval_windows=2,
                      curve_sizes=[0.5, 1.0])
    assert art.meta.scoring["base_format"] == "int4-g32"
    assert art.meta.result.extra["steps_rss_mib"] > 0  # every step logs its resident memory
    log = [json.loads(l) for l in (tmp_path / "q" / "log.jsonl").read_text().splitlines()]
    assert all(e["rss_mib"] > 0 for e in log)
    # the peak within a step (VmHWM, reset at the step's start) is never below the RSS after it
    assert all(e["step_peak_mib"] >= e["rss_mib"] for e in log)
    assert art.meta.result.extra["steps_peak_mib"] == max(e["step_peak_mib"] for e in log)
    # the transfer: the curve was measured on the full-precision factors, and the artifact opens as any other
    acip = art.curve[art.curve.method == "acip"]
    assert acip.ppl_heldout.notna().all() and (acip.ppl_heldout < 1e4).all()
    full = acip[acip.size_ratio.round(2) == 1.0].ppl_heldout.iloc[0]
    orig = art.curve[art.curve.method == "original"].ppl_heldout.iloc[0]
    assert abs(full - orig) / orig < 0.05  # at full size the transferred model is the original (+ its LoRA)
    model, _ = open_method(tmp_path / "q")
    assert abs(model.size_for_ratio(0.5).size_ratio - 0.5) < 0.05


def test_peak_rss_keeps_what_came_before_the_step_windows():
    """Each step resets Linux's high-water mark (clear_refs), which also resets ru_maxrss: the
    reported peak lost loading, family builds and the teacher."""
    import sys

    from acip_core.training import train

    if not sys.platform.startswith("linux"):
        pytest.skip("clear_refs is Linux's")
    big = torch.ones(100 * 2**20)  # 400 MiB, every page written
    held = train.rss_mib()
    del big
    train.reset_step_peak()
    train.reset_step_peak()
    assert train.peak_rss_mib() >= held


def test_a_checkpoint_naming_its_run_loads_and_a_torn_log_line_is_skipped(tmp_path):
    from acip_core.training import score
    from acip_core.training import train

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    train.save_checkpoint(tmp_path, dict(step=4, phase="acip", run={"seed": 1}), {"p": p}, opt)
    state, _ = score.load_checkpoint(tmp_path, {"p": p}, opt)  # a real checkpoint has "run": TypeError before
    assert state.step == 4 and state.phase == "acip"
    log = tmp_path / train.LOG_FILE
    log.write_text('{"step": 1, "rss_mib": 10}\n{"step": 2, "rss_mib": 30}\n{"no_step": 1}\n{"step": 3, "rss_')
    assert train.steps_memory(tmp_path)["steps_rss_mib"] == 30  # a torn last line (disk full) is skipped
    train._truncate_log(log, 1)
    assert [r["step"] for r in train.log_rows(log)] == [1]

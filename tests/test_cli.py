import json
import subprocess
import sys

import pytest


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "acip_core", *args, "--json"], capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_size_eval_generate_on_an_artifact(tiny_artifact):
    rc, size = _cli("size", "--artifact", str(tiny_artifact), "--size-ratio", "0.6")
    assert rc == 0 and 0.6 <= size["size_ratio"] <= 0.61 and size["bytes"] == 4 * size["params"]
    assert size["format"] == "float32"
    rc, budget = _cli("size", "--artifact", str(tiny_artifact), "--budget-gb", str(size["params"] * 2 / 1e9),
                      "--format", "bfloat16")
    assert rc == 0 and budget["params"] >= size["params"] and budget["budget_left_gb"] >= 0
    rc, ev = _cli("eval", "--artifact", str(tiny_artifact), "--size-ratio", "0.6", "--seq-len", "32",
                  "--max-windows", "4")
    assert rc == 0 and ev["perplexity"] > 1 and ev["tokens"] == 128
    rc, gen = _cli("generate", "--artifact", str(tiny_artifact), "--size-ratio", "0.6", "--prompt", "Debian",
                   "--max-new-tokens", "5", "--no-chat")
    assert rc == 0 and isinstance(gen["text"], str)


@pytest.mark.parametrize("ratio", ["nan", "-0.2", "1.5"])
def test_out_of_range_sizes_are_clear_errors(tiny_artifact, ratio):
    rc, out = _cli("size", "--artifact", str(tiny_artifact), "--size-ratio", ratio)
    assert rc == 2 and "size_ratio must be within [0, 1]" in out["error"]


def test_budget_too_small(tiny_artifact):
    rc, out = _cli("size", "--artifact", str(tiny_artifact), "--budget-gb", "0.0000001")
    assert rc == 2 and "smaller than the smallest model" in out["error"]


def test_the_layout_flag_reaches_the_size(tiny_artifact):
    """`--layout fast` names the format `int8+fast`; in this subprocess the per-call charge is on (the
    conftest switch is in the test process only), and the tiny model's layers (a few KB) are far below
    it, so the fast layout runs every layer dense (as int8's rank step of 16 does here for the small one)."""
    rc, small = _cli("size", "--artifact", str(tiny_artifact), "--size-ratio", "0.3", "--format", "int8")
    rc2, fast = _cli("size", "--artifact", str(tiny_artifact), "--size-ratio", "0.3", "--format", "int8",
                     "--layout", "fast")
    assert rc == rc2 == 0 and (small["format"], fast["format"]) == ("int8", "int8+fast")
    assert fast["dense_layers"] == fast["layers"] and fast["bytes"] >= small["bytes"]
    assert fast["size_ratio"] == small["size_ratio"]
    rc, out = _cli("size", "--artifact", str(tiny_artifact), "--size-ratio", "0.3", "--layout", "fast")
    assert rc == 2 and "only the quantized formats have a fast layout" in out["error"]


@pytest.mark.parametrize("options, message", [
    (["--methods", "acip", "--sizes", "1.0:0.3:0.05"], "LO <= HI"),
    (["--methods", "acip", "--sizes", "0.3:1:0"], "STEP > 0"),
    (["--methods", "acip", "--sizes", "0.3:1"], "LO:HI:STEP"),
    (["--methods", "svd-magnitude", "--formats", "int8"], "nothing to measure"),
    (["--methods", "acip,nope"], "unknown"),
    (["--methods", "acip", "--eval", "heldout"], "NAME=SOURCE"),
])
def test_curve_refuses_a_plan_before_it_drops_any_row(tiny_artifact, tmp_path, capsys, options, message):
    """A curve run that cannot measure anything said so only after rewriting curve.csv with the
    original's row alone (or crashed): now every option is checked before anything is touched."""
    import shutil

    from acip_core import cli

    folder = tmp_path / "art"
    shutil.copytree(tiny_artifact, folder)
    before = (folder / "curve.csv").read_bytes()
    assert cli.main(["curve", "--artifact", str(folder), "--windows", "2", "--seq-len", "32"] + options) == 2
    assert message in capsys.readouterr().err
    assert (folder / "curve.csv").read_bytes() == before


def test_texts_and_outputs_are_checked_before_any_long_work(tmp_path, capsys, monkeypatch):
    """score reads --data and --eval-data before loading the model (a typo failed after the whole run),
    self-text checks --out before sampling (a folder failed after minutes of sampling)."""
    from acip_core import cli
    from acip_core.sources import models

    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("loaded a model"))
    for argv, message in ((["score", "--data", "corpus:nope", "--out", str(tmp_path / "a")], "--data 'corpus:nope'"),
                          (["score", "--eval-data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "b")],
                           "--eval-data"),
                          (["self-text", "--out", str(tmp_path)], "name a file in an existing folder"),
                          (["self-text", "--out", str(tmp_path / "no" / "such" / "x.txt")], "existing folder")):
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_budget_on_an_eval_set_the_curve_lacks_names_the_ones_it_has(tiny_artifact, capsys):
    from acip_core import cli

    assert cli.main(["size", "--artifact", str(tiny_artifact), "--budget-gb", "1", "--eval-set", "typo"]) == 2
    err = capsys.readouterr().err
    assert "no perplexity on 'typo'" in err and "heldout" in err


def test_negative_eval_windows_and_a_nan_loss_are_clear_errors(tmp_path, capsys, monkeypatch):
    """--eval-windows -1 failed only after the whole run (at its curve); a loss that turned NaN
    (FloatingPointError, an ArithmeticError) escaped the CLI as a traceback."""
    from acip_core import cli
    from acip_core.sources import models

    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("loaded a model"))
    for argv in (["score", "--eval-windows", "-1", "--out", str(tmp_path / "a")],
                 ["finetune", "--artifact", "x", "--size-ratio", "0.5", "--eval-windows", "-2", "--out", str(tmp_path / "b")]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert "windows >= 0" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "plan", lambda args: (_ for _ in ()).throw(
        FloatingPointError("loss became nan at step 3; lower --lr")))
    assert cli.main(["plan", "--json"]) == 2
    assert "loss became nan" in json.loads(capsys.readouterr().out)["error"]

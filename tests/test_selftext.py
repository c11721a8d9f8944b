"""Calibration text sampled from the model itself (`self-text`), without the held-out domain."""

import json
import subprocess
import sys

from acip_core.evaluation.selftext import HELD_OUT_DOMAIN, drop_paragraphs


def test_paragraphs_about_or_in_python_are_left_out():
    text = "\n\n".join([
        "Bread rises because yeast makes gas.",
        "In Python, a list keeps its order.",
        "Here is the code:\n    import os\n    os.listdir('.')",
        "A for loop in JavaScript:\nfor (let i = 0; i < 3; i++) {}",
        "def main():\n    return 1",
        'Call print("hi") to greet.',
    ])
    kept = drop_paragraphs(text, HELD_OUT_DOMAIN).split("\n\n")
    assert kept == ["Bread rises because yeast makes gas.", "A for loop in JavaScript:\nfor (let i = 0; i < 3; i++) {}"]
    assert drop_paragraphs(text, "") == text  # an empty pattern keeps everything


def test_self_text_command_writes_the_samples(tiny_llama, tmp_path):
    out = tmp_path / "samples.txt"
    proc = subprocess.run([sys.executable, "-m", "acip_core", "self-text", "--model", tiny_llama, "--prompts", "3",
                           "--max-new-tokens", "12", "--batch-size", "2", "--dtype", "float32", "--out", str(out),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.read_text() and result["characters"] == len(out.read_text())

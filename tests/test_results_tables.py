"""The tables of benchmarks/RESULTS.md (and docs/HISTORY.md) are the ones their result files make
(`python -m benchmarks tables --check`, benchmarks/tables.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def benchmarks(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_every_generated_table_equals_its_result_file():
    run = benchmarks("tables", "--check")
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_hand_edited_figure_in_a_generated_table_is_caught(tmp_path):
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    start = text.index("<!-- table:llamacpp_speed -->")
    row = text.index("| llama.cpp Q4_1 |", start)
    edited = tmp_path / "RESULTS.md"
    edited.write_text(text[:row] + text[row:].replace("101.5", "111.5", 1))
    run = benchmarks("tables", "--check", str(edited))
    assert run.returncode == 1
    assert "llamacpp_speed" in run.stdout


def test_the_entry_point_lists_every_benchmark_with_its_purpose():
    run = benchmarks()
    assert run.returncode == 0, run.stderr
    names = {line.split()[0] for line in run.stdout.splitlines()[2:] if line.strip()}
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} | {p.stem for p in (ROOT / "benchmarks").glob("*.sh")}
    assert scripts - {"__main__", "common", "tables"} <= names
    assert "tables" in names

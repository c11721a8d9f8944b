"""The tables of benchmarks/RESULTS.md (and docs/HISTORY.md) are the ones their result files make
(`python -m benchmarks tables --check`, benchmarks/tables.py)."""

import json
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
    figure = text[row:].split("|")[2].strip()  # the row's decode tok/s, whatever was measured
    edited.write_text(text[:row] + text[row:].replace(figure, f"{float(figure) + 10:.1f}", 1))
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


def test_a_result_file_holds_the_machine_the_date_and_the_command_with_the_figures(tmp_path):
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import common, json; "
            f"p = common.write_result('probe', {{'tok_s': 1.5}}, {str(tmp_path / 'probe.json')!r}); "
            "print(p.read_text())")
    run = subprocess.run([sys.executable, "-c", code, "--rounds", "3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["figures"] == {"tok_s": 1.5}
    assert record["command"].endswith("--rounds 3")
    assert record["date"][:2] == "20"
    assert {"cpu", "cpu_flags", "cores", "torch", "torch_threads"} <= set(record["machine"])

"""One entry point for the benchmarks (benchmarks/RESULTS.md cites them by name):

    python -m benchmarks                  # the list, each with its purpose
    python -m benchmarks NAME [options]   # run benchmarks/NAME.py (or NAME.sh) with those options
    python -m benchmarks tables [--check] # RESULTS.md's tables from benchmarks/results/

A script runs exactly as `python benchmarks/NAME.py [options]` would (its folder on sys.path, `common`
importable); the shared options (`--artifact`, `--json`) and the machine description are in common.py."""

from __future__ import annotations

import ast
import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"__main__", "__init__", "common", "tables"}  # the harness itself


def scripts() -> dict[str, Path]:
    found = {p.stem: p for p in HERE.glob("*.sh")}
    found.update({p.stem: p for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS})
    return dict(sorted(found.items()))


def purpose(path: Path) -> str:
    """The first line of a script's docstring, or of a shell script's leading comment."""
    text = path.read_text()
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(text)) or ""
        return doc.strip().split("\n\n")[0].replace("\n", " ") or "(no docstring)"
    lines = [line[1:].strip() for line in text.splitlines()[1:] if line.startswith("#")]
    first = []
    for line in lines:  # the comment's first sentence
        first.append(line)
        if line.endswith((".", ":")) or not line:
            break
    return " ".join(first).strip() or "(no comment)"


def one_line(text: str, width: int = 110) -> str:
    """The first sentence, cut to `width` characters."""
    for stop in (". ", "? "):
        if stop in text:
            text = text.split(stop, 1)[0] + stop.strip()
            break
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def listing() -> str:
    rows = [("tables", "RESULTS.md's tables regenerated from benchmarks/results/ (--check: exit 1 on a difference)")]
    rows += [(name + (" (sh)" if path.suffix == ".sh" else ""), one_line(purpose(path))) for name, path in scripts().items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {text}" for name, text in rows)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__.split("\n\n")[0] + "\n\n" + listing())
        return 0
    name, options = argv[0], argv[1:]
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    if name == "tables":
        import tables

        return tables.main(options)
    path = scripts().get(name.removesuffix(".py").removesuffix(".sh"))
    if path is None:
        print(f"no benchmark {name!r}; `python -m benchmarks` lists them", file=sys.stderr)
        return 2
    if path.suffix == ".sh":
        os.execvp("bash", ["bash", str(path), *options])
    sys.argv = [str(path), *options]
    sys.path[0] = str(HERE)  # as `python benchmarks/NAME.py` has it
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

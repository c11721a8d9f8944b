"""Build manpages.txt: English prose from the manual pages installed on a Debian machine.

    python assets/corpus/make_manpages.py [--max-chars 800000] [--out assets/corpus/manpages.txt]
    python assets/corpus/make_manpages.py --sections man2,man3 --max-chars 600000 \
        --out assets/corpus/manpages_dev.txt       # programming reference: C and Perl, code included

Reference prose of another kind than the handbook (command options, file formats, overviews in
sections 1, 5, 7, 8; nothing about Python, whose help topics are the held-out domain), rendered by `man` without hyphenation or justification so that a paragraph is
one line. Each page is capped so that a few huge pages (bash, gcc) do not dominate; pages are taken
evenly across the sorted list up to about the size cap. Deterministic for a given set of installed pages.
"""

import argparse
import os
import re
import subprocess
from pathlib import Path

SECTIONS = ("man1", "man5", "man7", "man8")
PAGE_CAP = 12_000  # characters per page
TABLE_RULE = re.compile(r"[\u2500-\u257f\s]+")
WIDE_GAP = re.compile(r"[ \t]{9,}")


def render(path: Path) -> str:
    env = dict(os.environ, MANWIDTH="10000", LC_ALL="C.UTF-8")
    out = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], capture_output=True, env=env, timeout=30)
    text = subprocess.run(["col", "-b"], input=out.stdout, capture_output=True).stdout.decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines()[1:-1]]  # drop the header and footer lines
    # drop table rules: at MANWIDTH=10000 each one is thousands of box-drawing characters
    lines = [line for line in lines if not TABLE_RULE.fullmatch(line)]
    lines = [WIDE_GAP.sub("\t", line) for line in lines]  # and table cells padded with a thousand tabs
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return text[:text.rfind("\n", 0, PAGE_CAP)] if len(text) > PAGE_CAP else text


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-chars", type=int, default=800_000)
    parser.add_argument("--out", default=str(Path(__file__).with_name("manpages.txt")))
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated man directories")
    args = parser.parse_args()
    pages, families = [], set()
    for page in sorted(p for s in args.sections.split(",") for p in (Path("/usr/share/man") / s).glob("*.gz")):
        family = re.split(r"[-_.]|::", page.name)[0].lower()  # one page per family (gcloud has thousands)
        if family not in families and not family.startswith("py"):  # Python is the held-out domain
            families.add(family)
            pages.append(page)
    rendered = [t for t in map(render, pages) if len(t.split()) >= 150]  # no stubs, no redirects
    keep = max(1, round(len(rendered) * args.max_chars / sum(len(t) + 2 for t in rendered)))
    texts = [rendered[i * len(rendered) // keep] for i in range(min(keep, len(rendered)))]  # evenly spread
    total = sum(len(t) + 2 for t in texts)
    Path(args.out).write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    print(f"{len(texts)} pages, {total:,} characters -> {args.out}")


if __name__ == "__main__":
    main()

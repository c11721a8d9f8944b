"""Builds the offline lm-eval tasks (4-way multiple choice) from held-out text, deterministically.

- next_sentence: the context is 2 consecutive sentences of one paragraph; choose the true next
  sentence among 4: the true one and 3 sentences of similar length from other paragraphs.
- last_word: a passage of 2-3 consecutive sentences without its final word; choose that word
  among 4: the true one and 3 lowercase words of similar length and frequency from the same text
  that do not occur in the passage.

Only text the scoring never calibrates on is used: corpus:heldout (the last 20 % of the Debian
handbook) and corpus:domain (Python's help topics, a held-out domain). Every item is a JSON line
{id, source, context, choices[4], label, answer} with choices[label] == answer.

`python -m acip_core.evaluation.tasks_build` rewrites assets/lm_eval/*.jsonl (the same bytes every time).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

from acip_core.sources.data import load_text

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "lm_eval"
N_CHOICES = 4
N_ITEMS = 250
SEED = 1234
# task name -> (kind, text source)
TASK_SPECS = {
    "acip_next_sentence": ("next_sentence", "corpus:heldout"),
    "acip_last_word": ("last_word", "corpus:heldout"),
    "acip_next_sentence_domain": ("next_sentence", "corpus:domain"),
    "acip_last_word_domain": ("last_word", "corpus:domain"),
}

_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "cf.", "vs.", "Dr.", "Mr.", "Mrs.", "Ms.", "No.", "Fig.", "resp.")
_SPLIT = re.compile(r"(?<=[.!?])[\"”')]?\s+(?=[\"“(]?[A-Z])")
# traces of inline code that the corpus extraction dropped ("the and fields", "type .", "()")
_GAP = re.compile(r"\s[.,;:)!?]|\(\s|\(\)|\b(?:the|a|an|with|type|run)\s+(?:and|or|is|are)\b|\s{2}|\[|\]|[{}<>|=_\\`]")


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs, whitespace-normalized; code blocks, tables and headings left out."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        indents = [len(ln) - len(ln.lstrip(" ")) for ln in lines]
        if max(indents) - min(indents) >= 3 or any(ln.lstrip().startswith((">>>", "...", "$ ", "# "))
                                                     for ln in lines):
            continue  # a code block or a hanging layout
        par = " ".join(" ".join(lines).split()).replace("\xa0", " ")
        par = re.sub(r"^[*\-•]\s+", "", par)
        letters = sum(c.isalpha() or c.isspace() for c in par)
        if len(par) < 60 or letters < 0.85 * len(par):
            continue
        out.append(par)
    return out


def sentences(par: str) -> list[str]:
    """A paragraph split into sentences (not after common abbreviations or initials)."""
    pieces = [p for p in _SPLIT.split(par) if p]
    out = []
    for p in pieces:
        if out and (out[-1].endswith(_ABBREVIATIONS) or re.search(r"\b[A-Z]\.$", out[-1])):
            out[-1] += " " + p
        else:
            out.append(p)
    return [s.strip() for s in out]


def clean(s: str, lo: int = 30, hi: int = 240) -> bool:
    """A full, plain sentence: capitalized, ends with . ! ?, no extraction gaps, a sane length."""
    return (lo <= len(s) <= hi and s[0].isupper() and s[-1] in ".!?" and not _GAP.search(s)
            and sum(c.isalpha() or c.isspace() for c in s) >= 0.88 * len(s))


def _place(rng: random.Random, answer: str, distractors: list[str]) -> tuple[list[str], int]:
    label = rng.randrange(N_CHOICES)
    choices = list(distractors)
    choices.insert(label, answer)
    return choices, label


def next_sentence_items(text: str, n: int = N_ITEMS, seed: int = SEED, source: str = "") -> list[dict]:
    rng = random.Random(seed)
    pars = [sentences(p) for p in paragraphs(text)]
    pool = sorted({(s, i) for i, sents in enumerate(pars) for s in sents if clean(s, 40, 200)})
    candidates = []
    for i, sents in enumerate(pars):
        for j in range(len(sents) - 2):  # every sentence that follows two others
            a, b, c = sents[j:j + 3]
            if clean(a, 20, 300) and clean(b, 20, 300) and clean(c, 40, 200):
                candidates.append((i, a + " " + b, c))
    rng.shuffle(candidates)
    items, used = [], set()
    for i, context, answer in candidates:
        if len(items) == n:
            break
        if answer in used:
            continue
        near = [s for s, k in pool if k != i and s != answer and s not in context
                and 0.75 * len(answer) <= len(s) <= 1.33 * len(answer)]
        if len(set(near)) < N_CHOICES - 1:
            continue
        distractors = rng.sample(sorted(set(near)), N_CHOICES - 1)
        used.add(answer)
        choices, label = _place(rng, answer, distractors)
        items.append(dict(context=context, choices=choices, label=label, answer=answer))
    return _number(items, "next_sentence", source)


def last_word_items(text: str, n: int = N_ITEMS, seed: int = SEED, source: str = "") -> list[dict]:
    rng = random.Random(seed)
    pars = [sentences(p) for p in paragraphs(text)]
    counts = Counter(re.findall(r"(?<![\w'-])[a-z]{3,}(?![\w'-])", text))
    by_len: dict[int, list[str]] = {}
    for w in sorted(counts):
        by_len.setdefault(len(w), []).append(w)
    candidates = []
    for i, sents in enumerate(pars):
        for end in range(1, len(sents)):  # every sentence that ends a passage of 2 or 3
            passage = sents[max(0, end - 1 - rng.randrange(2)):end + 1]
            if not all(clean(s, 20, 300) for s in passage):
                continue
            whole = " ".join(passage)
            m = re.search(r"\s([a-z]{4,})\.$", whole)
            if m and 80 <= len(whole) <= 500:
                candidates.append((whole[:m.start()].rstrip(), m.group(1)))
    rng.shuffle(candidates)
    items = []
    for context, answer in candidates:
        if len(items) == n:
            break
        seen = {w.lower() for w in re.findall(r"[A-Za-z]+", context)}
        near = [w for d in (0, -1, 1) for w in by_len.get(len(answer) + d, [])
                if w[:4] != answer[:4] and w not in seen]  # no inflection of the answer
        if len(near) < N_CHOICES - 1:
            continue
        # 3 of the 12 closest in log-frequency (ties broken at random)
        rng.shuffle(near)
        near.sort(key=lambda w: (abs(math.log(counts[w]) - math.log(max(counts[answer], 1))), w))
        distractors = rng.sample(near[:12], N_CHOICES - 1)
        choices, label = _place(rng, answer, distractors)
        items.append(dict(context=context, choices=choices, label=label, answer=answer))
    return _number(items, "last_word", source)


def _number(items: list[dict], kind: str, source: str) -> list[dict]:
    return [dict(id=f"{kind}-{k:04d}", source=source, **item) for k, item in enumerate(items)]


BUILDERS = {"next_sentence": next_sentence_items, "last_word": last_word_items}


def build_task(task: str, n: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """The items of one offline task (see TASK_SPECS), built from its held-out text."""
    kind, source = TASK_SPECS[task]
    return BUILDERS[kind](load_text(source), n, seed, source)


def to_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def write_tasks(folder: Path = ASSET_DIR, n: int = N_ITEMS, seed: int = SEED) -> dict[str, int]:
    """Writes <task>.jsonl for every task of TASK_SPECS; returns the item count of each."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for task in TASK_SPECS:
        items = build_task(task, n, seed)
        (folder / f"{task}.jsonl").write_text(to_jsonl(items), encoding="utf-8")
        counts[task] = len(items)
    return counts


if __name__ == "__main__":
    print(json.dumps(write_tasks()))

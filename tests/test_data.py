"""The named corpus splits: calibration mixes never contain held-out text (in-domain or domain)."""

import re

import pytest

from acip_core.sources.data import SPLITS, DataSourceError, load_text

HELD_OUT = ("heldout", "domain")
CALIBRATION = [key for key in SPLITS if key not in HELD_OUT]


def _paragraphs(text: str, n: int = 60) -> list[str]:
    # the handbook repeats each chapter's table of contents ("13.1. Configuring ...13.2. ...") at its
    # start and at the chapter: those few lines are the book's own repeats, not a leak of the split
    long = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200 and not re.match(r"\d+\.\d+\. ", p)]
    return long[:: max(1, len(long) // n)]


@pytest.mark.parametrize("split", CALIBRATION)
def test_calibration_mix_holds_no_held_out_paragraph(split):
    calibration = load_text(f"corpus:{split}")
    for held_out in HELD_OUT:
        paragraphs = _paragraphs(load_text(f"corpus:{held_out}"))
        assert len(paragraphs) >= 50
        leaked = [p[:60] for p in paragraphs if p in calibration]
        assert not leaked, f"corpus:{split} holds {held_out} text: {leaked[:3]}"


def test_programming_reference_is_not_python():
    # corpus:broad-code adds programming text; Python's help topics are the held-out domain
    assert "python" not in load_text("corpus:manpages-dev").lower()
    assert len(load_text("corpus:broad-code")) > len(load_text("corpus:broad")) + 500_000


def test_unknown_split_is_a_clear_error():
    with pytest.raises(DataSourceError, match="unknown corpus part"):
        load_text("corpus:nope")


def test_an_hf_dataset_is_read_from_its_text_column_whatever_the_first_column_holds(monkeypatch):
    """Rows whose `text` is empty are skipped (the first column, an int id, was taken instead and failed
    as "could not load"); without a `text` column the first string column is read; none: said so."""
    import sys
    import types

    from acip_core.sources import data

    rows = {"with-text": [dict(id=1, text="first doc"), dict(id=2, text=""), dict(id=3, text="third doc")],
            "no-text": [dict(id=1, body="a body"), dict(id=2, body="another")],
            "no-strings": [dict(id=1, score=0.5)]}
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split, streaming: iter(rows[name]))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(data, "datasets_offline", lambda: False)
    monkeypatch.setattr(data, "is_public", lambda: False)
    assert load_text("hf:with-text") == "first doc\n\nthird doc"
    assert load_text("hf:no-text") == "a body\n\nanother"
    with pytest.raises(DataSourceError, match="no text column"):
        load_text("hf:no-strings")

"""What the app says (acip_core/serving/texts.py): no spread from one window, replies without visible text,
lm-eval counts, ETAs."""

import pytest

from acip_core.serving import texts as text


def _row(windows, low, high):
    return dict(perplexity=40.0, ppl_low=low, ppl_high=high, size_ratio=0.7, format="float32",
                data="corpus:heldout", windows=windows, seq_len=128, seconds=1.0, tokens_per_s=100.0)


def test_one_window_says_there_is_no_spread():
    one = text.perplexity_text(_row(1, 40.0, 40.0))
    assert "no spread" in one and "± 0" not in one and "1 window ×" in one
    two = text.perplexity_text(_row(2, 38.0, 42.0))
    assert "38.0–42.0" in two and "no spread" not in two
    table = text.results_table([dict(_row(1, 40.0, 40.0), kind="perplexity", time="t"),
                                dict(_row(4, 38.0, 42.0), kind="perplexity", time="t")])
    assert list(table["± (one s.e.)"]) == ["38.0–42.0", "no spread (1 window)"]


def test_a_reply_with_tokens_but_no_text_says_so():
    snap = dict(done=True, text=" \n", tokens=128)
    assert "128 tokens" in text.reply(snap) and "at once" not in text.reply(snap)
    assert "at once" in text.reply(dict(done=True, text="", tokens=0))
    assert text.reply(dict(done=False, text="", tokens=3)) == ""


def test_lm_eval_counts_are_whole_numbers_and_etas_read_well():
    assert text.metric_value(10.0) == "10" and text.metric_value(0.4567) == "0.457"
    assert text.metric_value(1000.0) == "1,000"
    assert text.eta_text(0, 10, 5.0) == "" and text.eta_text(10, 10, 5.0) == ""
    assert text.eta_text(5, 10, 10.0) == "ETA 10 s"
    assert text.eta_text(1, 10, 30.0) == "ETA 4 min 30 s"


def test_sweep_sizes_are_parsed_and_a_huge_range_is_refused_before_it_is_built():
    import time

    from acip_core.serving.texts import parse_sizes

    assert parse_sizes("1.0:0.4:0.1") == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert parse_sizes("0.5, 1; 0.5") == [1.0, 0.5]
    start = time.perf_counter()
    for bad in ("1:0:1e-9", "1:0:1e-300", "1e308:0:1e-308"):
        with pytest.raises(ValueError, match="at most 12 sizes per sweep"):
            parse_sizes(bad)
    assert time.perf_counter() - start < 0.5  # counted, not listed (1e9 floats would take minutes and GBs)
    for bad in ("inf:0:0.1", "1:-inf:0.1", "1:0:inf", "nan:0:0.1", "1:0:0", "1:0:-0.1", "a:b:c", ""):
        with pytest.raises(ValueError):
            parse_sizes(bad)
    for empty in ("", "  ", ",,"):
        with pytest.raises(ValueError, match="give at least one size"):
            parse_sizes(empty)
    with pytest.raises(ValueError) as err:
        parse_sizes("2, " + "0.5, " * 10_000)
    assert len(str(err.value)) < 200  # the message does not echo a huge field

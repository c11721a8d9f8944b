"""The formats, listed once (docs/ARCHITECTURE.md, "Formats"): each family in its own module owns its
bytes, rank step, packing, kernel call, dequantization and export form (formats/family.py); this module
names them, writes and parses the one key grammar, and says which keys the app offers, how the curve
plot draws each, and what the CLI accepts.

The key: `<family>[-g<group>][+emb8][+fast]`, e.g. `float32`, `int8+emb8`, `int4-g64+fast`, `float8`.
  -gNN   int4's group length along the input axis (the families with `group_sizes`);
  +emb8  the (tied) embedding / LM head quantized per row in int8 too (default: the compute dtype);
  +fast  a quantized family's layout that charges a low-rank layer's second kernel call
         (`Format.call_bytes`), so a layer runs factorized only where that is faster.

Bytes are counted from the tensors a QWeight holds (data + scales + zeros), so a memory budget is
checked against what the process really holds. The low-rank factors are quantized once, in score
order (engine/materialize.py): a size keeps a prefix of rows of `down` (a view) and a prefix of columns
of `up` (a small copy), its kept rank (LoRA rows included) a multiple of the family's rank step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from acip_core.formats import float8, floats, int4, int8
from acip_core.formats.family import Family

# every family, in the order the CLI and the plot list them
FAMILIES: dict[str, Family] = {f.name: f for f in (*floats.FAMILIES, *int8.FAMILIES, *int4.FAMILIES,
                                                   *float8.FAMILIES)}
FORMAT_NAMES = tuple(FAMILIES)
# the keys the app offers: float, weight-only int8 / int4 (groups of 32), both with the embedding / LM
# head in int8 too, and both in the fast layout; float8
APP_FORMATS = ("float32", "bfloat16", "int8", "int4-g32", "int8+emb8", "int4-g32+emb8", "int8+fast",
               "int4-g32+fast", "float8")
EMBEDDING_CHOICES = ("native", "int8")  # native = the compute dtype
LAYOUTS = ("small", "fast")  # quantized formats: fewest bytes, or a layer factorized only where that is faster
_EMB8, _FAST = "+emb8", "+fast"

# Format.call_bytes of the "fast" layout. A product by torch's low-bit CPU kernels (with our Python
# around it) takes about a + bytes/bandwidth (batch 1, weights cold): a·bandwidth = 110 KB (int8) and
# 147 KB (int4) on the Zen 5, ≈ 130 KB on the Zen 3 (benchmarks/call_floor.py; benchmarks/RESULTS.md,
# "Per-call charge"); rounded up, so a near-tie runs dense (the original's weight). Module level, so
# tests on tiny models, whose layers are far below it, set it to 0 and still reach the low-rank form
# (tests/conftest.py).
CALL_BYTES = 160_000


@dataclass(frozen=True)
class Format:
    """How the linears of a materialized model are stored and multiplied: a family and its options."""

    name: str = "float32"  # one of FORMAT_NAMES: the family
    group_size: int | None = None  # the family's group length (int4), else None
    embeddings: str = "native"  # "int8": the (tied) embedding / LM head quantized per row too
    layout: str = "small"  # "fast" (quantized families): the second kernel call of a low-rank layer charged

    def __post_init__(self):
        if self.name not in FAMILIES:
            raise ValueError(f"unknown format {self.name!r}; choose one of {list(FORMAT_NAMES)}")
        family = FAMILIES[self.name]
        if self.group_size is None and family.default_group_size is not None:
            object.__setattr__(self, "group_size", family.default_group_size)
        family.validate(self)
        if self.embeddings not in EMBEDDING_CHOICES:
            raise ValueError(f"embeddings must be one of {list(EMBEDDING_CHOICES)}, got {self.embeddings!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "fast" and not self.quantized:
            raise ValueError(f"only the quantized formats have a fast layout (their kernels' per-call floor); "
                             f"{self.name} has none")
        if self.embeddings == "int8" and not self.quantized:  # their embeddings stay in the float dtype
            raise ValueError(f"only the quantized formats take int8 embeddings (+emb8); {self.name} keeps its "
                             "embedding in its own dtype")

    # -- identity ---------------------------------------------------------------------------------
    @property
    def family(self) -> Family:
        return FAMILIES[self.name]

    @property
    def key(self) -> str:
        """The one string for this format (curve.csv's `format` column, CLI, app, cache keys)."""
        return (self.family.key(self) + (_EMB8 if self.embeddings == "int8" else "")
                + (_FAST if self.layout == "fast" else ""))

    def __str__(self) -> str:
        return self.key

    @property
    def quantized(self) -> bool:
        return self.family.quantized

    @property
    def calibrated(self) -> bool:
        """Whether packing wants each layer's input Gram (engine/materialize.py gathers them)."""
        return self.family.calibrated

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.family.compute_dtype(self)

    @property
    def rank_step(self) -> int:
        """The kept rank of a factorized layer (LoRA rows included) is a multiple of this (the family's
        kernel: int4 keeps whole groups, int8 and float8 input sizes of 16)."""
        return self.family.rank_step(self)

    @property
    def call_bytes(self) -> int:
        """What a low-rank layer's second kernel call is charged, in bytes read, when choosing between
        its two forms (`prune.LayerShape.format_bytes`). The "small" layout: 0, the paper's byte rule
        (fewest bytes, the best perplexity per GB). The "fast" layout: a call's measured floor, so a
        layer runs factorized only where two calls beat one — never slower than the original in the
        same format, for more bytes at the same size ratio (benchmarks/RESULTS.md, "Per-call charge")."""
        return CALL_BYTES if self.layout == "fast" else 0

    # -- bytes --------------------------------------------------------------------------------------
    @property
    def float_bytes(self) -> int:
        return self.compute_dtype.itemsize

    def weight_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of one [out, in] weight in this format: data + scales (+ zeros), as QWeight holds it."""
        return self.family.weight_bytes(self, out_features, in_features)

    def group_for(self, in_features: int) -> int:
        """The group length used for an input size (families with groups: int4)."""
        return self.family.group_for(self, in_features)

    def kept_rank(self, keep: int, full: int) -> int:
        """Rows a factorized layer really keeps for `keep` wanted (rounded up to the rank step)."""
        step = self.rank_step
        return min(-(-keep // step) * step, full) if keep else 0

    def embedding_bytes(self, rows: int, dim: int) -> int:
        if self.embeddings == "int8":
            return Format("int8").weight_bytes(rows, dim)
        return rows * dim * self.float_bytes

    # -- packing and multiplying -------------------------------------------------------------------
    def pack(self, weight: torch.Tensor, gram: torch.Tensor | None = None):
        """A [out, in] float weight in this format (a QWeight, or a plain tensor for float formats).
        `gram` (its input's second moment) lets a calibrated family choose its codes by the output's error."""
        return self.family.pack(self, weight, gram)

    def pack_many(self, weights: list, grams: list | None = None, rows: list | None = None) -> list:
        """`pack` of many weights at once, each padded with zero rows to `rows[i]` (int4 with Grams:
        one batched GPTQ, far faster than one by one)."""
        grams = list(grams) if grams is not None else [None] * len(weights)
        rows = list(rows) if rows is not None else [w.shape[0] for w in weights]
        return self.family.pack_many(self, weights, grams, rows)

    def pack_embedding(self, weight: torch.Tensor):
        """The embedding / LM head as this format holds it: int8 per row under +emb8."""
        return int8.quantize_int8(weight, self.compute_dtype)

    # -- export and docs ---------------------------------------------------------------------------
    def export_quant(self) -> dict:
        """config.json's `acip_quant` for a quantized export, less its `dense` list (export/sized.py)."""
        return dict(self.family.export_quant(self), embeddings=self.embeddings)

    def tensor_layout(self) -> str:
        return self.family.tensor_layout(self)

    # -- the curve plot ----------------------------------------------------------------------------
    @property
    def dash(self) -> str:
        return self.family.dash

    @property
    def marker(self) -> str:
        return self.family.marker


def parse_format(spec: "str | Format | None", group_size: int | None = None,
                 embeddings: str | None = None, layout: str | None = None) -> Format:
    """A Format from its key ("int4-g64+emb8+fast"), a family name plus options, or a Format (returned
    as is). The options given beside a key must agree with it or fill what it leaves out."""
    if isinstance(spec, Format):
        return spec
    spec = "float32" if spec is None else str(spec).strip()
    emb, lay = "native", "small"
    if spec.endswith(_FAST):
        spec, lay = spec[:-len(_FAST)], "fast"
    if spec.endswith(_EMB8):
        spec, emb = spec[:-len(_EMB8)], "int8"
    name, _, group = spec.partition("-g")
    if group:
        if not group.isdigit():
            raise ValueError(f"unknown format {spec!r}")
        if group_size is not None and int(group) != group_size:
            raise ValueError(f"format {spec!r} and group size {group_size} disagree")
        group_size = int(group)
    return Format(name, group_size, embeddings or emb, layout or lay)


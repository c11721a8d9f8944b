"""Any size in real time: ranks -> a runnable model built from views of shared factors.

Each target layer's factors are stored once, permuted into its score order, with s folded into
the input factor and the LoRA merged exactly in front (paper Remark 2.3):
down = [(α/r)·A ; diag(s)·Vh] [r_lora + k, in] and up_t = [Bᵀ ; Uᵀ] [r_lora + k, out]. Keeping
rank r is then the row prefix [:r_lora + r] of both: contiguous views, no copy. A layer runs dense
(original weight, no LoRA: App. D.3) when the factorized form would not be smaller, so size 1.0
is the original model. Every materialized size is its own module tree (modules shallow-copied,
targets swapped); all tensors are shared read-only, so sizes can run concurrently.

Precision is the second axis (formats.py): a size is materialized in a Format. Each format's
"family" (the base tree in the compute dtype, the factors and the dense weights in that format) is
built once on first use; int8/int4 factors are quantized once in score order, so a size takes a row
prefix of `down` (a view) and a column prefix of `up` (a small copy of whole groups).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

from acip_core.engine.attention import use_decode_attention
from acip_core.engine.basis import Factors
from acip_core.formats.int4 import int4_balance
from acip_core.formats.qweight import QuantEmbedding, QuantLinear, QuantLowRankLinear, weight_nbytes, zero_rows
from acip_core.formats.registry import Format, parse_format
from acip_core.engine.layers import LowRankLinear
from acip_core.formats.kernels import Bf16Linear
from acip_core.engine.prune import DEFAULT_SIZE_RULE, LayerShape, RankIndex, check_size_rule
from acip_core.engine.tree import clone_tree
from acip_core.system.units import format_gb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Size:
    """One point of the family: the ranks to keep and what they cost."""

    prefix: int  # entries kept in the global order
    ranks: dict  # fqn -> kept rank (score order; int4 rounds the stored rows up to its group size)
    size_ratio: float  # the paper's measure (target layers only)
    params: int  # every parameter (weight) the materialized model holds in `format`
    dense_layers: int  # layers that run with their original weight (in this format)
    format: Format = Format()  # how its weights are stored
    nbytes: int = 0  # bytes of every tensor the materialized model holds, in `format`
    original: bool = False  # every target layer its original weight, no LoRA (AnySizeModel.original_size)

    @property
    def gigabytes(self) -> float:
        return self.nbytes / 1e9


def non_target_params(model: nn.Module, targets) -> int:
    """Parameters outside the target layers (tied weights counted once)."""
    skip = {id(p) for n in targets for p in model.get_submodule(n).parameters()}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


class AnySizeModel:
    """A base model, its basis and a score map (+ LoRA): a model of any size, materialized on demand."""

    def __init__(self, base: nn.Module, tokenizer, basis: dict[str, Factors],
                 scores: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor] | None = None,
                 lora_rank: int = 0, lora_alpha: float = 16.0, meta=None,
                 calibration=None, size_rule: str = DEFAULT_SIZE_RULE):
        # calibration: () -> {layer: input Gram}, for int4's error-compensating quantizer (None: RTN)
        self.calibration = calibration
        use_decode_attention(base)  # before the formats' copies of it: they keep it
        self.base, self.tokenizer = base.eval(), tokenizer
        self.meta = meta  # the artifact's ArtifactMeta (artifacts.meta) when opened from one, else None
        self.targets = list(basis)
        self.originals = {n: base.get_submodule(n) for n in self.targets}
        # size_rule (prune.SIZE_RULES): "official" keeps every layer factorized with its LoRA (no dense
        # fallback) and meets a ratio as the official code does; the shapes and the index carry it
        self.size_rule = check_size_rule(size_rule)
        self.shapes = {n: LayerShape(m.out_features, m.in_features, m.bias is not None,
                                     dense_fallback=size_rule != "official")
                       for n, m in self.originals.items()}
        self.lora_rank = lora_rank if adapters else 0
        self.index = RankIndex(scores, self.shapes, self.lora_rank,
                               non_target_params(base, self.targets), size_rule)
        scaling = lora_alpha / lora_rank if self.lora_rank else 0.0
        self._families = {}  # format key -> (base tree, factors, dense weights) in that format
        self._targets_of = {}  # format key -> {target name: module of that family's tree}
        self._lock = threading.Lock()
        factors = {}
        for n, f in basis.items():
            order = self.index.orders[n]
            down, up_t = f.s[order, None] * f.Vh[order], f.U[:, order].t()  # [k, in], [k, out]
            if self.lora_rank:
                down = torch.cat([scaling * adapters[f"{n}.lora_A"].float(), down])
                up_t = torch.cat([adapters[f"{n}.lora_B"].float().t(), up_t])
            factors[n] = (down.contiguous(), up_t.contiguous())
        self._set_family(Format().key, (self.base, factors))
        self._other_bytes = {}

    # -- choosing a size ------------------------------------------------------------------------
    def other_bytes(self, format: Format) -> int:
        """Bytes of everything outside the target layers in `format` (tied embeddings counted once)."""
        if format.key not in self._other_bytes:
            embeddings = {id(m.weight) for m in (self.base.get_input_embeddings(),
                                                 self.base.get_output_embeddings()) if m is not None}
            skip = {id(p) for n in self.targets for p in self.originals[n].parameters()}
            seen, total = set(), 0
            for p in self.base.parameters():
                if id(p) in skip or id(p) in seen:
                    continue
                seen.add(id(p))
                total += format.embedding_bytes(*p.shape) if id(p) in embeddings else p.numel() * format.float_bytes
            self._other_bytes[format.key] = total
        return self._other_bytes[format.key]

    def size_at(self, prefix: int, format: "Format | str" = "float32") -> Size:
        format = parse_format(format)
        ranks = self.index.ranks_at(prefix)
        dense = sum(self.shapes[n].format_bytes(r, self.lora_rank, format)[1] for n, r in ranks.items())
        params = self.index.other_params + sum(self.shapes[n].format_params(r, self.lora_rank, format)
                                               for n, r in ranks.items())
        nbytes = int(self.index.bytes_cum(format, self.other_bytes(format))[prefix])
        return Size(prefix, ranks, self.index.ratio_at(prefix), params, dense, format, nbytes)

    def materialized_ratio(self, size: Size) -> float:
        """Target-layer weights the materialized size holds (factors with their LoRA rows, or the dense
        weight) over the original's. Beside size_ratio (LoRA not counted, a layer never above dense)
        it shows the band where the two differ: under the official rule a layer whose rank is near
        full holds more than its dense weight."""
        held = sum(self.shapes[n].materialized_params(r, self.lora_rank) for n, r in size.ranks.items())
        return held / self.index.dense_total

    def size_for_ratio(self, size_ratio: float, format: "Format | str" = "float32") -> Size:
        """The smallest size whose size_ratio is >= the target (never below it); under the official
        size rule, the official code's choice (strictly above the target: prune.RankIndex)."""
        return self.size_at(self.index.prefix_for_ratio(float(size_ratio)), format)

    def size_for_budget(self, gigabytes: float, format: "Format | str" = "float32") -> Size:
        """The largest size whose materialized weights fit in `gigabytes` (1 GB = 1e9 bytes) in `format`."""
        format = parse_format(format)
        if not gigabytes == gigabytes or gigabytes <= 0:  # NaN or non-positive
            raise ValueError(f"the budget must be a positive number of GB, got {gigabytes}")
        # clamped before the integer conversion: 1e308 GB is "everything", not an overflow
        # + 1e-3: a size's own `gigabytes` (nbytes / 1e9) times 1e9 can land a hair below nbytes
        max_bytes = int(min(gigabytes, 1e9) * 1e9 + 1e-3)  # 1e18 bytes: within int64
        prefix = self.index.prefix_for_bytes(format, self.other_bytes(format), max_bytes)
        if prefix < 0:
            smallest = self.size_at(0, format).gigabytes
            raise ValueError(f"{gigabytes:g} GB is smaller than the smallest model "
                             f"({format_gb(smallest)} in {format.key})")
        return self.size_at(prefix, format)

    def full_size(self, format: "Format | str" = "float32") -> Size:
        return self.size_at(len(self.index.layer_of), format)

    def original_size(self, format: "Format | str" = "float32") -> Size:
        """The original model in `format` (every target layer its own weight, no LoRA). Under our rule that
        is the full size; under the official rule the full size keeps its factors and LoRA, so the
        original's figures are those of dense layers and materialize() runs them dense."""
        format = parse_format(format)
        full = self.full_size(format)
        if self.size_rule != "official":
            return full
        plain = [LayerShape(s.out_features, s.in_features, s.bias) for s in self.shapes.values()]
        nbytes = self.other_bytes(format) + sum(s.format_bytes(s.full_rank, 0, format)[0] for s in plain)
        params = self.index.other_params + sum(s.dense_params for s in plain)
        return dataclasses.replace(full, params=params, dense_layers=len(plain), nbytes=nbytes, original=True)

    # -- materializing --------------------------------------------------------------------------
    def _family(self, format: Format):
        """(base tree, factors, dense weights) in `format`, built once (under the lock) on first use; a
        built one is read without the lock (a float32 size does not wait for another format's build)."""
        built = self._families.get(format.key)
        if built is not None:
            return built
        with self._lock:
            if format.key not in self._families:
                self._set_family(format.key, self._build_family(format))
            return self._families[format.key]

    def has_family(self, format: "Format | str") -> bool:
        """Whether sizes of `format` materialize at once (its family is built; the first int4 one measures
        the calibration Grams and runs GPTQ: about a minute on a 2-core CPU)."""
        return parse_format(format).key in self._families

    def grams(self, format: Format) -> dict:
        """The layer inputs' Grams for a calibrated format's quantizer (int4's GPTQ; measured now: one
        forward pass; {} for other formats or without a calibration, where int4 rounds to nearest)."""
        return self.calibration() if format.calibrated and self.calibration else {}

    def int4_balances(self, format: Format, grams: dict) -> dict:
        """{layer: per-rank scales} of formats.int4.int4_balance for the layers with a Gram, from the whole
        float32 factors (LoRA rows first); `up`'s groups run along its padded rank. The family and
        fine-tuning's frozen factors (which take rows lora.. of them) use the same."""
        factors32 = self._families[Format().key][1]
        return {n: int4_balance(*factors32[n], gram, format.group_for(self.shapes[n].padded_rank(self.lora_rank, format)),
                                format.compute_dtype)
                for n, gram in grams.items()}

    def release_float32_factors(self) -> None:
        """Frees the float32 factors (the largest tensors held: about twice the target weights), for a
        process that from now on only runs sizes of formats already built and the full size (whose
        layers are the original weights): fine-tuning in int8/int4 (finetune.py)."""
        with self._lock:
            base32, factors32 = self._families[Format().key]
            self._families[Format().key] = (base32, _Released(factors32))

    def _build_family(self, format: Format):
        base32, factors32 = self._families[Format().key]
        # norms, embeddings (ties kept); every nn.Linear a Bf16Linear (many rows in float32 on avx2 CPUs)
        dtype = format.compute_dtype
        converted = _bf16_linears(_cast_like_from_pretrained(base32, dtype))
        if not format.quantized:  # bfloat16: the converted copy of the tree and of the factors
            return converted, {n: (a.to(dtype), b.to(dtype)) for n, (a, b) in factors32.items()}
        start = time.perf_counter()
        # a built variant of the same family and group (int8 / int8+emb8 / int8+fast) packed the same
        # dense weights and factors: they are shared, not packed (and held) again
        built = {k: parse_format(k) for k in self._families if k != format.key}
        sibling = next((k for k, f in built.items() if f.quantized and (f.name, f.group_size) == (format.name, format.group_size)), None)
        swap = {}
        for n in self.targets:  # dense layers: the original float32 weight, quantized
            lin = self.originals[n]
            bias = None if lin.bias is None else lin.bias.detach().to(dtype)
            packed = self._targets_of[sibling][n].qweight if sibling else format.pack(lin.weight)
            swap[id(converted.get_submodule(n))] = QuantLinear(packed, bias).eval()
        if format.embeddings == "int8":
            swap.update(_quantized_embeddings(base32, converted, format))
        base = clone_tree(converted, swap)  # the converted target weights are dropped with `converted`
        if sibling:
            log.info("built the %s family in %.1f s (the %s family's packed weights)", format.key,
                     time.perf_counter() - start, sibling)
            return base, self._families[sibling][1]
        # int4 with Grams: the codes of `down` (whose input is the layer's) picked by the output's error
        # (GPTQ), and the factors balanced along the rank (formats.int4.int4_balance: `up`'s rows scaled
        # before its rounding, `down`'s scales after its GPTQ, the same codes); `up`'s input has a
        # near-diagonal second moment in the whitened basis, where GPTQ is round-to-nearest.
        # Both are padded with zero rank rows to the format's padded rank (a kept prefix never uses them).
        names = list(factors32)
        rows = [self.shapes[n].padded_rank(self.lora_rank, format) for n in names]
        grams = self.grams(format)
        balance = self.int4_balances(format, grams)
        downs = format.pack_many([factors32[n][0] for n in names], [grams.get(n) for n in names], rows)
        del grams  # 0.4 GB for SmolLM2: not kept once the family is built
        factors = {}
        for n, r, down in zip(names, rows, downs):
            c = balance.get(n)
            up_t = factors32[n][1] if c is None else factors32[n][1] * c[:, None]
            factors[n] = (down if c is None else down.scale_rows(1 / c), format.pack(zero_rows(up_t, r).t()))
        log.info("built the %s family in %.1f s", format.key, time.perf_counter() - start)
        return base, factors

    def materialize(self, size: Size | dict, format: "Format | str | torch.dtype" = "float32") -> nn.Module:
        """A runnable model at `size` (a Size or a dict fqn -> rank) in `format`, sharing the family's tensors."""
        if isinstance(format, torch.dtype):
            format = str(format).removeprefix("torch.")
        format = parse_format(format)
        ranks = size.ranks if isinstance(size, Size) else size
        is_original = isinstance(size, Size) and size.original
        base, factors = self._family(format)
        targets = self._targets_of[format.key]
        swap = {}
        for n in self.targets:
            original = targets[n]
            r = int(ranks[n])
            if not 0 <= r <= self.shapes[n].full_rank:
                raise ValueError(f"{n}: rank {r} outside [0, {self.shapes[n].full_rank}]")
            if is_original or self.shapes[n].format_bytes(r, self.lora_rank, format)[1]:
                swap[id(original)] = original  # shared module: the original weight, no LoRA
                continue
            down, up = factors[n]
            bias = getattr(original, "bias", None)
            if format.quantized:
                keep = format.kept_rank(self.lora_rank + r, self.shapes[n].padded_rank(self.lora_rank, format))
                swap[id(original)] = QuantLowRankLinear(down.rows(keep), up.cols(keep), bias).eval()
            else:
                keep = self.lora_rank + r
                swap[id(original)] = LowRankLinear(down[:keep], up[:keep], bias).eval()  # views
        model = clone_tree(base, swap)
        model.generation_config = copy.deepcopy(base.generation_config)  # generate() may edit it
        return model

    def _set_family(self, key: str, family: tuple) -> None:
        """Stores a family and its target modules, looked up once here (get_submodule walks the path:
        210 walks in every materialize were ~9 ms of a 50 ms new size)."""
        self._targets_of[key] = {n: family[0].get_submodule(n) for n in self.targets}
        self._families[key] = family  # last: a reader without the lock finds its targets already there


class _Released(dict):
    """Released float32 factors: their names stay, any use says why it fails."""

    def __init__(self, factors: dict):
        super().__init__({n: None for n in factors})

    def __getitem__(self, name):
        raise RuntimeError("the float32 factors were released (release_float32_factors): this process "
                           "can no longer build float32 sizes or new formats")

    def items(self):
        raise RuntimeError("the float32 factors were released: no new format can be built")


def _quantized_embeddings(base32: nn.Module, converted: nn.Module, format: Format) -> dict:
    """Swaps (keyed by the converted tree's modules) for the input embedding and the LM head as the
    format packs them (Format.pack_embedding: int8 per row), from the float32 weights; tied ones share
    one QWeight."""
    emb, head = base32.get_input_embeddings(), base32.get_output_embeddings()
    q_emb = format.pack_embedding(emb.weight)
    swap = {id(converted.get_input_embeddings()):
            QuantEmbedding(q_emb, format.compute_dtype, getattr(emb, "padding_idx", None))}
    if head is not None:
        q_head = q_emb if head.weight is emb.weight else format.pack_embedding(head.weight)
        bias = None if getattr(head, "bias", None) is None else head.bias.detach().to(format.compute_dtype)
        swap[id(converted.get_output_embeddings())] = QuantLinear(q_head, bias)
    return swap


def count_bytes(model: nn.Module) -> int:
    """Bytes of every tensor a materialized model holds for its forward (shared tensors once):
    parameters, low-rank factors, quantized data + scales. What `Size.nbytes` must equal."""
    seen, total = set(), 0
    for t in _held_tensors(model):
        key = (t.data_ptr(), t.numel(), t.dtype) if hasattr(t, "data_ptr") else id(t)
        if key not in seen:
            seen.add(key)
            total += weight_nbytes(t)
    return total


def _held_tensors(model: nn.Module):
    for p in model.parameters():
        yield p
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            yield from (t for t in (m.down, m.up_t, m.bias) if t is not None)
        elif isinstance(m, QuantLowRankLinear):
            yield from (m.down.data, m.down.scales, m.up.data, m.up.scales)
            if m.bias is not None:
                yield m.bias
        elif isinstance(m, (QuantLinear, QuantEmbedding)):
            yield from (m.qweight.data, m.qweight.scales)
            if getattr(m, "bias", None) is not None:
                yield m.bias


def count_params(model: nn.Module) -> int:
    """Parameters a materialized model holds (low-rank factors included, shared tensors once)."""
    seen, total = set(), 0
    tensors = list(model.parameters())
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            tensors += [t for t in (m.down, m.up_t, m.bias) if t is not None]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def _bf16_linears(tree: nn.Module) -> nn.Module:
    """`tree` with every plain nn.Linear class-swapped to a Bf16Linear (same tensors)."""
    for m in tree.modules():
        if type(m) is nn.Linear:
            m.__class__ = Bf16Linear
    return tree


def _cast_like_from_pretrained(base: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `base` in `dtype` whose non-persistent buffers (rotary inv_freq) stay as they are,
    as `from_pretrained(dtype=...)` leaves them: an export then computes the same numbers."""
    model = copy.deepcopy(base).to(dtype)
    originals = dict(base.named_modules())
    for name, module in model.named_modules():
        for buf in module._non_persistent_buffers_set:
            if module._buffers.get(buf) is not None:
                module._buffers[buf] = originals[name]._buffers[buf].clone()
    return model

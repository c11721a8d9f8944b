"""A memory plan before anything is loaded: what a scoring run (and the explorer) will hold, from the
model's config alone (no weights read), at a batch × sequence length, on a base format, with or
without FSDP.

The model is built on the meta device (shapes, no memory); target layers come from
`parametrize.target_linears`, and the scoring form from `parametrize.parametrize_` over
`basis.meta_basis`, so the plan counts the modules the run builds. What each term counts follows the
code that holds it (docs/ARCHITECTURE.md, "Memory plan"):

- `pipeline.run_scoring` loads every parameter in float32, keeps the original linears (W) beside the
  basis' U, s, Vh (float32, `basis.Factors`), and under bf16 autocast `score.score_loop` adds bf16
  copies of W, U and Vh (the float32 ones stay referenced: the originals and the basis dict).
- A quantized base (`ACIPLinear.quantize_base_`) holds the packed U, Vh and drops W and the float
  factors, but only after all of them were built: the setup phase holds both.
- Trainables (masks, LoRA A/B) are float32 with a gradient and AdamW's two moments: 16 bytes a value.
- Activations: the tensors autograd saves for the backward, counted exactly by running one forward
  of the meta model under `torch.autograd.graph.saved_tensors_hooks` (bf16 autocast emulated for the
  matrix products; attention counted as the fused kernels CPUs and GPUs run save it: q, k, v, the
  output and a log-sum-exp), plus the vocabulary loss's [tokens, vocab] float32 tensors.
- The whitened basis' first build holds the float64 input Grams (`basis.input_grams`) and one
  layer's float64 SVD workspace (`basis.whitened_factors`); saving it (`safetensors.save_file`)
  copies the factors once more. A cached basis skips this phase.

Every figure is an estimate of live bytes; `benchmarks/RESULTS.md` ("Memory plan") states its error
against measured peaks. The step time is an estimate too: the step's FLOPs over the rate of one
matrix product of the largest layer's shape timed here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from acip_core.engine.basis import meta_basis
from acip_core.engine.parametrize import parametrize_, target_linears, train_only_masks_and_lora_
from acip_core.formats.registry import FAMILIES, Format, parse_format
from acip_core.sources.models import check_context, load_config, pick_device
from acip_core.training.score import autocast_dtype
from acip_core.training.train import vocab_loss

log = logging.getLogger(__name__)

GiB = 2**30
# A scoring process's own memory before any model: Python, torch, transformers, the tokenizer and the
# tokenized calibration text (corpus:broad). Measured, benchmarks/RESULTS.md "Memory plan": 717 MiB.
RUNTIME_BYTES = 717 * 2**20
# What a CUDA process holds on the GPU before its first tensor (context, kernels); an estimate, not
# measured here (no GPU): torch's CUDA context is commonly 0.3-0.6 GiB.
CUDA_CONTEXT_BYTES = 512 * 2**20
TRAINABLE_BYTES = 16  # float32 value + gradient + AdamW exp_avg + exp_avg_sq
FSDP_BLOCKS_IN_FLIGHT = 2  # gathered units at once (README "Scoring on more than one device")
DEFAULT_LORA_RANK = 32


class PlanRefused(ValueError):
    """A run that the plan says cannot fit: the message holds needed and available bytes."""


@dataclass
class Term:
    name: str
    bytes: int
    where: str  # "ram" or "gpu"
    phases: tuple  # the phases ("basis build", "setup", "steps", "serve") that hold it
    note: str = ""


@dataclass
class Plan:
    model: str
    settings: dict
    shapes: dict  # counts: layers, target params, params, factors, trainables
    terms: list = field(default_factory=list)
    step_seconds: float | None = None  # estimate
    step_note: str = ""
    available: dict = field(default_factory=dict)  # where -> bytes free now

    def phase_bytes(self, where: str) -> dict:
        """Bytes held in each phase on `where` (ram / gpu)."""
        out = {}
        for t in self.terms:
            if t.where == where:
                for p in t.phases:
                    out[p] = out.get(p, 0) + t.bytes
        return out

    def needed(self, where: str, phases=("basis build", "setup", "steps")) -> int:
        """The largest phase of a scoring run on `where` (0 when nothing is held there)."""
        got = self.phase_bytes(where)
        return max([got[p] for p in phases if p in got], default=0)

    @property
    def scoring_where(self) -> tuple:
        return ("ram", "gpu") if self.settings["device"] == "cuda" else ("ram",)

    def fits(self) -> bool | None:
        """Whether every scoring phase fits what is free now (None: availability unknown)."""
        verdicts = [self.needed(w) <= self.available[w] for w in self.scoring_where if w in self.available]
        return all(verdicts) if verdicts else None

    def to_dict(self) -> dict:
        return dict(model=self.model, settings=self.settings, shapes=self.shapes,
                    terms=[asdict(t) for t in self.terms],
                    phases={w: self.phase_bytes(w) for w in ("ram", "gpu")},
                    needed={w: self.needed(w) for w in self.scoring_where},
                    serve_ram=self.needed("ram", ("serve",)),
                    available=self.available, fits=self.fits(),
                    step_seconds_estimate=self.step_seconds, step_note=self.step_note)

    def table(self) -> str:
        """A readable table: every term, then each phase's sum, needed vs available."""
        s = self.settings
        lines = [f"Memory plan for {self.model}: batch {s['batch_size']} × {s['seq_len']} tokens, base "
                 f"{s['base_format']}, {s['precision_used']} compute, on {s['device']}"
                 + (f", FSDP over {s['fsdp']} processes (per process)" if s["fsdp"] > 1 else ""),
                 f"  {self.shapes['target_layers']} target layers, {self.shapes['target_params'] / 1e6:,.1f} M target "
                 f"weights, {self.shapes['params'] / 1e6:,.1f} M parameters, {self.shapes['factor_values'] / 1e6:,.1f} M "
                 f"factor values, {self.shapes['trainables'] / 1e6:,.2f} M trainables (estimates; GiB)",
                 f"  {'term':34s} {'where':5s} {'GiB':>9s}  phases"]
        for t in self.terms:
            lines.append(f"  {t.name:34s} {t.where:5s} {t.bytes / GiB:9.3f}  {', '.join(t.phases)}"
                         + (f"  ({t.note})" if t.note else ""))
        for where in ("ram", "gpu"):
            phases = self.phase_bytes(where)
            if phases:
                lines.append(f"  {where.upper()} by phase: " + ", ".join(f"{p} {b / GiB:.2f}" for p, b in phases.items()))
        for where in self.scoring_where:
            avail = self.available.get(where)
            verdict = "" if avail is None else (f" of {avail / GiB:.2f} GiB available now: "
                                                + ("fits" if self.needed(where) <= avail else "DOES NOT FIT"))
            lines.append(f"  scoring needs {self.needed(where) / GiB:.2f} GiB of {where.upper()}{verdict}")
        lines.append(f"  serving it in the explorer needs {self.needed('ram', ('serve',)) / GiB:.2f} GiB of RAM "
                     "(base + factors + the float32 family; each other format's family as listed)")
        if self.step_seconds is not None:
            lines.append(f"  a step: ≈ {self.step_seconds:.2f} s (estimate: {self.step_note})")
        elif self.step_note:
            lines.append(f"  a step: {self.step_note}")
        return "\n".join(lines)


# -- the model, without its weights -----------------------------------------------------------------
# Bounds on a config before its meta model is built: building costs CPU time per module (≈ 3 ms a
# decoder layer), and a config is what anybody can publish on the hub. The largest real models are far
# below (126 decoder layers; 61 layers × 256 experts).
MAX_LAYERS, MAX_EXPERT_BLOCKS = 1024, 65_536


def check_buildable(config) -> None:
    """Refuses (ValueError) a config whose meta model would take minutes to build."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = max([int(getattr(text, k, 0) or 0) for k in ("num_hidden_layers", "n_layer", "num_layers")] + [0])
    experts = max([int(getattr(text, k, 0) or 0) for k in ("num_local_experts", "num_experts", "n_routed_experts")] + [1])
    if layers > MAX_LAYERS or layers * experts > MAX_EXPERT_BLOCKS:
        raise ValueError(f"this config describes {layers} layers" + (f" × {experts} experts" if experts > 1 else "")
                         + f": beyond what a plan builds (at most {MAX_LAYERS} layers and {MAX_EXPERT_BLOCKS} "
                         "expert blocks; the largest published models are far below)")


def meta_model(config) -> nn.Module:
    """The causal LM of `config` on the meta device, in float32 (what load_base reads): exact shapes,
    no memory; a config beyond check_buildable's bounds is refused first."""
    from transformers import AutoModelForCausalLM

    check_buildable(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# -- counting -------------------------------------------------------------------------------------
def _unique_params(module: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _grams_bytes(linears: dict) -> int:
    """float64 input Grams of basis.input_grams: one [in, in] per distinct input (q/k/v and gate/up
    read the same one; counted as the layers' names group them: same parent, same in_features)."""
    seen = {}
    for name, m in linears.items():
        parent = name.rpartition(".")[0]
        seen[(parent, m.in_features, _input_group(name))] = m.in_features
    return sum(8 * n * n for n in seen.values())


def _input_group(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    return {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp_in", "up_proj": "mlp_in"}.get(leaf, leaf)


def _svd_workspace(out_f: int, in_f: int) -> int:
    """float64 tensors of basis.whitened_factors for one layer: the Gram and its ridge copies (4 in²),
    L, W and W·L (out·in each), the SVD's U, Vh and LAPACK's copy of its input, Vh·L⁻¹."""
    k = min(out_f, in_f)
    return 8 * (5 * in_f * in_f + 3 * out_f * in_f + out_f * k + 2 * k * in_f + 4 * k * k)


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient, on CPUs and GPUs) saves: q, k, v, the
    output and a float32 log-sum-exp per query; the meta device would otherwise take the math path,
    which saves the [B, heads, L, L] probabilities that scoring never holds."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the plan only counts what the forward saves
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


_LOW_PRECISION = {torch.nn.functional.linear, torch.matmul, torch.bmm, torch.mm, torch.Tensor.matmul,
                  torch.Tensor.__matmul__}


class _AutocastOnMeta(torch.overrides.TorchFunctionMode):
    """Emulates what autocast does to a scoring step on the meta device (where torch.autocast does not
    apply): matrix products take `dtype` inputs; attention is counted as a fused kernel."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = (self._cast(t) for t in args[:3])
            return _FusedAttention.apply(q, k, v)
        if self.dtype is not None and func in _LOW_PRECISION:
            args = tuple(self._cast(a) for a in args)
        return func(*args, **kwargs)

    def _cast(self, t):
        if self.dtype is not None and torch.is_tensor(t) and t.is_floating_point() and t.dtype != self.dtype:
            return t.to(self.dtype)
        return t


def trace_step(model: nn.Module, batch: int, seq_len: int, amp_dtype: torch.dtype | None) -> dict:
    """Bytes a training step of the parametrized meta `model` holds for its backward, by one forward
    on the meta device with the saved tensors counted (each storage once; frozen parameters and
    buffers excluded: they are counted as weights). Returns dict(saved, logits)."""
    frozen = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    kept: dict[int, torch.Tensor] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in frozen:
            kept[id(base)] = base  # held here, so ids stay unique while counting
        return t

    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    model.train()
    # a padding warning some families (GPT-2) compute by reading the ids: a meta tensor has no values
    model.config.pad_token_id = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _AutocastOnMeta(amp_dtype):
        logits = model(input_ids=ids).logits[:, :-1]
        vocab_loss(logits, ids[:, 1:])
    saved = sum(t.numel() * t.element_size() for t in kept.values())
    return dict(saved=saved, logits=logits.numel() * logits.element_size())


# -- the plan -------------------------------------------------------------------------------------
def _amp(precision: str, device: str) -> torch.dtype | None:
    """score.autocast_dtype for a device named, not held (a plan for cuda made on a CPU machine)."""
    if device == "cuda" and precision != "fp32":
        return torch.bfloat16
    return autocast_dtype(precision, torch.device("cpu"))


def plan_scoring(model: str, batch_size: int = 2, seq_len: int = 256, base_format: str = "float32",
                 fsdp: int = 1, device: str = "cpu", precision: str = "auto", lora_rank: int = DEFAULT_LORA_RANK,
                 basis: str = "whitened", probe: bool = True, config=None, objective: str = "lm",
                 targets=None) -> Plan:
    """The memory plan of `python -m acip_core score` with these settings (and of serving the
    result in the explorer), from the model's config alone. `fsdp` > 1: per process of a sharded
    run over that many processes (`--fsdp`), each with batch_size / fsdp rows. `config`: a
    transformers config to use instead of reading `model`'s. `objective` kd / lm+kd: the teacher's
    logits are held through the step; `targets`: the layers `--targets` names (default: discovered)."""
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("fsdp", fsdp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if batch_size % fsdp:
        raise ValueError(f"the global batch {batch_size} must divide by the {fsdp} processes")
    format = parse_format(base_format)
    if format.quantized and fsdp > 1:
        raise ValueError("--base-format int8/int4 does not run under --fsdp (run_scoring refuses it)")
    amp = _amp(precision, device)  # a quantized base's kernels run in its compute dtype, the rest in this
    config = config if config is not None else load_config(model)
    check_context(config, seq_len)  # before tracing a step: its cost grows with seq_len
    net = meta_model(config)
    params = _unique_params(net)
    linears = target_linears(net, targets)
    if not linears:
        raise ValueError(f"{model}: no target linear layers found")
    P = sum(4 * p.numel() for p in params)
    W = sum(4 * m.weight.numel() for m in linears.values())
    k_of = {n: min(m.out_features, m.in_features) for n, m in linears.items()}
    uv_values = sum(k_of[n] * (m.out_features + m.in_features) for n, m in linears.items())
    s_values = sum(k_of.values())
    F = 4 * (uv_values + s_values)
    lora_values = sum(lora_rank * (m.out_features + m.in_features) for m in linears.values())
    trainables = s_values + lora_values  # one mask entry per singular value, plus LoRA A and B
    grams = _grams_bytes(linears) if basis == "whitened" else 0
    workspace = max(_svd_workspace(m.out_features, m.in_features) for m in linears.values())
    shapes = dict(target_layers=len(linears), target_params=W // 4, params=P // 4, factor_values=uv_values + s_values,
                  trainables=trainables, layers=getattr(config, "num_hidden_layers", None),
                  vocab=getattr(config, "vocab_size", None))

    quant_bytes = 0
    if format.quantized:
        for n, m in linears.items():
            try:
                quant_bytes += format.weight_bytes(m.out_features, k_of[n]) + format.weight_bytes(k_of[n], m.in_features)
            except ValueError as e:
                raise ValueError(f"--base-format {format.key} does not fit layer {n}: {e}") from None

    # activations: one forward of the scoring form on the meta device, with this process's rows
    with torch.device("meta"):
        parametrize_(net, meta_basis(linears), lora_rank=lora_rank)
    layers = train_only_masks_and_lora_(net)
    for l in layers.values():
        if amp is not None and not format.quantized:  # score_loop stores the frozen tensors in the compute dtype
            l.weight, l.U, l.Vh = l.weight.to(amp), l.U.to(amp), l.Vh.to(amp)
    rows = batch_size // fsdp
    traced = trace_step(net, rows, seq_len, amp)
    tokens, vocab = rows * (seq_len - 1), shapes["vocab"] or 0
    # the loss backward: grad·grad_loss and the slice's full-size gradient, [tokens, vocab] float32 each,
    # while the forward's logits are gone (its float32 loss gradient is inside `saved`)
    loss_peak = max(traced["logits"], 2 * 4 * rows * seq_len * vocab)

    gpu = device == "cuda"
    where_w = "gpu" if gpu else "ram"
    T: list[Term] = []
    add = lambda *a, **k: T.append(Term(*a, **k))  # noqa: E731
    add("runtime (python, torch, text)", RUNTIME_BYTES, "ram", ("basis build", "setup", "steps", "serve"),
        "imports, tokenizer and corpus:broad, measured")
    if gpu:
        add("CUDA context", CUDA_CONTEXT_BYTES, "gpu", ("setup", "steps"), "estimate")

    frozen_values = P // 4 + uv_values + s_values  # what FSDP shards: every parameter, U, s, Vh
    if fsdp > 1:
        # rank 0 loads the weights and builds/reads the basis in host RAM; every rank then holds 1/N of
        # the frozen tensors (one dtype per unit: the compute dtype under autocast) and two whole units
        blocks = max(int(getattr(config, "num_hidden_layers", 1) or 1), 1)
        dt = (amp or torch.float32).itemsize
        add("rank 0: weights (float32, loading)", P, "ram", ("basis build", "setup"), "only rank 0 reads them")
        add("rank 0: basis U, s, Vh (float32)", F, "ram", ("setup",), "before sharding")
        if amp is not None:  # shard_frozen casts every frozen tensor while the float32 ones are still referenced
            add(f"rank 0: {str(amp).removeprefix('torch.')} copies while sharding", frozen_values * amp.itemsize,
                "ram", ("setup",), "DistContext.shard_frozen")
        add(f"frozen shards (1/{fsdp}, {str(amp or torch.float32).removeprefix('torch.')})",
            frozen_values * dt // fsdp, where_w, ("steps",))
        add(f"{FSDP_BLOCKS_IN_FLIGHT} gathered blocks in flight", FSDP_BLOCKS_IN_FLIGHT * (W + F) // 4 * dt // blocks,
            where_w, ("steps",), "target weights + factors of a block")
    else:
        load_phases = ("basis build", "setup") + (("steps",) if not format.quantized else ())
        add("weights (float32)", P, where_w, load_phases, "every parameter, tied ones once")
        if gpu:  # the basis stays in host RAM (the basis dict) and is copied to the GPU by parametrize_
            add("basis U, s, Vh (float32, host)", F, "ram", ("setup", "steps") if not format.quantized else ("setup",))
            add("factors U, s, Vh (float32, on the GPU)", F, "gpu",
                ("setup",) if amp is not None or format.quantized else ("setup", "steps"),
                "replaced by the compute dtype's copies before step 1" if amp is not None else "")
        else:
            add("basis U, s, Vh (float32)", F, "ram", ("setup", "steps") if not format.quantized else ("setup",),
                "beside W: the forward subtracts the pruned part from W")
        if format.quantized:
            add(f"frozen factors packed ({format.key})", quant_bytes, where_w, ("setup", "steps"),
                "U, Vh quantized; W and the float factors dropped before step 1")
            add("other parameters (float32 copies)", P - W, where_w, ("steps",), "embeddings, norms, head")
            add("singular values s (float32)", 4 * s_values, where_w, ("steps",))
        elif amp is not None:
            add(f"{str(amp).removeprefix('torch.')} copies of W, U, Vh", (W // 4 + uv_values) * amp.itemsize, where_w,
                ("steps",), "score_loop: the float32 ones stay referenced")
    add("masks + LoRA + grads + AdamW", TRAINABLE_BYTES * trainables, where_w, ("steps",),
        f"{trainables / 1e6:.2f} M float32 values × 16 B")
    add("score map (Algorithm 1)", 2 * 4 * s_values, where_w, ("steps",))
    add(f"activations saved for backward ({rows} × {seq_len})", traced["saved"], where_w, ("steps",),
        "counted on the meta model; includes the loss's float32 [tokens, vocab] gradient")
    add("loss backward (tokens × vocab)", loss_peak, where_w, ("steps",), f"{tokens} × {vocab} float32")
    if objective != "lm":  # train.objective: the teacher's logits, and the softmax the KD gradient keeps
        add("teacher logits + softmax (kd)", 2 * 4 * tokens * vocab, where_w, ("steps",),
            f"{tokens} × {vocab} float32, twice")
    # the first build of the basis (not when cached): its largest moment of three, beside the weights.
    # basis.input_grams sums float64 Grams on the model's device and keeps their means in RAM (on a CPU
    # both at once); the factors are computed in RAM, and safetensors' save_file serializes a copy of them.
    note = f"float64 Grams {grams / GiB:.2f} GiB, SVD workspace {workspace / GiB:.2f} GiB; none when cached"
    if gpu and fsdp == 1:  # under FSDP rank 0 keeps the model on the CPU until sharding: all in RAM
        if grams:
            add("basis build: Gram sums (float64)", grams, "gpu", ("basis build",), "first run only")
        add("basis build (first run only)", max(grams + F + workspace, 2 * F), "ram", ("basis build",), note)
    else:
        add("basis build (first run only)", max(2 * grams, grams + F + workspace, 2 * F), "ram", ("basis build",),
            note)

    _serve_terms(add, net, linears, k_of, lora_rank, P, W)
    plan = Plan(model, dict(batch_size=batch_size, seq_len=seq_len, base_format=format.key, fsdp=fsdp, device=device,
                            precision=precision, precision_used=str(amp or torch.float32).removeprefix("torch."),
                            lora_rank=lora_rank, basis=basis), shapes, T)
    plan.available = available_memory(device)
    flops = step_flops(linears, k_of, lora_rank, rows, seq_len, config)
    if probe:
        plan.step_seconds, plan.step_note = estimate_step_seconds(flops, linears, k_of, device, amp, format)
    else:
        plan.step_note = f"{flops / 1e12:.2f} TFLOP a step (no probe run)"
    return plan


def _serve_terms(add, net, linears, k_of, lora_rank, P, W) -> None:
    """The explorer's memory for the scored model (materialize.AnySizeModel): the float32 base, the
    factors in score order with the LoRA rows in front (float32), and each format family it builds:
    bfloat16 copies the tree and the factors; an int format holds the tree in bf16, the dense weights
    and the factors packed."""
    rows = {n: k_of[n] + lora_rank for n in linears}
    factors32 = sum(4 * rows[n] * (m.in_features + m.out_features) for n, m in linears.items())
    add("serve: factors in score order (float32)", factors32, "ram", ("serve",), "LoRA rows merged in front")
    add("serve: base model (float32)", P, "ram", ("serve",), "the float32 family")
    other_bf16 = (P - W) // 2
    add("serve: + bfloat16 family", other_bf16 + W // 2 + factors32 // 2, "ram", ("family",),
        "built on first use of the format")
    for format in (Format(name) for name, family in FAMILIES.items() if family.quantized):
        try:
            dense = sum(format.weight_bytes(m.out_features, m.in_features) for m in linears.values())
            packed = sum(format.weight_bytes(_padded(rows[n], format), m.in_features)
                         + format.weight_bytes(m.out_features, _padded(rows[n], format)) for n, m in linears.items())
        except ValueError:
            continue  # widths this format cannot pack: the app cannot build it either
        add(f"serve: + {format.key} family", other_bf16 + dense + packed, "ram", ("family",), "built on first use")


def _padded(rows: int, format) -> int:
    step = format.rank_step
    return -(-rows // step) * step


# -- time --------------------------------------------------------------------------------------
def step_flops(linears, k_of, lora_rank, rows, seq_len, config) -> float:
    """Multiply-adds ×2 of one scoring step: each target layer's factored form forward and its input
    gradient backward (frozen factors need no weight gradient), the LoRA forward and both backward
    products, causal attention (forward, and twice that backward) and the head (forward + input
    gradient)."""
    t = rows * seq_len
    total = 0.0
    for n, m in linears.items():
        io = m.in_features + m.out_features
        total += 4 * t * k_of[n] * io + 6 * t * lora_rank * io
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    total += 3 * layers * 2 * rows * seq_len * seq_len * heads * head_dim  # causal: half of 4·B·L²·H·d
    total += 4 * t * hidden * (getattr(config, "vocab_size", 0) or 0)
    return float(total)


PROBE_MAX_SIDE = 2048


def estimate_step_seconds(flops: float, linears, k_of, device: str, amp, format) -> tuple[float | None, str]:
    """flops over the rate of one product of the largest target layer's factored shape, timed now on
    `device` in the step's compute dtype. An estimate: it leaves out everything that is not a matrix
    product (norms, softmax, the optimizer) and a quantized base's kernels (slower than float ones)."""
    if device == "cuda" and not torch.cuda.is_available():
        return None, f"{flops / 1e12:.2f} TFLOP a step; no CUDA device here to time a product on"
    name = max(linears, key=lambda n: k_of[n] * linears[n].in_features)
    # capped at PROBE_MAX_SIDE a side: a 70B's 28672 × 8192 factor would make the probe itself a
    # gigabyte and seconds; products this large run at the device's full rate anyway
    n_in, k = min(linears[name].in_features, PROBE_MAX_SIDE), min(k_of[name], PROBE_MAX_SIDE)
    dtype = amp if amp is not None and not (device == "cpu" and amp == torch.bfloat16 and not _native_bf16()) \
        else torch.float32
    rows = 1024
    a = torch.randn(rows, n_in, device=device, dtype=dtype)
    b = torch.randn(n_in, k, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    (a @ b).sum().item()  # warm-up
    reps, start = 0, time.perf_counter()
    while reps < 3 or (time.perf_counter() - start < 0.2 and reps < 50):
        a @ b
        reps += 1
    sync()
    rate = 2 * rows * n_in * k * reps / (time.perf_counter() - start)
    note = (f"{flops / 1e12:.3f} TFLOP at {rate / 1e9:.1f} GFLOP/s, the rate of one {rows}×{n_in} · {n_in}×{k} "
            f"{str(dtype).removeprefix('torch.')} product timed now on this {device}; non-matmul work not counted")
    if format.quantized:
        note += f"; a {format.key} base runs low-bit kernels, slower than this"
    return flops / rate, note


def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


# -- what is free, and the refusal ----------------------------------------------------------------
def available_memory(device: str = "cpu") -> dict:
    """Bytes free now: RAM (psutil if installed, else /proc/meminfo's MemAvailable) and, for cuda,
    the GPU's (torch.cuda.mem_get_info). A key is missing where it cannot be read."""
    out = {}
    try:
        import psutil

        out["ram"] = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    out["ram"] = int(line.split()[1]) * 1024
        except OSError:
            pass
    if device == "cuda" and torch.cuda.is_available():
        out["gpu"] = int(torch.cuda.mem_get_info()[0])
    return out


def check_fits(plan: Plan) -> None:
    """PlanRefused (with needed and available GiB) when a scoring phase does not fit what is free now;
    nothing when it fits or availability cannot be read."""
    for where in plan.scoring_where:
        avail, need = plan.available.get(where), plan.needed(where)
        log.info("memory plan of %s: %.2f GiB of %s needed, %s available", plan.model, need / GiB, where,
                 "?" if avail is None else f"{avail / GiB:.2f} GiB")
        if avail is not None and need > avail:
            phases = plan.phase_bytes(where)
            worst = max((p for p in phases if p != "serve" and p != "family"), key=phases.get)
            s = plan.settings
            raise PlanRefused(
                f"{plan.model} at batch {s['batch_size']} × {s['seq_len']} (base {s['base_format']}) needs "
                f"{need / GiB:.2f} GiB of {where.upper()} ({worst}) but {avail / GiB:.2f} GiB is available: "
                "it would be killed. Try a smaller batch or sequence, --base-format int4, --fsdp over more "
                "processes, or a bigger machine (python -m acip_core plan shows every term; --force runs anyway).")


def plan_for_config(model: str, cfg, basis: str = "whitened", fsdp: int = 1, device: str | None = None,
                    targets=None) -> Plan:
    """The plan of a scoring run described by a score.ScoreConfig on this machine's device."""
    return plan_scoring(model, cfg.batch_size, cfg.seq_len, cfg.base_format, fsdp=fsdp,
                        device=device or pick_device().type, precision=cfg.precision, lora_rank=cfg.lora_rank,
                        basis=basis, probe=False, objective=cfg.objective, targets=targets)

"""ACIP Studio's engine: score a causal LM once, then materialize a model of any size in real time.

Never imports gradio. Public verbs:
    load_base(source)                      -> (model, tokenizer)
    run_scoring(model, data, out, ...)     -> Artifact          (the one expensive step)
    open_artifact(folder)                  -> AnySizeModel
    AnySizeModel.size_for_ratio(r) / .size_for_budget(gb, dtype) -> Size
    AnySizeModel.materialize(size, dtype)  -> nn.Module         (milliseconds)
    perplexity(model, windows)             -> dict
and what an app shows of them: the texts (DATA_CHOICES, DEFAULT_DATA), generation's defaults and its
Cancelled, and a curve read at a size (curve_at, ppl_columns, eval_set_label, suggested_ratio).
"""

from acip_core.system.version import __version__  # noqa: F401
from acip_core.artifacts.artifact import Artifact, ArtifactError, load_artifact, save_artifact
from acip_core.evaluation.curve import curve_at, eval_set_label, ppl_columns, suggested_ratio
from acip_core.evaluation.evaluate import REPETITION_PENALTY, Cancelled, generate_text, perplexity
from acip_core.sources.data import DATA_CHOICES, DEFAULT_DATA
from acip_core.engine.materialize import AnySizeModel, Size
from acip_core.sources.models import EMBEDDED, ModelSourceError, load_base
from acip_core.artifacts.open import open_artifact
from acip_core.training.pipeline import run_scoring
from acip_core.training.score import ScoreConfig

__all__ = ["Artifact", "ArtifactError", "load_artifact", "save_artifact", "generate_text", "perplexity",
           "AnySizeModel", "Size", "EMBEDDED", "ModelSourceError", "load_base", "open_artifact",
           "run_scoring", "ScoreConfig", "REPETITION_PENALTY", "Cancelled", "DATA_CHOICES", "DEFAULT_DATA",
           "curve_at", "eval_set_label", "ppl_columns", "suggested_ratio"]

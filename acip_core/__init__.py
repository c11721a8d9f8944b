"""ACIP Studio's engine: score a causal LM once, then materialize a model of any size in real time.

Never imports gradio. Public verbs:
    load_base(source)                      -> (model, tokenizer)
    run_scoring(model, data, out, ...)     -> Artifact          (the one expensive step)
    open_artifact(folder)                  -> AnySizeModel
    AnySizeModel.size_for_ratio(r) / .size_for_budget(gb, dtype) -> Size
    AnySizeModel.materialize(size, dtype)  -> nn.Module         (milliseconds)
    perplexity(model, windows)             -> dict
"""

__version__ = "0.1.0"

from .artifact import Artifact, ArtifactError, load_artifact, save_artifact  # noqa: E402
from .evaluate import generate_text, perplexity  # noqa: E402
from .materialize import AnySizeModel, Size  # noqa: E402
from .models import EMBEDDED, ModelSourceError, load_base  # noqa: E402
from .pipeline import open_artifact, run_scoring  # noqa: E402
from .score import ScoreConfig  # noqa: E402

__all__ = ["Artifact", "ArtifactError", "load_artifact", "save_artifact", "generate_text", "perplexity",
           "AnySizeModel", "Size", "EMBEDDED", "ModelSourceError", "load_base", "open_artifact",
           "run_scoring", "ScoreConfig"]

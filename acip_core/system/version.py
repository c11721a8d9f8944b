"""The project's version and the library versions an artifact records."""
from __future__ import annotations

import torch

__version__ = "0.1.0"


def versions() -> dict:
    import transformers

    return {"acip_studio": __version__, "torch": torch.__version__, "transformers": transformers.__version__}

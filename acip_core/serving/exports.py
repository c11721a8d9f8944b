"""The export verb of the Explorer: one size written as a folder (low-rank with remote code, or dense
in the base architecture: export/sized.py), with a model card of what was measured at that size."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from acip_core.engine.materialize import Size
from acip_core.export.card import card_from_curve
from acip_core.export.folder import saved_params, zip_folder
from acip_core.export.sized import export_dense, export_lowrank
from acip_core.serving.checks import check_format


class ExportMixin:
    """Export for the Explorer (serving/explorer.py), which provides `any_size`, `curve`, `name` and
    `size(ratio)`."""

    def export(self, ratio, out: str | Path, dense: bool = False, format: str = "float32",
               zip_path: str | Path | None = None, measured=()) -> dict:
        """Writes the size to `out` (low-rank with remote code, or dense in the base architecture)."""
        format = check_format(format)
        size = self.any_size.size_at(self.size(ratio).prefix, format)
        out = Path(out)
        start = time.perf_counter()
        if dense:
            export_dense(self.any_size, size, out, format, self._card(size, measured))
        else:
            export_lowrank(self.any_size, size, out, format, self._card(size, measured))
        info = dict(folder=str(out), kind="dense" if dense else "low-rank", format=format,
                    size_ratio=size.size_ratio, params=saved_params(out),
                    bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()))
        if zip_path is not None:
            info["zip"] = str(zip_folder(out, zip_path) or zip_path)
        info["seconds"] = time.perf_counter() - start
        return info

    def _card(self, size: Size, measured=()) -> dict:
        """What the model card states (export.model_card keys): the latest perplexity measured at
        this size in this session (rows from measure_perplexity), and the original's on the same
        text when measured too; else what the artifact's curve says at this size."""
        meta = self.any_size.meta
        card = dict(base_model=meta.model.source if meta else None, artifact=self.name)
        ppl = pd.DataFrame([r for r in measured if r.get("kind") == "perplexity"
                            and r.get("artifact", self.name) == self.name])
        here = ppl[ppl.size_ratio == round(size.size_ratio, 5)] if len(ppl) else ppl
        if not len(here):
            return dict(card_from_curve(self.curve, size.size_ratio), **card)
        last = here.iloc[-1]
        card.update(perplexity=float(last.perplexity), perplexity_data=str(last.data),
                    perplexity_tokens=int(last.tokens))
        base = ppl[(ppl.size_ratio == 1.0) & (ppl.data == last.data) & (ppl.tokens == last.tokens)]
        if len(base):
            card["base_perplexity"] = float(base.iloc[-1].perplexity)
        return card

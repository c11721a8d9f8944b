"""How a memory figure reads to a person: one GB format for the app, the CLI and the export cards.

One rounding rule, to the safe side: what a size needs is rounded up (a need typed back as a budget
still holds that size), what is left of a budget is rounded down (never more than there is).
1 GB = 1e9 bytes, as every size in acip_core counts it (engine/materialize.py `Size.gigabytes`)."""
from __future__ import annotations

import math


def gb_up(gb: float) -> float:
    """GB rounded up to 3 decimals: the number the app puts in its budget box for a size's need."""
    return math.ceil(gb * 1000 - 1e-9) / 1000


def format_gb(gb: float, left: bool = False) -> str:
    """GB with 3 decimals, rounded up (a need) or, with left=True, down (what is left); MB with one
    decimal below 0.01 GB, rounded the same way (a small figure never reads "0.000 GB"); a huge number
    (a visitor's budget of 1e308 GB) in short scientific form."""
    if abs(gb) >= 1e6:
        return f"{gb:.3g} GB"
    step = math.floor if left else math.ceil
    slack = 1e-9 if left else -1e-9  # float noise (0.384 stored as 0.38400000001) moves no digit
    if abs(gb) < 0.01:
        return f"{step(gb * 10_000 + slack) / 10:.1f} MB"
    return f"{step(gb * 1000 + slack) / 1000:.3f} GB"

"""The checks of a visitor's values every Explorer job starts with: a size ratio, a format key, a
whole number, a bounded float, a memory budget. Each raises a ValueError that names the value
(the app shows it as is)."""

from __future__ import annotations

import math

from acip_core.formats.registry import APP_FORMATS, parse_format

FORMAT_CHOICES = APP_FORMATS  # the formats the app offers (formats/registry.py)


def check_ratio(value, name: str = "size_ratio") -> float:
    """A size ratio as a float in [0, 1]; ValueError with a clear message otherwise."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number within [0, 1], got {value!r}") from None
    if not math.isfinite(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value!r}")
    return ratio


def check_format(fmt) -> str:
    """A format key from FORMAT_CHOICES ("int4" alone means its default group size)."""
    try:
        key = parse_format(fmt).key if isinstance(fmt, str) else None
    except ValueError:
        key = None
    if key not in FORMAT_CHOICES:
        raise ValueError(f"format must be one of {list(FORMAT_CHOICES)}, got {fmt!r}")
    return key


def check_int(value, lo: int, hi: int | None, name: str) -> int:
    """A whole number in [lo, hi] (hi None: no upper bound) from a visitor's value, or a ValueError that
    names it (the app's number fields and every Explorer job use this one check)."""
    within = f"in [{lo}, {hi}]" if hi is not None else f"≥ {lo}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number {within}, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or number < lo or (hi is not None and number > hi):
        raise ValueError(f"{name} must be a whole number {within}, got {value!r}")
    return int(number)


def check_float(value, lo: float, hi: float, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return number


def check_budget(gigabytes) -> float:
    """A memory budget in GB as a positive finite number, or a ValueError that names it."""
    try:
        budget = float(gigabytes)
    except (TypeError, ValueError):
        raise ValueError(f"the budget must be a number of GB, got {gigabytes!r}") from None
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"the budget must be a positive number of GB, got {gigabytes!r}")
    return budget

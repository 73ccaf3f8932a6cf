"""Validation of hyper-parameters: one helper for type, bounds and choices, so that every refusal
reads ``key=value: must be ...`` and names what is accepted."""

from __future__ import annotations

import math

KINDS = ("number", "int", "bool", "choice")


def _describe(kind: str, low, high, low_open: bool, high_open: bool, choices) -> str:
    if kind == "bool":
        return "True or False"
    if kind == "choice":
        return f"one of {tuple(choices)}"
    base = "an integer" if kind == "int" else "a finite number" if math.isfinite(high if high is not None else 0) else "a number"
    if low is not None and high is not None:
        return f"{base} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{base} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{base} {'<' if high_open else '<='} {high}"
    return base


def _accepts(value, kind: str, low, high, low_open: bool, high_open: bool, choices) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "choice":
        return value in choices
    if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
        return False
    if math.isnan(value) or (math.isinf(value) and not (high is not None and math.isinf(high))):
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or (value < high if high_open else value <= high)


def check_option(group: dict, key: str, kind: str = "number", *, low=None, high=None, low_open: bool = False,
                 high_open: bool = False, choices=(), optional: str | None = None, note: str = "") -> None:
    """Refuse ``group[key]`` unless it is of ``kind`` (``bool`` is never a number) within the bounds,
    or one of ``choices``. ``optional`` says what ``None`` means, where ``None`` is accepted. A number
    must be finite unless ``high`` is infinite."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    value = group[key]
    if optional is not None and value is None:
        return
    if _accepts(value, kind, low, high, low_open, high_open, choices):
        return
    message = f"{key}={value!r}: must be {_describe(kind, low, high, low_open, high_open, choices)}"
    if optional is not None:
        message += f", or None {optional}"
    raise ValueError(message + (f" ({note})" if note else ""))

"""Budgets of `minitron search` and the candidates that meet them.

A budget is `KIND=VALUE`: `params=4.5B` or `params=50%` (total parameters, absolute or a share of the
teacher's), `non_embedding=50%` (the same, without embeddings), `memory=9GiB` (weights at the engine
profile's precision plus the KV cache of one full-length sequence), `speedup=1.8x` (batch-1 decode
tokens/s over the teacher's) or `latency=20ms` (batch-1 time per output token). Budgets are met within
a tolerance (parameter counts are quoted rounded: the published "4.5B" students have 4.51B and
4.54B). Of the shapes within the budget, the survivors are those that cannot grow: no axis can take
its next larger valid value and stay within the budget, so no capacity the budget allows is left unused.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from toolchain.errors import UserError, setting
from toolchain.prune.shapes import ModelShape

# kind -> (unit suffixes and their factors, True when larger values are better for the student (must be >= budget))
BUDGET_KINDS: dict[str, tuple[dict[str, float], bool]] = {
    "params": ({"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9}, False),
    "non_embedding": ({"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9}, False),
    "memory": ({"b": 1.0, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9}, False),
    "speedup": ({"x": 1.0, "": 1.0}, True),
    "latency": ({"s": 1.0, "ms": 1e-3, "us": 1e-6}, False),
}
NEEDS_PROFILE = ("memory", "speedup", "latency")
AXES = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads", "num_layers")


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float  # in the kind's base unit, or a share of the teacher's value when `relative`
    relative: bool
    text: str

    @property
    def at_least(self) -> bool:
        """True when a candidate must reach the value (speedup), False when it must stay below it."""
        return BUDGET_KINDS[self.kind][1]

    def limit(self, teacher_value: float | None) -> float:
        return self.value * teacher_value if self.relative else self.value

    def meets(self, value: float, limit: float, tolerance: float) -> bool:
        return value >= limit * (1 - tolerance) if self.at_least else value <= limit * (1 + tolerance)


def parse_budget(text: str) -> Budget:
    """`KIND=VALUE` as the module docstring lists; anything else is a one-line error naming the forms."""
    kind, _, raw = text.partition("=")
    kind = kind.strip().lower()
    forms = "params=4.5B, params=50%, non_embedding=50%, memory=9GiB, speedup=1.8x or latency=20ms"
    if kind not in BUDGET_KINDS:
        raise UserError(f"unknown budget kind {kind!r} in {setting('search.budget')} {text!r}; use one of {forms}")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", raw)
    units, _ = BUDGET_KINDS[kind]
    if match is None or (match.group(2) != "%" and match.group(2).lower() not in units) or (match.group(2) == "%" and kind not in ("params", "non_embedding")):
        raise UserError(f"cannot read {setting('search.budget')} {text!r}; write e.g. {forms}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if number <= 0:
        raise UserError(f"{setting('search.budget')} {text!r} must be positive")
    if unit == "%":
        return Budget(kind, number / 100, True, text)
    return Budget(kind, number * units[unit], False, text)


def survivors(shapes: list[ModelShape], measure: Callable[[ModelShape], float], budget: Budget, limit: float, tolerance: float) -> list[ModelShape]:
    """The shapes within the budget that cannot grow along any axis and stay within it (see the module docstring)."""
    within = {shape for shape in shapes if budget.meets(measure(shape), limit, tolerance)}
    space = set(shapes)
    values = {axis: sorted({getattr(shape, axis) for shape in shapes}) for axis in AXES}

    def grown(shape: ModelShape, axis: str) -> ModelShape | None:
        """The next larger valid shape along `axis` (a value the other axes make invalid, e.g. hidden not divisible by the heads, is skipped)."""
        for value in values[axis][values[axis].index(getattr(shape, axis)) + 1:]:
            bigger = ModelShape(**{**shape.to_dict(), axis: value})
            if bigger in space:
                return bigger
        return None

    return sorted((shape for shape in within if not any(grown(shape, axis) in within for axis in AXES)),
                  key=lambda shape: tuple(getattr(shape, axis) for axis in AXES))


def nearest_miss(shapes: list[ModelShape], measure: Callable[[ModelShape], float], budget: Budget, limit: float) -> tuple[ModelShape, float]:
    """The shape that comes closest to the budget, and its value (for the error when none meets it)."""
    distance = (lambda shape: limit / measure(shape)) if budget.at_least else (lambda shape: measure(shape) / limit)
    best = min(shapes, key=distance)
    return best, measure(best)


def spread(candidates: list[ModelShape], count: int, key: Callable[[ModelShape], float]) -> list[ModelShape]:
    """At most `count` candidates evenly spaced along `key` (the ends included), so a few distillations cover the range."""
    ordered = sorted(candidates, key=key)
    if len(ordered) <= count:
        return ordered
    picks = {round(i * (len(ordered) - 1) / (count - 1)) for i in range(count)} if count > 1 else {len(ordered) - 1}
    return [ordered[i] for i in sorted(picks)]


def format_quantity(kind: str, value: float) -> str:
    if kind in ("params", "non_embedding"):
        return f"{value / 1e9:.3f}B" if value >= 1e9 else f"{value / 1e6:.1f}M"
    if kind == "memory":
        return f"{value / 2**30:.2f} GiB"
    if kind == "speedup":
        return f"{value:.2f}x"
    return f"{value * 1e3:.2f} ms" if math.isfinite(value) else "inf"

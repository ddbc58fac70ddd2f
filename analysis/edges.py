"""Selected configurations on the edge of the searched range: an optimum on a bound says that the
range, not the method, stopped the search there.

    space = Experiment.open("experiments/NAME").manifest["space"]   # as tune.spec writes it
    for edge in edges({"lr": 1.2e-5, "mask_prob": 0.895}, space):
        print(edge.line())   # lr 1.2e-05 sits at the low end of [1e-05, 0.001] (4% ...) ...

A searched knob (not fixed, not categorical) is on an edge when it lies within EDGE of its range
from either bound, measured in log space where the knob is searched on a log scale. The way out
is a `--space` file line that extends the range on that side by half its width (in log space: by
half its decades), clipped to the knob's hard limit (LIMITS); a bound that is the hard limit
cannot move, and the line says so.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

EDGE = 0.05  # the fraction of a knob's range, from either bound, that counts as its edge
# the values cmg.config.validate (or the method) allows a searched knob, for knobs whose widened
# range could leave them: a probability, percentiles, two classes in a mix (a condition of one
# class mixes nothing: that is the single-class control arm, not a wider search of CMG) and one
# epoch trained (tests/test_edges.py checks these against cmg.config and cmg.generate)
LIMITS = {"stage2.mask_prob": (0.0, 1.0), "stage2.m_in_percentile": (0.0, 100.0),
          "stage2.m_out_percentile": (0.0, 100.0), "stage2.num_mixed": (2, None),
          "stage2.epochs": (1, None)}


@dataclass(frozen=True)
class Edge:
    """One searched knob of a configuration on an edge of its range."""

    name: str  # the space's name for it (`lr`), as a --space file spells it
    value: float
    low: float
    high: float
    log: bool
    side: str  # "low" or "high"
    position: float  # where the value lies in the range: 0 at `low`, 1 at `high`
    widened: tuple[float, float] | None  # the range that moves the bound; None: a hard limit

    def space_line(self) -> str | None:
        """The --space YAML line that widens the range (None: the bound is a hard limit)."""
        if self.widened is None:
            return None
        low, high = map(_yaml_number, self.widened)
        return f"{self.name}: {{low: {low}, high: {high}" + (", log: true}" if self.log else "}")

    def line(self) -> str:
        """One sentence: the knob, where it sits, and the line that widens its range."""
        where = (f"`{self.name}` {_short(self.value)} sits at the {self.side} end of "
                 f"[{_short(self.low)}, {_short(self.high)}] ({100 * self.position:.0f}% of the "
                 f"range{', log scale' if self.log else ''})")
        line = self.space_line()
        if line is None:
            return f"{where}; that bound is the knob's hard limit, so the range cannot widen there"
        return f"{where}; widen it with the --space file line `{line}`"


def edges(params: dict[str, Any], space: dict[str, dict] | None) -> list[Edge]:
    """The searched knobs of `params` ({name: value}, as a trial's `param_*` without the prefix)
    that lie within EDGE of a bound of `space` (manifest.json's "space": {name: {key, kind, low,
    high, log, fixed, ...}}), in the space's order. Knobs the configuration did not draw (NaN,
    None, absent), fixed knobs and categorical ones are never flagged."""
    found = []
    for name, p in (space or {}).items():
        value = params.get(name)
        if (p.get("kind") not in ("float", "int") or p.get("fixed") is not None
                or not isinstance(value, numbers.Real) or isinstance(value, bool)
                or math.isnan(value) or p["high"] <= p["low"]):
            continue
        scale = math.log if p.get("log") else float
        position = (scale(value) - scale(p["low"])) / (scale(p["high"]) - scale(p["low"]))
        if EDGE < position < 1 - EDGE:
            continue
        side = "low" if position <= EDGE else "high"
        found.append(Edge(name, float(value), p["low"], p["high"], bool(p.get("log")), side,
                          position, _widened(p, side)))
    return found


def _widened(p: dict, side: str) -> tuple[float, float] | None:
    """The range extended by half its width on `side` (log: half its decades), within the
    knob's LIMITS and rounded outwards for an integer knob; None if that bound is the limit."""
    low, high, log = p["low"], p["high"], bool(p.get("log"))
    floor, ceiling = LIMITS.get(p.get("key"), (None, None))
    if log:
        half = math.sqrt(high / low)
        new = low / half if side == "low" else high * half
    else:
        new = low - (high - low) / 2 if side == "low" else high + (high - low) / 2
    if side == "low" and floor is not None:
        new = max(new, floor)
    if side == "high" and ceiling is not None:
        new = min(new, ceiling)
    if p.get("kind") == "int":
        new = math.floor(new) if side == "low" else math.ceil(new)
    elif log:
        new = float(f"{new:.2g}")  # 1e-06, not 9.999999999999999e-07
    if new == (low if side == "low" else high):
        return None
    return (new, high) if side == "low" else (low, new)


def _yaml_number(value: float) -> str:
    """`value` as YAML reads back a number of the same type (YAML takes `1e-06` for a string)."""
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def _short(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3g}"

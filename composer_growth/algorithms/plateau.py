"""When the eval loss stops improving: the ``trigger_plateau`` of the orchestrator's ops and of the growth algorithms.

``trigger_plateau: {window: 200ba, min_delta: 0.01}`` holds at an eval where the best eval loss
improved by less than ``min_delta`` over the last ``window``::

    best(at or before now - window) - best(now) < min_delta

judged once an eval at or before ``now - window`` exists. ``window`` is any Composer time in ``ba``,
``tok``, ``sp`` or ``dur``. :class:`Plateau` keeps what that needs, the best loss so far at each eval
(pruned to the evals the window can still reach), and saves it in the owner's ``state_dict``: a resumed
run judges exactly as the uninterrupted one. The loss it is fed is the one Composer's eval reduced
over ranks; the owner decides on rank 0 and shares the decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from composer.core import Time, TimeUnit

from composer_growth.errors import check, is_number
from composer_growth.timeutil import parse_time

DEFAULT_MONITOR = "metrics/eval/LanguageCrossEntropy"
PLATEAU_KEYS = ("window", "min_delta")
_UNITS = {TimeUnit.BATCH: "ba", TimeUnit.TOKEN: "tok", TimeUnit.SAMPLE: "sp", TimeUnit.DURATION: "dur"}


def parse_monitor(monitor: Any) -> tuple[str, str]:
    """``metrics/<evaluator label>/<metric>`` (as Composer logs it) or a metric name of the ``eval`` evaluator."""
    check(isinstance(monitor, str) and monitor.strip() != "", "monitor", monitor,
          "an eval metric, e.g. metrics/eval/LanguageCrossEntropy")
    parts = monitor.split("/")
    if len(parts) == 1:
        return "eval", parts[0]
    check(len(parts) == 3 and parts[0] == "metrics" and all(parts), "monitor", monitor,
          "metrics/<evaluator label>/<metric name>, e.g. metrics/eval/LanguageCrossEntropy")
    return parts[1], parts[2]


class Plateau:
    """The plateau rule of one trigger: ``window`` (a Composer time) and ``min_delta`` (nats)."""

    def __init__(self, window: Time, min_delta: float):
        self.window, self.min_delta = window, float(min_delta)
        self.history: list[tuple[float, float]] = []  # (time in the window's unit, best loss so far) per eval

    @classmethod
    def parse(cls, value: Any, key: str = "trigger_plateau") -> Plateau:
        """``{window: <time>, min_delta: <number > 0>}``; an error names ``key.window`` / ``key.min_delta``."""
        check(isinstance(value, Mapping), key, value, "a mapping {window: <Composer time>, min_delta: <number > 0>}")
        for k in value:
            check(k in PLATEAU_KEYS, f"{key}.{k}", value[k], f"unknown key; allowed: {', '.join(PLATEAU_KEYS)}")
        check("window" in value, f"{key}.window", None, "a Composer time in ba, tok, sp or dur (e.g. 200ba)")
        raw = value["window"]
        window = parse_time(raw, f"{key}.window")
        check(window.unit in _UNITS, f"{key}.window", raw, "a Composer time in ba, tok, sp or dur (e.g. 200ba)")
        check(window.value > 0, f"{key}.window", raw, "a time > 0")
        delta = value.get("min_delta")
        check(is_number(delta) and delta > 0, f"{key}.min_delta", delta,
              "a number > 0 (nats of eval-loss improvement over the window)")
        return cls(window, float(delta))

    @property
    def unit(self) -> TimeUnit:
        return self.window.unit

    def describe(self) -> str:
        return f"window {float(self.window.value):g}{_UNITS[self.unit]}, min_delta {self.min_delta:g}"

    def observe(self, now: float, loss: float) -> None:
        """Record the eval loss measured at ``now`` (the run's time in the window's unit)."""
        best = min(loss, self.history[-1][1]) if self.history else float(loss)
        self.history.append((float(now), best))
        # keep the last eval the window has passed (its best covers every earlier one) and those after it
        old = self._before(now)
        if old is not None and old > 0:
            del self.history[:old]

    def _before(self, now: float) -> int | None:
        """Index of the last eval at or before ``now - window`` (float-tolerant for ``dur``)."""
        edge = now - float(self.window.value) + 1e-9 * max(1.0, abs(now))
        found = None
        for i, (t, _) in enumerate(self.history):
            if t <= edge:
                found = i
            else:
                break
        return found

    def improvement(self) -> float | None:
        """At the last eval: best loss at or before ``now - window`` minus the best now (None: window not filled)."""
        if not self.history:
            return None
        now, best = self.history[-1]
        old = self._before(now)
        return None if old is None else self.history[old][1] - best

    def reached(self) -> bool:
        """Whether the last eval recorded is on a plateau."""
        gain = self.improvement()
        return gain is not None and gain < self.min_delta

    def reset(self) -> None:
        self.history = []

    def state_dict(self) -> list[list[float]]:
        return [[t, best] for t, best in self.history]

    def load_state_dict(self, history: Any) -> None:
        self.history = [(float(t), float(best)) for t, best in (history or [])]

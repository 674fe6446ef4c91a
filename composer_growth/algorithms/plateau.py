"""When the eval loss stops improving: the ``trigger_plateau`` of the orchestrator's ops and of the growth algorithms.

``trigger_plateau: {window: 200ba, min_delta: 0.01}`` holds at an eval where the best eval loss
improved by less than ``min_delta`` over the last ``window``::

    best(at or before now - window) - best(now) < min_delta

judged once an eval at or before ``now - window`` exists. ``window`` is any Composer time in ``ba``,
``tok``, ``sp`` or ``dur``. ``min_delta`` is in nats, or a share such as ``"10%"``: then the rule holds
when the improvement over the last window is below that share of the largest improvement over one
window seen so far in the run (the loss curve has flattened to a tenth of its steepest), which needs
no knowledge of the loss's scale. :class:`Plateau` keeps what that needs, the best loss so far at each
eval (pruned to the evals the window can still reach) and the largest improvement, and saves them in
the owner's ``state_dict``: a resumed run judges exactly as the uninterrupted one. The loss it is fed is the one Composer's eval reduced
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
    """The plateau rule of one trigger: ``window`` (a Composer time) and ``min_delta`` (nats, or with
    ``relative`` a share of the largest improvement over one window so far)."""

    def __init__(self, window: Time, min_delta: float, relative: bool = False):
        self.window, self.min_delta, self.relative = window, float(min_delta), relative
        self.history: list[tuple[float, float]] = []  # (time in the window's unit, best loss so far) per eval
        self.steepest = 0.0  # the largest improvement over one window so far

    @classmethod
    def parse(cls, value: Any, key: str = "trigger_plateau") -> Plateau:
        """``{window: <time>, min_delta: <number > 0> | "<P>%"}``; an error names ``key.window`` / ``key.min_delta``."""
        check(isinstance(value, Mapping), key, value,
              "a mapping {window: <Composer time>, min_delta: <number > 0, or a share like '10%'>}")
        for k in value:
            check(k in PLATEAU_KEYS, f"{key}.{k}", value[k], f"unknown key; allowed: {', '.join(PLATEAU_KEYS)}")
        check("window" in value, f"{key}.window", None, "a Composer time in ba, tok, sp or dur (e.g. 200ba)")
        raw = value["window"]
        window = parse_time(raw, f"{key}.window")
        check(window.unit in _UNITS, f"{key}.window", raw, "a Composer time in ba, tok, sp or dur (e.g. 200ba)")
        check(window.value > 0, f"{key}.window", raw, "a time > 0")
        delta = value.get("min_delta")
        allowed = ("a number > 0 (nats of eval-loss improvement over the window), or a share of the largest "
                   "improvement over one window so far, '1%' to '99%'")
        if isinstance(delta, str):
            try:
                share = float(delta.strip().removesuffix("%")) if delta.strip().endswith("%") else None
            except ValueError:
                share = None
            check(share is not None and 0 < share < 100, f"{key}.min_delta", delta, allowed)
            return cls(window, share / 100, relative=True)
        check(is_number(delta) and delta > 0, f"{key}.min_delta", delta, allowed)
        return cls(window, float(delta))

    @property
    def unit(self) -> TimeUnit:
        return self.window.unit

    def describe(self) -> str:
        delta = f"{self.min_delta * 100:g}%" if self.relative else f"{self.min_delta:g}"
        return f"window {float(self.window.value):g}{_UNITS[self.unit]}, min_delta {delta}"

    def observe(self, now: float, loss: float) -> None:
        """Record the eval loss measured at ``now`` (the run's time in the window's unit)."""
        best = min(loss, self.history[-1][1]) if self.history else float(loss)
        self.history.append((float(now), best))
        gain = self.improvement()
        if gain is not None:
            self.steepest = max(self.steepest, gain)
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

    def threshold(self) -> float:
        """The improvement over the window below which the rule holds, now."""
        return self.min_delta * self.steepest if self.relative else self.min_delta

    def reached(self) -> bool:
        """Whether the last eval recorded is on a plateau (with a share: also when no window improved)."""
        gain = self.improvement()
        if gain is None:
            return False
        return gain < self.threshold() or (self.relative and self.steepest <= 0)

    def reset(self) -> None:
        self.history, self.steepest = [], 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[t, best] for t, best in self.history], "steepest": self.steepest}

    def load_state_dict(self, saved: Any) -> None:
        """What :meth:`state_dict` gave (a bare history list: a checkpoint from before ``steepest``)."""
        if isinstance(saved, Mapping):
            history, self.steepest = saved.get("history"), float(saved.get("steepest", 0.0))
        else:
            history, self.steepest = saved, 0.0
        self.history = [(float(t), float(best)) for t, best in (history or [])]

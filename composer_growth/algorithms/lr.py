"""The learning rate on top of the recipe's schedule: the one way algorithms change it.

Composer compiles each of its schedulers into a ``LambdaLR``: every step sets a param group's lr to
``base_lrs[i] x f(state)``. Algorithms change that in three ways, all here:

* :func:`scale_lr`: from now on, the schedule times a factor (the orchestrator's ``change_lr``):
  ``base_lrs``, each group's lr and ``initial_lr`` are multiplied; it is saved with the schedulers
  and optimizers in every checkpoint.
* :func:`set_lr_multiplier`: a named factor on top of the scheduled lr, one per algorithm (the
  context schedule's per-phase ``lr_multiplier``, lora_merge's restart ramp). Every group's lr is
  the scheduled lr (the scheduler's last value, or without a scheduler the lr before any factor)
  times the factors of all algorithms; setting one puts the groups on that product at once. Each
  algorithm sets its factor from its own saved state (the phase, the last merge), so a resumed run
  composes the same factors.
* :class:`RestartableSchedule`: a Composer scheduler of ours around the recipe's, whose time can
  restart (a time offset) and whose warmup can change (the orchestrator's ``reset_lr_schedule`` and
  ``change_warmup_iters`` / ``set_warmup_iters``); the orchestrator keeps the offset and warmup in its state_dict.

Multipliers act after the scheduler, not inside its lambda: Composer steps its schedulers before it
advances the timestamp, so a factor inside the lambda would see the previous batch's time.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

from composer.core import State, Time, TimeUnit
from composer.utils import ensure_tuple

UNIT_SUFFIX = {TimeUnit.BATCH: "ba", TimeUnit.TOKEN: "tok", TimeUnit.SAMPLE: "sp", TimeUnit.EPOCH: "ep",
         TimeUnit.DURATION: "dur"}
#: a param group's lr before any multiplier, where no scheduler keeps it (the key older checkpoints hold)
BASE_LR_KEY = "lora_lr"

_MULTIPLIERS: weakref.WeakKeyDictionary[State, dict[str, float]] = weakref.WeakKeyDictionary()
_SCHEDULES: weakref.WeakKeyDictionary[State, list[RestartableSchedule]] = weakref.WeakKeyDictionary()


def optimizer_lrs(state: State) -> list[float]:
    return [g["lr"] for opt in ensure_tuple(state.optimizers) for g in opt.param_groups]


def _scheduler_of(state: State, optimizer: Any) -> Any:
    return next((s for s in state.schedulers if getattr(s, "optimizer", None) is optimizer), None)


def _apply(state: State) -> None:
    """Every param group on its scheduled lr times every algorithm's factor."""
    factors = [f for _, f in sorted(_MULTIPLIERS.get(state, {}).items())]  # one order, however they were set
    for opt in ensure_tuple(state.optimizers):
        sched = _scheduler_of(state, opt)
        for i, group in enumerate(opt.param_groups):
            lr = sched.get_last_lr()[i] if sched is not None else group.setdefault(BASE_LR_KEY, group["lr"])
            for factor in factors:
                lr = lr * factor
            group["lr"] = lr


def set_lr_multiplier(state: State, name: str, factor: float) -> None:
    """Algorithm ``name``'s factor on top of the scheduled lr, applied to every param group now.

    Call it again after each scheduler step while the factor is not 1 (a step puts the groups back on
    the scheduled lr). Nothing is touched while this factor is and was 1.
    """
    factors = _MULTIPLIERS.setdefault(state, {})
    if factor == 1.0 and factors.get(name, 1.0) == 1.0:
        return
    factors[name] = float(factor)
    _apply(state)


def lr_multiplier(state: State, name: str) -> float:
    return _MULTIPLIERS.get(state, {}).get(name, 1.0)


def scheduled_lr(state: State) -> float:
    """The first param group's lr on the recipe's schedule, before the algorithms' factors."""
    opt = ensure_tuple(state.optimizers)[0]
    sched, group = _scheduler_of(state, opt), opt.param_groups[0]
    return sched.get_last_lr()[0] if sched is not None else group.get(BASE_LR_KEY, group["lr"])


def active_multipliers(state: State) -> dict[str, float]:
    """The algorithms' factors other than 1 on top of the scheduled lr now, by algorithm."""
    return {name: f for name, f in sorted(_MULTIPLIERS.get(state, {}).items()) if f != 1.0}


def scale_lr(state: State, factor: float) -> None:
    """The schedule times ``factor`` from now on: each group's lr (and ``initial_lr``, what a scheduler
    rebuilt by ``surgery.grow`` starts from), every scheduler's ``base_lrs``."""
    for opt in ensure_tuple(state.optimizers):
        for group in opt.param_groups:
            group["lr"] *= factor
            for key in ("initial_lr", BASE_LR_KEY):
                if key in group:
                    group[key] *= factor
    for scheduler in state.schedulers:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = optimizer_lrs(state)


def refresh_lr(state: State) -> float:
    """Put each param group on its scheduler's value now (the next batch trains with it), times the
    algorithms' factors; returns the first group's lr."""
    for scheduler in state.schedulers:
        if hasattr(scheduler, "lr_lambdas"):
            factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
            if len(factors) == 1:
                factors = factors * len(scheduler.base_lrs)
            for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, factors):
                group["lr"] = base * f
            scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
    if any(f != 1.0 for f in _MULTIPLIERS.get(state, {}).values()):
        _apply(state)
    return optimizer_lrs(state)[0]


class _Restarted:
    """The State as a restarted schedule sees it: time counted from ``start``, the rest of the run as its length."""

    def __init__(self, state: State, start: dict[str, int]):
        self._state = state
        ts = state.timestamp
        self.timestamp = ts.copy(batch=int(ts.batch) - start["ba"], sample=int(ts.sample) - start["sp"],
                                 token=int(ts.token) - start["tok"], epoch=int(ts.epoch) - start["ep"])
        md = state.max_duration
        self.max_duration = Time(int(md.value) - start[UNIT_SUFFIX[md.unit]], md.unit)

    def get_elapsed_duration(self) -> Time:
        md = self.max_duration
        return Time(min(1.0, float(self.timestamp.get(md.unit).value) / max(1, int(md.value))), TimeUnit.DURATION)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


class RestartableSchedule:
    """A Composer scheduler (``(state, ssr) -> factor``) around ``schedule``, whose time can restart.

    Pass it to the Trainer as the scheduler (the recipe does). Until :meth:`restart` it is
    ``schedule`` itself; after, ``schedule`` sees the run from the restart on (time counted from
    there, the rest of the run as its length). :meth:`set_warmup` rebuilds ``schedule`` from its
    own arguments with another ``t_warmup``. The Trainer's ``State`` finds it through
    :func:`restartable_schedules` once the Trainer has compiled it.
    """

    def __init__(self, schedule: Any):
        self.schedule = schedule
        self._current = schedule
        self.start: dict[str, int] | None = None
        self.warmup: str | None = None

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        known = _SCHEDULES.setdefault(state, [])
        if not any(s is self for s in known):
            known.append(self)
        view = state if self.start is None else _Restarted(state, self.start)
        sched = self._current
        if len(inspect.signature(sched).parameters) > 1:
            return sched(view, ssr)
        return sched(view)

    @property
    def has_warmup(self) -> bool:
        return "t_warmup" in inspect.signature(type(self.schedule)).parameters

    def restart(self, start: dict[str, int] | None) -> None:
        """Count the schedule's time from ``start`` (``ba``, ``sp``, ``tok``, ``ep`` done then); None: from 0."""
        self.start = None if start is None else dict(start)

    def set_warmup(self, warmup: str | None) -> None:
        """The schedule rebuilt from its own arguments with ``t_warmup = warmup`` (None: the original)."""
        self.warmup = warmup
        if warmup is None:
            self._current = self.schedule
            return
        params = inspect.signature(type(self.schedule)).parameters
        if "t_warmup" not in params:
            raise ValueError(f"{type(self.schedule).__name__} has no warmup")
        kwargs = {name: getattr(self.schedule, name) for name in params if hasattr(self.schedule, name)}
        kwargs["t_warmup"] = warmup
        self._current = type(self.schedule)(**kwargs)


def restartable_schedules(state: State) -> list[RestartableSchedule]:
    """The :class:`RestartableSchedule` objects the Trainer of ``state`` compiled into its schedulers."""
    return list(_SCHEDULES.get(state, []))

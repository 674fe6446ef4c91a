"""The phases of a context-length schedule: the type, parsing, and which phase is active.

A phase says how long the sequences are, for how long (a Composer ``Time``), how the rotary
embedding is configured while it runs, and optionally where its data comes from. :class:`Timeline`
places the phases on the run: each phase's start in one unit, and the phase of any point of the
run. Nothing here needs a Trainer.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from composer.core import Time, TimeUnit

from composer_growth.errors import ConfigError, check, check_int
from composer_growth.families import Family
from composer_growth.functional.rope import RopeTarget, rope_target, validate_rope_scaling
from composer_growth.timeutil import parse_time

PHASE_KEYS = ("name", "seq_length", "duration", "rope_scaling", "microbatch_size", "lr_multiplier", "description",
              "dataset", "prepare", "global_batch_size", "max_position_embeddings")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
EPS = 1e-6


@dataclass
class Phase:
    """One phase of the schedule, checked and normalised."""
    index: int
    name: str
    seq_length: int
    duration: Time | None              # None: the last phase, covering the rest of the run
    rope_scaling: dict[str, Any] | None  # normalised; None: the model's own rope as built or loaded
    microbatch_size: int | None
    lr_multiplier: float
    description: str
    dataset: str | None
    prepare: dict[str, Any] | None
    global_batch_size: int | None
    max_position_embeddings: int | None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "seq_length": self.seq_length,
            "duration": None if self.duration is None else str(self.duration),
            "rope_scaling": self.rope_scaling, "microbatch_size": self.microbatch_size,
            "lr_multiplier": self.lr_multiplier, "dataset": self.dataset,
            "global_batch_size": self.global_batch_size, "description": self.description,
        }

    def rope(self, original: dict[str, Any], family: Family, config: Any = None) -> RopeTarget:
        """The phase's rope config on a model whose own rope is ``original`` (:func:`rope_snapshot`)."""
        return rope_target(self.rope_scaling, original, family, config, seq_length=self.seq_length,
                           max_position_embeddings=self.max_position_embeddings,
                           key=f"phases[{self.index}].rope_scaling")


def _optional_int(raw: Mapping[str, Any], name: str, key: str) -> int | None:
    value = raw.get(name)
    if value is None:
        return None
    check_int(value, f"{key}.{name}", minimum=1)
    return int(value)


def parse_phase(i: int, raw: Any, n: int) -> Phase:
    """Phase ``i`` of ``n`` from its mapping; ConfigError naming ``phases[i].<key>`` for a bad value."""
    key = f"phases[{i}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(key, raw, "a mapping with name, seq_length, duration and optional rope_scaling, "
                                    "microbatch_size, lr_multiplier, description, dataset")
    for k in raw:
        if k not in PHASE_KEYS:
            raise ConfigError(f"{key}.{k}", raw[k], f"unknown key; allowed: {', '.join(PHASE_KEYS)}")
    name = raw.get("name", f"phase{i}")
    check(isinstance(name, str) and bool(_NAME.match(name)), f"{key}.name", name,
          "a folder name: letters, digits, '.', '_', '-'")
    check_int(raw.get("seq_length"), f"{key}.seq_length", minimum=1)
    if raw.get("duration") is None:
        if i != n - 1:
            raise ConfigError(f"{key}.duration", None, "required (only the last phase may leave it out: "
                                                       "it covers the rest of the run)")
        duration = None
    else:
        duration = parse_time(raw["duration"], f"{key}.duration")
        check(float(duration.value) > 0, f"{key}.duration", raw["duration"], "a positive time")
    rope = raw.get("rope_scaling")
    if rope is not None:
        rope = validate_rope_scaling(rope, f"{key}.rope_scaling")
    mult = raw.get("lr_multiplier", 1.0)
    mult = 1.0 if mult is None else mult
    check(isinstance(mult, numbers.Real) and not isinstance(mult, bool) and math.isfinite(mult) and mult > 0,
          f"{key}.lr_multiplier", mult, "a number > 0")
    description = raw.get("description") or ""
    check(isinstance(description, str), f"{key}.description", description, "a string")
    dataset = raw.get("dataset")
    check(dataset is None or (isinstance(dataset, str) and dataset.strip() != ""), f"{key}.dataset", dataset,
          "null or the folder of a prepared dataset (composer-growth prepare-data)")
    prepare = raw.get("prepare")
    if prepare is not None:
        check(isinstance(prepare, Mapping), f"{key}.prepare", prepare, "a mapping of prepare-data options")
        check(dataset is not None, f"{key}.prepare", prepare, "needs phases[i].dataset: the folder to build")
        prepare = dict(prepare)
    gbs = _optional_int(raw, "global_batch_size", key)
    if gbs is not None:
        check(dataset is not None, f"{key}.global_batch_size", gbs,
              "needs phases[i].dataset (phases without one train on the Trainer's own batches)")
    return Phase(index=i, name=name, seq_length=int(raw["seq_length"]), duration=duration, rope_scaling=rope,
                 microbatch_size=_optional_int(raw, "microbatch_size", key), lr_multiplier=float(mult),
                 description=description, dataset=dataset, prepare=prepare, global_batch_size=gbs,
                 max_position_embeddings=_optional_int(raw, "max_position_embeddings", key))


def parse_phases(raw: Any) -> list[Phase]:
    """A schedule's phases: a non-empty list, names unique, lengths strictly increasing."""
    check(isinstance(raw, (list, tuple)) and len(raw) > 0, "phases", raw,
          "a non-empty list of phases (name, seq_length, duration, ...)")
    phases = [parse_phase(i, item, len(raw)) for i, item in enumerate(raw)]
    names = [p.name for p in phases]
    for i, name in enumerate(names):
        check(name not in names[:i], f"phases[{i}].name", name, "a name no other phase has")
    for i in range(1, len(phases)):
        prev, cur = phases[i - 1].seq_length, phases[i].seq_length
        check(cur > prev, f"phases[{i}].seq_length", cur, f"longer than the previous phase's ({prev}): lengths must increase")
    return phases


class Timeline:
    """Where each phase starts, in one unit, and which phase a point of the run falls in.

    :meth:`place` computes the starts (checking the units against ``max_duration``); until it has,
    :attr:`starts` is None. ``warn`` receives the warnings (durations that do not add up).
    """

    def __init__(self, phases: list[Phase], warn: Callable[[str], None]):
        self.phases, self.warn = phases, warn
        self.unit: TimeUnit | None = None
        self.starts: list[float] | None = None

    def place(self, max_duration: Time | None) -> bool:
        """Compute each phase's start in one unit; False when that needs max_duration and it is unknown."""
        durations = [p.duration for p in self.phases]
        units = {d.unit for d in durations if d is not None and d.unit != TimeUnit.DURATION}
        if len(units) > 1:
            raise ConfigError("phases", [str(d) for d in durations], "durations in one unit, or shares of the run ('dur')")
        shares = [i for i, d in enumerate(durations) if d is not None and d.unit == TimeUnit.DURATION]
        max_unit = max_duration.unit if max_duration is not None else None
        if units:
            unit = next(iter(units))
            if shares and max_duration is not None and max_unit != unit:
                i = shares[0]
                raise ConfigError(f"phases[{i}].duration", str(durations[i]),
                                  f"a share of the run ('dur') mixes with {unit.value} durations only when "
                                  f"max_duration is in {unit.value} (it is {max_duration})")
        elif max_unit is not None:
            unit = max_unit
        elif shares:
            return False
        else:
            unit = TimeUnit.BATCH
        if shares and max_duration is None:
            return False
        values = [None if d is None else float(d.value) * (float(max_duration.value) if d.unit == TimeUnit.DURATION
                                                           else 1.0) for d in durations]
        starts, total = [0.0], 0.0
        for v in values[:-1]:
            total = math.fsum([total, v])
            starts.append(round(total, 6))
        self.unit, self.starts = unit, starts
        if max_duration is not None:
            self._check_run(max_duration, values[-1])
        return True

    def _check_run(self, max_duration: Time, last_value: float | None) -> None:
        unit, starts, last = self.unit, self.starts, self.phases[-1]
        if unit != max_duration.unit:
            self.warn(f"ContextLengthSchedule: phases are measured in {unit.value} and max_duration in "
                      f"{max_duration.unit.value}: the last phase '{last.name}' covers the rest of the run, however "
                      "long that is")
            return
        run = float(max_duration.value)
        for i in range(1, len(starts)):
            # a phase starts with the first batch at or past its start: batch counts are whole
            first = math.ceil(starts[i] - EPS) if unit == TimeUnit.BATCH else starts[i]
            if first >= run - EPS:
                raise ConfigError(f"phases[{i}]", self.phases[i].name,
                                  f"starts at {starts[i]:g}{unit.value}, when the run has ended "
                                  f"(max_duration={max_duration}): shorten the phases before it")
        if last_value is not None:
            end = math.fsum([starts[-1], last_value])
            if abs(end - run) > EPS * max(1.0, run):
                self.warn(f"ContextLengthSchedule: the phases add up to {end:g}{unit.value}, max_duration is "
                          f"{run:g}{unit.value}: the last phase '{last.name}' covers the rest of the run "
                          f"({run - starts[-1]:g}{unit.value} instead of {last_value:g}{unit.value})")

    def index(self, now: Callable[[TimeUnit], float]) -> int:
        """The phase a batch trains in when the run has done ``now(unit)`` of each unit (after :meth:`place`)."""
        done = now(self.unit)
        index = 0
        for j, start in enumerate(self.starts):
            if done >= start - EPS:
                index = j
        return index

    def next_start(self, index: int) -> float:
        """Where the phase after ``index`` starts (``math.inf`` for the last phase)."""
        return self.starts[index + 1] - EPS if index + 1 < len(self.starts) else math.inf

"""The orchestrator's schedule: entries (name, value, trigger, timeout, options) read and checked.

A schedule is a list of mappings, or the path of a JSON / YAML file holding one. Each entry becomes
an :class:`Op`: its operation kind (a name of :data:`~composer_growth.algorithms.orchestrator.ops.OPS`)
with the value and options that kind allows, the ``trigger_loss`` it fires below, the ``trigger_plateau``
it fires on (:class:`~composer_growth.algorithms.plateau.Plateau`), and its timeout (``max_wait_iters``
batches or ``max_wait`` a Composer time, else the orchestrator's ``max_wait``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from composer.core import Time, TimeUnit

from composer_growth.algorithms.orchestrator.ops import OPS, OpKind
from composer_growth.algorithms.plateau import DEFAULT_MONITOR, Plateau, parse_monitor
from composer_growth.errors import ConfigError, check, check_flag, is_int, is_number
from composer_growth.timeutil import parse_time

ENTRY_KEYS = ("name", "value", "trigger_loss", "trigger_plateau", "max_wait_iters", "max_wait", "reevaluate", "args")
__all__ = ["DEFAULT_MONITOR", "ENTRY_KEYS", "Op", "load_schedule", "parse_monitor", "parse_op"]


@dataclass
class Op:
    """One schedule entry, checked."""
    index: int
    name: str
    value: Any
    trigger_loss: float | None
    max_wait: Time | None
    reevaluate: bool
    args: dict[str, Any] = field(default_factory=dict)
    trigger_plateau: Plateau | None = None  # judged while the op is the next one (its history starts then)

    @property
    def kind(self) -> OpKind:
        """What the entry's name does."""
        return OPS[self.name]

    def label(self) -> str:
        return self.name if self.value is None else f"{self.name}({self.value:g})" if is_number(self.value) \
            else f"{self.name}({self.value})"


def load_schedule(schedule: Any) -> list[Any]:
    """A schedule given as a list, or the path of a JSON or YAML file holding one."""
    if isinstance(schedule, str):
        if not os.path.isfile(schedule):
            raise ConfigError("schedule", schedule, "a list of operations or the path of a .json / .yaml file")
        with open(schedule) as f:
            text = f.read()
        try:
            if schedule.endswith(".json"):
                schedule = json.loads(text)
            else:
                import yaml

                schedule = yaml.safe_load(text)
        except ValueError as e:  # json.JSONDecodeError and yaml.YAMLError (via its base) both land here
            raise ConfigError("schedule", schedule, f"not valid JSON / YAML: {str(e).splitlines()[0]}") from None
        except Exception as e:  # noqa: BLE001 - yaml's errors do not derive from ValueError
            raise ConfigError("schedule", schedule, f"not valid YAML: {str(e).splitlines()[0]}") from None
    check(isinstance(schedule, (list, tuple)) and len(schedule) > 0, "schedule", schedule,
          "a non-empty list of operations (name, value, trigger_loss, max_wait_iters, reevaluate)")
    return list(schedule)


def parse_op(i: int, raw: Any, max_wait: Time | None) -> Op:
    key = f"schedule[{i}]"
    check(isinstance(raw, Mapping), key, raw, "a mapping with name, value, trigger_loss, max_wait_iters, reevaluate")
    for k in raw:
        check(k in ENTRY_KEYS, f"{key}.{k}", raw[k], f"unknown key; allowed: {', '.join(ENTRY_KEYS)}")
    name = raw.get("name")
    check(name in OPS, f"{key}.name", name, f"one of {', '.join(OPS)}")
    kind = OPS[name]
    value = kind.value(raw.get("value"), f"{key}.value")
    trigger = raw.get("trigger_loss")
    check(trigger is None or is_number(trigger), f"{key}.trigger_loss", trigger, "a number or null")
    wait_iters, wait = raw.get("max_wait_iters"), raw.get("max_wait")
    check(wait_iters is None or (is_int(wait_iters) and wait_iters >= 1), f"{key}.max_wait_iters", wait_iters,
          "an integer >= 1 (batches) or null")
    check(wait_iters is None or wait is None, f"{key}.max_wait", wait, "not together with max_wait_iters")
    if wait_iters is not None:
        wait_t: Time | None = Time(wait_iters, TimeUnit.BATCH)
    elif wait is not None:
        wait_t = parse_time(wait, f"{key}.max_wait")
        check(wait_t.value > 0, f"{key}.max_wait", wait, "a time > 0")
    else:
        wait_t = max_wait
    plateau = raw.get("trigger_plateau")
    plateau = None if plateau is None else Plateau.parse(plateau, f"{key}.trigger_plateau")
    check(trigger is not None or plateau is not None or wait_t is not None, f"{key}.trigger_loss", trigger,
          "a number, or give the op a trigger_plateau or a max_wait_iters / max_wait (it could never fire)")
    reevaluate = raw.get("reevaluate", False)
    check_flag(reevaluate, f"{key}.reevaluate")
    given = raw.get("args") or {}
    check(isinstance(given, Mapping), f"{key}.args", given, "a mapping of the op's options")
    args = {}
    for arg in given:
        check(arg in kind.args, f"{key}.args.{arg}", given[arg],
              f"unknown option of {name}; allowed: {', '.join(kind.args) or 'none'}")
    for arg, (parse, default) in kind.args.items():
        args[arg] = parse(given[arg], f"{key}.args.{arg}") if arg in given else default
    return Op(index=i, name=name, value=value, trigger_loss=None if trigger is None else float(trigger),
              max_wait=wait_t, reevaluate=reevaluate, args=args, trigger_plateau=plateau)

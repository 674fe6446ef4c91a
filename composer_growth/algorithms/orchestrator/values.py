"""Value and option checkers of the orchestrator's operations: ``(value, key) -> normalised value``.

Each raises :class:`~composer_growth.errors.ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from composer.core import TimeUnit

from composer_growth.algorithms.lr import UNIT_SUFFIX
from composer_growth.errors import check, is_int, is_number
from composer_growth.timeutil import parse_time


def multiplier(value: Any, key: str) -> float:
    check(is_number(value) and value > 0, key, value, "a number > 0 (a multiplier)")
    return float(value)


def multiplier_of(current: str, absolute: str) -> Callable[[Any, str], float]:
    """A multiplier of the run's ``current`` value; ``absolute`` names the op that sets it outright."""
    def parse(value: Any, key: str) -> float:
        check(is_number(value) and value > 0, key, value,
              f"a number > 0 (a multiplier of the {current}: 0.5 halves, 2 doubles; {absolute} sets it outright)")
        return float(value)
    return parse


def scaling_factor(value: Any, key: str) -> float:
    check(is_number(value) and 0 <= value <= 1, key, value,
          "a number in [0, 1] (the adapters' scaling is multiplied by it; 0 disables them)")
    return float(value)


def nothing(value: Any, key: str) -> None:
    check(value is None, key, value, "null (this operation takes no value)")


def times(value: Any, key: str) -> int:
    check(is_int(value) and value >= 2, key, value, "an integer >= 2 (copies of the layer stack)")
    return value


def factor(value: Any, key: str) -> float:
    check(is_number(value) and value > 1, key, value, "a number > 1 (new MLP width / old)")
    return float(value)


def count(value: Any, key: str) -> int:
    check(is_int(value) and value >= 1, key, value, "an integer >= 1")
    return value


def batches_or_time(minimum: int) -> Callable[[Any, str], str]:
    def parse(value: Any, key: str) -> str:
        if is_int(value):
            check(value >= minimum, key, value, f"an integer >= {minimum} (batches) or a Composer time")
            return f"{value}ba"
        t = parse_time(value, key)
        check(t.unit != TimeUnit.DURATION or minimum == 0 or t.value > 0, key, value, "a time > 0")
        check(t.unit != TimeUnit.EPOCH, key, value, "in ba, tok, sp or dur")
        check(minimum == 0 or t.value > 0, key, value, "a time > 0")
        return str(value) if isinstance(value, str) else f"{t.value}{UNIT_SUFFIX[t.unit]}"
    return parse


def one_of(*choices: str) -> Callable[[Any, str], str]:
    def parse(value: Any, key: str) -> str:
        check(value in choices, key, value, f"one of {', '.join(choices)}")
        return value
    return parse


def seed(value: Any, key: str) -> int:
    check(is_int(value), key, value, "an integer")
    return value


def noise(value: Any, key: str) -> float:
    check(is_number(value) and value >= 0, key, value, "a number >= 0")
    return float(value)


def divisor(value: Any, key: str) -> int:
    check(is_int(value) and value >= 1, key, value, "an integer >= 1 (the adapters' rank is divided by it)")
    return value


def prune_ratio(value: Any, key: str) -> float:
    check(is_number(value) and 0 <= value < 1, key, value, "a number in [0, 1)")
    return float(value)

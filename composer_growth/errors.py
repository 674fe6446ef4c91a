"""One error type for bad options: one line naming the key, the value and what is allowed."""

from __future__ import annotations

import math
import numbers
from typing import Any


class ConfigError(ValueError):
    """A recipe key or algorithm argument holds a value that is not allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{key}={shown}: {allowed}")


def check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(key, value, allowed)


def is_int(value: Any) -> bool:
    """An integer, and not a bool (``True`` is an ``int`` to Python, not to a recipe)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any, finite: bool = True) -> bool:
    """A real number, not a bool; finite unless ``finite=False``."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and (not finite or math.isfinite(value)))


def check_flag(value: Any, key: str, allowed: str = "true or false") -> None:
    check(isinstance(value, bool), key, value, allowed)


def check_int(value: Any, key: str, minimum: int | None = None, allowed: str | None = None) -> None:
    """An integer (not a bool), at least ``minimum``; ``allowed`` words the error (default: ``an integer >= m``)."""
    ok = is_int(value) and (minimum is None or value >= minimum)
    check(ok, key, value, allowed or ("an integer" if minimum is None else f"an integer >= {minimum}"))


def check_number(value: Any, key: str, *, minimum: float | None = None, above: float | None = None,
                 below: float | None = None, finite: bool = True, allowed: str | None = None) -> None:
    """A real number (not a bool), finite unless ``finite=False``, ``>= minimum``, ``> above`` and
    ``< below``; ``allowed`` words the error (default: ``a number >= m``, ``a number > a``,
    ``a number in [m, b)``)."""
    ok = (is_number(value, finite) and (minimum is None or value >= minimum) and (above is None or value > above)
          and (below is None or value < below))
    if allowed is None:
        if minimum is not None and below is not None:
            allowed = f"a number in [{minimum:g}, {below:g})"
        elif above is not None:
            allowed = f"a number > {above:g}"
        elif minimum is not None:
            allowed = f"a number >= {minimum:g}"
        else:
            allowed = "a number"
    check(ok, key, value, allowed)


class DataError(RuntimeError):
    """A dataset on disk cannot be read as it stands (a damaged index, missing shards); one line."""

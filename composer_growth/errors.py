"""One error type for bad options: one line naming the key, the value and what is allowed."""

from __future__ import annotations

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


def check_flag(value: Any, key: str) -> None:
    check(isinstance(value, bool), key, value, "true or false")


def check_int(value: Any, key: str, minimum: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
    check(ok, key, value, "an integer" if minimum is None else f"an integer >= {minimum}")

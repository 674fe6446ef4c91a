"""Composer algorithms: when to act, and the state to resume from."""

__all__: list[str] = []

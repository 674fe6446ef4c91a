"""Durations: Composer ``Time`` everywhere, parsed here and nowhere else."""

from __future__ import annotations

from typing import Any

from composer.core import State, Time, TimeUnit

from composer_growth.errors import ConfigError

UNITS = "'<float>dur', '<int>ba', '<int>ep', '<int>tok', '<int>sp'"


def parse_time(value: Any, key: str) -> Time:
    """Parse ``"0.3dur"``, ``"2000ba"``, ``"5e7tok"``, ``"1ep"``, ``"100sp"`` or a ``Time``.

    A bare float in [0, 1] means a share of the run (``dur``).
    """
    if isinstance(value, Time):
        t = value
    elif isinstance(value, float) and 0.0 <= value <= 1.0:
        t = Time(value, TimeUnit.DURATION)
    elif isinstance(value, str):
        text = value.strip()
        try:
            t = Time.from_timestring(text)
        except (ValueError, KeyError):
            t = None
            # allow "5e7tok" style integers in scientific notation
            for unit in ("tok", "sp", "ba", "ep"):
                if text.endswith(unit):
                    try:
                        num = float(text[: -len(unit)])
                    except ValueError:
                        break
                    if num.is_integer():
                        t = Time.from_timestring(f"{int(num)}{unit}")
                    break
        if t is None:
            raise ConfigError(key, value, f"expected a Composer time string: {UNITS}")
    else:
        raise ConfigError(key, value, f"expected a Composer time string: {UNITS}")
    if t.unit not in (TimeUnit.DURATION, TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.TOKEN, TimeUnit.SAMPLE):
        raise ConfigError(key, value, f"unit must be one of {UNITS}")
    if t.value < 0 or (t.unit == TimeUnit.DURATION and t.value > 1):
        raise ConfigError(key, value, "must be >= 0 (and <= 1 for 'dur')")
    return t


def elapsed(state: State, unit: TimeUnit) -> float:
    """How much of ``unit`` the run has done so far (``dur``: share of max_duration)."""
    if unit == TimeUnit.DURATION:
        frac = state.get_elapsed_duration()
        return 0.0 if frac is None else float(frac.value)
    if unit == TimeUnit.EPOCH and state.dataloader_len is not None and int(state.dataloader_len) > 0:
        # fractional epochs, so an epoch-long schedule moves every batch
        return int(state.timestamp.epoch) + int(state.timestamp.batch_in_epoch) / int(state.dataloader_len)
    return float(state.timestamp.get(unit).value)


def progress(state: State, start: Time, end: Time) -> float:
    """Share of the way from ``start`` to ``end`` (same unit) the run has done, clipped to [0, 1]."""
    now = elapsed(state, end.unit)
    span = float(end.value) - float(start.value)
    if span <= 0:
        return 1.0 if now >= float(end.value) else 0.0
    return min(1.0, max(0.0, (now - float(start.value)) / span))


def reached(state: State, t: Time) -> bool:
    return elapsed(state, t.unit) >= float(t.value)


def to_duration_fraction(t: Time, max_duration: Time | None) -> float | None:
    """``t`` as a share of ``max_duration`` when the units allow it, else None."""
    if t.unit == TimeUnit.DURATION:
        return float(t.value)
    if max_duration is None or max_duration.unit != t.unit or max_duration.value == 0:
        return None
    return float(t.value) / float(max_duration.value)


def uncount_tokens(state: State, excess: int, reduce: bool) -> None:
    """Take off the timestamp tokens Composer counted but no model saw.

    Composer counts a batch's tokens before ``Event.AFTER_DATALOADER``; an algorithm that cuts
    the batch calls this at ``Event.BATCH_END`` with this rank's excess. ``reduce`` sums it over
    ranks and must be the same on every rank.
    """
    if reduce:
        import torch
        from composer.utils import dist

        t = state.device.tensor_to_device(torch.tensor([excess], dtype=torch.int64))
        dist.all_reduce(t, reduce_operation="SUM")
        excess = int(t.item())
    if excess:
        ts = state.timestamp
        state.timestamp = ts.copy(token=int(ts.token) - excess, token_in_epoch=int(ts.token_in_epoch) - excess,
                                  token_in_iteration=int(ts.token_in_iteration) - excess)

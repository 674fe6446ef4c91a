"""Durations: Composer ``Time`` everywhere, parsed here and nowhere else."""

from __future__ import annotations

from typing import Any

from composer.core import State, Time, TimeUnit

from composer_growth.errors import ConfigError

TIME_STRINGS = "'<float>dur', '<int>ba', '<int>ep', '<int>tok', '<int>sp'"


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
            raise ConfigError(key, value, f"expected a Composer time string: {TIME_STRINGS}")
    else:
        raise ConfigError(key, value, f"expected a Composer time string: {TIME_STRINGS}")
    if t.unit not in (TimeUnit.DURATION, TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.TOKEN, TimeUnit.SAMPLE):
        raise ConfigError(key, value, f"unit must be one of {TIME_STRINGS}")
    if t.value < 0 or (t.unit == TimeUnit.DURATION and t.value > 1):
        raise ConfigError(key, value, "must be >= 0 (and <= 1 for 'dur')")
    return t


def epoch_batches(state: State) -> int | None:
    """Batches in one epoch of the train loader (None when the loader has no length).

    During an eval ``state.dataloader_len`` is the eval loader's, so the train loader's own length
    is read then.
    """
    train = state.train_dataloader
    active = state.dataloader is not None and (state.dataloader is train or
                                               (train is None and state.dataloader_label == "train"))
    if active:
        n = None if state.dataloader_len is None else int(state.dataloader_len)
    elif train is None:
        return None
    else:
        try:
            n = len(train)
        except (TypeError, NotImplementedError):
            return None
    return n if n is not None and n > 0 else None


def elapsed(state: State, unit: TimeUnit) -> float:
    """How much of ``unit`` the run has done so far.

    ``dur``: the share of ``max_duration`` done, in the unit of ``max_duration``; ``ep``: epochs done,
    fractional inside an epoch (batches of the epoch over its length) when the train loader has one.
    So a ``dur`` time follows the batch within an epoch in a run whose ``max_duration`` is in epochs.
    """
    if unit == TimeUnit.DURATION:
        max_duration = state.max_duration
        if max_duration is None or float(max_duration.value) <= 0:
            return 0.0
        if max_duration.unit == TimeUnit.DURATION:
            frac = state.get_elapsed_duration()
            return 0.0 if frac is None else float(frac.value)
        n = epoch_batches(state) if max_duration.unit == TimeUnit.EPOCH else None
        if n is not None:  # batches done over batches in the run: the same number a batch-based run computes
            ts = state.timestamp
            return (int(ts.epoch) * n + min(int(ts.batch_in_epoch), n)) / (n * float(max_duration.value))
        return elapsed(state, max_duration.unit) / float(max_duration.value)
    if unit == TimeUnit.EPOCH:
        n = epoch_batches(state)
        if n is not None:
            return int(state.timestamp.epoch) + min(int(state.timestamp.batch_in_epoch), n) / n
    return float(state.timestamp.get(unit).value)


def reached(state: State, t: Time) -> bool:
    """Whether the run has done ``t`` (``dur`` and ``ep`` times inside an epoch as :func:`elapsed` says)."""
    return elapsed(state, t.unit) >= float(t.value)


def run_over(state: State) -> bool:
    """Whether the run has reached ``max_duration`` (an integer comparison for a run in batches)."""
    max_duration = state.max_duration
    if max_duration is None:
        return False
    if max_duration.unit == TimeUnit.BATCH:
        return state.timestamp.batch.value >= max_duration.value
    return state.timestamp >= max_duration


def earliest_batch(state: State, t: Time) -> int | None:
    """A batch count before which :func:`reached` is certainly False for ``t``; None when unknown.

    Lets an algorithm that waits for ``t`` skip the time arithmetic with one integer comparison
    until then (and still ask :func:`reached` from that batch on). Known for ``ba`` times, and for
    ``dur`` times when ``max_duration`` is in batches.
    """
    if t.unit == TimeUnit.BATCH:
        return int(t.value)
    max_duration = state.max_duration
    if t.unit == TimeUnit.DURATION and max_duration is not None and max_duration.unit == TimeUnit.BATCH:
        return max(0, int(float(t.value) * int(max_duration.value)) - 1)  # one below: float rounding
    return None


def to_duration_fraction(t: Time, max_duration: Time | None, batches_per_epoch: int | None = None) -> float | None:
    """``t`` as a share of ``max_duration`` when the units allow it, else None.

    ``ba`` and ``ep`` convert into each other with ``batches_per_epoch`` (the train loader's length).
    """
    if t.unit == TimeUnit.DURATION:
        return float(t.value)
    if max_duration is None or max_duration.value == 0:
        return None
    value, run = float(t.value), float(max_duration.value)
    if max_duration.unit == t.unit:
        return value / run
    if batches_per_epoch:
        if t.unit == TimeUnit.BATCH and max_duration.unit == TimeUnit.EPOCH:
            return value / (run * batches_per_epoch)
        if t.unit == TimeUnit.EPOCH and max_duration.unit == TimeUnit.BATCH:
            return value * batches_per_epoch / run
    return None


def check_progress_known(state: State, times: dict[str, Time], within: bool = True) -> None:
    """ConfigError, before training, when a time's progress needs an epoch's length and the loader has none.

    ``times`` maps a key to its time. A ``dur`` time in a run whose ``max_duration`` is in epochs needs
    the train loader's length (batches per epoch); with ``within``, so does an ``ep`` time (progress
    inside the epoch, as a warmup needs; without it, whole epochs are enough).
    """
    max_duration = state.max_duration
    if epoch_batches(state) is not None:
        return
    for key, t in times.items():
        by_epoch = (t.unit == TimeUnit.DURATION and max_duration is not None and max_duration.unit == TimeUnit.EPOCH
                    and 0 < float(t.value) < 1)
        if by_epoch or (t.unit == TimeUnit.EPOCH and (within or not float(t.value).is_integer())):
            raise ConfigError(key, str(t), f"needs the train loader's length (batches per epoch) with max_duration "
                                           f"{max_duration}, and this loader has none: use a time in ba, tok or sp "
                                           "(and max_duration in ba, tok or sp)")


def uncount_tokens(state: State, excess: int, reduce: bool) -> None:
    """Take off the timestamp tokens Composer counted but no model saw.

    Composer counts a batch's tokens before ``Event.AFTER_DATALOADER``; an algorithm that cuts
    the batch calls this at ``Event.BATCH_END`` with this rank's excess. ``reduce`` sums it over
    ranks and must be the same on every rank.
    """
    from composer.utils import dist

    if reduce and dist.get_world_size() > 1:  # one rank: no collective, no device round trip
        import torch

        t = state.device.tensor_to_device(torch.tensor([excess], dtype=torch.int64))
        dist.all_reduce(t, reduce_operation="SUM")
        excess = int(t.item())
    if excess:
        ts = state.timestamp
        state.timestamp = ts.copy(token=int(ts.token) - excess, token_in_epoch=int(ts.token_in_epoch) - excess,
                                  token_in_iteration=int(ts.token_in_iteration) - excess)

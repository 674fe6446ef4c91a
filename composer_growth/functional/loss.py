"""The loss of a Composer model on one batch, and summed over a few batches: one way to compute it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from composer.core.precision import Precision, get_precision_context
from composer.utils import ensure_tuple

from composer_growth.functional.batch import IGNORE_INDEX


def batch_loss(model: torch.nn.Module, batch: Any, precision: Precision | str | None = None,
               precision_config: dict[str, Any] | None = None) -> torch.Tensor:
    """``model.loss(model(batch), batch)`` of a ``ComposerModel``, its loss terms summed, under ``precision``.

    Gradients follow the caller's mode: call it under ``torch.no_grad()`` for a probe.
    """
    with get_precision_context(precision or Precision.FP32, precision_config):
        return sum(ensure_tuple(model.loss(model(batch), batch)))


@torch.no_grad()
def loss_sum(model: torch.nn.Module, batches: Iterable[Any], max_batches: int,
             prepare: Callable[[Any], Any] = lambda batch: batch, precision: Precision | str | None = None,
             precision_config: dict[str, Any] | None = None) -> torch.Tensor:
    """``[sum of loss x predicted tokens, predicted tokens]`` (float64) over the first ``max_batches``
    batches, each passed through ``prepare`` (cut to a length, moved to the device), in eval mode.

    Sums, not a mean, so ranks can add theirs before dividing.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    try:
        iterator = iter(batches)
        for _ in range(max_batches):
            try:
                batch = prepare(next(iterator))
            except StopIteration:
                break
            loss = batch_loss(model, batch, precision, precision_config)
            labels = batch.get("labels", batch["input_ids"])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += torch.tensor([float(loss) * n, n], dtype=torch.float64)
    finally:
        model.train(was_training)
    return total

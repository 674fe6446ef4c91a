"""Loss and metrics of a Composer model on a few batches: one routine for every evaluation outside the Trainer's.

:func:`eval_batches` is the loop the growth probe, the orchestrator's re-evaluation and the context
schedule's perplexity at every length share: eval mode and ``torch.no_grad()``, each batch moved to
the model's device, the run's precision, the model's mode put back and an FSDP2 root resharded after.

Composer keeps ``state.batch`` where the dataloader made it until it splits microbatches (on the CPU
at ``Event.BATCH_END`` of a GPU run), and an evaluator's dataloader yields CPU batches: every batch
goes through ``device.batch_to_device`` (a Composer ``Device``: ``state.device``), which moves the
tensors of any ``Mapping`` (transformers' ``BatchEncoding`` included) and nested sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from composer.core.precision import Precision, get_precision_context
from composer.utils import ensure_tuple

from composer_growth.functional.batch import IGNORE_INDEX
from composer_growth.functional.sharding import reshard


def batch_loss(model: torch.nn.Module, batch: Any, precision: Precision | str | None = None,
               precision_config: dict[str, Any] | None = None) -> torch.Tensor:
    """``model.loss(model(batch), batch)`` of a ``ComposerModel``, its loss terms summed, under ``precision``.

    Gradients follow the caller's mode: call it under ``torch.no_grad()`` for a probe.
    """
    with get_precision_context(precision or Precision.FP32, precision_config):
        return sum(ensure_tuple(model.loss(model(batch), batch)))


@torch.no_grad()
def eval_batches(model: torch.nn.Module, batches: Iterable[Any], max_batches: int | None,
                 step: Callable[[Any], None], prepare: Callable[[Any], Any] | None = None, device: Any = None,
                 precision: Precision | str | None = None, precision_config: dict[str, Any] | None = None) -> int:
    """Call ``step(batch)`` on the first ``max_batches`` batches (None or < 0: all) in eval mode; returns how many.

    Each batch goes through ``prepare`` (e.g. cut to a length), then ``device.batch_to_device``
    (``device``: a Composer ``Device``, e.g. ``state.device``; None: the batch stays where it is),
    and ``step`` runs under ``precision``. The model's train/eval mode is put back after, and an
    FSDP2 root is resharded (a no_grad forward leaves it unsharded).
    """
    was_training = model.training
    model.eval()
    done = 0
    try:
        for batch in batches:
            if max_batches is not None and 0 <= max_batches <= done:
                break
            if prepare is not None:
                batch = prepare(batch)
            if device is not None:
                batch = device.batch_to_device(batch)
            with get_precision_context(precision or Precision.FP32, precision_config):
                step(batch)
            done += 1
    finally:
        model.train(was_training)
        reshard(model)
    return done


def loss_sum(model: torch.nn.Module, batches: Iterable[Any], max_batches: int,
             prepare: Callable[[Any], Any] = lambda batch: batch, precision: Precision | str | None = None,
             precision_config: dict[str, Any] | None = None, device: Any = None) -> torch.Tensor:
    """``[sum of loss x predicted tokens, predicted tokens]`` (float64, on the CPU) over the first
    ``max_batches`` batches (:func:`eval_batches`: ``prepare``, moved to ``device``, eval mode).

    Sums, not a mean, so ranks can add theirs before dividing.
    """
    total = torch.zeros(2, dtype=torch.float64)

    def step(batch: Any) -> None:
        loss = batch_loss(model, batch, precision, precision_config)
        labels = batch.get("labels", batch["input_ids"])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total.add_(torch.tensor([float(loss) * n, n], dtype=torch.float64))

    eval_batches(model, batches, max_batches, step, prepare, device, precision, precision_config)
    return total


def batch_mean_loss(model: torch.nn.Module, batch: Any, device: Any = None, precision: Precision | str | None = None,
                    precision_config: dict[str, Any] | None = None) -> float:
    """The loss of one batch (:func:`batch_loss`), measured as :func:`eval_batches` measures: eval mode, on ``device``."""
    out: list[float] = []
    eval_batches(model, [batch], 1, lambda b: out.append(float(batch_loss(model, b, precision, precision_config))),
                 device=device, precision=precision, precision_config=precision_config)
    return out[0]


def metric_value(model: torch.nn.Module, metric: Any, batches: Iterable[Any], max_batches: int | None,
                 prepare: Callable[[Any], Any] | None = None, after_device: Callable[[Any], Any] | None = None,
                 device: Any = None, precision: Precision | str | None = None,
                 precision_config: dict[str, Any] | None = None) -> float:
    """A torchmetrics ``metric`` of a ``ComposerModel`` (``eval_forward``, ``update_metric``) over the first
    ``max_batches`` batches, as the Trainer's eval computes it (synced over ranks by ``compute``).

    The metric is moved to ``device`` first (a Trainer's ``state.eval_metrics`` stay on the CPU until
    its first eval); ``after_device`` runs on each batch once on the device (e.g. an evaluator's
    microbatch transforms).
    """
    if device is not None:
        metric = device.module_to_device(metric)

    def step(batch: Any) -> None:
        if after_device is not None:
            batch = after_device(batch)
        model.update_metric(batch, model.eval_forward(batch), metric)

    eval_batches(model, batches, max_batches, step, prepare, device, precision, precision_config)
    return float(metric.compute())

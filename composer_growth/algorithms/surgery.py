"""The one place that changes a live Trainer's model architecture.

``grow(state, op)`` runs a functional op (``stack_layers``, ``widen_mlp``, ...) on the model and
rebuilds everything the change invalidates: the optimizers (same class and hyperparameters,
state carried by parameter name), the schedulers (bound to the new optimizers at the same
progress), the DDP wrapper and the compiled forward. The grad scaler keeps its scale (its
per-optimizer state is rebuilt every step).

Resuming: Composer loads a checkpoint's model weights before any algorithm's state, so an
algorithm that changed the architecture must replay its change first. ``install_replay_hook``
wraps ``state.load_model_state`` once; before the weights load it calls, in algorithm order,
``replay(state, saved_state)`` on every algorithm that has it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from composer.core import State
from composer.utils import dist
from torch import nn

from composer_growth.families import unwrap_composer
from composer_growth.functional.growth import ParamSource, param_names
from composer_growth.functional.optim import transfer_optimizer_state


def composer_model(state: State) -> nn.Module:
    """The ``ComposerModel`` under a DDP wrapper (the object Composer saves and evaluates)."""
    return unwrap_composer(state.model)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_supported(state: State, name: str) -> None:
    if state.fsdp_enabled:
        raise ValueError(f"{name}: growth surgery under FSDP is not supported; use DDP (no `parallelism.fsdp`)")


def grow(state: State, op: Callable[[nn.Module], dict[str, ParamSource]],
         after: Callable[[nn.Module, dict[str, ParamSource]], None] | None = None) -> dict[str, Any]:
    """Apply ``op`` to the model and rebuild optimizers, schedulers, DDP and compile around it.

    ``after(model, mapping)`` runs once the op is done and before the optimizer is rebuilt
    (e.g. to freeze parameters). Returns timing and parameter counts.
    """
    start = time.perf_counter()
    model = composer_model(state)
    ddp = state.model if isinstance(state.model, nn.parallel.DistributedDataParallel) else None
    compiled = getattr(state.model.forward, "_torchdynamo_orig_callable", None) is not None
    before = count_params(model)
    names = param_names(model)
    mapping = op(model)
    if after is not None:
        after(model, mapping)
    new_optimizers = [transfer_optimizer_state(opt, names, model, mapping) for opt in state.optimizers]
    for opt in new_optimizers:
        init_missing_state(opt)
    state.schedulers = [_rebind_scheduler(s, state.optimizers, new_optimizers) for s in state.schedulers]
    state.optimizers = new_optimizers
    if compiled:
        torch._dynamo.reset()  # drop graphs traced for the old shapes
    if ddp is not None:
        # a fresh wrapper over the new parameters (DDP broadcasts rank 0's values when built)
        state.model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=ddp.find_unused_parameters)
        if compiled:  # as Composer compiles: the wrapper's forward, patched in place
            state.model.forward = torch.compile(state.model).dynamo_ctx(state.model.forward)
    dist.barrier()
    return {"params_before": before, "params_after": count_params(model),
            "trainable_after": count_params(model, trainable_only=True),
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def init_missing_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter the optimizer holds without state the state its first step creates.

    Fresh parameters (``init="random"``, new LoRA adapters, a new rank) have no optimizer state until
    they are stepped, and torch's optimizer-state loading wants state for every trainable parameter:
    a checkpoint written right after the surgery would not load. One step at LR 0 with zero
    gradients on those parameters only creates it (the others are not touched); counters such as
    ``step`` are then put back to 0, so the next real step is exactly a first step.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [p for p in params if p.requires_grad and not optimizer.state.get(p)]
    if not missing:
        return
    grads = {p: p.grad for p in params}
    lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        for p in params:
            p.grad = None
        for p in missing:
            p.grad = torch.zeros_like(p)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        for p, grad in grads.items():
            p.grad = grad
    for p in missing:
        for key, value in optimizer.state[p].items():
            if key == "step":
                if torch.is_tensor(value):
                    value.zero_()
                else:
                    optimizer.state[p][key] = 0


def _rebind_scheduler(scheduler: Any, old: list[torch.optim.Optimizer], new: list[torch.optim.Optimizer]) -> Any:
    """The same scheduler (same progress, same lambdas) driving the new optimizer."""
    target = getattr(scheduler, "optimizer", None)
    if target is None:
        return scheduler
    index = next(i for i, opt in enumerate(old) if opt is target)
    rebound = copy.copy(scheduler)
    rebound.optimizer = new[index]
    rebound.base_lrs = [g.get("initial_lr", g["lr"]) for g in new[index].param_groups]
    return rebound


def install_replay_hook(state: State) -> None:
    """Make checkpoint loading replay recorded architecture changes before the weights load."""
    if getattr(state, "_growth_replay_installed", False):
        return
    original = state.load_model_state

    def load_model_state(state_dict: dict[str, Any], *args: Any, **kwargs: Any):
        saved = state_dict.get("algorithms")
        if isinstance(saved, list):
            by_class: dict[str, list[Any]] = {}
            for cls_name, alg_state in saved:
                by_class.setdefault(cls_name, []).append(alg_state)
            seen: dict[str, int] = {}
            for alg in state.algorithms:
                name = type(alg).__qualname__
                i = seen.get(name, 0)
                seen[name] = i + 1
                entries = by_class.get(name, [])
                if hasattr(alg, "replay") and i < len(entries):
                    alg.replay(state, entries[i])
        return original(state_dict, *args, **kwargs)

    state.load_model_state = load_model_state
    state._growth_replay_installed = True

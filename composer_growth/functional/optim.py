"""Carry an optimizer across a growth op, by parameter name, using the op's mapping.

Usage (no Trainer, DDP or scheduler here)::

    names = param_names(model)                  # before growing
    mapping = stack_layers(model, ...)          # or widen_mlp(...)
    optimizer = transfer_optimizer_state(optimizer, names, model, mapping)

For two ops in a row, transfer after each (taking ``param_names`` again in between).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Mapping

import torch
import torch.nn as nn

from composer_growth.errors import ConfigError, check
from composer_growth.functional.growth import ParamSource, param_names

__all__ = ["SECOND_MOMENT_KEYS", "param_names", "transfer_optimizer_state"]

# Per-parameter state holding squared quantities: transformed with scale ** 2.
SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta"})


def _as_source(entry: Any) -> ParamSource:
    """A mapping value as a ParamSource (also accepts a name or a ``(source, index, dim, scale)`` tuple)."""
    if isinstance(entry, ParamSource):
        return entry
    if isinstance(entry, str):
        return ParamSource(entry)
    if isinstance(entry, (tuple, list)) and len(entry) == 2:  # (source, scale)
        return ParamSource(entry[0], scale=entry[1])
    return ParamSource(*entry)


def _layer_pattern(name: str) -> str:
    """The name with block indices wild-carded: ``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp...``."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _carry_state(state: Mapping[str, Any], old: torch.Tensor, new: torch.Tensor,
                 src: ParamSource, name: str) -> dict[str, Any]:
    """The new parameter's state: tensors shaped like the old parameter go through ``src``, scalars are kept.

    A parameter that survived the growth unchanged (same object, identity entry) takes its state
    tensors as they are, without a copy. State that is neither (e.g. factored second moments)
    can only follow an identity entry; otherwise the parameter starts with no state at all.
    """
    if new is old and src.is_identity:
        return dict(state)
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            out[key] = value
        elif key == "step" or value.dim() == 0:
            out[key] = value.clone()
        elif value.shape == old.shape:
            moved = src.apply(value, power=2 if key in SECOND_MOMENT_KEYS else 1)
            check(moved.shape == new.shape, "mapping", name,
                  f"an entry giving shape {tuple(new.shape)}, not {tuple(moved.shape)}")
            out[key] = moved.to(new.device)
        elif src.is_identity:
            out[key] = value.clone()
        else:
            return {}
    return out


def same_kind(old: torch.optim.Optimizer, groups: list[list[nn.Parameter]]) -> torch.optim.Optimizer:
    """A new optimizer of ``old``'s class and constructor defaults, group i holding ``groups[i]``
    with old group i's hyperparameters (all of them, e.g. ``initial_lr`` too)."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in old.param_groups]
    accepted = inspect.signature(type(old).__init__).parameters
    kwargs = {k: v for k, v in old.defaults.items() if k in accepted and k != "params"}
    new = type(old)([{**h, "params": ps} for h, ps in zip(hyper, groups)], **kwargs)
    for group, h in zip(new.param_groups, hyper):
        group.update(h)  # constructors may rewrite some (DecoupledAdamW sets initial_lr = lr)
    new.defaults.update(old.defaults)
    return new


def transfer_optimizer_state(old_optimizer: torch.optim.Optimizer,
                             old_names: Mapping[nn.Parameter | int, str],
                             new_model: nn.Module,
                             mapping: Mapping[str, ParamSource | tuple]) -> torch.optim.Optimizer:
    """A new optimizer for the grown ``new_model``, with ``old_optimizer``'s class, groups and state.

    Args:
        old_optimizer: the optimizer of the model before growth (any ``torch.optim.Optimizer``;
            tested with AdamW, SGD and Composer's DecoupledAdamW).
        old_names: every parameter of the old model (object or ``id()``) to its name, from
            :func:`param_names` taken *before* growing.
        new_model: the grown model.
        mapping: new parameter name -> :class:`ParamSource`, as returned by the growth op.

    Rules, per parameter of ``new_model`` (in ``named_parameters`` order):

    * with a mapping entry whose source the old optimizer held: it joins that source's group
      (same index), and its state is the source's, transformed by the entry: tensors shaped
      like the parameter via ``entry.apply`` (``scale`` for e.g. ``exp_avg`` / ``momentum_buffer``,
      ``scale ** 2`` for :data:`SECOND_MOMENT_KEYS`), scalars such as ``step`` kept;
    * with an entry whose source the old optimizer did not hold, or frozen (``requires_grad`` off,
      e.g. a trunk frozen or wrapped in LoRA by the growth): left out, with its state (a frozen
      parameter's Adam moments would hold 8 bytes a parameter for the rest of the run);
    * with no entry (fresh, e.g. ``init="random"``) and ``requires_grad``: no state, in the group
      of an old parameter with the same name up to block indices, else group 0.

    Group hyperparameters and optimizer defaults are copied. The state tensors of parameters that
    survived unchanged are moved, not copied (growth then needs no second copy of the whole
    optimizer state): the old optimizer is not to be stepped afterwards.
    """
    by_id = {(k if isinstance(k, int) else id(k)): name for k, name in old_names.items()}
    old_param: dict[str, torch.Tensor] = {}
    old_group: dict[str, int] = {}
    for g, group in enumerate(old_optimizer.param_groups):
        for p in group["params"]:
            name = by_id.get(id(p))
            check(name is not None, "old_names", f"<{len(by_id)} names>",
                  "must name every parameter of old_optimizer (take param_names(model) before growing)")
            old_param[name], old_group[name] = p, g
    group_by_pattern: dict[str, int] = {}
    for name, g in old_group.items():
        group_by_pattern.setdefault(_layer_pattern(name), g)
    known = set(by_id.values())

    groups: list[list[nn.Parameter]] = [[] for _ in old_optimizer.param_groups]
    states: dict[nn.Parameter, dict[str, Any]] = {}
    for name, p in new_model.named_parameters():
        if name not in mapping:
            if p.requires_grad:
                groups[group_by_pattern.get(_layer_pattern(name), 0)].append(p)
            continue
        src = _as_source(mapping[name])
        if src.source not in known:
            raise ConfigError("mapping", name, f"a source among old_names, not {src.source!r}")
        if src.source not in old_group or not p.requires_grad:  # frozen: no group, no moments kept
            continue
        groups[old_group[src.source]].append(p)
        old = old_param[src.source]
        state = _carry_state(old_optimizer.state.get(old, {}), old, p, src, name)
        if state:
            states[p] = state

    new = same_kind(old_optimizer, groups)
    for p, state in states.items():
        new.state[p] = state
    return new

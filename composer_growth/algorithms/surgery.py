"""The one place that changes a live Trainer's model architecture.

``grow(state, op)`` runs a functional op (``stack_layers``, ``widen_mlp``, ...) on the model and
rebuilds everything the change invalidates: the optimizers (same class and hyperparameters,
state carried by parameter name), the schedulers (bound to the new optimizers at the same
progress), the DDP wrapper and the compiled forward. The grad scaler keeps its scale (its
per-optimizer state is rebuilt every step).

Under FSDP2 (Composer's ``FSDP2Config``) a growth with a shard-local form (``stack_layers``,
``widen_mlp``, given as ``local``) runs on each rank's own shards
(:mod:`composer_growth.algorithms.shard_local`): new blocks become new FSDP2 units, the optimizer state
is carried shard for shard. Where it cannot (LoRA adapters, HSDP meshes, ``trunk: lora``,
``stack_lora``, or ``COMPOSER_GROWTH_FSDP_PATH=gathered``), the op runs on a full, unsharded copy: every
rank gathers the full parameters and optimizer state, copies the module tree without FSDP2 (each module
of its own class again, LoRA adapters and a peft wrapper included) around them, grows it with the
same op, shards it again on the same device mesh as Composer did (one unit per block, the model
under the ``ComposerModel`` as root) and carries the optimizer state by name as under DDP, then
shards that too. Peak memory during that gathered growth is one full copy of the model and its optimizer
state per rank.

Resuming: Composer loads a checkpoint's model weights before any algorithm's state, so an
algorithm that changed the architecture must replay its change first:
:func:`composer_growth.algorithms.composer_hooks.install_replay_hook` calls, before the weights
load, ``replay(state, saved_state)`` on every algorithm that has it.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from composer.core import State
from composer.utils import dist
from torch import nn

from composer_growth.algorithms.compiling import compile_context, is_compiled
from composer_growth.algorithms.shard_local import Units, choose_path, path_setting, plain_copy, relink
from composer_growth.errors import ConfigError
from composer_growth.functional.growth import ParamSource, param_names
from composer_growth.functional.optim import transfer_optimizer_state
from composer_growth.functional.sharding import cpu_state_dict, full, is_sharded, reshard, shard_of
from composer_growth.unwrap import composer_model, unwrap_hf

log = logging.getLogger(__name__)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def is_fsdp2(state: State) -> bool:
    from composer.utils.parallelism import FSDP2Config

    return isinstance(state.fsdp_config, FSDP2Config) and state.fsdp_enabled


def check_supported(state: State, name: str) -> None:
    if state.fsdp_enabled and not is_fsdp2(state):
        raise ValueError(f"{name}: growth surgery under FSDP1 is not supported; use FSDP2 "
                         "(parallelism.fsdp.version: 2) or DDP")
    if is_fsdp2(state):
        if state.fsdp_config.activation_checkpointing or state.fsdp_config.activation_cpu_offload:
            raise ValueError(f"{name}: growth under FSDP2 does not support activation checkpointing or offload")
        path_setting()  # COMPOSER_GROWTH_FSDP_PATH: checked before training


def check_recipe_sharding(parallelism: dict[str, Any], name: str) -> None:
    """What :func:`check_supported` refuses at FIT_START, refused from a recipe's ``parallelism`` before training."""
    fsdp = parallelism.get("fsdp")
    if not isinstance(fsdp, dict):
        return
    if fsdp.get("version", 1) != 2:
        raise ConfigError("parallelism.fsdp.version", fsdp.get("version", 1),
                          f"2 for {name} (growth runs under FSDP2 or DDP, not FSDP1)")
    for key in ("activation_checkpointing", "activation_cpu_offload"):
        if fsdp.get(key):
            raise ConfigError(f"parallelism.fsdp.{key}", fsdp[key], f"false with {name} (model surgery under FSDP2)")


def grow(state: State, op: Callable[[nn.Module], dict[str, ParamSource]],
         after: Callable[[nn.Module, dict[str, ParamSource]], None] | None = None,
         local: Callable[[nn.Module, Units], dict[str, ParamSource]] | None = None) -> dict[str, Any]:
    """Apply ``op`` to the model and rebuild optimizers, schedulers, DDP / FSDP2 and compile around it.

    ``after(model, mapping)`` runs once the op is done and before the optimizer is rebuilt
    (e.g. to freeze parameters). ``local(model, units)``: the same op on each rank's own shards under
    FSDP2 (:mod:`composer_growth.algorithms.shard_local`), run where it can (``path`` of the result:
    ``shard-local``). Otherwise under FSDP2 (``gathered``) every rank runs ``op`` on its own full copy;
    the result is then rank 0's, as a DDP wrapper built over it would broadcast (Composer seeds each
    rank differently, and peft draws new adapters from the global RNG), and each rank keeps its shard
    of it. Returns timing, parameter counts and the path (``unsharded`` without FSDP2).
    """
    start = time.perf_counter()
    model = composer_model(state)
    ddp = state.model if isinstance(state.model, nn.parallel.DistributedDataParallel) else None
    compiled = is_compiled(state)
    context = compile_context(state.model.forward) if compiled else None  # the Trainer's compile_config
    path, reason = choose_path(model, local) if is_fsdp2(state) else ("unsharded", "")
    old_optimizers = list(state.optimizers)
    if path == "gathered":
        log.info("growth under FSDP2 on gathered tensors: %s", reason)
        mesh, old_optimizers = _unshard(model, old_optimizers)
    elif path == "shard-local":
        reshard(model)
    before = count_params(model)
    names = param_names(model)
    mapping = local(model, Units(state, model)) if path == "shard-local" else op(model)
    if after is not None:
        after(model, mapping)
    forget_cached_properties(model)
    if path == "gathered":
        _broadcast(model)
        _shard(state, model, mesh)
    elif path == "shard-local":
        relink(model)
        for p in model.parameters():  # as the gathered path's fresh parameters: no gradient (a trunk frozen
            p.grad = None             # now would keep its last one for the rest of the run)
    new_optimizers = [transfer_optimizer_state(opt, names, model, mapping) for opt in old_optimizers]
    for opt in new_optimizers:
        if path == "gathered":
            _shard_optimizer_state(opt)
        init_missing_state(opt)
    state.schedulers = [_rebind_scheduler(s, state.optimizers, new_optimizers) for s in state.schedulers]
    state.optimizers = new_optimizers
    if compiled:
        torch._dynamo.reset()  # drop graphs traced for the old shapes
    if ddp is not None:
        # a fresh wrapper over the new parameters (DDP broadcasts rank 0's values when built)
        state.model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=ddp.find_unused_parameters)
        if compiled:  # as Composer compiles: the wrapper's forward, patched in place, with the same options
            context = context or torch.compile(state.model).dynamo_ctx
            state.model.forward = context(state.model.forward)
    dist.barrier()
    return {"params_before": before, "params_after": count_params(model),
            "trainable_after": count_params(model, trainable_only=True),
            "seconds": time.perf_counter() - start, "path": path}


def forget_cached_properties(model: nn.Module) -> None:
    """Drop the values a Composer model caches in ``functools.cached_property`` (llm-foundry's
    ``n_active_params`` / ``n_total_params``, which its ``flops_per_batch`` reads): after surgery they
    describe the old model, so the speed monitor's FLOPs and MFU would stay at the pre-growth size."""
    for cls in type(model).__mro__:
        for name, attr in vars(cls).items():
            if isinstance(attr, functools.cached_property):
                model.__dict__.pop(name, None)


class ConfigFlops:
    """``flops_per_batch`` for a Composer model that has none (Composer's ``HuggingFaceModel``, llm-foundry's
    ``hf_causal_lm``): the batch's training FLOPs on the model's config as it is at each call, so grown."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, batch: Any) -> int:
        from composer_growth.functional.flops import batch_flops

        return batch_flops(unwrap_hf(self.model).config, batch)


def ensure_flops_per_batch(model: nn.Module) -> None:
    """Give a Composer model without ``flops_per_batch`` one (:class:`ConfigFlops`); Composer's speed monitor
    then logs FLOPs and MFU, at the grown size after each growth. A model's own count is left alone."""
    if not hasattr(model, "flops_per_batch"):
        model.flops_per_batch = ConfigFlops(model)


def _unshard(model: nn.Module, optimizers: list[torch.optim.Optimizer]):
    """Replace the sharded model under ``model`` (its direct child holding the HF model, e.g. a peft
    wrapper) by a plain copy holding the gathered parameters; return the device mesh and optimizers
    over the copy holding the gathered state.

    Collective: every rank gathers every tensor, in the same order.
    """
    from composer_growth.functional.optim import same_kind

    reshard(model)
    hf = unwrap_hf(model)
    child = next(name for name, m in model.named_children() if any(sub is hf for sub in m.modules()))
    sharded = getattr(model, child)
    mesh = next(p.device_mesh for p in sharded.parameters() if is_sharded(p))
    old_names = {id(p): name for name, p in model.named_parameters()}
    params = {id(p): nn.Parameter(full(p.detach()), requires_grad=p.requires_grad) for p in sharded.parameters()}
    setattr(model, child, plain_copy(sharded, params, {}))
    new_params = dict(model.named_parameters())
    plain_optimizers = []
    for opt in optimizers:
        groups = [[new_params[old_names[id(p)]] for p in g["params"]] for g in opt.param_groups]
        gathered = same_kind(opt, groups)
        for g_old, g_new in zip(opt.param_groups, gathered.param_groups):
            for p_old, p_new in zip(g_old["params"], g_new["params"]):
                if p_old in opt.state:
                    gathered.state[p_new] = {k: full(v) if torch.is_tensor(v) else v
                                             for k, v in opt.state[p_old].items()}
        plain_optimizers.append(gathered)
    return mesh, plain_optimizers


@torch.no_grad()
def _broadcast(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (collective; the model is plain, unsharded)."""
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)


def _shard(state: State, model: nn.Module, mesh: Any) -> None:
    """Shard the grown model as Composer did: its own FSDP2 wrap policy, on the same mesh."""
    from composer.distributed.fsdp2 import prepare_fully_shard
    from composer.distributed.fsdp2_utils import generate_composer_model_policy

    config = copy.copy(state.fsdp_config)
    config.device_mesh = mesh
    prepare_fully_shard(model, config, state.precision, generate_composer_model_policy(model))


def _shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Shard the full state tensors of an optimizer over sharded parameters like the parameters (each rank
    keeps a copy of its part only, and the full tensors are freed)."""
    for p, st in opt.state.items():
        if not is_sharded(p):
            continue
        for key, value in st.items():
            if torch.is_tensor(value) and not is_sharded(value) and value.shape == p.shape:
                st[key] = shard_of(value, p)


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
    _track_steps(new[index], called=getattr(target, "_opt_called", False))
    return rebound


def _track_steps(optimizer: torch.optim.Optimizer, called: bool) -> None:
    """Give ``optimizer`` torch's step wrapper, as a scheduler built on it would.

    A torch scheduler checks at its first step that ``optimizer.step`` carries that wrapper (else it
    warns that the step "has been overridden after learning rate scheduler initialization") and that
    the optimizer was stepped; ``called`` carries the second fact over from the optimizer replaced.
    A throwaway scheduler installs the wrapper; the param groups are put back as they were.
    """
    from torch.optim.lr_scheduler import LambdaLR

    if not hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        groups = [dict(g) for g in optimizer.param_groups]
        LambdaLR(optimizer, lambda _: 1.0)
        for group, saved in zip(optimizer.param_groups, groups):
            group.clear()
            group.update(saved)
    if called:
        optimizer._opt_called = True


def gather_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights of the HF model inside a sharded ``model``, on global rank 0 (None on the
    other ranks). Collective: every rank calls it."""
    return cpu_state_dict(unwrap_hf(model))

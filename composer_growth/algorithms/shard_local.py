"""Growth under FSDP2 on each rank's own shards: ``stack_layers`` and ``widen_mlp`` without gathering the model.

Under Composer's ``FSDP2Config`` every block is one ``fully_shard`` unit and every parameter a ``DTensor``
sharded on its first dimension over a 1-D mesh. The shard-local ops build the grown model in place:

* a stacked block is a copy of its source block, shard for shard: a new unit of the same shapes and
  placements, made on the meta device, wrapped as Composer wraps a block (its own policy, mesh and
  mixed-precision policy), given storage (``to_empty``), and each rank copies its own shards into it
  (``function_preserving``: the residual output projections' shards are zero). ``random`` init draws the
  full tensors of one new block at a time, seeded identically on every rank as the reference op, and
  each rank keeps its shards;
* a widened block is a new unit with the widened MLP: Net2WiderNet's re-indexing along the shard
  dimension gathers that one tensor (an input projection of ``nn.Linear``), along another dimension
  it runs on the local shard (the output projection); the other tensors are copied shard for shard.

Each op returns the same mapping as its reference op in :mod:`composer_growth.functional.growth`, made
of :class:`ShardSource` entries, which carry the optimizer moments the same way, shard for shard (or one
tensor gathered at a time). The units that did not change stay as they are; at the next forward the
root re-runs FSDP2's lazy initialisation over the new tree (:func:`relink`).

:func:`plain_copy` (a module tree without FSDP2) serves both these ops and the gathered path of
:func:`composer_growth.algorithms.surgery.grow`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from composer.utils import dist
from torch import nn

from composer_growth.errors import check
from composer_growth.export import base_class
from composer_growth.families import config_set, family_of, get_path, set_path
from composer_growth.functional.growth import (ParamSource, _add_noise, _collect_mapping, _renumber, _unit_dims,
                                               _zeroed, projection_like, stack_start, unit_index, widen_sizes)
from composer_growth.functional.sharding import full, is_sharded, shard_of
from composer_growth.unwrap import peft_model, unwrap_hf

__all__ = ["PATH_ENV", "PATHS", "ShardSource", "Units", "choose_path", "path_setting", "plain_copy", "relink",
           "stack_local", "widen_local"]

#: the environment variable that picks the FSDP2 growth path, and its values (the first is the default)
PATH_ENV = "COMPOSER_GROWTH_FSDP_PATH"
PATHS = ("shard-local", "gathered")


def path_setting() -> str:
    """The growth path under FSDP2 that ``COMPOSER_GROWTH_FSDP_PATH`` asks for (``shard-local`` if unset)."""
    value = os.environ.get(PATH_ENV, PATHS[0])
    check(value in PATHS, PATH_ENV, value, f"one of {', '.join(PATHS)}")
    return value


# ------------------------------------------------------------------------------------- module trees

_HOOK_KEYS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
              "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")


def _from_fsdp(hook: Any) -> bool:
    fn = getattr(hook, "hook", hook)  # load-state-dict pre-hooks come wrapped
    return (getattr(fn, "__module__", None) or "").startswith("torch.distributed.fsdp")


def plain_copy(module: nn.Module, params: dict[int, nn.Parameter], memo: dict[int, nn.Module]) -> nn.Module:
    """A copy of the module tree without FSDP2: every module of its class before ``fully_shard``, holding
    ``params[id(p)]`` for each of its (sharded) parameters ``p``, its buffers, its other attributes (the
    same objects) and its hooks; what FSDP2 added (hooks, its state) is left out. A module met twice
    (shared) is copied once."""
    if id(module) in memo:
        return memo[id(module)]
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY

    cls = base_class(module)
    new = cls.__new__(cls)
    new.__dict__.update((k, v) for k, v in module.__dict__.items() if k not in (REGISTRY_KEY, STATE_KEY))
    memo[id(module)] = new
    new.__dict__.update(
        _parameters={k: None if p is None else params[id(p)] for k, p in module._parameters.items()},
        _buffers=dict(module._buffers), _non_persistent_buffers_set=set(module._non_persistent_buffers_set),
        _modules={k: None if m is None else plain_copy(m, params, memo) for k, m in module._modules.items()})
    for key, hooks in module.__dict__.items():
        if key.startswith("_") and "hooks" in key and isinstance(hooks, dict):
            kept = ((k, h) for k, h in hooks.items() if key not in _HOOK_KEYS or not _from_fsdp(h))
            new.__dict__[key] = OrderedDict(kept) if isinstance(hooks, OrderedDict) else dict(kept)
    return new


def _meta_copy(block: nn.Module, shapes: dict[str, tuple[int, ...]] | None = None) -> nn.Module:
    """A plain copy of a sharded block on the meta device: full shapes (``shapes[name]`` where given),
    dtypes and ``requires_grad`` of its parameters, copies of its buffers."""
    shapes = shapes or {}
    names = {id(p): name for name, p in block.named_parameters()}
    params = {id(p): nn.Parameter(torch.empty(shapes.get(names[id(p)], p.shape), dtype=p.dtype, device="meta"),
                                  requires_grad=p.requires_grad) for p in block.parameters()}
    new = plain_copy(block, params, {})
    for module in new.modules():
        module._buffers = {k: None if b is None else b.clone() for k, b in module._buffers.items()}
    return new


def _gathered_copy(block: nn.Module) -> nn.Module:
    """A plain copy of a sharded block holding its full parameters (collective: one block gathered)."""
    return plain_copy(block, {id(p): nn.Parameter(full(p.detach()), requires_grad=p.requires_grad)
                              for p in block.parameters()}, {})


class Units:
    """Wraps new blocks of the model as Composer wrapped its blocks: its own wrap policy, on the same mesh,
    with the run's ``reshard_after_forward`` and mixed-precision policy."""

    def __init__(self, state: Any, model: nn.Module):
        self.state, self.model = state, model
        sharded = next(p for p in model.parameters() if is_sharded(p))
        self.mesh, self.device = sharded.device_mesh, sharded.to_local().device

    def wrap(self, blocks: list[nn.Module]) -> None:
        """``fully_shard`` the new (meta) ``blocks``, already in the model, then give them storage."""
        from composer.distributed.fsdp2 import create_mixed_precision_policy
        from composer.distributed.fsdp2_utils import generate_composer_model_policy
        from torch.distributed.fsdp import fully_shard

        config = self.state.fsdp_config
        root = {"mesh": self.mesh, "reshard_after_forward": config.reshard_after_forward,
                "mp_policy": create_mixed_precision_policy(self.state.precision, config.mixed_precision)}
        targets = generate_composer_model_policy(self.model)._run_policy(root_module=self.model,
                                                                           ignored_modules=set(), root_kwargs=root)
        for block in blocks:
            if block not in targets:
                raise RuntimeError(f"the FSDP2 wrap policy does not wrap the new block {type(block).__name__}")
            buffers = [(m, k, b) for m in block.modules() for k, b in m._buffers.items() if b is not None]
            for module in reversed(list(block.modules())):  # inner units first, as Composer applies them
                if module in targets:
                    fully_shard(module, **targets[module])
            block.to_empty(device=self.device)
            for module, key, buffer in buffers:  # to_empty left them uninitialised
                module._buffers[key] = buffer.to(self.device)


def relink(model: nn.Module) -> None:
    """Make FSDP2 initialise the tree again at the next forward (root, states, streams), so the new units
    join it. (A parameter frozen since its unit last gathered it is gathered frozen: FSDP2 copies the flag
    at every gather.)"""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPStateContext

    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            state._is_root = None
            state._state_ctx = FSDPStateContext()


# ------------------------------------------------------------------------------------- which path


def _blocker(model: nn.Module) -> str | None:
    """Why the shard-local ops cannot grow this model (None: they can)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Shard

    if peft_model(model) is not None or any(hasattr(m, "lora_A") for m in model.modules()):
        return "LoRA adapters"
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState, FSDPStateContext  # noqa: F401

        state = FSDPState()
        if not (hasattr(state, "_is_root") and hasattr(state, "_state_ctx")):
            return "this torch's FSDP2 state differs"
    except ImportError:
        return "this torch's FSDP2 state differs"
    hf = unwrap_hf(model)
    blocks = get_path(hf, family_of(hf).layers)
    if not isinstance(hf, FSDPModule) or not all(isinstance(b, FSDPModule) for b in blocks):
        return "not one FSDP2 unit per block"
    for p in hf.parameters():
        if not is_sharded(p) or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            return "parameters not sharded Shard(0) on a 1-D mesh (HSDP)"
    return None


def choose_path(model: nn.Module, local_op: Any) -> tuple[str, str]:
    """``(path, reason)``: ``shard-local`` or ``gathered``, as rank 0 finds (every rank follows)."""
    reason = f"{PATH_ENV}=gathered"
    if path_setting() == "shard-local":
        reason = "no shard-local form of this growth" if local_op is None else _blocker(model)
    decision = [("gathered", reason) if reason else ("shard-local", "")]
    dist.broadcast_object_list(decision, src=0)
    return decision[0]


# ------------------------------------------------------------------------------------- sources


@dataclass(frozen=True, eq=False)
class ShardSource(ParamSource):
    """A :class:`ParamSource` that applies to a sharded tensor shard-locally and returns it sharded alike.

    Re-indexing along a dimension the tensor is not sharded on runs on the local shard; along the shard
    dimension the tensor is gathered (that tensor only) and each rank keeps its part. ``move``: the new
    tensor is the old one itself (a parameter rebuilt in a new unit: its state moves, not copied)."""

    move: bool = False

    def apply(self, old: torch.Tensor, power: int = 1) -> torch.Tensor:
        if self.move:
            return old
        if not is_sharded(old) or self.index is None:
            return super().apply(old, power)
        from torch.distributed.tensor import DTensor

        (placement,) = old.placements
        if self.dim != placement.dim:
            local = super().apply(old.to_local(), power)
            shape = list(old.shape)
            shape[self.dim] = len(self.index)
            stride = torch.empty(shape, device="meta").stride()
            return DTensor.from_local(local, old.device_mesh, old.placements, run_check=False,
                                      shape=torch.Size(shape), stride=stride)
        return shard_of(super().apply(old.full_tensor(), power), old)


def _fill(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` into the local shard of the sharded ``param``: a DTensor like it, or the whole tensor."""
    if is_sharded(value):
        local = value.to_local()
    else:
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local()
    dst = param.to_local()
    if dst.shape != local.shape:
        raise RuntimeError(f"shard of shape {tuple(local.shape)} for a local shard of {tuple(dst.shape)}")
    dst.copy_(local)


# ------------------------------------------------------------------------------------- the ops


@torch.no_grad()
def stack_local(model: nn.Module, units: Units, mode: str = "repeat", times: int = 2,
                source_layers: list[int] | None = None, num_new: int | None = None, init: str = "copy",
                seed: int = 0) -> dict[str, ParamSource]:
    """:func:`composer_growth.functional.growth.stack_layers` on a sharded model (no LoRA adapters), shard-locally."""
    hf, family, old_blocks, plan = stack_start(model, mode, times, source_layers, num_new, init, seed)

    before = {id(p): name for name, p in model.named_parameters()}
    blocks, fresh = [], []
    for src, is_new in plan:
        blocks.append(_meta_copy(old_blocks[src]) if is_new else old_blocks[src])
        if is_new:
            fresh.append((blocks[-1], old_blocks[src]))
    set_path(hf, family.layers, nn.ModuleList(blocks))
    _renumber(hf, family, [src for src, _ in plan])
    units.wrap([new for new, _ in fresh])
    made: dict[int, ParamSource] = {}
    if init == "random":  # fresh: no mapping entry
        _random_fill(hf, fresh, seed)
        return _collect_mapping(model, before, made)
    for new, src in fresh:
        src_params = dict(src.named_parameters())
        for rel, p in new.named_parameters():
            old = src_params[rel]
            zero = init == "function_preserving" and _zeroed(rel, family)
            if zero:
                p.to_local().zero_()
            else:
                p.to_local().copy_(old.to_local())
            made[id(p)] = ShardSource(before[id(old)], scale=0.0 if zero else 1.0)
    return _collect_mapping(model, before, made)


def _random_fill(hf: nn.Module, fresh: list[tuple[nn.Module, nn.Module]], seed: int) -> None:
    """The reference's ``init="random"``: the model's ``_init_weights`` on each new block in order, from one
    seeded stream, each on a full copy of its source (one block gathered at a time); each rank keeps its shards."""
    cuda = sorted({p.device.index or 0 for p in hf.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for new, src in fresh:
            whole = _gathered_copy(src)
            whole.apply(hf._init_weights)
            values = dict(whole.named_parameters())
            for rel, p in new.named_parameters():
                _fill(p, values[rel])
            del whole, values


@torch.no_grad()
def widen_local(model: nn.Module, units: Units, factor: float, noise_std: float = 0.0,
                seed: int = 0) -> dict[str, ParamSource]:
    """:func:`composer_growth.functional.growth.widen_mlp` on a sharded model (no LoRA adapters), shard-locally:
    every block becomes a new unit; at most one tensor of one block is gathered at a time."""
    hf = unwrap_hf(model)
    family = family_of(hf)
    n, m = widen_sizes(hf, factor, noise_std, seed)
    in_dim, out_dim = _unit_dims(family)
    pick, noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    before = {id(p): name for name, p in model.named_parameters()}
    plans = []
    for block in get_path(hf, family.layers):
        index, scale = unit_index(n, m, pick)
        mlp = get_path(block, family.mlp)
        prefix = next(name for name, sub in block.named_modules() if sub is mlp)
        sources, shapes = {}, {}
        projections = [(name, in_dim, None) for name in family.mlp_in if hasattr(mlp, name)]
        for name, dim, out_scale in [*projections, (family.mlp_out, out_dim, scale)]:
            proj = get_path(mlp, name)
            rel = f"{prefix}.{name}" if prefix else name
            weight = ShardSource(before[id(proj.weight)], index, dim, 1.0 if out_scale is None else out_scale)
            sources[f"{rel}.weight"] = weight
            shapes[f"{rel}.weight"] = _resized(proj.weight.shape, dim, m)
            if proj.bias is not None:
                grows = out_scale is None
                sources[f"{rel}.bias"] = (ShardSource(before[id(proj.bias)], index, 0) if grows
                                          else ShardSource(before[id(proj.bias)], move=True))
                shapes[f"{rel}.bias"] = _resized(proj.bias.shape, 0, m) if grows else proj.bias.shape
        new = _meta_copy(block, shapes)
        new_mlp = get_path(new, family.mlp)
        for name, _, _ in [*projections, (family.mlp_out, None, None)]:
            old = get_path(new_mlp, name)
            set_path(new_mlp, name, projection_like(family, old, old.weight, old.bias))
        plans.append((block, new, sources, [f"{prefix}.{name}.weight" if prefix else f"{name}.weight"
                                            for name, _, _ in projections]))
    set_path(hf, family.layers, nn.ModuleList([new for _, new, _, _ in plans]))
    units.wrap([new for _, new, _, _ in plans])

    made: dict[int, ParamSource] = {}
    for block, new, sources, noisy in plans:
        old_params, new_params = dict(block.named_parameters()), dict(new.named_parameters())
        for rel, p in new_params.items():
            made[id(p)] = src = sources.get(rel) or ShardSource(before[id(old_params[rel])], move=True)
            if noise_std == 0 or rel not in noisy:
                _fill(p, src.apply(old_params[rel]))
        for rel in noisy if noise_std > 0 else ():  # the noise on the new units of the whole tensor, in the
            whole = sources[rel].apply(old_params[rel].full_tensor())  # reference's order
            _add_noise(whole, in_dim, n, noise_std, noise)
            _fill(new_params[rel], whole)
    config_set(hf.config, family.intermediate_key, m)
    return _collect_mapping(model, before, made)


def _resized(shape: torch.Size, dim: int, size: int) -> tuple[int, ...]:
    out = list(shape)
    out[dim] = size
    return tuple(out)

"""Plain and FSDP2-sharded tensors alike: what an op needs to change a sharded model in place.

Under FSDP2 every parameter of the model, and every optimizer state tensor shaped like one, is a
``DTensor`` sharded on its first dimension across the ranks. An op that needs whole tensors (a
LoRA delta ``B @ A``: no rank holds all of A's rows; a top-k over a moment tensor) gathers them
with :func:`full`, computes what it would compute on the unsharded model (the same numbers on
every rank), and writes the result back with :func:`copy_full_` / :func:`add_full_`, each rank
keeping its own part. On plain tensors these helpers are plain ``copy_`` / ``add_``.

:func:`full` is collective under FSDP2: every rank calls it, on the same tensors, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["add_full_", "copy_full_", "cpu_state_dict", "full", "full_state", "is_sharded", "reshard", "shard_of"]

#: dtypes whose sums are computed in float32 and rounded once (a small delta would round away)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank for a DTensor; the tensor itself otherwise)."""
    return t.full_tensor() if is_sharded(t) else t


def _like(value: torch.Tensor, dst: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` (the whole tensor, the same on every rank) placed as ``dst`` is: each rank keeps its part."""
    value = value.to(device=dst.device, dtype=dtype or dst.dtype)
    if not is_sharded(dst):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, dst.device_mesh, dst.placements, src_data_rank=None)  # no communication


def shard_of(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (the whole tensor, the same on every rank) placed as the ``DTensor`` ``like`` is, holding a copy
    of this rank's part only: ``distribute_tensor`` keeps a view of the whole tensor, and so all its memory."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(like.device)
    local = distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to_local().clone()
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=value.shape,
                              stride=value.stride())


def copy_full_(dst: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(value)`` for ``value`` the whole tensor: a sharded ``dst`` takes its part."""
    return dst.copy_(_like(value, dst))


def add_full_(dst: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``dst.add_(value)`` for ``value`` the whole tensor: a sharded ``dst`` adds its part.

    A bf16 / fp16 ``dst`` takes ``dst + value`` computed in float32 and rounded once (``value`` is
    not rounded to ``dst``'s dtype first)."""
    if dst.dtype in LOW_PRECISION:
        return dst.copy_(dst.float() + _like(value, dst, torch.float32))
    return dst.add_(_like(value, dst))


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """``module``'s full state dict on the CPU of global rank 0, None on the other ranks.

    Sharded (FSDP2): gathered one tensor at a time and offloaded to rank 0's CPU
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), so no device holds the whole
    model; collective, every rank calls it. Plain: every rank gets CPU copies of its own tensors."""
    if any(is_sharded(p) for p in module.parameters()):
        from composer.utils import dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if dist.get_global_rank() == 0 else None
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def reshard(model: nn.Module) -> None:
    """Reshard every FSDP2 unit of ``model``: a forward outside backward (``no_grad``) leaves the root
    unsharded, and an in-place change to its parameters then would be lost at the next reshard."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def full_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block, the sharded state tensors of ``params`` in ``optimizer`` are whole tensors
    (the same on every rank); on leaving it each rank's shard takes its part of what they then hold
    (the state keeps its tensor objects). Nothing changes for plain tensors. Collective when sharded."""
    swapped = []
    for p in params:
        state = optimizer.state.get(p) or {}
        for key, value in list(state.items()):
            if is_sharded(value):
                state[key] = value.full_tensor()
                swapped.append((state, key, value))
    try:
        yield
    finally:
        for state, key, value in swapped:
            copy_full_(value, state[key])
            state[key] = value

"""Growth ops on a plain HF causal LM: deeper (``stack_layers``) and wider MLPs (``widen_mlp``).

Both ops change the model in place and return a **mapping** from every parameter name of the
grown model (as in ``model.named_parameters()`` of the object passed in, wrapper prefixes
included) to a :class:`ParamSource` saying how that tensor was made from a parameter of the
model before growth::

    new = old[source].index_select(dim, index) * scale     # index None: no selection

``scale`` is a float or a 1-D tensor broadcast along ``dim``. Parameters that did not change
map to themselves (``ParamSource(name)``); a parameter missing from the mapping is fresh
(``init="random"``). :func:`composer_growth.functional.optim.transfer_optimizer_state` goes
purely by this mapping (first moments use ``scale``, second moments ``scale ** 2``).

Everything model-specific comes from :mod:`composer_growth.families`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from composer_growth.errors import check, check_int, check_number, is_int
from composer_growth.families import Family, config_set, family_of, get_path, set_path
from composer_growth.unwrap import unwrap_hf

__all__ = ["ParamSource", "STACK_MODES", "STACK_INITS", "param_names", "stack_layers", "widen_mlp"]

STACK_MODES = ("repeat", "explicit", "append", "prepend")
STACK_INITS = ("copy", "function_preserving", "random")


@dataclass(frozen=True, eq=False)
class ParamSource:
    """How one grown tensor derives from one old parameter: ``old.index_select(dim, index) * scale``.

    ``index`` (1-D long tensor, or None for the whole tensor) selects slices of the old tensor
    along ``dim``; ``scale`` is a float or a 1-D tensor with one entry per selected slice.
    """

    source: str
    index: torch.Tensor | None = None
    dim: int = 0
    scale: torch.Tensor | float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.index is None and not isinstance(self.scale, torch.Tensor) and self.scale == 1

    def apply(self, old: torch.Tensor, power: int = 1) -> torch.Tensor:
        """The new tensor from ``old`` (a parameter or state tensor shaped like it).

        ``power`` raises the scale first: 1 for weights and first moments, 2 for second moments.
        Always returns a new tensor.
        """
        new = old if self.index is None else old.index_select(self.dim, self.index.to(old.device))
        scale = self.scale
        # scaled in (at least) float32 and rounded once: in bf16 the scale itself would round first
        wide = torch.promote_types(new.dtype, torch.float32)
        if isinstance(scale, torch.Tensor):
            shape = [1] * new.dim()
            shape[self.dim] = -1
            return (new.to(wide) * (scale.to(device=new.device, dtype=wide) ** power).reshape(shape)).to(new.dtype)
        if scale == 0:
            return torch.zeros_like(new)
        if scale == 1:
            return new.clone() if new is old else new
        return (new.to(wide) * scale**power).to(new.dtype)


def param_names(model: nn.Module) -> dict[nn.Parameter, str]:
    """Every parameter of ``model`` to its name; take it *before* growing to transfer optimizer state."""
    return {p: name for name, p in model.named_parameters()}


def _collect_mapping(model: nn.Module, before: dict[int, str],
                     made: dict[int, ParamSource]) -> dict[str, ParamSource]:
    """The mapping of the grown model: parameters made by the op, else unchanged ones (by identity)."""
    mapping = {}
    for name, p in model.named_parameters():
        if id(p) in made:
            mapping[name] = made[id(p)]
        elif id(p) in before:
            mapping[name] = ParamSource(before[id(p)])
    return mapping


# ----------------------------------------------------------------------------------------------
# depth
# ----------------------------------------------------------------------------------------------


def _stack_plan(mode: str, n_layers: int, times: Any, source_layers: Any,
                num_new: Any) -> list[tuple[int, bool]]:
    """(source index, is a new block) for each position of the grown stack; checks the arguments.

    For ``repeat`` / ``explicit`` a position is new when its source already occurred earlier;
    for ``append`` / ``prepend`` the ``num_new`` added positions are new.
    """
    check(mode in STACK_MODES, "mode", mode, f"one of {', '.join(STACK_MODES)}")
    check(source_layers is None or mode == "explicit", "source_layers", source_layers,
          "only with mode='explicit'")
    check(num_new is None or mode in ("append", "prepend"), "num_new", num_new,
          "only with mode='append' or mode='prepend'")
    old = [(i, False) for i in range(n_layers)]
    if mode in ("append", "prepend"):
        check_int(num_new, "num_new", minimum=1, allowed=f"an int >= 1 for mode={mode!r}")
        return old + [(n_layers - 1, True)] * num_new if mode == "append" else [(0, True)] * num_new + old
    if mode == "repeat":
        check_int(times, "times", minimum=2, allowed="an int >= 2")
        sources = list(range(n_layers)) * times
    else:
        ok = (isinstance(source_layers, Sequence) and not isinstance(source_layers, str)
              and len(source_layers) > 0
              and all(is_int(i) and 0 <= i < n_layers for i in source_layers))
        check(ok, "source_layers", source_layers,
              f"a non-empty list of layer indices in [0, {n_layers - 1}]")
        sources = list(source_layers)
    return [(src, src in sources[:pos]) for pos, src in enumerate(sources)]


def stack_start(model: nn.Module, mode: str, times: Any, source_layers: Any, num_new: Any, init: str,
                seed: Any) -> tuple[nn.Module, Any, list[nn.Module], list[tuple[int, bool]]]:
    """The checks and the layer plan every stack starts with: the HF model, its family, its blocks and
    ``(source block, is new)`` for each block of the grown model."""
    hf = unwrap_hf(model)
    family = family_of(hf)
    check(init in STACK_INITS, "init", init, f"one of {', '.join(STACK_INITS)}")
    check_int(seed, "seed", allowed="an int")
    old_blocks = list(get_path(hf, family.layers))
    return hf, family, old_blocks, _stack_plan(mode, len(old_blocks), times, source_layers, num_new)


def _zeroed(rel_name: str, family: Family) -> bool:
    """Is this block parameter part of a residual output projection (zeroed to preserve the function)?"""
    return any(rel_name.startswith(path + ".") for path in family.residual_out)


def _new_block(src: nn.Module, src_names: dict[int, str], init: str, family: Family,
               made: dict[int, ParamSource], fold_adapters: Callable[[nn.Module], bool] | None = None) -> nn.Module:
    """A deep copy of ``src`` (the LoRA layers ``fold_adapters`` accepts folded in); for function_preserving
    its residual outputs are zero. Records ``made`` (a weight with an adapter folded in is fresh: no source)."""
    from composer_growth.functional.lora import merge_lora_modules

    block = copy.deepcopy(src)
    if fold_adapters is not None:
        merge_lora_modules(block, fold_adapters)
    src_params = dict(src.named_parameters())
    for rel, new in block.named_parameters():
        if init == "random":
            continue  # fresh: no source
        old = src_params.get(rel)
        if old is None:  # a weight of src's adapter-wrapped layer (`<module>.base_layer.weight`), merged
            if init == "function_preserving" and _zeroed(rel, family):
                with torch.no_grad():
                    new.zero_()
            continue
        zero = init == "function_preserving" and _zeroed(rel, family)
        if zero:
            with torch.no_grad():
                new.zero_()
        made[id(new)] = ParamSource(src_names[id(old)], scale=0.0 if zero else 1.0)
    return block


def _reinit(hf: nn.Module, blocks: list[nn.Module], seed: int) -> None:
    """Initialise ``blocks`` with the model's own ``_init_weights``, seeded, leaving global RNG untouched."""
    cuda = sorted({p.device.index or 0 for b in blocks for p in b.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for block in blocks:
            block.apply(hf._init_weights)


def _renumber(hf: nn.Module, family: Family, sources: list[int]) -> None:
    """Layer count, every layer index attribute inside each block (``layer_idx``; MPT's ``block_idx`` and
    ``max_block_idx``), and per-layer config lists (by source index)."""
    config = hf.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):
        config.layer_types = [layer_types[src] for src in sources]
    config_set(config, family.num_layers_key, len(sources))
    for idx, block in enumerate(get_path(hf, family.layers)):
        for module in block.modules():  # the block, its attention (self_attn / attn / attention), ...
            for attrs, value in ((family.layer_index_attrs, idx), (family.last_layer_index_attrs, len(sources) - 1)):
                for attr in attrs:
                    if hasattr(module, attr):
                        setattr(module, attr, value)


def stack_layers(model: nn.Module, mode: str = "repeat", times: int = 2,
                 source_layers: Sequence[int] | None = None, num_new: int | None = None,
                 init: str = "copy", seed: int = 0,
                 fold_adapters: Callable[[nn.Module], bool] | None = None) -> dict[str, ParamSource]:
    """Grow the depth of an HF causal LM in place; return the :class:`ParamSource` mapping.

    Modes (the new stack, by source index; L = current depth):

    * ``repeat``: G_stack, ``[0..L-1] * times`` (``times >= 2``).
    * ``explicit``: ``source_layers``, e.g. ``[0, 1, 1, 2, 3, 3]`` (may also drop or reorder layers).
    * ``append`` / ``prepend``: StackWise, ``num_new`` new blocks after / before the existing ones,
      copied from the last / first existing block.

    The first occurrence of each source keeps the original module (same parameter objects);
    every other position is a *new* block, built by ``init``:

    * ``copy``: deep copy of the source (mapping scale 1.0), its peft LoRA adapters included. The
      adapter-wrapped layers that ``fold_adapters(layer)`` accepts are folded into plain layers of the
      copy (computing what the source's do; their weights have no mapping entry: their optimizer
      state starts fresh). The same for the other inits.
    * ``function_preserving``: a copy whose residual output projections (``family.residual_out``,
      weight and bias) are zero, so the new block is the identity on the residual stream
      (scale 0.0 for those tensors). With ``repeat`` / ``append`` / ``prepend`` the grown model
      computes the same function; with ``explicit`` too, when the first occurrences keep the
      original order. (GPT-2 with ``scale_attn_by_inverse_layer_idx`` depends on the position,
      so moved layers change there.)
    * ``random``: ``model._init_weights`` on a copy, seeded with ``seed`` (no mapping entry).

    Updates the config's layer count, ``config.layer_types`` when it is a list, and every
    layer index attribute inside each block (``family.layer_index_attrs``: the KV cache is indexed by it).
    """
    hf, family, old_blocks, plan = stack_start(model, mode, times, source_layers, num_new, init, seed)
    before = {id(p): name for p, name in param_names(model).items()}
    made: dict[int, ParamSource] = {}
    blocks, fresh = [], []
    for src, is_new in plan:
        if is_new:
            blocks.append(_new_block(old_blocks[src], before, init, family, made, fold_adapters))
            fresh.append(blocks[-1])
        else:
            blocks.append(old_blocks[src])
    set_path(hf, family.layers, nn.ModuleList(blocks))
    _renumber(hf, family, [src for src, _ in plan])
    if init == "random":
        _reinit(hf, fresh, seed)
    return _collect_mapping(model, before, made)


# ----------------------------------------------------------------------------------------------
# width
# ----------------------------------------------------------------------------------------------


def _unit_dims(family: Family) -> tuple[int, int]:
    """Weight dim holding the hidden units: (input projections, output projection)."""
    return (1, 0) if family.conv1d else (0, 1)


def _projection(family: Family, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A Linear / Conv1D module around the given tensors (built on meta: no RNG, no allocation)."""
    n_in, n_out = weight.shape if family.conv1d else weight.shape[::-1]
    with torch.device("meta"):
        module = Conv1D(n_out, n_in) if family.conv1d else nn.Linear(n_in, n_out, bias=bias is not None)
    module.weight = weight
    module.bias = bias
    return module


def _grow_projection(family: Family, old: nn.Module, names: dict[int, str], index: torch.Tensor,
                     weight_dim: int, scale: torch.Tensor | None, grow_bias: bool,
                     made: dict[int, ParamSource]) -> nn.Module:
    """The projection with ``old``'s units re-indexed; records each new parameter's source in ``made``."""
    sources = {"weight": ParamSource(names[id(old.weight)], index, weight_dim, 1.0 if scale is None else scale)}
    if old.bias is not None:
        sources["bias"] = ParamSource(names[id(old.bias)], index, 0) if grow_bias else ParamSource(names[id(old.bias)])
    params = {}
    for key, src in sources.items():
        old_p = getattr(old, key)
        params[key] = nn.Parameter(src.apply(old_p.detach()), requires_grad=old_p.requires_grad)
        made[id(params[key])] = src
    return projection_like(family, old, params["weight"], params.get("bias"))


def projection_like(family: Family, old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A projection of ``old``'s kind around the given tensors, with ``old``'s plain attributes and mode."""
    module = _projection(family, weight, bias)
    for attr, value in vars(old).items():  # plain attributes the model set (MPT's _is_residual, block_idx)
        if attr not in vars(module):
            setattr(module, attr, value)
    module.train(old.training)
    return module


def _grow_adapters(layer: nn.Module, names: dict[int, str], index: torch.Tensor, scale: torch.Tensor | None,
                   made: dict[int, ParamSource]) -> None:
    """Widen the LoRA adapters of a peft ``LoraLayer`` along the MLP's units, as its base was widened.

    An input projection's units are its outputs: each adapter's ``lora_B`` rows are re-indexed. The
    output projection's units are its inputs: ``lora_A``'s columns are re-indexed and scaled like the
    base weight. Either way ``B @ A`` is re-indexed exactly as the base weight, so the layer computes
    the same function, and the adapters keep training.
    """
    check(not any(getattr(layer, "use_dora", {}).values()), "model.peft.use_dora", True,
          "False for widen_mlp (DoRA's magnitudes are not widened)")
    for adapter in layer.lora_A:
        key, dim = ("lora_B", 0) if scale is None else ("lora_A", 1)
        old = getattr(layer, key)[adapter]
        src = ParamSource(names[id(old.weight)], index, dim, 1.0 if scale is None else scale)
        weight = nn.Parameter(src.apply(old.weight.detach()), requires_grad=old.weight.requires_grad)
        made[id(weight)] = src
        with torch.device("meta"):
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        module.weight = weight
        module.train(old.training)
        getattr(layer, key)[adapter] = module
    base = layer.get_base_layer()
    layer.in_features, layer.out_features = (base.weight.shape if getattr(layer, "fan_in_fan_out", False)
                                             else base.weight.shape[::-1])


def _widen(family: Family, parent: nn.Module, name: str, names: dict[int, str], index: torch.Tensor,
           weight_dim: int, scale: torch.Tensor | None, made: dict[int, ParamSource]) -> nn.Module:
    """Widen the projection ``parent.<name>`` in place; a peft LoRA layer keeps its wrapper and adapters."""
    from peft.tuners.lora import LoraLayer

    old = get_path(parent, name)
    if isinstance(old, LoraLayer):
        old.base_layer = _grow_projection(family, old.get_base_layer(), names, index, weight_dim, scale,
                                          scale is None, made)
        _grow_adapters(old, names, index, scale, made)
        return old.base_layer
    proj = _grow_projection(family, old, names, index, weight_dim, scale, scale is None, made)
    set_path(parent, name, proj)
    return proj


def _add_noise(weight: torch.Tensor, dim: int, start: int, std: float, gen: torch.Generator) -> None:
    """Seeded gaussian noise on the slices ``start:`` of ``weight`` along ``dim`` (the new copies)."""
    rows = weight.narrow(dim, start, weight.shape[dim] - start)
    noise = torch.randn(rows.shape, generator=gen, dtype=torch.float32) * std
    with torch.no_grad():
        rows.add_(noise.to(device=rows.device, dtype=rows.dtype))


def widen_sizes(hf: nn.Module, factor: float, noise_std: float, seed: int) -> tuple[int, int]:
    """The MLP width before and after ``widen_mlp(factor)``; checks the arguments."""
    check_number(factor, "factor", above=1)
    n = family_of(hf).intermediate_size(hf.config)
    m = round(n * factor)
    check(m > n, "factor", factor, f"large enough to add a unit to intermediate size {n}")
    check_number(noise_std, "noise_std", minimum=0)
    check_int(seed, "seed", allowed="an int")
    return n, m


def unit_index(n: int, m: int, pick: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's unit index (``0..n-1``, then ``m - n`` draws from ``pick``) and output scale (1 / count)."""
    index = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,), generator=pick)])
    return index, 1.0 / torch.bincount(index, minlength=n).to(torch.float32)[index]


def widen_mlp(model: nn.Module, factor: float, noise_std: float = 0.0, seed: int = 0) -> dict[str, ParamSource]:
    """Net2WiderNet on every MLP, in place; return the :class:`ParamSource` mapping.

    The intermediate size n becomes ``m = round(n * factor)``. Unit ``j < n`` keeps unit ``j``;
    each new unit ``j >= n`` copies a unit drawn uniformly (with replacement) from a CPU
    ``torch.Generator`` seeded with ``seed``, one fresh draw per layer in layer order (so the
    result is identical on every rank and device). Input projections (``family.mlp_in``, e.g.
    ``gate_proj`` / ``up_proj``, their biases too) copy the units; the output projection
    (``family.mlp_out``) copies them divided by each unit's replication count, so with
    ``noise_std=0`` the model computes the same function. ``noise_std > 0`` adds gaussian noise
    of that absolute std (from a second generator seeded with ``seed + 1``) to the input weights
    of the new copies only, to break symmetry.

    Mapping entries for the MLP (``index`` is the length-m unit index, shared by a layer's projections):

    * input weight: ``ParamSource(old_name, index, unit_dim, 1.0)``; input bias: ``(old, index, 0, 1.0)``
    * output weight: ``ParamSource(old_name, index, unit_dim, 1 / count[index])`` (float tensor)
    * output bias: ``ParamSource(old_name)``

    where ``unit_dim`` is 0 for ``nn.Linear`` input / 1 for output weights, the reverse for
    GPT-2's ``Conv1D``. The projections are new modules (same dtype / device / requires_grad);
    every other parameter maps to itself. A projection wrapped by a peft LoRA layer keeps its
    wrapper: its base is widened as above and its adapters along the same units (``lora_B``'s rows of
    an input projection, ``lora_A``'s columns of the output projection, scaled), so the adapters
    keep training and the function is still kept. The config's intermediate size key is updated.
    """
    hf = unwrap_hf(model)
    family = family_of(hf)
    n, m = widen_sizes(hf, factor, noise_std, seed)
    in_dim, out_dim = _unit_dims(family)
    pick, noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    before = {id(p): name for p, name in param_names(model).items()}
    made: dict[int, ParamSource] = {}
    for block in get_path(hf, family.layers):
        mlp = get_path(block, family.mlp)
        index, scale = unit_index(n, m, pick)
        for name in (n for n in family.mlp_in if hasattr(mlp, n)):  # e.g. MPT's mptmlp has no gate_proj
            proj = _widen(family, mlp, name, before, index, in_dim, None, made)
            if noise_std > 0:
                _add_noise(proj.weight, in_dim, n, noise_std, noise)
        _widen(family, mlp, family.mlp_out, before, index, out_dim, scale, made)
    config_set(hf.config, family.intermediate_key, m)
    return _collect_mapping(model, before, made)

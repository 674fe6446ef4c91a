"""LoRA adapters (peft's ``LoraLayer``: ``Linear``, GPT-2 ``Conv1D``, ``Embedding``) during pre-training.

* :func:`add_lora` wraps modules (by name or by group) in peft adapters; :func:`merge_lora` folds
  every adapter back and restores the plain modules (for an HF export); :func:`merged_model` does
  that on a copy.
* ReLoRA's step: :func:`merge_and_reinit_lora` adds each adapter's delta into its base weight in
  place and re-initialises the adapter as peft does (the model computes the same function, the
  optimizer keeps the same parameter objects); :func:`prune_optimizer_state` then prunes the
  adapters' Adam moments.
* :func:`scale_lora_alpha` multiplies the adapters' scaling (plain or rslora);
  :func:`resize_lora_rank` gives adapters a new rank from the truncated SVD of their delta and
  returns the parameter mapping :func:`composer_growth.functional.optim.transfer_optimizer_state`
  and :func:`composer_growth.algorithms.surgery.grow` take.

Target groups (:data:`LORA_GROUPS`) come from the family table (:mod:`composer_growth.families`):
``attention`` (modules inside each block's attention), ``mlp`` (inside each block's MLP),
``embedding`` (the input token embedding) and ``all``. For the ops on live adapters, ``all`` is
every adapter of the model; for :func:`add_lora`, ``all`` is every linear layer of the blocks
(attention and MLP; embedding adapters only when asked for). A list of names selects modules whose
name equals an entry or ends with ``.<entry>`` (``"q_proj"``, ``"model.layers.0.mlp.up_proj"``).

Random re-initialisation draws from a CPU ``torch.Generator`` when one is given, so every rank
(and every device) that seeds it alike gets identical adapters without a broadcast.

Deltas are computed in float32 and added to a bf16 / fp16 base in float32, rounded once
(:func:`lora_delta`): in the base's dtype a small delta would round away.

On an FSDP2-sharded model (parameters are ``DTensor`` shards) :func:`merge_and_reinit_lora`
gathers each adapter's A and B whole (no rank's shards of A and B give any part of ``B @ A``),
computes the delta as on the unsharded model, and each rank adds its rows of it into its shard of
the base weight (:mod:`composer_growth.functional.sharding`); :func:`merged_state_dict` gathers the
full weights to global rank 0's CPU only and merges there. Both are collective: every rank calls
them alike.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from composer_growth.errors import ConfigError, check, check_int, check_number
from composer_growth.families import Family, family_of, get_path, set_path
from composer_growth.functional.growth import ParamSource, _collect_mapping, param_names
from composer_growth.functional.sharding import add_full_, copy_full_, cpu_state_dict, full
from composer_growth.unwrap import unwrap_hf

__all__ = ["LORA_GROUPS", "PRUNE_MODES", "add_lora", "lora_target_modules", "lora_targets", "merge_and_reinit_lora",
           "lora_delta", "merge_lora", "merge_lora_modules", "plain_linear_modules", "merged_model", "merged_state_dict", "prune_optimizer_state", "resize_lora_rank",
           "scale_lora_alpha"]

LORA_GROUPS = ("attention", "mlp", "embedding", "all")
PRUNE_MODES = ("reset", "random", "magnitude")
# Adam-style moments pruned by prune_optimizer_state (those shaped like the parameter)
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

Targets = str | Sequence[str]


# ----------------------------------------------------------------------------------------------
# resolving targets
# ----------------------------------------------------------------------------------------------


def _group_prefixes(hf: nn.Module, family: Family, group: str) -> list[str]:
    """Module-name prefixes of a group (``all``: the blocks' attention and MLP)."""
    n = len(get_path(hf, family.layers))
    prefixes = []
    if group in ("attention", "all"):
        prefixes += [f"{family.layers}.{i}.{family.attn}" for i in range(n)]
    if group in ("mlp", "all"):
        prefixes += [f"{family.layers}.{i}.{family.mlp}" for i in range(n)]
    if group == "embedding":
        prefixes.append(family.embed)
    return prefixes


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _shown(names: Sequence[str], limit: int = 6) -> str:
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _select(candidates: dict[str, nn.Module], targets: Targets, hf: nn.Module, family: Family,
            what: str, groups_all: bool) -> dict[str, nn.Module]:
    """The entries of ``candidates`` (name -> module) that ``targets`` names, in model order."""
    if isinstance(targets, str):
        check(targets in LORA_GROUPS, "targets", targets, f"one of {', '.join(LORA_GROUPS)}, or a list of module names")
        if targets == "all" and groups_all:
            chosen = dict(candidates)
        else:
            prefixes = _group_prefixes(hf, family, targets)
            chosen = {n: m for n, m in candidates.items() if _under(n, prefixes)}
        if not chosen:
            raise ConfigError("targets", targets, f"no {what} of the {family.name} model there; "
                                                  f"{what}s: {_shown(list(candidates))}")
        return chosen
    check(isinstance(targets, (list, tuple)) and len(targets) > 0 and all(isinstance(t, str) for t in targets),
          "targets", targets, f"one of {', '.join(LORA_GROUPS)}, or a non-empty list of module names")
    chosen = {}
    for t in targets:
        hits = {n: m for n, m in candidates.items() if n == t or n.endswith("." + t)}
        if not hits:
            raise ConfigError("targets", t, f"no {what} of the {family.name} model matches; "
                                            f"{what}s: {_shown(list(candidates))}")
        chosen.update(hits)
    return {n: m for n, m in candidates.items() if n in chosen}


def _check_untied(hf: nn.Module, name: str, weight: torch.Tensor) -> None:
    out = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is weight:
        raise ConfigError("targets", name, "an embedding tied to the output head (tie_word_embeddings): merging its "
                                           "adapter would change the head too; untie it or leave the embedding out")


def lora_target_modules(model: nn.Module, targets: Targets) -> list[str]:
    """Names (from the HF model) of the plain modules ``targets`` selects for new adapters.

    Candidates are ``nn.Linear`` / GPT-2 ``Conv1D`` modules inside the blocks and the input
    embedding, not already wrapped in an adapter. Raises :class:`ConfigError` (naming the family and
    the candidates) when nothing matches.
    """
    hf = unwrap_hf(model)
    family = family_of(hf)
    chosen = _select(_plain_candidates(hf, family), targets, hf, family, "linear or embedding module", groups_all=False)
    return list(chosen)


def _plain_candidates(hf: nn.Module, family: Family) -> dict[str, nn.Module]:
    """Linear / ``Conv1D`` modules inside the blocks and the input embedding, not wrapped in an adapter."""
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    blocks = [f"{family.layers}.{i}" for i in range(len(get_path(hf, family.layers)))]
    inside = [n for n, m in hf.named_modules() if isinstance(m, LoraLayer)]  # adapters and wrapped bases
    return {n: m for n, m in hf.named_modules()
            if ((isinstance(m, (nn.Linear, Conv1D)) and _under(n, blocks))
                or (n == family.embed and isinstance(m, nn.Embedding))) and not _under(n, inside)}


def plain_linear_modules(model: nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Names (from the HF model) of the linear layers under the given module prefixes (e.g. blocks) that
    carry no adapter yet; empty when every one has one."""
    hf = unwrap_hf(model)
    family = family_of(hf)
    prefixes = list(prefixes)
    return [n for n, m in _plain_candidates(hf, family).items()
            if not isinstance(m, nn.Embedding) and _under(n, prefixes)]


def lora_targets(model: nn.Module, targets: Targets = "all") -> dict[str, Any]:
    """The peft ``LoraLayer`` modules ``targets`` selects, by name (from the HF model), in model order.

    ``targets``: a group of :data:`LORA_GROUPS` (``all``: every adapter) or a list of module names.
    Raises :class:`ConfigError` naming the family and the modules that hold adapters when nothing
    matches (or the model has none), and for adapters the ops cannot handle (DoRA, merged adapters,
    an embedding tied to the output head).
    """
    from peft.tuners.lora import LoraLayer

    hf = unwrap_hf(model)
    family = family_of(hf)
    candidates = {n: m for n, m in hf.named_modules() if isinstance(m, LoraLayer)}
    if not candidates:
        raise ConfigError("targets", targets, f"the {family.name} model has no LoRA adapters "
                                              "(add them first: model.peft, add_lora or start_at)")
    chosen = _select(candidates, targets, hf, family, "LoRA adapter", groups_all=True)
    for name, layer in chosen.items():
        check(not getattr(layer, "merged", False), "targets", name, "adapters that are not merged (peft merge())")
        check(not any(getattr(layer, "use_dora", {}).values()) and not getattr(layer, "lora_variant", None),
              "targets", name, "plain LoRA adapters (DoRA and other variants are not supported)")
        if layer.lora_embedding_A:
            _check_untied(hf, name, layer.get_base_layer().weight)
    return chosen


def _adapters(layer: Any) -> list[str]:
    return list(layer.lora_A.keys()) + list(layer.lora_embedding_A.keys())


# ----------------------------------------------------------------------------------------------
# adding and merging
# ----------------------------------------------------------------------------------------------


def add_lora(model: nn.Module, modules: Iterable[str] | str, rank: int = 8, alpha: float | None = None,
             dropout: float = 0.0, use_rslora: bool = False) -> list[str]:
    """Wrap submodules of the HF model in peft LoRA adapters, in place.

    ``modules``: a group of :data:`LORA_GROUPS` or a list of module names (full, or the end of a
    name such as ``q_proj``), resolved with :func:`lora_target_modules`. Linear, GPT-2 ``Conv1D``
    (peft sets ``fan_in_fan_out``) and ``nn.Embedding`` modules can be wrapped. The new adapters
    train, the wrapped modules' base weights freeze, and every other parameter (earlier adapters
    too) keeps the ``requires_grad`` it had. Returns the wrapped module
    names. The base weights of a wrapped module are renamed ``<module>.base_layer.weight``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    check_int(rank, "rank", minimum=1)
    if alpha is not None:
        check_number(alpha, "alpha", above=0, allowed="null or a number > 0")
    hf = unwrap_hf(model)
    modules = modules if isinstance(modules, str) else list(modules)
    if not modules:
        return []
    targets = lora_target_modules(hf, modules)
    for name in targets:
        module = get_path(hf, name)
        if isinstance(module, nn.Embedding):
            _check_untied(hf, name, module.weight)
    existing = {id(p): p.requires_grad for p in hf.parameters()}
    # a string target is matched against each module's full name with re.fullmatch
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        use_rslora=use_rslora, target_modules="|".join(re.escape(t) for t in targets))
    with warnings.catch_warnings():  # adapters added again (a second stack) are intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, hf)
    bases = [f"{t}.base_layer" for t in targets]
    for name, p in hf.named_parameters():
        if id(p) not in existing:  # the new adapters
            p.requires_grad_(True)
        elif _under(name, bases):
            p.requires_grad_(False)
        else:  # peft marks only adapters trainable: put back what the rest had (earlier adapters too)
            p.requires_grad_(existing[id(p)])
    return targets


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put the plain module back, in place.

    After this the model is a plain transformers model again (``save_pretrained`` output loads
    with ``from_pretrained``). Returns how many modules were merged.
    """
    return merge_lora_modules(unwrap_hf(model))


@torch.no_grad()
def merge_lora_modules(module: nn.Module, which: Callable[[nn.Module], bool] | None = None) -> int:
    """:func:`merge_lora` on any module (e.g. one block): every adapter-wrapped layer under it (those
    ``which(layer)`` accepts) folded into its base weight, and the plain module put back. Returns how
    many modules were merged."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in module.named_modules()
               if isinstance(m, LoraLayer) and (which is None or which(m))]
    for name, layer in wrapped:
        layer.merge()
        set_path(module, name, layer.get_base_layer())
    return len(wrapped)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, transpose: bool) -> torch.Tensor:
    """An adapter's delta ``B @ A x scaling`` (transposed for embeddings and ``fan_in_fan_out``),
    computed in float32 whatever the adapters' dtype: peft's ``get_delta_weight`` rounds it to the
    adapters' dtype, and a bf16 base then rounds the sum a second time."""
    delta = b.float() @ a.float()
    return (delta.T if transpose else delta) * scaling


def _adapter_tensors(layer: Any, adapter: str, get) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """(A, B, B's bias or None, transpose) of one adapter, each tensor read through ``get(name, tensor)``."""
    if adapter in layer.lora_A:
        bias = layer.lora_B[adapter].bias
        return (get(f"lora_A.{adapter}.weight", layer.lora_A[adapter].weight),
                get(f"lora_B.{adapter}.weight", layer.lora_B[adapter].weight),
                None if bias is None else get(f"lora_B.{adapter}.bias", bias),
                bool(getattr(layer, "fan_in_fan_out", False)))
    return (get(f"lora_embedding_A.{adapter}", layer.lora_embedding_A[adapter]),
            get(f"lora_embedding_B.{adapter}", layer.lora_embedding_B[adapter]), None, True)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The HF model's state dict with every adapter folded in, under the plain model's names, on the
    CPU (``hf.save_pretrained(folder, state_dict=merged_state_dict(hf))`` writes a plain model).

    Each merged weight is ``base + B @ A x scaling`` computed in float32 and cast once to the base's
    dtype; a peft ``modules_to_save`` copy is written under the plain module's name. The model is left as it is. On an FSDP2-sharded model the full weights are gathered to
    global rank 0's CPU only and merged there (collective: every rank calls it; None on the other
    ranks), so no device holds a full copy of the model. A peft ``modules_to_save`` copy (the trained
    one) is written under the plain module's name.
    """
    from peft.tuners.lora import LoraLayer

    hf = unwrap_hf(model)
    sd = cpu_state_dict(hf)
    if sd is None:
        return None
    for name, layer in hf.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        key = f"{name}.base_layer"
        weight_key, bias_key = f"{key}.weight", f"{key}.bias"
        dtype = sd[weight_key].dtype
        weight = sd[weight_key].to(torch.float32, copy=True)
        bias = sd[bias_key].to(torch.float32, copy=True) if bias_key in sd else None
        for adapter in _adapters(layer):
            a, b, b_bias, transpose = _adapter_tensors(layer, adapter, lambda rel, _: sd[f"{name}.{rel}"])
            scaling = layer.scaling[adapter]
            weight += lora_delta(a, b, scaling, transpose)
            if b_bias is not None and bias is not None:
                bias += b_bias.float() * scaling
        sd[weight_key] = weight.to(dtype)
        if bias is not None:
            sd[bias_key] = bias.to(sd[bias_key].dtype)
    sd = _saved_copies(hf, sd)
    return {key.replace(".base_layer.", "."): tensor for key, tensor in sd.items()
            if not any(part.startswith("lora_") for part in key.split("."))}


def _saved_copies(hf: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's ``modules_to_save``: the active trained copy under the plain module's name, the frozen
    original (and other adapters' copies) dropped."""
    from peft.utils.other import ModulesToSaveWrapper

    for name, wrapper in hf.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        active = f"{name}.modules_to_save.{wrapper.active_adapters[0]}."
        inside = [k for k in sd if k.startswith(f"{name}.original_module.") or k.startswith(f"{name}.modules_to_save.")]
        for key in inside:
            tensor = sd.pop(key)
            if key.startswith(active):
                sd[f"{name}.{key[len(active):]}"] = tensor
    return sd


def merged_model(model: nn.Module) -> nn.Module:
    """A copy of the HF model with every adapter folded in: a plain ``PreTrainedModel`` for
    ``save_pretrained`` (the model passed in is left as it is)."""
    hf = unwrap_hf(model)
    plain = copy.deepcopy(hf)
    merge_lora(plain)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in plain.__dict__:
            delattr(plain, attr)
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def _fresh_adapter(layer: Any, adapter: str, generator: torch.Generator | None) -> list[nn.Parameter]:
    """Re-initialise one adapter as peft does (``init_lora_weights=True``), drawing from ``generator``.

    Linear / Conv1D: A Kaiming-uniform (a = sqrt(5)), B (and its bias) zero. Embedding: A zero,
    B standard normal. The draws are made on the CPU in float32 and copied into the parameters.
    """
    if adapter in layer.lora_A:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        init = torch.empty(a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
        copy_full_(a, init)
        b.zero_()
        params = [a, b]
        bias = layer.lora_B[adapter].bias
        if bias is not None:
            bias.zero_()
            params.append(bias)
        return params
    a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    a.zero_()
    init = torch.empty(b.shape, dtype=torch.float32)
    nn.init.normal_(init, generator=generator)
    copy_full_(b, init)
    return [a, b]


@torch.no_grad()
def merge_and_reinit_lora(model: nn.Module, targets: Targets = "all",
                          generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """ReLoRA's merge: add each selected adapter's delta into its base weight, in place, and
    re-initialise the adapter (A as peft does, B = 0; for embeddings A = 0, B normal).

    The model computes the same function before and after, and every parameter stays the same
    object (an optimizer holding them stays valid). Pass a CPU ``generator`` seeded alike on every
    rank for identical adapters everywhere (else the global RNG draws). Returns the adapter
    parameters that were re-initialised (e.g. for :func:`prune_optimizer_state`).

    On an FSDP2-sharded model it works on the shards (see the module's notes); the generator must
    then be seeded alike on every rank, and FSDP2's units must be resharded (no unsharded root left
    by a ``no_grad`` forward: ``sharding.reshard``).
    """
    fresh: list[nn.Parameter] = []
    for layer in lora_targets(model, targets).values():
        base = layer.get_base_layer()
        for adapter in _adapters(layer):
            a, b, b_bias, transpose = _adapter_tensors(layer, adapter, lambda _, t: full(t))
            add_full_(base.weight, lora_delta(a, b, layer.scaling[adapter], transpose))  # fp32, rounded once
            if b_bias is not None:
                check(base.bias is not None, "targets", type(base).__name__, "a base layer with a bias (lora_bias)")
                add_full_(base.bias, b_bias.float() * layer.scaling[adapter])
            fresh += _fresh_adapter(layer, adapter, generator)
    return fresh


# ----------------------------------------------------------------------------------------------
# scaling and rank
# ----------------------------------------------------------------------------------------------


def scale_lora_alpha(model: nn.Module, factor: float, targets: Targets = "all") -> int:
    """Multiply the selected adapters' ``lora_alpha`` and their ``scaling`` by ``factor`` (so the
    scaling stays ``alpha / r`` or, with rslora, ``alpha / sqrt(r)``). A factor of 0 turns the
    adapters off: the model computes the base model's function there. Returns how many adapters
    changed."""
    check_number(factor, "factor", minimum=0, allowed="a finite number >= 0 (0 turns the adapters off)")
    n = 0
    for layer in lora_targets(model, targets).values():
        for adapter in _adapters(layer):
            layer.lora_alpha[adapter] = layer.lora_alpha[adapter] * factor
            layer.scaling[adapter] = layer.scaling[adapter] * factor
            n += 1
    return n


def _uses_rslora(hf: nn.Module, layer: Any, adapter: str) -> bool:
    """Whether the adapter's scaling is ``alpha / sqrt(r)`` (rslora) rather than ``alpha / r``."""
    r, alpha, scaling = layer.r[adapter], layer.lora_alpha[adapter], layer.scaling[adapter]
    if r > 1 and alpha:
        per = scaling / alpha
        return abs(per - r ** -0.5) < abs(per - 1 / r)
    config = getattr(hf, "peft_config", {}).get(adapter)
    return bool(getattr(config, "use_rslora", False))


def _nominal(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


@torch.no_grad()
def resize_lora_rank(model: nn.Module, rank: int | None = None, divisor: int | None = None,
                     targets: Targets = "attention") -> dict[str, ParamSource]:
    """Give the selected adapters a new rank from the truncated SVD of their delta, in place.

    New rank: ``rank``, or the old rank ``// divisor`` (at least 1); exactly one of them is given.
    With ``delta = B @ A * scaling = U S V^T`` (in ``B @ A``'s orientation) and ``k`` the new rank,
    the scaling becomes the one the new rank has (``alpha / k``, or ``alpha / sqrt(k)`` with rslora,
    times any extra factor the old scaling held) and, for Linear / Conv1D adapters,
    ``A = c V_k^T``, ``B = U_k S_k / (c scaling)`` with ``c`` the old rows' RMS norm (so A keeps its
    magnitude and, as peft's init, B holds the delta); for Embedding adapters the roles of A and B
    swap. The delta is the best rank-``k`` approximation of the old one: exact when ``k`` is at
    least the old rank.

    The new A and B are new parameters (same names); every other parameter stays the same object.
    Returns the mapping of every parameter of ``model`` (names as in ``model.named_parameters()``)
    to its source, the new A and B left out (they start with fresh optimizer state), for
    :func:`~composer_growth.functional.optim.transfer_optimizer_state`; usable as ``op`` of
    :func:`composer_growth.algorithms.surgery.grow`.
    """
    check((rank is None) != (divisor is None), "rank", rank, "exactly one of rank and divisor")
    if rank is not None:
        check_int(rank, "rank", minimum=1)
    else:
        check_int(divisor, "divisor", minimum=1)
    hf = unwrap_hf(model)
    before = {id(p): name for p, name in param_names(model).items()}
    layers = lora_targets(model, targets)
    for name, layer in layers.items():
        for adapter in _adapters(layer):
            check(layer.scaling[adapter] != 0, "targets", targets,
                  f"adapters with a scaling (those of {name} are turned off: scaling 0)")
    for name, layer in layers.items():
        for adapter in _adapters(layer):
            _resize(hf, name, layer, adapter, rank if rank is not None else max(1, layer.r[adapter] // divisor))
    return _collect_mapping(model, before, {})


def _resize(hf: nn.Module, name: str, layer: Any, adapter: str, k: int) -> None:
    linear = adapter in layer.lora_A
    if linear:
        old_a, old_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    else:
        old_a, old_b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    r, alpha, scaling = layer.r[adapter], layer.lora_alpha[adapter], layer.scaling[adapter]
    out_dim, in_dim = old_b.shape[0], old_a.shape[1]
    check(k <= min(out_dim, in_dim), "rank", k, f"at most {min(out_dim, in_dim)} for {name} ({out_dim} x {in_dim})")
    if k == r:
        return
    rslora = _uses_rslora(hf, layer, adapter)
    new_scaling = scaling * _nominal(alpha, k, rslora) / _nominal(alpha, r, rslora)
    delta = old_b.detach().float() @ old_a.detach().float() * scaling
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    fixed = old_a if linear else old_b  # the factor peft initialises at random
    c = float(fixed.detach().float().norm()) / math.sqrt(r) or 1.0
    if linear:
        new_a, new_b = c * vh, u * (s / (c * new_scaling))
    else:
        new_a, new_b = (s / (c * new_scaling))[:, None] * vh, c * u
    new_a = new_a.to(dtype=old_a.dtype, device=old_a.device).contiguous()
    new_b = new_b.to(dtype=old_b.dtype, device=old_b.device).contiguous()
    if linear:
        lin_a = nn.Linear(in_dim, k, bias=False, device="meta")
        lin_a.weight = nn.Parameter(new_a, requires_grad=old_a.requires_grad)
        old_bias = layer.lora_B[adapter].bias
        lin_b = nn.Linear(k, out_dim, bias=False, device="meta")
        lin_b.weight = nn.Parameter(new_b, requires_grad=old_b.requires_grad)
        lin_b.bias = old_bias  # the same object: it does not depend on the rank
        lin_a.train(layer.lora_A[adapter].training)
        lin_b.train(layer.lora_B[adapter].training)
        layer.lora_A[adapter], layer.lora_B[adapter] = lin_a, lin_b
    else:
        layer.lora_embedding_A[adapter] = nn.Parameter(new_a, requires_grad=old_a.requires_grad)
        layer.lora_embedding_B[adapter] = nn.Parameter(new_b, requires_grad=old_b.requires_grad)
    layer.r[adapter] = k
    layer.scaling[adapter] = new_scaling


# ----------------------------------------------------------------------------------------------
# optimizer state
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def prune_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], mode: str = "reset",
                          ratio: float = 0.9, generator: torch.Generator | None = None) -> int:
    """Prune the Adam moments (:data:`MOMENT_KEYS`) of ``params`` in ``optimizer``, in place (ReLoRA).

    Each parameter's moments are pruned with ONE mask, so no entry keeps a first moment whose
    second moment was zeroed (Adam's ``m / (sqrt(v) + eps)`` would then be ``m / eps``: a spike).
    ``reset`` zeroes them; ``random`` zeroes a random ``ratio`` share of the entries (drawn on the
    CPU from ``generator``); ``magnitude`` zeroes the ``ratio`` share of the entries whose first
    moment (``exp_avg``) is smallest in magnitude. Scalars such as ``step`` are kept. Returns how
    many moment entries were zeroed.
    """
    check(mode in PRUNE_MODES, "mode", mode, f"one of {', '.join(PRUNE_MODES)}")
    check_number(ratio, "ratio", minimum=0, below=1)
    zeroed = 0
    for p in params:
        state = optimizer.state.get(p) or {}
        moments = [state[k] for k in MOMENT_KEYS if torch.is_tensor(state.get(k)) and state[k].shape == p.shape]
        if not moments:
            continue
        mask = _prune_mask(moments[0], mode, ratio, generator)
        for t in moments:
            t.masked_fill_(mask, 0)
        zeroed += int(mask.sum()) * len(moments)
    return zeroed


def _prune_mask(first: torch.Tensor, mode: str, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """The entries to zero in every moment of one parameter (``first``: its first moment)."""
    if mode == "reset":
        return torch.ones_like(first, dtype=torch.bool)
    if mode == "random":
        return (torch.rand(first.shape, generator=generator) < ratio).to(first.device)
    mask = torch.zeros(first.numel(), dtype=torch.bool, device=first.device)
    n = int(ratio * first.numel())
    if n:
        mask[torch.topk(first.abs().reshape(-1), n, largest=False).indices] = True
    return mask.view(first.shape)


# --------------------------------------------------------------------------- export


def save_adapter(peft: Any, folder: str) -> None:
    """``peft.save_pretrained``; Composer leaves ``peft_type`` a plain string, which peft's model card needs
    as its enum (a ``str`` enum: Composer's ``== 'LORA'`` checks still hold)."""
    from peft import PeftType

    for config in peft.peft_config.values():
        if isinstance(config.peft_type, str) and not isinstance(config.peft_type, PeftType):
            config.peft_type = PeftType(config.peft_type.upper())
    peft.save_pretrained(folder)


def base_state_dict(hf: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights from a LoRA-injected model: adapter tensors dropped, names restored."""
    out = {}
    for name, tensor in hf.state_dict().items():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out

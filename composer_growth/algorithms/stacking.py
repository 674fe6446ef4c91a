"""One depth growth with its trunk and LoRA options (StackWise), shared by the ``StackLayers``
algorithm and the orchestrator's ``stack_layers`` op: one validator, one implementation.

:class:`StackSpec` checks the options once (:class:`~composer_growth.errors.ConfigError` naming the
option) and grows a model in two steps that :func:`composer_growth.algorithms.surgery.grow` takes:
:meth:`StackSpec.op` (the depth op of :mod:`composer_growth.functional.growth`) and
:meth:`StackSpec.after` (trunk and LoRA adapters, before the optimizer is rebuilt).

Stack after stack: a new stack is a copy of its source blocks' current function. The adapters
stacking added (``trunk: lora``, ``stack_lora``) are folded into the copied weights; adapters of the
run's own LoRA scheme (``model.peft``, ``lora_merge``) are copied with the block, as they are how
every block trains. The trunk is every block that existed before this growth:

* ``train`` leaves it as it is (what trained keeps training);
* ``frozen`` freezes all of it, its adapters included;
* ``lora`` makes every linear layer of it train through one adapter: layers that already carry one
  keep it (its rank, values and optimizer state; it trains again if it was frozen), plain ones get a
  new adapter of ``lora_rank``.

The new stacks train fully, or, with ``stack_lora``, through their own new adapters (base frozen).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from composer_growth.errors import ConfigError, check, check_int, check_number, is_int
from composer_growth.families import config_get, family_of, get_path
from composer_growth.functional.growth import STACK_INITS, STACK_MODES, stack_layers
from composer_growth.functional.lora import add_lora, plain_linear_modules
from composer_growth.unwrap import peft_model, unwrap_hf

__all__ = ["STACK_LORA_PATTERNS", "TRUNKS", "StackSpec", "spec_of_value", "stack_spec"]

TRUNKS = ("train", "frozen", "lora")
STACK_LORA_PATTERNS = ("constant", "increasing")


_ADDED = "added_by_stacking"  # marks a LoRA layer of a trunk or a new stack (``trunk: lora``, ``stack_lora``)


def added_by_stacking(layer: nn.Module) -> bool:
    """Whether stacking wrapped this LoRA layer (its copies fold it in), not ``model.peft`` or ``lora_merge``."""
    return bool(getattr(layer, _ADDED, False))


class StackSpec:
    """The options of one depth growth, checked (see the module's doc and ``StackLayers``)."""

    #: every option, as ``StackLayers`` and the orchestrator's op take it
    OPTIONS = ("mode", "times", "source_layers", "num_new", "init", "trunk", "lora_rank", "lora_alpha", "stack_lora",
               "stack_lora_pattern", "stack_lora_alpha", "seed")

    def __init__(self, mode: str = "repeat", times: int = 2, source_layers: list[int] | None = None,
                 num_new: int | None = None, init: str = "copy", trunk: str = "train", lora_rank: int = 8,
                 lora_alpha: float | None = None, stack_lora: int | list[int] | None = None,
                 stack_lora_pattern: str = "constant", stack_lora_alpha: float | None = None, seed: int = 0):
        check(mode in STACK_MODES, "mode", mode, f"one of {', '.join(STACK_MODES)}")
        check(init in STACK_INITS, "init", init, f"one of {', '.join(STACK_INITS)}")
        check(trunk in TRUNKS, "trunk", trunk, f"one of {', '.join(TRUNKS)}")
        if mode == "repeat":
            check_int(times, "times", minimum=2)
        if mode == "explicit":
            check(isinstance(source_layers, list) and len(source_layers) > 0
                  and all(is_int(i) and i >= 0 for i in source_layers),
                  "source_layers", source_layers, "a non-empty list of layer indices >= 0")
        if mode in ("append", "prepend"):
            check_int(num_new, "num_new", minimum=1)
        self.mode, self.times, self.source_layers, self.num_new = mode, times, source_layers, num_new
        check_int(lora_rank, "lora_rank", minimum=1)
        if lora_alpha is not None:
            check_number(lora_alpha, "lora_alpha", above=0, allowed="null or a number > 0")
        check_int(seed, "seed")
        self.init, self.trunk, self.seed = init, trunk, seed
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha
        self.stack_lora_ranks = self._stack_ranks(stack_lora, stack_lora_pattern)
        if stack_lora_alpha is not None:
            check_number(stack_lora_alpha, "stack_lora_alpha", above=0, allowed="null or a number > 0")
        self.stack_lora_alpha = stack_lora_alpha
        self._old_layers: set[int] = set()
        self._trained: set[str] = set()
        self._peft = False

    def _stack_ranks(self, stack_lora: Any, pattern: str) -> list[int] | None:
        """The adapter rank of each new stack (None: no adapters on the new stacks)."""
        check(pattern in STACK_LORA_PATTERNS, "stack_lora_pattern", pattern, f"one of {', '.join(STACK_LORA_PATTERNS)}")
        if stack_lora is None:
            return None
        stacks = self.times - 1 if self.mode == "repeat" else 1
        if isinstance(stack_lora, list):
            check(len(stack_lora) == stacks and all(is_int(r) and r >= 1 for r in stack_lora),
                  "stack_lora", stack_lora, f"a list of {stacks} integer ranks >= 1 (one per new stack)")
            return list(stack_lora)
        check_int(stack_lora, "stack_lora", minimum=1)
        return [stack_lora * (i + 1 if pattern == "increasing" else 1) for i in range(stacks)]

    def check_model_config(self, config: Any) -> None:
        """Reject options the model (its config) cannot take, before training."""
        family = family_of(getattr(config, "model_type", None), key="model.family")
        n = config_get(config, family.num_layers_key)
        for key in family.per_layer_keys:
            check(not config_get(config, key), "model", f"{key}={config_get(config, key)!r}",
                  f"{family.name} blocks configured per position ({key}) cannot be stacked")
        if self.mode == "explicit":
            bad = [i for i in self.source_layers if i >= n]
            check(not bad, "source_layers", self.source_layers, f"indices below the model's layer count ({n})")

    def op(self, model: nn.Module):
        """Grow the depth (``surgery.grow``'s op); remembers the trunk for :meth:`after`."""
        self._remember(model)
        return stack_layers(model, mode=self.mode, times=self.times, source_layers=self.source_layers,
                            num_new=self.num_new, init=self.init, seed=self.seed, fold_adapters=added_by_stacking)

    @property
    def local(self):
        """The op on each rank's shards under FSDP2 (``surgery.grow``'s ``local``); None where adapters are added."""
        if self.trunk == "lora" or self.stack_lora_ranks is not None:
            return None
        return self._local

    def _local(self, model: nn.Module, units: Any):
        from composer_growth.algorithms.shard_local import stack_local

        self._remember(model)
        return stack_local(model, units, mode=self.mode, times=self.times, source_layers=self.source_layers,
                           num_new=self.num_new, init=self.init, seed=self.seed)

    def _remember(self, model: nn.Module) -> None:
        layers = get_path(unwrap_hf(model), family_of(model).layers)
        self._old_layers = {id(layer) for layer in layers}
        self._trained = {name for name, p in model.named_parameters() if p.requires_grad}
        self._peft = peft_model(model) is not None

    def after(self, model: nn.Module, mapping: dict[str, Any]) -> None:
        """Trunk and adapters (``surgery.grow``'s ``after``): what trains from now on."""
        hf = unwrap_hf(model)
        path = family_of(hf).layers
        layers = [(f"{path}.{i}", layer) for i, layer in enumerate(get_path(hf, path))]
        old = [(prefix, layer) for prefix, layer in layers if id(layer) in self._old_layers]
        new = [(prefix, layer) for prefix, layer in layers if id(layer) not in self._old_layers]
        for _, layer in new:
            if not self._peft:  # a new stack trains, whatever its source did (not weights under a kept adapter)
                for name, p in layer.named_parameters():
                    p.requires_grad_(".base_layer." not in name or p.requires_grad)
        if self.trunk == "frozen":
            for _, layer in old:
                layer.requires_grad_(False)  # adapters the trunk holds freeze with it
        elif self.trunk == "lora":
            for _, layer in old:
                for name, p in layer.named_parameters():
                    if "lora_" in name:
                        p.requires_grad_(True)
            _wrap(model, hf, [prefix for prefix, _ in old], self.lora_rank, self.lora_alpha, mapping)
        if self.stack_lora_ranks is not None:
            size = len(new) // len(self.stack_lora_ranks)
            for i, rank in enumerate(self.stack_lora_ranks):
                alpha = self.stack_lora_alpha if self.stack_lora_alpha is not None else rank
                _wrap(model, hf, [p for p, _ in new[i * size:(i + 1) * size]], rank, alpha, mapping)
        # a parameter that trains now but did not before has no optimizer state to carry: it starts fresh
        for name, p in model.named_parameters():
            if p.requires_grad and name in mapping and mapping[name].source not in self._trained:
                del mapping[name]


def _wrap(model: nn.Module, hf: nn.Module, prefixes: list[str], rank: int, alpha: float | None, mapping) -> None:
    """LoRA adapters on the plain linear layers of the given blocks (those with adapters keep theirs)."""
    targets = plain_linear_modules(hf, prefixes)
    add_lora(hf, targets, rank=rank, alpha=alpha)
    for target in targets:
        setattr(get_path(hf, target), _ADDED, True)
    # the wrapped modules' weights moved to `<module>.base_layer.*`: keep the optimizer map in step
    outer = next(name for name, m in model.named_modules() if m is hf)
    outer = f"{outer}." if outer else ""
    for target in targets:
        for leaf in ("weight", "bias"):
            key = f"{outer}{target}.{leaf}"
            if key in mapping:
                mapping[f"{outer}{target}.base_layer.{leaf}"] = mapping.pop(key)


def stack_spec(value: Any, key: str) -> dict[str, Any]:
    """The orchestrator's ``stack_layers`` value: ``times`` (an int, repeat mode) or a mapping of the
    :attr:`StackSpec.OPTIONS` but ``init`` and ``seed`` (the op's ``args``), checked by :class:`StackSpec`.
    Returns the value (a mapping as a plain dict)."""
    if is_int(value):
        options: dict[str, Any] = {"times": value}
    else:
        check(isinstance(value, Mapping), key, value,
              "an integer >= 2 (copies of the layer stack) or a mapping of stack_layers options")
        options = dict(value)
    allowed = [o for o in StackSpec.OPTIONS if o not in ("init", "seed")]
    for option in options:
        check(option in allowed, f"{key}.{option}", options[option],
              f"unknown option; allowed: {', '.join(allowed)} (init and seed go under args)")
    try:
        StackSpec(**options)
    except ConfigError as e:
        raise ConfigError(key if is_int(value) else f"{key}.{e.key}", e.value, e.allowed) from None
    return value if is_int(value) else options


def spec_of_value(value: Any, init: str, seed: int) -> StackSpec:
    """The :class:`StackSpec` of a value :func:`stack_spec` checked."""
    return StackSpec(**({"times": value} if is_int(value) else value), init=init, seed=seed)

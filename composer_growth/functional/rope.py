"""RoPE scaling: check a ``rope_scaling`` dict, and apply it to a live model in place.

``rope_scaling`` is transformers' own dict (``{"rope_type": "yarn", "factor": 4.0, ...}``; the legacy
``type`` key is accepted too), optionally with a ``rope_theta`` key that sets the config's RoPE base
instead of staying inside ``rope_scaling``. Validation defers to transformers wherever it can: the
rope types are those of ``ROPE_INIT_FUNCTIONS``, and ``rope_config_validation`` does the per-type checks.
That function only *logs* most problems, so its warnings are captured here and raised as
:class:`ConfigError` instead.

:func:`apply_rope_scaling` edits the config and rebuilds every rotary embedding module through
transformers' rope initialisation, so the model then computes what ``from_config(model.config)``
with the same weights would compute (including the lazily updated dynamic / longrope frequencies,
whose state starts fresh).

:func:`rope_target` is the policy for one context: from a scaling, the model's own rope
(:func:`rope_snapshot`) and the length to train, the config to apply, the declared max positions and
how far the positions then reach. :func:`~composer_growth.families.rope_type` is the one reader of a
dict's rope type.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch.nn as nn
from transformers import modeling_rope_utils as hf_rope

from composer_growth.errors import ConfigError, check_int, check_number
from composer_growth.families import (FAMILIES, Family, config_get, config_set, family_of, get_path, rope_type, set_path)
from composer_growth.unwrap import unwrap_hf

#: Rope types this transformers build can initialise (read from its registry, never hard-coded).
SUPPORTED_ROPE_TYPES: tuple[str, ...] = tuple(sorted(set(hf_rope.ROPE_INIT_FUNCTIONS) | {"default"}))

_TYPE_KEYS = ("rope_type", "type")
_INT_PARAMS = frozenset({"original_max_position_embeddings"})
# transformers warnings that are information, not a problem with the dict.
_BENIGN_WARNINGS = ("This model has set a `original_max_position_embeddings` field",)


# --------------------------------------------------------------------------- validation


def validate_rope_scaling(
    rope_scaling: Mapping[str, Any] | None,
    key: str = "rope_scaling",
    family: Family | str | None = None,
    max_position_embeddings: int | None = None,
    original_max_position_embeddings: int | None = None,
    config: Any = None,
) -> dict[str, Any] | None:
    """Check ``rope_scaling`` and return it normalised, or ``None`` for no scaling.

    The result carries both ``rope_type`` and ``type``, numbers as float (int for
    ``original_max_position_embeddings``), and ``rope_theta`` when one was given (for the caller to
    put on the config: it is not a ``rope_scaling`` key). A dict without a rope type (only
    ``rope_theta``, or empty) means the ``default`` rope.

    ``family`` (a :class:`Family` or model type) rejects any scaling for a family without RoPE.
    ``max_position_embeddings`` is the context the config will declare (transformers checks llama3's
    ``original_max_position_embeddings`` against it); ``original_max_position_embeddings`` is a
    config's top-level field of that name (Phi-3 style longrope), not the ``rope_scaling`` key.
    ``config``, when given, supplies both of those defaults and the head size (longrope factor lengths).
    """
    family = _resolve_family(family, config)
    if rope_scaling is None:
        return None
    kind = position_kind(family, config)
    if kind != "rope":
        why = " (ALiBi needs no scaling for longer sequences)" if kind == "alibi" else ""
        raise ConfigError(key, rope_scaling, f"{family.name} has {kind} positions, not RoPE{why}: only null is allowed")
    if not isinstance(rope_scaling, Mapping):
        raise ConfigError(key, rope_scaling, "null or a mapping with rope_type and its parameters")

    params = dict(rope_scaling)
    kind = _pop_rope_type(params, key)
    if family is not None and family.rope_types is not None and kind not in dict(family.rope_types):
        raise ConfigError(f"{key}.rope_type", kind,
                          f"one of {', '.join(dict(family.rope_types))} ({family.name}'s config takes these)")
    theta = params.pop("rope_theta", None)
    params = {name: _coerce_param(value, f"{key}.{name}", name) for name, value in params.items()}
    if params.get("factor") is not None and params["factor"] <= 0:
        raise ConfigError(f"{key}.factor", params["factor"], "a number > 0")
    clean = {"rope_type": kind, "type": kind, **params}

    if max_position_embeddings is None and config is not None:
        max_position_embeddings = config_get(config, _max_positions_key(family))
    if original_max_position_embeddings is None and config is not None:
        original_max_position_embeddings = getattr(config, "original_max_position_embeddings", None)
    view = _validation_view(clean, config, max_position_embeddings, original_max_position_embeddings)
    _validate_with_transformers(view, key, rope_scaling)

    if theta is not None:
        clean["rope_theta"] = _positive_number(theta, f"{key}.rope_theta")
    return clean


def position_kind(family: Family | None, config: Any = None) -> str:
    """``rope``, ``alibi`` or ``learned``: from the config when given, else the family's usual kind."""
    if family is None:
        return "rope"
    if config is not None:
        return family.positions(config)
    return "rope" if family.rotary is not None else "learned"


def _resolve_family(family: Family | str | None, config: Any) -> Family | None:
    if isinstance(family, str):
        return family_of(family, key="family")
    if family is None and config is not None:
        return FAMILIES.get(getattr(config, "model_type", None))
    return family


def _max_positions_key(family: Family | None) -> str:
    return family.max_positions_key if family is not None else "max_position_embeddings"


def _pop_rope_type(params: dict[str, Any], key: str) -> str:
    """Remove ``rope_type`` / ``type`` from ``params`` and return the (supported) rope type."""
    given = {k: params.pop(k) for k in _TYPE_KEYS if k in params}
    if len(set(map(str, given.values()))) > 1:
        raise ConfigError(key, given, "rope_type and type must name the same rope type")
    if not given:
        if any(name != "rope_theta" for name in params):
            raise ConfigError(f"{key}.rope_type", None, f"required; one of: {', '.join(SUPPORTED_ROPE_TYPES)}")
        return "default"
    rope_type = next(iter(given.values()))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{key}.rope_type", rope_type, f"one of: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return rope_type


def _coerce_param(value: Any, key: str, name: str) -> Any:
    """A rope parameter as transformers expects it: float, int (positions) or a list of floats."""
    if value is None:  # transformers reads None as "use the default" for optional keys
        return None
    if isinstance(value, (list, tuple)):
        return [float(_real(v, key)) for v in value]
    number = _real(value, key)
    if name in _INT_PARAMS:
        if number <= 0 or number != int(number):
            raise ConfigError(key, value, "a positive integer")
        return int(number)
    return float(number)


def _real(value: Any, key: str) -> numbers.Real:
    check_number(value, key, allowed="a finite number")
    return value


def _positive_number(value: Any, key: str) -> float:
    if float(_real(value, key)) <= 0:
        raise ConfigError(key, value, "a number > 0")
    return float(value)


def _validation_view(
    rope_scaling: dict[str, Any], config: Any, max_positions: int | None, original_max_positions: int | None
) -> SimpleNamespace:
    """The config fields transformers' rope validators read, without touching any real config.

    Without a config, longrope's factor lists are only checked against each other, and an unknown
    ``max_position_embeddings`` bounds nothing.
    """
    view = SimpleNamespace(
        rope_scaling=rope_scaling, max_position_embeddings=max_positions if max_positions is not None else math.inf
    )
    if config is not None and hasattr(config, "hidden_size") and hasattr(config, "num_attention_heads"):
        view.hidden_size, view.num_attention_heads = config.hidden_size, config.num_attention_heads
        view.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        view.partial_rotary_factor = getattr(config, "partial_rotary_factor", 1.0)
    else:
        view.head_dim = view.hidden_size = max(2, 2 * len(rope_scaling.get("short_factor") or ()))
        view.num_attention_heads, view.partial_rotary_factor = 1, 1.0
    if original_max_positions is not None:
        view.original_max_position_embeddings = original_max_positions
    return view


def _validate_with_transformers(view: SimpleNamespace, key: str, shown: Any) -> None:
    """Run ``rope_config_validation``; its exceptions and logged warnings become ConfigError."""
    with _captured_warnings() as messages:
        try:
            hf_rope.rope_config_validation(view)
        except KeyError as err:  # a missing required parameter; the message names it
            raise ConfigError(key, shown, str(err.args[0])) from None
        except (TypeError, ValueError, AttributeError) as err:
            raise ConfigError(key, shown, f"rejected by transformers: {err}") from None
    problems = [m for m in messages if not m.startswith(_BENIGN_WARNINGS)]
    if problems:
        raise ConfigError(key, shown, "; ".join(problems))


class _Collect(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())
        return False


@contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    """Collect (and silence) what transformers' rope module logs, whatever its verbosity is set to."""
    logger = logging.getLogger(hf_rope.__name__)
    collect, level = _Collect(), logger.level
    logger.addFilter(collect)
    logger.setLevel(logging.WARNING)
    try:
        yield collect.messages
    finally:
        logger.removeFilter(collect)
        logger.setLevel(level)


# --------------------------------------------------------------------------- reach


def max_addressable_positions(config_like: Any, bound: bool = True) -> int | float:
    """The longest sequence a config's positions are meant to address (``math.inf``: no bound).

    ``config_like`` is a model (wrappers allowed), a config, or a mapping with the config's keys.
    The result is the larger of the declared context (the family's ``max_positions_key``) and the
    reach of its rope scaling:

    * none / ``default``: the declared context;
    * ``dynamic``: ``math.inf`` (frequencies are recomputed for any length);
    * ``yarn`` with ``original_max_position_embeddings``: the declared context (transformers then
      derives the factor as declared / original);
    * otherwise (``linear``, ``yarn``, ``llama3``, ``longrope``, ...): ``factor`` times the original
      context, i.e. ``rope_scaling["original_max_position_embeddings"]``, else the config's top-level
      ``original_max_position_embeddings``, else the declared context.

    ALiBi addresses any length; learned positions their table. With ``bound``, a family whose model
    refuses sequences past its declared context (``positions_bound``: llm-foundry's MPT) reaches no further.
    """
    config = _config_of(config_like)
    family = FAMILIES.get(_field(config, "model_type"))
    declared = _field(config, _max_positions_key(family))
    if family is not None and not isinstance(config, Mapping) and position_kind(family, config) != "rope":
        return declared if family.positions_bound or position_kind(family, config) == "learned" else math.inf
    reach = _rope_reach(config, family, declared)
    return min(reach, declared) if bound and family is not None and family.positions_bound else reach


def _rope_reach(config: Any, family: Family | None, declared: int) -> int | float:
    scaling = (family.rope_scaling(config) if family is not None and not isinstance(config, Mapping)
               else _field(config, "rope_scaling")) or {}
    kind = rope_type(scaling)
    if kind == "default":
        return declared
    if kind == "dynamic":
        return math.inf
    if kind == "yarn" and "original_max_position_embeddings" in scaling:
        return declared
    original = (
        scaling.get("original_max_position_embeddings")
        or _field(config, "original_max_position_embeddings")
        or declared
    )
    return max(declared, int(original * (scaling.get("factor") or 1.0)))


def _config_of(config_like: Any) -> Any:
    if isinstance(config_like, nn.Module):
        return unwrap_hf(config_like).config
    return config_like


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else config_get(config, name)


# --------------------------------------------------------------------------- a rope config per context


def rope_snapshot(config: Any, family: Family) -> dict[str, Any]:
    """The rope fields of a config: its scaling, base, declared context and kind of positions."""
    theta = None
    for name in family.rope_theta_keys:
        if config_get(config, name) is not None:
            theta = float(config_get(config, name))
            break
    return {
        "rope_scaling": copy.deepcopy(family.rope_scaling(config)),
        "rope_theta": theta,
        "max_positions": int(config_get(config, family.max_positions_key)),
        "original_max_position_embeddings": getattr(config, "original_max_position_embeddings", None),
        "positions": family.positions(config),
    }


@dataclass
class RopeTarget:
    """The rope config a model gets for a context, and how far its positions reach."""
    scaling: dict[str, Any] | None  # what apply_rope_scaling gets (with rope_theta); None: no rotary
    max_positions: int              # the config's declared context
    reach: float                    # the longest sequence the positions address
    kind: str = "rope"              # the model's positions: rope, alibi or learned

    @property
    def factor(self) -> float:
        return float((self.scaling or {}).get("factor") or 1.0)

    @property
    def theta(self) -> float | None:
        return (self.scaling or {}).get("rope_theta")

    @property
    def rope_type(self) -> str:
        return rope_type(self.scaling)

    def describe(self) -> str:
        """One phrase: ``rope linear x2, theta 10000``, ``ALiBi (...)`` or ``learned positions``."""
        if self.kind == "alibi":
            return "ALiBi (longer sequences need no scaling)"
        if self.scaling is None:
            return "learned positions"
        kind = self.rope_type
        text = "rope " + (kind if kind == "default" else f"{kind} x{self.factor:g}")
        if self.theta is not None:
            text += f", theta {self.theta:g}"
        return text


def rope_target(scaling: Mapping[str, Any] | None, original: dict[str, Any], family: Family, config: Any = None,
                seq_length: int | None = None, max_position_embeddings: int | None = None,
                key: str = "rope_scaling") -> RopeTarget:
    """The rope config for training at ``seq_length`` with ``scaling`` (normalised; None: the model's own
    rope, ``original``: :func:`rope_snapshot` of the model as built), checked against ``config``.

    The declared max positions stay the model's unless ``max_position_embeddings`` is given, or the
    rope type reads the declared context as the *extended* one (``yarn`` with
    ``original_max_position_embeddings``, ``llama3``): then it is ``factor x original``. A family whose
    model refuses sequences past its declared context (``positions_bound``) declares ``seq_length``,
    as far as the rope reaches.
    """
    p0 = original["max_positions"]
    kind = position_kind(family, config) if config is not None else original.get("positions") or position_kind(family)
    if kind != "rope":
        if scaling is not None:
            validate_rope_scaling(scaling, key, family, config=config)  # raises: no RoPE
        # ALiBi extends to any length with no scaling, up to what the model accepts (positions_bound)
        reach = p0 if kind == "learned" or family.positions_bound else math.inf
        return RopeTarget(None, p0, reach, kind)
    if scaling is not None:
        chosen = dict(scaling)
    elif original["rope_scaling"]:
        chosen = dict(original["rope_scaling"])
    else:
        chosen = {"rope_type": "default"}
    theta = chosen.pop("rope_theta", None)
    if theta is None:
        theta = original["rope_theta"]
    kind = rope_type(chosen)
    if max_position_embeddings is not None:
        declared = max_position_embeddings
    elif kind in ("yarn", "llama3") and chosen.get("original_max_position_embeddings") and chosen.get("factor"):
        declared = max(p0, int(round(float(chosen["factor"]) * int(chosen["original_max_position_embeddings"]))))
    else:
        declared = p0
    full = {**chosen, **({"rope_theta": theta} if theta is not None else {})}
    full = validate_rope_scaling(full, key, family, max_position_embeddings=declared,
                                 original_max_position_embeddings=original.get("original_max_position_embeddings"),
                                 config=config) or {"rope_type": "default"}
    view = {"model_type": family.name, family.max_positions_key: declared,
            "rope_scaling": {k: v for k, v in full.items() if k != "rope_theta"},
            "original_max_position_embeddings": original.get("original_max_position_embeddings")}
    reach = max_addressable_positions(view, bound=False)
    if family.positions_bound and max_position_embeddings is None and seq_length is not None:
        # the model refuses sequences past its declared context: raise it to what is trained,
        # as far as the rope reaches
        declared = max(declared, min(seq_length, int(min(reach, 2**62))))
        reach = min(reach, declared)
    return RopeTarget(full, declared, reach)


# --------------------------------------------------------------------------- apply


def apply_rope_scaling(
    model: nn.Module,
    rope_scaling: Mapping[str, Any] | None,
    max_position_embeddings: int | None = None,
    key: str = "rope_scaling",
) -> dict[str, Any]:
    """Set ``rope_scaling`` (and ``rope_theta`` / max positions when given) on a model, in place.

    ``rope_scaling=None`` (or a ``default`` type) restores the plain rope; ``rope_theta`` keeps its
    current value unless the dict names one. The config gets the normalised dict (both ``rope_type``
    and ``type``); every rotary module of the family's rotary class is rebuilt from the updated
    config by its own class (keeping the old buffers' device and dtype), so the model matches one
    freshly built from its config. The new modules are built before anything is changed, so a
    rejected setting leaves the model as it was. A config whose ``head_dim`` is ``None`` (mistral)
    gets ``hidden_size // num_attention_heads``, the value its attention uses anyway, because
    transformers' dynamic / yarn / longrope initialisers cannot read ``None``.

    Returns ``{"family", "rotary_modules", "config_keys_set", "old_rope_scaling", "new_rope_scaling",
    "old_rope_theta", "new_rope_theta", "old_max_positions", "new_max_positions",
    "max_addressable_positions"}`` for logging.
    """
    hf = unwrap_hf(model)
    family = family_of(hf)
    config = hf.config
    before = _rope_state(config, family)
    max_positions = _check_max_positions(max_position_embeddings, family, before["max_positions"], config)
    clean = validate_rope_scaling(rope_scaling, key, family, max_positions, config=config)

    updates = _config_updates(clean, family, config, max_positions)
    paths = _rotary_paths(hf, family)
    trial = copy.deepcopy(config)
    _set_fields(trial, updates)
    rebuilt = {}
    for path in paths:
        old = get_path(hf, path)
        own = getattr(old, "config", None) is not config  # a rotary config of its own (llm-foundry's MPT)
        module_config = _own_rotary_config(old.config, clean, max_positions) if own else trial
        rebuilt[path] = (_rebuild(old, module_config, key, clean), own)

    _set_fields(config, updates)
    for path, (module, own) in rebuilt.items():
        if not own:
            module.config = config  # the live config, as in a freshly built model
        set_path(hf, path, module)
    return _report(family, paths, updates, before, _rope_state(config, family), config)


def _own_rotary_config(own: Any, clean: dict[str, Any] | None, max_positions: int | None) -> Any:
    """A config of the rotary module's own config class with the new rope fields (transformers' names):
    what its model builds the module from."""
    scaling = dict(clean or {"rope_type": "default"})
    theta = scaling.pop("rope_theta", None)
    scaling.setdefault("type", scaling["rope_type"])
    fields = {name: getattr(own, name, None) for name in
              ("hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings", "rope_theta")}
    fields["rope_scaling"] = scaling
    if theta is not None:
        fields["rope_theta"] = theta
    if max_positions is not None:
        fields["max_position_embeddings"] = max_positions
    return type(own)(**fields)


def _rope_state(config: Any, family: Family) -> dict[str, Any]:
    snapshot = rope_snapshot(config, family)
    return {name: snapshot[name] for name in ("rope_scaling", "rope_theta", "max_positions")}


def _check_max_positions(value: int | None, family: Family, current: int, config: Any = None) -> int | None:
    if value is None:
        return None
    check_int(value, "max_position_embeddings", minimum=1, allowed="a positive integer")
    kind = position_kind(family, config)
    if kind != "rope" and value != current:
        raise ConfigError(
            "max_position_embeddings", value,
            f"{family.name} has {kind} positions ({family.max_positions_key}={current}); "
            "resizing them is not a rope change",
        )
    return int(value)


def _config_updates(
    clean: dict[str, Any] | None, family: Family, config: Any, max_positions: int | None
) -> dict[str, Any]:
    """The config fields to set: (dotted) config key -> new value."""
    if position_kind(family, config) != "rope":
        return {}
    clean = dict(clean or {"rope_type": "default"})
    theta = clean.pop("rope_theta", None)
    plain = clean["rope_type"] == "default" and set(clean) <= set(_TYPE_KEYS)
    updates: dict[str, Any] = {family.rope_scaling_key: family.rope_scaling_value(None if plain else clean)}
    if theta is not None:
        updates.update({name: theta for name in family.rope_theta_keys})
    if max_positions is not None:
        updates[family.max_positions_key] = max_positions
    if hasattr(config, "head_dim") and config.head_dim is None and hasattr(config, "num_attention_heads"):
        updates["head_dim"] = getattr(config, family.hidden_key) // config.num_attention_heads
    return updates


def _set_fields(config: Any, updates: Mapping[str, Any]) -> None:
    for name, value in updates.items():
        config_set(config, name, copy.deepcopy(value))


def _rotary_paths(hf: nn.Module, family: Family) -> list[str]:
    """Every path (shared modules included) to a module of the family's rotary class."""
    if position_kind(family, hf.config) != "rope":
        return []
    rotary_cls = type(get_path(hf, family.rotary))
    return [name for name, module in hf.named_modules(remove_duplicate=False) if type(module) is rotary_cls]


def _rebuild(old: nn.Module, config: Any, key: str, shown: Any) -> nn.Module:
    """A fresh module of ``old``'s class from ``config``, with ``old``'s buffer device and dtypes."""
    reference = getattr(old, "inv_freq", None)
    device = reference.device if reference is not None else None
    try:
        new = type(old)(config=config, device=device)
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as err:
        raise ConfigError(key, shown, f"transformers could not build {type(old).__name__}: {err}") from None
    for name, buffer in list(new.named_buffers(recurse=False)):
        old_buffer = old._buffers.get(name)
        if old_buffer is not None and buffer.is_floating_point():
            setattr(new, name, buffer.to(dtype=old_buffer.dtype))
    return new.train(old.training)


def _report(
    family: Family, paths: list[str], updates: dict[str, Any], before: dict[str, Any], after: dict[str, Any],
    config: Any,
) -> dict[str, Any]:
    return {
        "family": family.name,
        "rotary_modules": paths,
        "config_keys_set": sorted(updates),
        **{f"old_{name}": value for name, value in before.items()},
        **{f"new_{name}": value for name, value in after.items()},
        "max_addressable_positions": max_addressable_positions(config),
    }

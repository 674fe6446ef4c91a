"""The recipe schema: typed sections, read from a plain mapping with one-line errors.

Every key, type and value is checked here before any model is built or data read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from composer_growth.errors import ConfigError, is_int, is_number


@dataclass
class PrepareConfig:
    """How to build the dataset when ``data.path`` holds none (see ``composer-growth prepare-data``)."""
    source: str = "python-source"
    seq_len: int = 256
    vocab_size: int = 4096
    tokenizer: Union[str, None] = None
    max_bytes: int = 8_000_000
    val_percent: float = 5.0
    files: Union[list[str], None] = None
    hub_name: Union[str, None] = None
    hub_split: str = "train"
    text_field: str = "text"


@dataclass
class DataConfig:
    path: str = "./data/python-source"
    remote: Union[str, None] = None
    prepare: Union[PrepareConfig, None] = None
    train_split: str = "train"
    eval_split: str = "val"
    shuffle: bool = True
    num_workers: int = 0


@dataclass
class ModelConfig:
    family: str = "llama"
    config: dict[str, Any] = field(default_factory=dict)
    pretrained: Union[str, None] = None
    peft: Union[dict[str, Any], None] = None
    attn_implementation: str = "sdpa"


@dataclass
class OptimizerConfig:
    name: str = "decoupled_adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    name: str = "cosine_with_warmup"
    t_warmup: str = "0.05dur"
    alpha_f: float = 0.1


@dataclass
class Recipe:
    run_name: Union[str, None] = None
    seed: int = 17
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: Union[str, None] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    algorithms: dict[str, Any] = field(default_factory=dict)  # name -> options, or a list of them (repeatable ones)
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    loggers: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress_bar: bool = True
    console_log_interval: str = "10ba"
    max_duration: str = "100ba"
    eval_interval: str = "50ba"
    eval_first: bool = True
    eval_subset_num_batches: int = -1
    global_train_batch_size: int = 16
    device_train_microbatch_size: Union[int, str] = 16
    device_eval_batch_size: int = 16
    precision: str = "fp32"
    device: Union[str, None] = None
    compile: Union[bool, dict[str, Any]] = False  # true, or torch.compile's options (compile_config)
    save_folder: Union[str, None] = None
    save_interval: str = "1ep"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: Union[str, None] = None
    load_weights_only: bool = False
    parallelism: Union[dict[str, Any], None] = None
    dist_timeout: float = 300.0
    summary_file: Union[str, None] = None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(key, value, f"expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"expected {_type_name(tp)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "expected a mapping")
        _, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if v is None and val_tp is not Any:
                v = {}  # `name:` with nothing after it switches a component on with defaults
            out[str(k)] = _convert(v, val_tp, f"{key}.{k}")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "expected true or false")
    if tp is int:
        if is_int(value):
            return value
        raise ConfigError(key, value, "expected an integer")
    if tp is float:
        if is_number(value, finite=False):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, value, "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "expected a string")
    raise TypeError(f"unsupported schema type {tp!r} at {key}")


def from_mapping(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    where = prefix or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where, data, "expected a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(full, value, f"unknown key; allowed keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)

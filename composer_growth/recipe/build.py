"""YAML -> validated :class:`ValidRecipe` -> Composer ``Trainer``.

``validate`` reads nothing but the recipe and the dataset's manifest, so a bad recipe
fails in seconds, before a model is built or data read.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from composer_growth.algorithms.base import SuiteAlgorithm
from composer_growth.errors import ConfigError, check, is_int
from composer_growth.families import FAMILIES, mark_fsdp_blocks
from composer_growth.recipe.schedulers import build_scheduler
from composer_growth.recipe.schema import Recipe, from_mapping
from composer_growth.registry import ALGORITHMS, CALLBACKS, LOGGERS, register_composer_builtins
from composer_growth.runfacts import RunFacts
from composer_growth.timeutil import parse_time

OPTIMIZERS = ("decoupled_adamw", "adamw", "decoupled_sgdw")
SCHEDULERS = ("constant", "constant_with_warmup", "linear_with_warmup", "cosine_with_warmup")
PRECISIONS = ("fp32", "amp_fp16", "amp_bf16", "amp_fp8")
DEVICES = ("cpu", "gpu", "mps")
PARALLELISM_KEYS = ("fsdp", "tp")
RECIPE_KEYS = frozenset(f.name for f in dataclasses.fields(Recipe))
NO_DATA_HINT = "run `composer-growth prepare-data` there or give data.prepare to build it"
#: the modules whose import registers the suite's algorithms and callbacks
REGISTERING_MODULES = ("composer_growth.algorithms", "composer_growth.callbacks")


@dataclass
class ValidRecipe:
    """A validated recipe plus the objects built from it without touching data or models."""
    recipe: Recipe
    algorithms: list[Any] = field(default_factory=list)
    callbacks: list[Any] = field(default_factory=list)
    loggers: list[Any] = field(default_factory=list)
    world_size: int = 1
    facts: RunFacts | None = None  # what the algorithms were checked against
    algorithm_labels: list[str] = field(default_factory=list)  # recipe key of each algorithm (``stack_layers.1``)

    @property
    def device_train_batch_size(self) -> int:
        return self.recipe.global_train_batch_size // self.world_size


def construct(kind: str, name: str, table: dict[str, Any], kwargs: dict[str, Any], label: str | None = None) -> Any:
    """``table[name](**kwargs)``; an error names ``<kind>.<label>.<argument>`` (``label``: ``name``)."""
    if name not in table:
        raise ConfigError(f"{kind}.{name}", kwargs, f"unknown {kind[:-1]}; registered: {', '.join(sorted(table))}")
    ctor = table[name]
    label = name if label is None else label
    try:
        params = inspect.signature(ctor).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if not accepts_any:
            for arg in kwargs:
                if arg not in params:
                    allowed = ", ".join(p for p in params if p != "self")
                    raise ConfigError(f"{kind}.{label}.{arg}", kwargs[arg], f"unknown argument; allowed: {allowed}")
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
    try:
        return ctor(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{kind}.{label}.{e.key}", e.value, e.allowed) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{kind}.{label}", kwargs, str(e).splitlines()[0]) from None
    except ImportError as e:
        raise ConfigError(f"{kind}.{label}", kwargs, f"needs a package that is not installed: {e}") from None


def _check_data(recipe: Recipe, world_size: int = 1) -> None:
    from composer_growth.data.prepare import SOURCES, check_manifest, no_dataset

    data = recipe.data
    if data.remote is not None:
        return  # a remote dataset is checked by streaming when it is opened
    manifest = check_manifest(data.path, "data.path",
                              splits={data.train_split: "data.train_split", data.eval_split: "data.eval_split"},
                              tokenizer_key="tokenizer" if recipe.tokenizer is None else None)
    if manifest is None:
        if data.prepare is None and world_size > 1:
            return  # every rank learns which nodes lack it, and stops together (ensure_data)
        if data.prepare is None:
            raise no_dataset("data.path", data.path, NO_DATA_HINT)
        check(data.prepare.source in SOURCES, "data.prepare.source", data.prepare.source, f"one of {', '.join(SOURCES)}")
        check(data.prepare.seq_len >= 2, "data.prepare.seq_len", data.prepare.seq_len, "an integer >= 2")


def _fsdp_fields(version: int) -> list[str]:
    from composer.utils.parallelism import FSDP2Config, FSDPConfig

    if version == 2:
        return sorted(FSDP2Config.settable_attrs() - {"device_mesh"})
    return sorted(f.name for f in dataclasses.fields(FSDPConfig) if not f.name.startswith("_"))


def _on_gpu(recipe: Recipe) -> bool:
    import torch

    return recipe.device == "gpu" or (recipe.device is None and torch.cuda.is_available())


def _check_fsdp(recipe: Recipe) -> None:
    """``parallelism.fsdp``: a mapping with ``version`` 1 (Composer's FSDPConfig, CUDA only) or 2
    (``FSDP2Config``) and that version's keys."""
    fsdp = recipe.parallelism.get("fsdp")
    if fsdp is None:
        return
    check(isinstance(fsdp, dict), "parallelism.fsdp", fsdp, "a mapping (version: 2 and FSDP2Config keys)")
    version = fsdp.get("version", 1)
    check(is_int(version) and version in (1, 2), "parallelism.fsdp.version", version, "1 or 2")
    allowed = _fsdp_fields(version)
    for key, value in fsdp.items():
        check(key == "version" or key in allowed, f"parallelism.fsdp.{key}", value,
              f"not an FSDP{version} key; allowed: version, {', '.join(allowed)}")
    if version == 1 and not _on_gpu(recipe):
        raise ConfigError("parallelism.fsdp.version", version,
                          "FSDP1 needs CUDA and this machine has none; set parallelism.fsdp.version: 2 (FSDP2)")
    check(fsdp.get("state_dict_type", "sharded") in ("full", "sharded"), "parallelism.fsdp.state_dict_type",
          fsdp.get("state_dict_type"), "full or sharded")
    if version == 2:
        check(recipe.device_train_microbatch_size != "auto", "device_train_microbatch_size", "auto",
              "a positive integer under FSDP2 (Composer has no auto microbatching there)")
        from composer_growth.algorithms.shard_local import path_setting

        path_setting()  # COMPOSER_GROWTH_FSDP_PATH: how growth runs under FSDP2


def parallelism_config(recipe: Recipe) -> dict[str, Any] | None:
    """The Trainer's ``parallelism_config``: ``parallelism.fsdp`` with ``version: 2`` as an ``FSDP2Config``
    (whatever the FSDP_VERSION environment variable says), version 1 as Composer's ``FSDPConfig``."""
    if recipe.parallelism is None:
        return None
    out = dict(recipe.parallelism)
    fsdp = out.get("fsdp")
    if fsdp is not None:
        from composer.utils.parallelism import FSDP2Config, FSDPConfig

        kwargs = {k: v for k, v in fsdp.items() if k != "version"}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="FSDP2 Config/APIs are experimental")
            out["fsdp"] = FSDP2Config(**kwargs) if fsdp.get("version", 1) == 2 else FSDPConfig(**kwargs)
    return out


def flash_attention_fallback(recipe: Recipe) -> str | None:
    """Why ``model.attn_implementation: flash_attention_2`` cannot run this recipe here (None if it can):
    flash-attn needs its package, CUDA, and half precision (it has no fp32 kernels)."""
    import importlib.util

    reasons = []
    if importlib.util.find_spec("flash_attn") is None:
        reasons.append("flash-attn is not importable")
    if not _on_gpu(recipe):
        reasons.append("no CUDA device")
    if recipe.precision == "fp32":
        reasons.append("precision is fp32 (flash-attn runs in bf16 / fp16 only)")
    return "; ".join(reasons) or None


def _check_attention(recipe: Recipe) -> None:
    """``flash_attention_2`` that would fail at the first forward falls back to ``sdpa``, saying why in one line."""
    model = recipe.model
    check(model.attn_implementation in ("eager", "sdpa", "flash_attention_2"), "model.attn_implementation",
          model.attn_implementation, "one of eager, sdpa, flash_attention_2")
    if model.attn_implementation != "flash_attention_2":
        return
    why = flash_attention_fallback(recipe)
    if why is not None:
        model.attn_implementation = "sdpa"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"model.attn_implementation: flash_attention_2 -> sdpa ({why})", flush=True)


def _check_model(recipe: Recipe) -> None:
    model = recipe.model
    _check_attention(recipe)
    if model.pretrained is not None:
        check(os.path.exists(model.pretrained), "model.pretrained", model.pretrained, "a local model directory")
        return
    check(model.family in FAMILIES, "model.family", model.family, f"one of {', '.join(sorted(FAMILIES))}")
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model.family)
    for key, value in model.config.items():
        if not hasattr(defaults, key):
            raise ConfigError(f"model.config.{key}", value, f"not a {model.family} config attribute")
    if model.peft is not None:
        from peft import LoraConfig

        if "r" in model.peft:
            check(is_int(model.peft["r"]) and model.peft["r"] >= 1, "model.peft.r", model.peft["r"], "an integer >= 1")

        try:
            LoraConfig(**model.peft)
        except (TypeError, ValueError) as e:
            raise ConfigError("model.peft", model.peft, str(e).splitlines()[0]) from None


def load_all() -> None:
    """Import every module that registers an algorithm or a callback, and Composer's own (idempotent).

    The registry imports nothing: the modules register themselves when imported (``@register_algorithm``),
    so the layer that builds recipes imports them.
    """
    for module in REGISTERING_MODULES:
        importlib.import_module(module)
    register_composer_builtins()


def _check_save_folder(recipe: Recipe) -> None:
    """A local ``save_folder`` must be (or be creatable as) a writable folder: its nearest existing
    ancestor is a folder we may write into."""
    folder = recipe.save_folder
    if folder is None or "://" in folder:
        return
    path = os.path.abspath(folder.split("{", 1)[0] or ".")
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError("save_folder", folder, f"{path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("save_folder", folder, f"{path} is not writable")


def algorithm_entries(recipe: Recipe) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, registered name, options)`` of each algorithm of the recipe, in order. A list under a
    name (an algorithm that is ``repeatable``) gives one entry per item, labelled ``name.<index>``."""
    entries = []
    for name, value in recipe.algorithms.items():
        check(name in ALGORITHMS, f"algorithms.{name}", value,
              f"unknown algorithm; registered: {', '.join(sorted(ALGORITHMS))}")
        if isinstance(value, list):
            alg = ALGORITHMS.get(name)
            repeatable = isinstance(alg, type) and issubclass(alg, SuiteAlgorithm) and alg.repeatable
            check(repeatable, f"algorithms.{name}", value,
                  f"a mapping of options (a list only for: {', '.join(_repeatable())})")
            check(len(value) > 0, f"algorithms.{name}", value, "a mapping of options or a non-empty list of them")
            items = [(f"{name}.{i}", item) for i, item in enumerate(value)]
        else:
            items = [(name, value)]
        for label, options in items:
            options = {} if options is None else options  # `name:` alone switches it on with defaults
            check(isinstance(options, dict), f"algorithms.{label}", options, "expected a mapping")
            entries.append((label, name, options))
    return entries


def _repeatable() -> list[str]:
    return sorted(n for n, a in ALGORITHMS.items() if isinstance(a, type) and issubclass(a, SuiteAlgorithm)
                  and a.repeatable)


def _check_files(recipe: Recipe) -> None:
    """An algorithm argument that names a .json / .yaml file (an orchestrator schedule) names one that exists."""
    for name, _, kwargs in algorithm_entries(recipe):
        for arg, value in kwargs.items():
            if isinstance(value, str) and value.endswith((".json", ".yaml", ".yml")) and not os.path.isfile(value):
                raise ConfigError(f"algorithms.{name}.{arg}", value,
                                  f"no such file; give the path of a .json / .yaml file (relative paths are read "
                                  f"from {os.getcwd()})")


def validate(data: dict[str, Any], world_size: int | None = None) -> ValidRecipe:
    """Check every key of a recipe and build its algorithms, callbacks and loggers."""
    load_all()
    recipe: Recipe = from_mapping(Recipe, data)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))

    max_duration = parse_time(recipe.max_duration, "max_duration")
    check(max_duration.unit.value != "dur", "max_duration", recipe.max_duration, "a time in ba, ep, tok or sp")
    check(max_duration.value > 0, "max_duration", recipe.max_duration, "a positive time")
    for key in ("eval_interval", "save_interval", "console_log_interval"):
        check(parse_time(getattr(recipe, key), key).value > 0, key, getattr(recipe, key), "a positive time")
    parse_time(recipe.scheduler.t_warmup, "scheduler.t_warmup")

    gbs = recipe.global_train_batch_size
    check(gbs > 0, "global_train_batch_size", gbs, "a positive integer")
    check(gbs % world_size == 0, "global_train_batch_size", gbs, f"must divide by the world size ({world_size})")
    mbs = recipe.device_train_microbatch_size
    if isinstance(mbs, str):
        check(mbs == "auto", "device_train_microbatch_size", mbs, "a positive integer or 'auto'")
    else:
        check(mbs > 0, "device_train_microbatch_size", mbs, "a positive integer or 'auto'")
        check((gbs // world_size) % mbs == 0 or mbs >= gbs // world_size, "device_train_microbatch_size", mbs,
              f"must divide the per-device batch size ({gbs // world_size})")
    check(recipe.device_eval_batch_size > 0, "device_eval_batch_size", recipe.device_eval_batch_size,
          "a positive integer")
    check(recipe.precision in PRECISIONS, "precision", recipe.precision, f"one of {', '.join(PRECISIONS)}")
    check(recipe.device is None or recipe.device in DEVICES, "device", recipe.device, f"null or one of {', '.join(DEVICES)}")
    check(recipe.optimizer.name in OPTIMIZERS, "optimizer.name", recipe.optimizer.name, f"one of {', '.join(OPTIMIZERS)}")
    check(recipe.optimizer.lr > 0, "optimizer.lr", recipe.optimizer.lr, "a positive number")
    check(len(recipe.optimizer.betas) == 2, "optimizer.betas", recipe.optimizer.betas, "two numbers")
    check(recipe.scheduler.name in SCHEDULERS, "scheduler.name", recipe.scheduler.name, f"one of {', '.join(SCHEDULERS)}")
    if recipe.autoresume:
        check(recipe.save_folder is not None, "autoresume", True, "needs save_folder")
        check(recipe.run_name is not None, "autoresume", True, "needs run_name")
    _check_save_folder(recipe)
    if recipe.parallelism is not None:
        for key in recipe.parallelism:
            check(key in PARALLELISM_KEYS, f"parallelism.{key}", recipe.parallelism[key],
                  f"unknown key; allowed: {', '.join(PARALLELISM_KEYS)}")
        _check_fsdp(recipe)
    if isinstance(recipe.compile, dict):
        accepted = set(inspect.signature(__import__("torch").compile).parameters) - {"model"}
        for key, value in recipe.compile.items():
            check(key in accepted, f"compile.{key}", value, f"a torch.compile option: {', '.join(sorted(accepted))}")
    _check_model(recipe)
    _check_data(recipe, world_size)

    _check_files(recipe)
    entries = algorithm_entries(recipe)
    algorithms = [construct("algorithms", n, ALGORITHMS, kw, label=label) for label, n, kw in entries]
    callbacks = [construct("callbacks", n, CALLBACKS, kw) for n, kw in recipe.callbacks.items()]
    loggers = [construct("loggers", n, LOGGERS, kw) for n, kw in recipe.loggers.items()]
    facts = RunFacts.from_recipe(recipe, world_size)
    facts.adapters_later = any(isinstance(a, SuiteAlgorithm) and a.adds_adapters_later() for a in algorithms)
    labels = [label for label, _, _ in entries]
    for label, alg in zip(labels, algorithms):
        validate_algorithm(label, alg, facts)
    return ValidRecipe(recipe=recipe, algorithms=algorithms, callbacks=callbacks, loggers=loggers, world_size=world_size,
                       facts=facts, algorithm_labels=labels)


def validate_algorithm(name: str, algorithm: Any, facts: RunFacts) -> None:
    """``algorithm.validate_run(facts)`` for an algorithm of the suite; an error names the recipe key it is about."""
    if not isinstance(algorithm, SuiteAlgorithm):
        return
    try:
        algorithm.validate_run(facts)
    except ConfigError as e:
        top = e.key.split(".")[0].split("[")[0]
        key = e.key if top in RECIPE_KEYS else f"algorithms.{name}.{e.key}"
        raise ConfigError(key, e.value, e.allowed) from None


def init_dist(valid: ValidRecipe) -> None:
    """Start torch.distributed before anything (data preparation, StreamingDataset) needs it."""
    from composer.utils import dist

    if dist.get_world_size() > 1 and not dist.is_initialized():
        import torch
        from composer.devices import DeviceCPU, DeviceGPU

        on_gpu = valid.recipe.device == "gpu" or (valid.recipe.device is None and torch.cuda.is_available())
        dist.initialize_dist(DeviceGPU() if on_gpu else DeviceCPU(), timeout=valid.recipe.dist_timeout)


def ensure_data(valid: ValidRecipe) -> None:
    """Build the dataset named by the recipe where it is missing; every rank takes the same path.

    Each node's local rank 0 looks at its own copy of ``data.path``; the answers are gathered, so
    every rank knows which nodes lack the data. With no ``data.prepare`` block every rank stops with
    the same one-line error. Otherwise local rank 0 of each node that lacks it builds it, under a
    file lock: nodes sharing a filesystem build a shared folder once, and the others reuse it.
    """
    from composer_growth.data.prepare import prepare_dataset, prepare_once

    data = valid.recipe.data
    if data.remote is not None:
        return
    p = data.prepare
    build = None if p is None else lambda: prepare_dataset(
        data.path, source=p.source, seq_len=p.seq_len, vocab_size=p.vocab_size, tokenizer=p.tokenizer,
        max_bytes=p.max_bytes, val_percent=p.val_percent, files=p.files, hub_name=p.hub_name, hub_split=p.hub_split,
        text_field=p.text_field)
    if prepare_once(data.path, build, "data.path", NO_DATA_HINT):
        _check_data(valid.recipe)  # the splits of what was built


def check_save_folder(valid: ValidRecipe) -> None:
    """On several nodes, ``autoresume`` needs a save folder every node sees (shared or remote).

    Each node's local rank 0 writes a marker into the local ``save_folder`` and looks for the other
    nodes' markers; unless every node sees every marker, every rank stops with one line.
    """
    import uuid

    from composer.utils import dist, format_name_with_dist

    r = valid.recipe
    nodes = dist.get_world_size() // max(dist.get_local_world_size(), 1)
    if not r.autoresume or r.save_folder is None or "://" in r.save_folder or nodes <= 1:
        return
    folder = format_name_with_dist(r.save_folder, r.run_name)
    token = [uuid.uuid4().hex]
    dist.broadcast_object_list(token, src=0)
    node, local0 = dist.get_node_rank(), dist.get_local_rank() == 0
    marker = os.path.join(folder, f".node-check-{token[0]}-{node}")
    if local0:
        os.makedirs(folder, exist_ok=True)
        open(marker, "w").close()
    dist.barrier()
    seen = None
    if local0:
        seen = sum(name.startswith(f".node-check-{token[0]}-") for name in os.listdir(folder))
    counts = [c for c in dist.all_gather_object(seen) if c is not None]
    dist.barrier()
    if local0:
        os.remove(marker)
    if min(counts) < nodes:
        raise ConfigError("save_folder", r.save_folder,
                          f"autoresume on {nodes} nodes needs a folder all nodes share (or a remote URI); "
                          "here each node sees only its own")


def build_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    path = recipe.tokenizer or os.path.join(recipe.data.path, "tokenizer")
    return AutoTokenizer.from_pretrained(path)


def build_model(recipe: Recipe, tokenizer, peft: bool = True):
    """An HF causal LM (from a config or a local path) in Composer's ``HuggingFaceModel`` (with
    ``flops_per_batch``: :class:`~composer_growth.recipe.model.CausalLM`).

    ``peft=False`` leaves the ``model.peft`` adapters off (an algorithm adds them mid-run).
    """
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
    from transformers import AutoConfig, AutoModelForCausalLM

    from composer_growth.recipe.model import CausalLM

    cfg = recipe.model
    if cfg.pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, attn_implementation=cfg.attn_implementation)
    else:
        config = AutoConfig.for_model(
            cfg.family, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg.config,
        )
        model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    peft_config = None
    if cfg.peft is not None and peft:
        from peft import LoraConfig

        peft_config = LoraConfig(**{"task_type": "CAUSAL_LM", **cfg.peft})
    composer_model = CausalLM(
        model, tokenizer=tokenizer, use_logits=True, shift_labels=True, peft_config=peft_config,
        metrics=[LanguageCrossEntropy()], eval_metrics=[LanguageCrossEntropy(), LanguagePerplexity()],
        should_save_peft_only=False,
    )
    if getattr(model.config, "model_type", None) in FAMILIES:
        mark_fsdp_blocks(composer_model)  # FSDP wraps one unit per block (read only under FSDP)
    return composer_model


def build_optimizer(recipe: Recipe, model):
    from composer.optim import DecoupledAdamW, DecoupledSGDW
    import torch

    o = recipe.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "decoupled_adamw":
        return DecoupledAdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return DecoupledSGDW(params, lr=o.lr, momentum=o.betas[0], weight_decay=o.weight_decay)


def build_trainer(valid: ValidRecipe):
    """Build data, model, optimizer and the Composer ``Trainer`` a validated recipe describes."""
    from composer import Trainer
    from composer.core import Evaluator
    from composer.utils import reproducibility

    from composer_growth.callbacks import ResumeRng, RunSummary
    from composer_growth.data.loaders import build_lm_dataloader

    r = valid.recipe
    init_dist(valid)
    ensure_data(valid)
    check_save_folder(valid)
    resume = resume_path(r)
    reproducibility.seed_all(r.seed)
    tokenizer = build_tokenizer(r)
    model = build_model(r, tokenizer, peft=not any(isinstance(a, SuiteAlgorithm) and a.defers_peft for a in valid.algorithms))
    optimizer = build_optimizer(r, model)
    train_loader = build_lm_dataloader(r.data.path, r.data.train_split, valid.device_train_batch_size,
                                       shuffle=r.data.shuffle, seed=r.seed, num_workers=r.data.num_workers,
                                       remote=r.data.remote)
    eval_loader = build_lm_dataloader(r.data.path, r.data.eval_split, r.device_eval_batch_size, shuffle=False,
                                      seed=r.seed, num_workers=r.data.num_workers, remote=r.data.remote,
                                      drop_last=False)
    evaluator = Evaluator(label="eval", dataloader=eval_loader,
                          metric_names=["LanguageCrossEntropy", "LanguagePerplexity"],
                          subset_num_batches=r.eval_subset_num_batches)
    if (r.parallelism or {}).get("fsdp") is not None:  # a sharded resume with a progress bar (composer_hooks)
        from composer_growth.algorithms.composer_hooks import install_sharded_load_fixes

        install_sharded_load_fixes()
    callbacks = list(valid.callbacks)
    if not any(isinstance(c, RunSummary) for c in callbacks):
        callbacks.append(RunSummary(path=r.summary_file))
    if not any(isinstance(c, ResumeRng) for c in callbacks):  # a resume mid-epoch draws what the run drew
        callbacks.append(ResumeRng())
    trainer = Trainer(
        run_name=r.run_name,
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=evaluator,
        eval_interval=r.eval_interval,
        eval_subset_num_batches=r.eval_subset_num_batches,
        max_duration=r.max_duration,
        optimizers=optimizer,
        schedulers=build_scheduler(r),
        algorithms=valid.algorithms,
        callbacks=callbacks,
        loggers=valid.loggers,
        progress_bar=r.progress_bar,
        log_to_console=not r.progress_bar,
        console_log_interval=r.console_log_interval,
        device_train_microbatch_size=r.device_train_microbatch_size,
        precision=r.precision,
        device=r.device,
        seed=r.seed,
        save_folder=r.save_folder,
        save_interval=r.save_interval,
        # the folder's count is kept by KeepCheckpoints (across restarts); Composer's counts only its own saves
        save_num_checkpoints_to_keep=-1 if r.save_num_checkpoints_to_keep > 0 else r.save_num_checkpoints_to_keep,
        save_overwrite=r.save_overwrite,
        autoresume=r.autoresume and resume is None and "://" in (r.save_folder or ""),
        load_path=resume or r.load_path,
        load_weights_only=False if resume else r.load_weights_only,
        parallelism_config=parallelism_config(r),
        compile_config=dict(r.compile) if isinstance(r.compile, dict) else ({} if r.compile else None),
        dist_timeout=r.dist_timeout,
        python_log_level="error",
    )
    if r.save_folder is not None and "://" not in r.save_folder and r.save_num_checkpoints_to_keep > 0:
        from composer.utils import format_name_with_dist

        from composer_growth.recipe.checkpoints import KeepCheckpoints

        # after Composer's saver (the Trainer appended it last), so the count includes the new checkpoint
        folder = format_name_with_dist(r.save_folder, r.run_name)
        trainer.state.callbacks.append(KeepCheckpoints(folder, r.save_num_checkpoints_to_keep))
    return trainer


def resume_path(recipe: Recipe) -> str | None:
    """With ``autoresume`` and a local ``save_folder``: the newest readable checkpoint there, which
    every rank loads (damaged newer ones set aside, each with one line); None when there is none
    (the run starts afresh, from ``load_path`` if given). A remote folder keeps Composer's autoresume
    (without the copy of the store's latest that an earlier restart downloaded)."""
    from composer.utils import format_name_with_dist

    from composer_growth.recipe.checkpoints import CheckpointError, choose_resume, drop_stale_download, readable_or_why

    found = None
    if recipe.autoresume and recipe.save_folder is not None and "://" not in recipe.save_folder:
        found = choose_resume(format_name_with_dist(recipe.save_folder, recipe.run_name))
    elif recipe.autoresume and recipe.save_folder is not None:
        drop_stale_download(recipe.save_folder, recipe.run_name)
    if found is None and recipe.load_path is not None and os.path.exists(recipe.load_path):
        why = readable_or_why(recipe.load_path)
        if why is not None:
            raise CheckpointError(f"load_path {recipe.load_path}: unreadable ({why})")
    return found


def run(valid: ValidRecipe):
    """Train as the validated recipe says; an eval before the first step when ``eval_first`` is set."""
    from composer_growth.recipe.checkpoints import disk_full

    trainer = build_trainer(valid)
    try:
        if valid.recipe.eval_first and int(trainer.state.timestamp.batch) == 0:
            trainer.eval(subset_num_batches=valid.recipe.eval_subset_num_batches)
        trainer.fit()
    except Exception as e:
        full = disk_full(valid.recipe.save_folder, valid.recipe.run_name, e)
        if full is not None:  # torch's zip writer words a full disk as "unexpected pos"
            raise full from e
        raise
    trainer.close()
    return trainer

"""YAML -> validated :class:`Plan` -> Composer ``Trainer``.

``validate`` reads nothing but the recipe and the dataset's manifest, so a bad recipe
fails in seconds, before a model is built or data read.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

from composer_growth.errors import ConfigError, check
from composer_growth.families import FAMILIES
from composer_growth.recipe.schema import Recipe, from_mapping
from composer_growth.registry import ALGORITHMS, CALLBACKS, LOGGERS, load_all
from composer_growth.timeutil import parse_time

OPTIMIZERS = ("decoupled_adamw", "adamw", "decoupled_sgdw")
SCHEDULERS = ("constant", "constant_with_warmup", "linear_with_warmup", "cosine_with_warmup")
PRECISIONS = ("fp32", "amp_fp16", "amp_bf16", "amp_fp8")
DEVICES = ("cpu", "gpu", "mps")
PARALLELISM_KEYS = ("fsdp", "tp")
RECIPE_KEYS = frozenset(f.name for f in dataclasses.fields(Recipe))


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML recipe, apply ``key=value`` overrides and resolve interpolations."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not os.path.isfile(path):
        raise ConfigError("recipe", path, "no such file")
    try:
        cfg = OmegaConf.load(path)
        for item in overrides:
            if "=" not in item:
                raise ConfigError("override", item, "expected key=value")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "recipe"
        raise ConfigError(str(key), path, str(e).splitlines()[0]) from None
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise ConfigError("override", " ".join(overrides), str(e).splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError("recipe", path, "the YAML file must hold a mapping")
    return data


@dataclass
class Plan:
    """A validated recipe plus the objects built from it without touching data or models."""
    recipe: Recipe
    algorithms: list[Any] = field(default_factory=list)
    callbacks: list[Any] = field(default_factory=list)
    loggers: list[Any] = field(default_factory=list)
    world_size: int = 1

    @property
    def device_train_batch_size(self) -> int:
        return self.recipe.global_train_batch_size // self.world_size


def _construct(kind: str, name: str, table: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    if name not in table:
        raise ConfigError(f"{kind}.{name}", kwargs, f"unknown {kind[:-1]}; registered: {', '.join(sorted(table))}")
    ctor = table[name]
    try:
        params = inspect.signature(ctor).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if not accepts_any:
            for arg in kwargs:
                if arg not in params:
                    allowed = ", ".join(p for p in params if p != "self")
                    raise ConfigError(f"{kind}.{name}.{arg}", kwargs[arg], f"unknown argument; allowed: {allowed}")
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
    try:
        return ctor(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{kind}.{name}.{e.key}", e.value, e.allowed) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{kind}.{name}", kwargs, str(e).splitlines()[0]) from None
    except ImportError as e:
        raise ConfigError(f"{kind}.{name}", kwargs, f"needs a package that is not installed: {e}") from None


def _check_data(recipe: Recipe) -> None:
    from composer_growth.data.prepare import read_manifest

    data = recipe.data
    if data.remote is not None:
        return  # a remote dataset is checked by streaming when it is opened
    manifest = read_manifest(data.path)
    if manifest is None:
        if data.prepare is None:
            raise ConfigError("data.path", data.path,
                              "no dataset there (no manifest.json); run `composer-growth prepare-data` "
                              "or give data.prepare to build it")
        from composer_growth.data.prepare import SOURCES
        check(data.prepare.source in SOURCES, "data.prepare.source", data.prepare.source, f"one of {', '.join(SOURCES)}")
        check(data.prepare.seq_len >= 2, "data.prepare.seq_len", data.prepare.seq_len, "an integer >= 2")
        return
    for key in ("train_split", "eval_split"):
        split = getattr(data, key)
        if split not in manifest.get("splits", {}):
            raise ConfigError(f"data.{key}", split, f"splits in {data.path}: {', '.join(manifest.get('splits', {}))}")


def _check_model(recipe: Recipe) -> None:
    model = recipe.model
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

        try:
            LoraConfig(**model.peft)
        except (TypeError, ValueError) as e:
            raise ConfigError("model.peft", model.peft, str(e).splitlines()[0]) from None
    check(model.attn_implementation in ("eager", "sdpa", "flash_attention_2"), "model.attn_implementation",
          model.attn_implementation, "one of eager, sdpa, flash_attention_2")


def validate(data: dict[str, Any], world_size: int | None = None) -> Plan:
    """Check every key of a recipe and build its algorithms, callbacks and loggers."""
    load_all()
    recipe: Recipe = from_mapping(Recipe, data)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))

    max_duration = parse_time(recipe.max_duration, "max_duration")
    check(max_duration.unit.value != "dur", "max_duration", recipe.max_duration, "a time in ba, ep, tok or sp")
    check(max_duration.value > 0, "max_duration", recipe.max_duration, "a positive time")
    parse_time(recipe.eval_interval, "eval_interval")
    parse_time(recipe.save_interval, "save_interval")
    parse_time(recipe.console_log_interval, "console_log_interval")
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
    if recipe.parallelism is not None:
        for key in recipe.parallelism:
            check(key in PARALLELISM_KEYS, f"parallelism.{key}", recipe.parallelism[key],
                  f"unknown key; allowed: {', '.join(PARALLELISM_KEYS)}")
    _check_model(recipe)
    _check_data(recipe)

    algorithms = [_construct("algorithms", n, ALGORITHMS, kw) for n, kw in recipe.algorithms.items()]
    callbacks = [_construct("callbacks", n, CALLBACKS, kw) for n, kw in recipe.callbacks.items()]
    loggers = [_construct("loggers", n, LOGGERS, kw) for n, kw in recipe.loggers.items()]
    for name, alg in zip(recipe.algorithms, algorithms):
        hook = getattr(alg, "validate_run", None)
        if hook is not None:
            try:
                hook(max_duration=max_duration, recipe=recipe)
            except ConfigError as e:
                top = e.key.split(".")[0].split("[")[0]
                key = e.key if top in RECIPE_KEYS else f"algorithms.{name}.{e.key}"
                raise ConfigError(key, e.value, e.allowed) from None
    return Plan(recipe=recipe, algorithms=algorithms, callbacks=callbacks, loggers=loggers, world_size=world_size)


def init_dist(plan: Plan) -> None:
    """Start torch.distributed before anything (data preparation, StreamingDataset) needs it."""
    from composer.utils import dist

    if dist.get_world_size() > 1 and not dist.is_initialized():
        import torch
        from composer.devices import DeviceCPU, DeviceGPU

        on_gpu = plan.recipe.device == "gpu" or (plan.recipe.device is None and torch.cuda.is_available())
        dist.initialize_dist(DeviceGPU() if on_gpu else DeviceCPU(), timeout=plan.recipe.dist_timeout)


def ensure_data(plan: Plan) -> None:
    """Build the dataset named by the recipe if it is missing: local rank 0 builds, the rest wait.

    Whether it is missing is decided once, on global rank 0, and shared, so every rank takes
    the same path to the barrier.
    """
    from composer.utils import dist

    from composer_growth.data.prepare import prepare_dataset, read_manifest

    data = plan.recipe.data
    missing = [data.remote is None and read_manifest(data.path) is None]
    dist.broadcast_object_list(missing, src=0)
    if not missing[0]:
        return
    if dist.get_local_rank() == 0:
        p = data.prepare
        prepare_dataset(data.path, source=p.source, seq_len=p.seq_len, vocab_size=p.vocab_size,
                        tokenizer=p.tokenizer, max_bytes=p.max_bytes, val_percent=p.val_percent, files=p.files,
                        hub_name=p.hub_name, hub_split=p.hub_split, text_field=p.text_field)
    dist.barrier()


def build_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    path = recipe.tokenizer or os.path.join(recipe.data.path, "tokenizer")
    return AutoTokenizer.from_pretrained(path)


def build_model(recipe: Recipe, tokenizer, peft: bool = True):
    """An HF causal LM (from a config or a local path) in Composer's ``HuggingFaceModel``.

    ``peft=False`` leaves the ``model.peft`` adapters off (an algorithm adds them mid-run).
    """
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
    from composer.models import HuggingFaceModel
    from transformers import AutoConfig, AutoModelForCausalLM

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
    return HuggingFaceModel(
        model, tokenizer=tokenizer, use_logits=True, shift_labels=True, peft_config=peft_config,
        metrics=[LanguageCrossEntropy()], eval_metrics=[LanguageCrossEntropy(), LanguagePerplexity()],
        should_save_peft_only=False,
    )


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


def build_scheduler(recipe: Recipe):
    from composer.optim import (ConstantScheduler, ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler,
                                LinearWithWarmupScheduler)

    s = recipe.scheduler
    if s.name == "constant":
        return ConstantScheduler()
    if s.name == "constant_with_warmup":
        return ConstantWithWarmupScheduler(t_warmup=s.t_warmup)
    if s.name == "linear_with_warmup":
        return LinearWithWarmupScheduler(t_warmup=s.t_warmup, alpha_f=s.alpha_f)
    return CosineAnnealingWithWarmupScheduler(t_warmup=s.t_warmup, alpha_f=s.alpha_f)


def build_trainer(plan: Plan):
    """Build data, model, optimizer and the Composer ``Trainer`` a validated plan describes."""
    from composer import Trainer
    from composer.core import Evaluator
    from composer.utils import reproducibility

    from composer_growth.algorithms import batch_length_order
    from composer_growth.callbacks import RunSummary
    from composer_growth.data.loaders import build_lm_dataloader

    r = plan.recipe
    init_dist(plan)
    ensure_data(plan)
    reproducibility.seed_all(r.seed)
    tokenizer = build_tokenizer(r)
    model = build_model(r, tokenizer, peft=not any(getattr(a, "defers_peft", False) for a in plan.algorithms))
    optimizer = build_optimizer(r, model)
    train_loader = build_lm_dataloader(r.data.path, r.data.train_split, plan.device_train_batch_size,
                                       shuffle=r.data.shuffle, seed=r.seed, num_workers=r.data.num_workers,
                                       remote=r.data.remote)
    eval_loader = build_lm_dataloader(r.data.path, r.data.eval_split, r.device_eval_batch_size, shuffle=False,
                                      seed=r.seed, num_workers=r.data.num_workers, remote=r.data.remote,
                                      drop_last=False)
    evaluator = Evaluator(label="eval", dataloader=eval_loader,
                          metric_names=["LanguageCrossEntropy", "LanguagePerplexity"],
                          subset_num_batches=r.eval_subset_num_batches)
    callbacks = list(plan.callbacks)
    if not any(isinstance(c, RunSummary) for c in callbacks):
        callbacks.append(RunSummary(path=r.summary_file))
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
        algorithms=plan.algorithms,
        algorithm_passes=[batch_length_order],
        callbacks=callbacks,
        loggers=plan.loggers,
        progress_bar=r.progress_bar,
        log_to_console=not r.progress_bar,
        console_log_interval=r.console_log_interval,
        device_train_microbatch_size=r.device_train_microbatch_size,
        precision=r.precision,
        device=r.device,
        seed=r.seed,
        save_folder=r.save_folder,
        save_interval=r.save_interval,
        save_num_checkpoints_to_keep=r.save_num_checkpoints_to_keep,
        save_overwrite=r.save_overwrite,
        autoresume=r.autoresume,
        load_path=r.load_path,
        load_weights_only=r.load_weights_only,
        parallelism_config=r.parallelism,
        compile_config={} if r.compile else None,
        dist_timeout=r.dist_timeout,
        python_log_level="error",
    )
    return trainer


def run(plan: Plan):
    """Train as the plan says; an eval before the first step when ``eval_first`` is set."""
    trainer = build_trainer(plan)
    if plan.recipe.eval_first and int(trainer.state.timestamp.batch) == 0:
        trainer.eval(subset_num_batches=plan.recipe.eval_subset_num_batches)
    trainer.fit()
    trainer.close()
    return trainer

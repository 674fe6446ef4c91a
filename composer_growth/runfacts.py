"""What a run is, in one record, for every algorithm to check itself against once before training.

:class:`RunFacts` holds the run's length, world size, batch sizes, the data's manifest and sequence
length, the model's config and, from a recipe, the recipe's model, data and parallelism blocks.
It is built

* from a recipe before anything else (:meth:`RunFacts.from_recipe`: ``recipe.validate`` and
  ``composer-growth plan``), or
* from the Trainer's ``State`` at ``FIT_START`` (:meth:`RunFacts.from_state`) for a plain Composer
  script, where only the clock, the batch sizes and the model are known.

Each algorithm's ``validate_run(facts)`` reads this record, never a recipe, and keeps the record it
was checked against (``run_facts``); :func:`check_at_fit_start` checks it at ``FIT_START`` only when
no recipe did, or when the Trainer knows the run's length better than the recipe could.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from composer.core import State, Time

from composer_growth.timeutil import epoch_batches, parse_time


@dataclass
class RunFacts:
    """The facts of one run that algorithms check their options against.

    The fields after ``source`` are a recipe's (``origin == "recipe"``); from a State or an
    llm-foundry YAML they keep their defaults, which say nothing about the run.
    """
    max_duration: Time
    world_size: int = 1
    global_batch: int | None = None
    microbatch: int | str | None = None  # rows per microbatch on a device, "auto", or None (unknown)
    batches_per_epoch: int | None = None
    data_seq_len: int | None = None  # tokens per row of the training data
    model_config: Any = None  # the model's transformers (or llm-foundry) config; None when unknown
    origin: str = "state"  # "recipe" (every field known), "state" (FIT_START) or "foundry" (an llm-foundry YAML)
    source: str = ""  # the run's name, for messages
    # -- a recipe's --------------------------------------------------------------------------
    manifest: dict[str, Any] | None = None  # data.path's manifest.json (None: not there yet or remote)
    data_path: str | None = None
    data_prepare: dict[str, Any] = field(default_factory=dict)  # data.prepare's options ({}: none)
    data_shuffle: bool = True
    data_num_workers: int = 0
    tokenizer: str | None = None  # the tokenizer of the data's tokens
    model_family: str | None = None  # model.family when the model is built from a config (not pretrained)
    pretrained: str | None = None  # model.pretrained
    peft: dict[str, Any] | None = None  # model.peft
    parallelism: dict[str, Any] = field(default_factory=dict)  # the recipe's parallelism block
    save_folder: str | None = None
    adapters_later: bool = False  # an algorithm of the recipe adds LoRA adapters mid-run (lora_merge start_at)

    @property
    def has_recipe(self) -> bool:
        """Whether the recipe's own fields (model, data, parallelism blocks) are known."""
        return self.origin == "recipe"

    @property
    def rows_per_device(self) -> int | None:
        return None if self.global_batch is None else self.global_batch // max(self.world_size, 1)

    @classmethod
    def from_recipe(cls, recipe: Any, world_size: int = 1) -> "RunFacts":
        """The facts of a recipe (a :class:`composer_growth.recipe.schema.Recipe` whose keys were checked),
        read from it and the data's manifest alone: no data read, no model built."""
        from composer_growth.data.prepare import read_manifest

        data, model = recipe.data, recipe.model
        manifest = read_manifest(data.path)
        prepare = _asdict(data.prepare)
        if manifest is not None:
            seq_len, vocab = manifest.get("seq_len"), manifest.get("vocab_size")
            sequences = manifest.get("splits", {}).get(data.train_split, {}).get("sequences")
        else:
            seq_len, vocab, sequences = prepare.get("seq_len"), prepare.get("vocab_size"), None
        gbs = recipe.global_train_batch_size
        return cls(max_duration=parse_time(recipe.max_duration, "max_duration"), world_size=world_size,
                   global_batch=gbs, microbatch=recipe.device_train_microbatch_size,
                   batches_per_epoch=_batches_per_epoch(sequences, gbs, world_size),
                   data_seq_len=seq_len, model_config=_recipe_model_config(model, vocab), origin="recipe",
                   source=recipe.run_name or "", manifest=manifest, data_path=data.path, data_prepare=prepare,
                   data_shuffle=data.shuffle, data_num_workers=data.num_workers,
                   tokenizer=recipe.tokenizer or os.path.join(data.path, "tokenizer"),
                   model_family=model.family if model.pretrained is None else None, pretrained=model.pretrained,
                   peft=model.peft, parallelism=dict(recipe.parallelism or {}), save_folder=recipe.save_folder)

    @classmethod
    def from_state(cls, state: State) -> "RunFacts":
        """The facts a Trainer's State holds at ``FIT_START`` (a plain Composer script: no recipe)."""
        from composer.utils import dist

        from composer_growth.unwrap import unwrap_hf

        world = dist.get_world_size()
        rows = getattr(state.train_dataloader, "batch_size", None)
        mb = state.device_train_microbatch_size
        config = getattr(unwrap_hf(state.model), "config", None) if state.model is not None else None
        return cls(max_duration=state.max_duration, world_size=world,
                   global_batch=rows * world if isinstance(rows, int) else None,
                   microbatch="auto" if state.auto_microbatching else mb, batches_per_epoch=epoch_batches(state),
                   model_config=config, origin="state", source=state.run_name or "")


def _batches_per_epoch(sequences: int | None, global_batch: int, world_size: int) -> int | None:
    """Batches in an epoch of the recipe's train loader: StreamingDataset gives each rank
    ceil(sequences / world) samples, and the loader drops the last partial batch."""
    rows = global_batch // max(world_size, 1)
    if not sequences or rows <= 0:
        return None
    return -(-sequences // max(world_size, 1)) // rows or None


def _asdict(block: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(block) if block is not None else {}


def _recipe_model_config(model: Any, vocab_size: int | None) -> Any:
    """The config of a recipe's model (``model.pretrained``'s, or ``model.family`` with ``model.config``,
    the data's vocabulary size unless the config gives one); None when it cannot be built (the recipe's
    own model checks report why)."""
    from transformers import AutoConfig

    try:
        if model.pretrained is not None:
            return AutoConfig.from_pretrained(model.pretrained)
        extra = {"vocab_size": vocab_size} if vocab_size and "vocab_size" not in model.config else {}
        return AutoConfig.for_model(model.family, **extra, **model.config)
    except Exception:  # noqa: BLE001 - a bad model block is the recipe checks' to report
        return None


def peft_key(model: Any) -> str:
    """The model's LoRA block as its run's config names it: llm-foundry's ``model.peft_config`` (its
    ``hf_causal_lm``), our recipes' ``model.peft``."""
    from composer_growth.unwrap import unwrap_composer

    return "model.peft_config" if type(unwrap_composer(model)).__module__.startswith("llmfoundry") else "model.peft"


def check_at_fit_start(algorithm: Any, state: State) -> None:
    """At ``FIT_START``: ``algorithm.validate_run`` against the State's facts, unless the facts it was
    checked against (a recipe's, while the Trainer was built) already said the same about the run's
    length: the same ``max_duration`` and the same batches per epoch."""
    if state.max_duration is None:
        return
    seen = algorithm.run_facts
    if (seen is not None and seen.max_duration == state.max_duration
            and seen.batches_per_epoch == epoch_batches(state)):
        return
    algorithm.validate_run(RunFacts.from_state(state))

"""The context schedule's phase datasets: checked before training, built on first use, one loader source each.

:class:`PhaseDatasets` is the part of
:class:`~composer_growth.algorithms.context_schedule.ContextLengthSchedule` that knows about phases
with a ``dataset``: that each exists (or has a ``prepare`` block to build it), is long enough and
shares the tokenizer, that its loader gets whole rows per rank at the run's tokens per step, the
loader source of each phase, and (for ``composer-growth plan``) the batches that source yields.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from composer.core import State
from composer.utils import dist

from composer_growth.algorithms.phases import Phase
from composer_growth.data.phased import BASE
from composer_growth.errors import ConfigError, check
from composer_growth.unwrap import unwrap_composer


class PhaseDatasets:
    """Phase datasets of a context schedule (a base of ``ContextLengthSchedule``, which holds the state it reads:
    ``phases``, ``_recipe``, ``tokens_per_step``, ``train_split``, ``_sources``, ``_phase_sources``, ``_tokens``,
    ``_data_lengths``)."""

    def _uses_datasets(self) -> bool:
        return any(p.dataset is not None for p in self.phases)

    def _dataset_paths(self) -> dict[str, list[Phase]]:
        paths: dict[str, list[Phase]] = {}
        for p in self.phases:
            if p.dataset is not None:
                paths.setdefault(p.dataset, []).append(p)
        return paths

    def _prepare_options(self, path: str, users: list[Phase]) -> dict[str, Any] | None:
        """prepare-data options for a missing phase dataset (None: no phase says how to build it)."""
        blocks = [p.prepare for p in users if p.prepare is not None]
        if not blocks:
            return None
        options = dict(self._recipe.get("prepare") or {})
        options.pop("seq_len", None)  # data.prepare's length is data.path's, not this dataset's
        options["tokenizer"] = self._recipe.get("tokenizer")  # token ids must agree across phases
        for block in blocks:
            options.update(block)
        if options.get("seq_len") is None:
            options["seq_len"] = max(p.seq_length for p in users)
        return options

    def _check_data(self) -> None:
        """Phase datasets exist (or say how to be built), are long enough, and share the tokenizer."""
        from composer_growth.data.prepare import SOURCES, check_manifest, no_dataset
        from composer_growth.recipe.schema import PrepareConfig, from_mapping

        base_len = self._recipe.get("base_len")
        vocab = (self._recipe.get("manifest") or {}).get("vocab_size")
        for p in self.phases:
            if p.dataset is None and base_len is not None and p.seq_length > base_len:
                raise ConfigError(f"phases[{p.index}].seq_length", p.seq_length,
                                  f"longer than the sequences of data.path ({base_len} tokens in "
                                  f"{self._recipe['data_path']}): give the phase a dataset prepared at "
                                  f">= {p.seq_length} tokens (phases[{p.index}].dataset)")
        lengths: dict[str, int] = {}
        for path, users in self._dataset_paths().items():
            for p in users:
                manifest = check_manifest(path, f"phases[{p.index}].dataset", splits={self.train_split: "train_split"},
                                          seq_len=p.seq_length, seq_len_key=f"phases[{p.index}].seq_length",
                                          vocab_size=vocab)
                if manifest is None:
                    break
                lengths[path] = int(manifest["seq_len"])
            if path in lengths:
                continue
            options = self._prepare_options(path, users)
            if options is None:
                raise no_dataset(f"phases[{users[0].index}].dataset", path,
                                 f"prepare it with `composer-growth prepare-data --out {path} --seq-len "
                                 f"{max(p.seq_length for p in users)}` (with data.path's tokenizer) or give the phase "
                                 "a prepare block")
            key = f"phases[{next(p for p in users if p.prepare is not None).index}].prepare"
            clean = from_mapping(PrepareConfig, {k: v for k, v in options.items() if v is not None or k in
                                                 ("tokenizer", "files", "hub_name")}, key)
            check(clean.source in SOURCES, f"{key}.source", clean.source, f"one of {', '.join(SOURCES)}")
            lengths[path] = clean.seq_len
            for p in users:  # the prepare block asks for too short a length
                check(clean.seq_len >= p.seq_length, f"{key}.seq_len", clean.seq_len,
                      f"sequences of {clean.seq_len} tokens, shorter than phases[{p.index}].seq_length ({p.seq_length})")
        self._data_lengths = lengths
        self._check_batches(lengths)

    def _check_batches(self, lengths: dict[str, int]) -> None:
        """Every phase loader gets a whole number of rows per rank."""
        world = self._recipe.get("world", 1)
        gbs, base_len = self._recipe.get("global_batch"), self._recipe.get("base_len")
        base_tokens = gbs * base_len if gbs and base_len else None
        if self.tokens_per_step is not None and base_tokens is not None and base_tokens != self.tokens_per_step:
            for p in self.phases:
                if p.dataset is None:
                    raise ConfigError("tokens_per_step", self.tokens_per_step,
                                      f"phases without a dataset ({p.name}) train on data.path's batches of "
                                      f"{gbs} x {base_len} = {base_tokens} tokens per step")
        tokens = self.tokens_per_step or base_tokens
        for p in self.phases:
            if p.dataset is None or p.dataset not in lengths:
                continue
            try:
                self._loader_rows(p, lengths[p.dataset], tokens, world)
            except ValueError as err:
                key = f"phases[{p.index}].global_batch_size" if p.global_batch_size else (
                    "tokens_per_step" if self.tokens_per_step else "global_train_batch_size")
                value = p.global_batch_size or self.tokens_per_step or gbs
                raise ConfigError(key, value, str(err)) from None

    def _step_tokens(self, base_rows: int | None, base_len: int | None, world: int) -> int | None:
        """Tokens per optimizer step, all ranks: ``tokens_per_step``, or the Trainer's batches (``base_rows``
        rows per rank of ``base_len`` tokens); None when neither is known."""
        return self.tokens_per_step or (base_rows * base_len * world if base_rows and base_len else None)

    def _loader_rows(self, phase: Phase, length: int, tokens: int | None, world: int) -> int:
        """Rows per rank of a phase loader over data of ``length`` tokens."""
        step = phase.global_batch_size * phase.seq_length if phase.global_batch_size else tokens
        if step is None:
            raise ValueError(f"phase '{phase.name}': tokens per step unknown; set tokens_per_step")
        if step % (length * world) or step < length * world:
            raise ValueError(f"{step} tokens per step do not split into whole rows of {length} tokens "
                             f"({phase.dataset}) on each of {world} ranks")
        return step // (length * world)

    def plan_batch(self, index: int) -> tuple[int, int] | None:
        """``composer-growth plan``: the rows per step (all ranks) and tokens per row that phase ``index``'s
        loader yields before any cut, as :meth:`_source_key` builds it; None for the Trainer's own batches.

        Needs :meth:`validate_run` on the run's facts first (the phase datasets' lengths and the batch)."""
        phase = self.phases[index]
        if phase.dataset is None:
            return None
        facts = self.run_facts
        length = self._data_lengths.get(phase.dataset)
        if length is None:  # not checked against a recipe (an llm-foundry YAML): the manifest's
            from composer_growth.data.prepare import read_manifest

            manifest = read_manifest(phase.dataset)
            if manifest is None:
                raise ConfigError(f"phases[{index}].dataset", phase.dataset,
                                  "a prepared dataset (manifest.json): plan reads its sequence length")
            length = int(manifest["seq_len"])
        world = facts.world_size
        tokens = self._step_tokens(facts.rows_per_device, facts.data_seq_len, world)
        try:
            rows = self._loader_rows(phase, length, tokens, world)
        except ValueError as err:
            raise ConfigError(f"phases[{index}]", phase.name, str(err)) from None
        return rows * world, length

    def _prepare_datasets(self, state: State) -> None:
        """Build missing phase datasets from their prepare blocks, once per node (or once for a shared folder)."""
        from composer_growth.data.prepare import prepare_once

        for path, users in self._dataset_paths().items():
            options = self._prepare_options(path, users)
            build = None if options is None else lambda path=path, users=users, options=options: (
                self._build_dataset(state, path, users, options))
            prepare_once(path, build, f"phases[{users[0].index}].dataset",
                         "give the phase a prepare block or run `composer-growth prepare-data` there")

    def _build_dataset(self, state: State, path: str, users: list[Phase], options: dict[str, Any]) -> None:
        from composer_growth.data.prepare import prepare_dataset, read_manifest

        if read_manifest(path) is not None:  # another node built the shared folder meanwhile
            return
        named = any("tokenizer" in (p.prepare or {}) for p in users)
        if not named and (not options.get("tokenizer") or not os.path.exists(str(options["tokenizer"]))):
            options["tokenizer"] = self._model_tokenizer_dir(state)  # no recipe: the model's own
        options = {k: v for k, v in options.items() if v is not None or k == "tokenizer"}
        if options.get("tokenizer") is not None:
            options.pop("vocab_size", None)
        prepare_dataset(path, **options)

    def _model_tokenizer_dir(self, state: State) -> str | None:
        tokenizer = getattr(unwrap_composer(state.model), "tokenizer", None)
        if tokenizer is None:
            return None
        if self._tmp_tokenizer is None:
            self._tmp_tokenizer = tempfile.mkdtemp(prefix="ctx-tokenizer-")
            tokenizer.save_pretrained(self._tmp_tokenizer)
        return self._tmp_tokenizer

    def _source_key(self, state: State, phase: Phase) -> str:
        """The source of a phase's batches, built on first use."""
        if phase.dataset is None:
            return BASE
        if phase.name in self._phase_sources:
            return self._phase_sources[phase.name]
        from composer_growth.data.loaders import build_lm_dataloader
        from composer_growth.data.prepare import read_manifest

        manifest = read_manifest(phase.dataset)
        if manifest is None:
            raise ValueError(f"ContextLengthSchedule: phase '{phase.name}': no dataset at {phase.dataset}")
        rows = self._loader_rows(phase, int(manifest["seq_len"]), self._tokens, dist.get_world_size())
        key = f"{phase.dataset}@{rows}"
        self._sources.add(key, lambda: build_lm_dataloader(
            phase.dataset, self.train_split, rows, shuffle=self._recipe.get("shuffle", self.shuffle),
            seed=state.rank_zero_seed, num_workers=self._recipe.get("num_workers", self.num_workers)))
        self._phase_sources[phase.name] = key
        return key

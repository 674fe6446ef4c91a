"""One record of run facts: built from a recipe before training (and the algorithms checked against it
once), or from the Trainer's State at FIT_START in a plain Composer script."""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from composer_growth import SeqLengthWarmup
from composer_growth.errors import ConfigError
from composer_growth.recipe import run, validate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_recipe_run_is_checked_once_against_the_recipes_facts(tiny_recipe):
    tiny_recipe["algorithms"] = {"seq_length_warmup": {"min_seq_length": 8, "max_seq_length": 32, "step_size": 8,
                                                       "duration": "2ba", "preallocate": False},
                                 "stack_layers": {"at": "2ba", "mode": "append", "num_new": 1}}
    tiny_recipe.update(max_duration="4ba", eval_interval="4ba", save_interval="4ba")
    plan = validate(tiny_recipe)
    facts = plan.facts
    assert (facts.origin, facts.data_seq_len, facts.global_batch, facts.world_size) == ("recipe", 32, 8, 1)
    assert facts.model_config.num_hidden_layers == 2 and facts.model_config.vocab_size == facts.manifest["vocab_size"]
    assert facts.batches_per_epoch == facts.manifest["splits"]["train"]["sequences"] // 8
    assert all(alg.run_facts is facts for alg in plan.algorithms)
    trainer = run(plan)
    assert all(alg.run_facts is facts for alg in trainer.state.algorithms)  # FIT_START did not check again


def _plain_trainer(warmup: SeqLengthWarmup, max_duration: str) -> Trainer:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(5, 64, (12, 16), generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids],
                        batch_size=4)
    return Trainer(model=HuggingFaceModel(LlamaForCausalLM(config), use_logits=True), train_dataloader=loader,
                   max_duration=max_duration, algorithms=[warmup], progress_bar=False, log_to_console=False)


def test_a_plain_composer_script_is_checked_against_the_state_at_fit_start():
    warmup = SeqLengthWarmup(min_seq_length=8, max_seq_length=16, step_size=8, duration="1ep", preallocate=False)
    trainer = _plain_trainer(warmup, "2ep")
    trainer.fit()
    facts = warmup.run_facts
    assert (facts.origin, facts.global_batch, facts.batches_per_epoch, str(facts.max_duration)) == (
        "state", 4, 3, "2ep")
    late = SeqLengthWarmup(min_seq_length=8, max_seq_length=16, step_size=8, duration="4ba", preallocate=False)
    with pytest.raises(ConfigError, match=r"^duration='4ba': must end within max_duration"):
        _plain_trainer(late, "1ep").fit()  # 3 batches an epoch: the State's facts say so

"""Length algorithms in either listing order on a plain Composer Trainer (no algorithm_passes), and the
context schedule's save_folder default."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from composer import Callback, Trainer
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from composer_growth import ContextLengthSchedule, SeqLengthWarmup

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, LENGTH = 64, 32


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return HuggingFaceModel(LlamaForCausalLM(config), use_logits=True)


def _loader(batches=6, rows=4):
    ids = torch.randint(5, VOCAB, (batches * rows, LENGTH), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids],
                      batch_size=rows)


class Lengths(Callback):
    """The batch each step trains on: (rows, length) after every algorithm acted."""

    def __init__(self):
        self.seen: list[tuple[int, int]] = []

    def batch_start(self, state, logger):
        self.seen.append(tuple(state.batch["input_ids"].shape))


def _algorithms(**schedule_kw):
    warmup = SeqLengthWarmup(min_seq_length=8, max_seq_length=16, step_size=8, duration="2ba", preallocate=False,
                             mode="truncate")
    schedule = ContextLengthSchedule(phases=[{"name": "short", "seq_length": 16, "duration": "3ba"},
                                             {"name": "long", "seq_length": 32}], verbose=False, **schedule_kw)
    return warmup, schedule


def _fit(algorithms, **kw):
    rec = Lengths()
    trainer = Trainer(model=_model(), train_dataloader=_loader(), max_duration="6ba", algorithms=algorithms,
                      optimizers=None, callbacks=[rec], seed=3, progress_bar=False, log_to_console=False, **kw)
    trainer.fit()
    return trainer, rec


@pytest.mark.parametrize("warmup_first", [True, False])
def test_schedule_then_warmup_whatever_the_listing_order(warmup_first):
    warmup, schedule = _algorithms(save_checkpoints=False, export_hf=False, eval_batches=0)
    trainer, rec = _fit([warmup, schedule] if warmup_first else [schedule, warmup])
    # the phase reshapes 4 x 32 -> 8 x 16, the warmup truncates inside it (8 for two batches), then 'long' at 32
    assert rec.seen == [(8, 8), (8, 8), (8, 16), (4, 32), (4, 32), (4, 32)]
    assert int(trainer.state.timestamp.token) == sum(rows * n for rows, n in rec.seen) == 640


def test_schedule_takes_the_trainers_save_folder(tmp_path):
    _, schedule = _algorithms(export_hf=False, eval_batches=0)
    _fit([schedule], save_folder=str(tmp_path / "ckpt"), save_interval="100ba")
    assert schedule.save_folder == str(tmp_path / "ckpt")
    assert os.path.isfile(tmp_path / "ckpt" / "short" / "checkpoint.pt")
    assert os.path.isfile(tmp_path / "ckpt" / "long" / "checkpoint.pt")


def test_schedule_without_any_save_folder_says_so_once():
    _, schedule = _algorithms(eval_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([schedule])
    said = [w for w in caught if "phase checkpoints and HF exports are off" in str(w.message)]
    assert len(said) == 1 and schedule.save_folder is None

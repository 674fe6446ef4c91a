"""The algorithms with the clients users already have: transformers' collators (causal and masked LM),
llm-foundry's batch format (per-row token counts), epoch-based runs, torch schedulers."""

from __future__ import annotations

import warnings
from collections import UserDict

import pytest
import torch
from composer import Callback, Trainer
from composer.core import DataSpec
from composer.loggers import InMemoryLogger
from composer.metrics import LanguageCrossEntropy
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import (BatchEncoding, BertConfig, BertForMaskedLM, BertTokenizerFast, DataCollatorForLanguageModeling,
                          LlamaConfig, LlamaForCausalLM)

from composer_growth import ContextLengthSchedule, SeqLengthWarmup, StackLayers, WidenMLP
from composer_growth.errors import ConfigError
from composer_growth.functional import set_batch_sequence_length
from composer_growth.unwrap import unwrap_hf

VOCAB = 64
LENGTH = 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A WordPiece tokenizer over 64 ids (pad 0, mask 4), written here: nothing downloaded."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(path))


def _llama(seed=0, metrics=None):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return HuggingFaceModel(LlamaForCausalLM(config), use_logits=True, metrics=metrics)


def _bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return HuggingFaceModel(BertForMaskedLM(config), use_logits=True)


def _examples(n, padded, seed=0):
    """Token-id examples of 32 tokens, or of 9 to 32 tokens (padded by the collator) when ``padded``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(9, LENGTH + 1, (1,), generator=g)) if padded else LENGTH
        out.append({"input_ids": torch.randint(5, VOCAB, (length,), generator=g).tolist()})
    return out


class FoundryCollator:
    """A batch as llm-foundry 0.22's ``text`` collator builds it: transformers' collator, then per-row Python
    lists ``total_tokens`` (the row's attention_mask sum) and ``loss_generating_tokens`` (its labels[1:]
    that are not -100)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = dict(self.collator(examples))
        batch["total_tokens"] = [int(n) for n in batch["attention_mask"].sum(dim=1)]
        batch["loss_generating_tokens"] = [int(n) for n in (batch["labels"][:, 1:] != -100).sum(dim=1)]
        return batch


def foundry_token_count(batch):
    """llm-foundry 0.22's ``get_tokens_per_batch_func`` on a batch that has its per-row counts."""
    return {"total": int(sum(batch["total_tokens"])), "loss_generating": int(sum(batch["loss_generating_tokens"]))}


class Recorder(Callback):
    """What the loader gave (a DataSpec batch transform, before any algorithm) and what the model got
    (a forward pre-hook, per microbatch), grouped by batch."""

    def __init__(self, model):
        self.before: list[dict] = []
        self.seen: list[list[dict]] = []
        unwrap_hf(model).register_forward_pre_hook(self._hook, with_kwargs=True)

    def transform(self, batch):
        self.before.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        self.seen.append([])
        return batch

    def _hook(self, module, args, kwargs):
        if module.training and self.seen:
            self.seen[-1].append({k: v.detach().clone() for k, v in kwargs.items()
                                  if k in ("input_ids", "attention_mask", "labels")})

    def batch_start(self, state, logger):
        batch = state.batch
        if "total_tokens" in batch:  # the per-row counts follow the rows and count what is trained
            rows = batch["input_ids"].shape[0]
            assert len(batch["total_tokens"]) == len(batch["loss_generating_tokens"]) == rows
            assert batch["total_tokens"] == [int(n) for n in batch["attention_mask"].sum(dim=1)]
            assert batch["loss_generating_tokens"] == [int(n) for n in (batch["labels"][:, 1:] != -100).sum(dim=1)]

    def lengths(self):
        return [b[0]["input_ids"].shape[1] for b in self.seen]

    def total(self, key, batches=None):
        batches = self.seen if batches is None else batches
        return sum(int(_real(key, mb)) for b in batches for mb in b)


def _real(key, batch):
    if key == "mask":
        return batch["attention_mask"].sum()
    if key == "labels":
        return (batch["labels"] != -100).sum()
    return batch["input_ids"].numel()


def _fit(model, loader, algorithms, max_duration, microbatch=8, recorder=True, token_count=None, **kw):
    rec = Recorder(model) if recorder else None
    spec = DataSpec(loader, batch_transforms=rec.transform if rec else None,
                    **({"get_num_tokens_in_batch": token_count} if token_count else {}))
    trainer = Trainer(model=model, train_dataloader=spec, max_duration=max_duration, algorithms=algorithms,
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), callbacks=[rec] if rec else [],
                      device_train_microbatch_size=microbatch, seed=3, progress_bar=False, log_to_console=False,
                      **kw)
    trainer.fit()
    return trainer, rec


# -- the batch op on Mappings with values that are not [batch, seq] tensors ------------------------

def _mixed_batch(padded):
    ids = torch.arange(1, 4 * 8 + 1).reshape(4, 8)
    mask = torch.ones_like(ids)
    if padded:
        for r, n in enumerate((8, 5, 0, 3)):
            mask[r, n:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[0, 2] = -100  # one ignored real token
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels,
            "total_tokens": [int(n) for n in mask.sum(dim=1)],
            "loss_generating_tokens": [int(n) for n in (labels[:, 1:] != -100).sum(dim=1)],
            "weight": torch.tensor([10.0, 11.0, 12.0, 13.0]), "ids": ["a", "b", "c", "d"],
            "seq_len": 8, "note": "kept"}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("mode", ["truncate", "reshape"])
@pytest.mark.parametrize("kind", [dict, UserDict, BatchEncoding])
def test_any_mapping_and_values_that_are_not_sequences(kind, mode, padded):
    given = _mixed_batch(padded)
    out = set_batch_sequence_length(kind(given), 3, mode)
    assert type(out) is kind
    rows = out["input_ids"].shape[0]
    assert out["input_ids"].shape[1] == 3 and out["labels"].shape == out["attention_mask"].shape == (rows, 3)
    # per-row values follow their rows; counts are recomputed on what is left; the rest passes through
    assert out["total_tokens"] == [int(n) for n in out["attention_mask"].sum(dim=1)]
    assert out["loss_generating_tokens"] == [int(n) for n in (out["labels"][:, 1:] != -100).sum(dim=1)]
    assert out["weight"].shape == (rows,) and len(out["ids"]) == rows
    assert out["seq_len"] == 8 and out["note"] == "kept"
    if mode == "truncate":
        source = [0, 1, 2, 3]
    else:  # real token ids are unique: the row a new row's first token comes from
        source = [int((given["input_ids"] == int(t)).nonzero()[0, 0]) for t in out["input_ids"][:, 0]]
    assert out["weight"].tolist() == [10.0 + r for r in source]
    assert out["ids"] == ["abcd"[r] for r in source]
    if mode == "reshape" and padded:  # rows of 8, 5, 0, 3 real tokens -> 3 + 2 + 0 + 1 pieces, each from one row
        assert source == [0, 0, 0, 1, 1, 3] and out["total_tokens"] == [3, 3, 2, 3, 2, 3]
    elif mode == "reshape":  # 32 packed tokens -> 10 rows of 3 (2 dropped); a row takes its first token's row's values
        assert source == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3] and out["total_tokens"] == [3] * 10
        assert out["loss_generating_tokens"] == [1] + [2] * 9  # row 0's ignored label at position 2
    else:
        assert out["total_tokens"] == ([3, 3, 0, 3] if padded else [3] * 4)


# -- transformers' DataCollatorForLanguageModeling, causal and masked LM, in a real Trainer --------

WARMUP = dict(min_seq_length=8, max_seq_length=32, step_size=8, duration="4ba", preallocate=False)


@pytest.mark.parametrize("mlm", [False, True], ids=["causal", "mlm"])
@pytest.mark.parametrize("mode", ["truncate", "reshape"])
def test_collator_batches_through_the_warmup(tokenizer, one_thread, mlm, mode):
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=mlm, mlm_probability=0.3, pad_to_multiple_of=LENGTH)
    loader = DataLoader(_examples(48, padded=True), batch_size=8, collate_fn=collator)
    assert isinstance(next(iter(loader)), BatchEncoding)
    model = _bert() if mlm else _llama()
    trainer, rec = _fit(model, loader, [SeqLengthWarmup(mode=mode, **WARMUP)], "6ba", microbatch=8)
    assert rec.lengths() == [8, 8, 16, 24, 32, 32]
    before = rec.before
    if mode == "truncate":
        for b, seen in zip(before, rec.seen):
            length = seen[0]["input_ids"].shape[1]
            for key in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(torch.cat([mb[key] for mb in seen]), b[key][:, :length]), key
    else:  # every real token and every masked (MLM) / next-token (causal) label is trained, none twice
        assert rec.total("mask") == sum(int(b["attention_mask"].sum()) for b in before)
        assert rec.total("labels") == sum(int((b["labels"] != -100).sum()) for b in before)
    # time/token counts what the model was given (Composer's default count: rows x length)
    assert int(trainer.state.timestamp.token) == rec.total("ids")


# -- llm-foundry's batches: per-row Python lists, token counts from them -----------------------------

@pytest.mark.parametrize("algorithm", ["warmup-truncate", "warmup-reshape", "context"])
def test_foundry_batches(tokenizer, one_thread, algorithm):
    collator = FoundryCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=LENGTH))
    loader = DataLoader(_examples(48, padded=True, seed=1), batch_size=8, collate_fn=collator)
    extra = {}
    if algorithm == "context":  # its eval loop and phase-end perplexities read llm-foundry's eval batches too
        alg = ContextLengthSchedule(phases=[{"seq_length": 16, "duration": "0.5dur"}, {"seq_length": 32}],
                                    eval_batches=2, save_checkpoints=False, export_hf=False, verbose=False)
        extra = dict(eval_dataloader=DataLoader(_examples(16, padded=True, seed=2), batch_size=8, collate_fn=collator),
                     eval_interval="3ba", loggers=[InMemoryLogger()])
    else:
        alg = SeqLengthWarmup(mode=algorithm.split("-")[1], **WARMUP)
    model = _llama(metrics=[LanguageCrossEntropy()])
    trainer, rec = _fit(model, loader, [alg], "6ba", microbatch=4, token_count=foundry_token_count,
                        accumulate_train_batch_on_tokens=True, **extra)
    if algorithm == "context":
        logged = extra["loggers"][0].data
        assert "context/phase_end_ppl/16" in logged and "context/phase_end_ppl/32" in logged
        assert [v for _, v in logged["context/eval_seq_len"]] == [16, 32]
    expected = [16, 16, 16, 32, 32, 32] if algorithm == "context" else [8, 8, 16, 24, 32, 32]
    assert rec.lengths() == expected
    # the Trainer's token count (llm-foundry's: the sum of total_tokens) is the real tokens trained
    assert int(trainer.state.timestamp.token) == rec.total("mask")
    if algorithm != "warmup-truncate":  # reshape keeps every real token
        assert rec.total("mask") == sum(int(b["attention_mask"].sum()) for b in rec.before)


# -- epoch-based max_duration: the same lengths and growth batch as the batch-based run ---------------

def _packed_loader(batches=4, rows=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (batches * rows, LENGTH), generator=g)
    return DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids],
                      batch_size=rows)


@pytest.mark.parametrize("epochs", [1, 2])
def test_epoch_runs_match_batch_runs(one_thread, epochs):
    batches = 4 * epochs
    warmup = dict(min_seq_length=8, max_seq_length=32, step_size=8, duration="0.5dur", preallocate=False)
    by_epoch = _fit(_llama(), _packed_loader(), [SeqLengthWarmup(**warmup), StackLayers(at="0.5dur")],
                    f"{epochs}ep")
    by_batch = _fit(_llama(), _packed_loader(), [SeqLengthWarmup(**warmup), StackLayers(at="0.5dur")],
                    f"{batches}ba")
    lengths = [8, 16, 32, 32] if epochs == 1 else [8, 8, 16, 24, 32, 32, 32, 32]
    assert by_epoch[1].lengths() == by_batch[1].lengths() == lengths
    grown = [t.state.algorithms[1].record["batch"] for t, _ in (by_epoch, by_batch)]
    assert grown == [batches // 2] * 2  # the middle batch, also inside the only epoch of a 1ep run
    assert unwrap_hf(by_epoch[0].state.model).config.num_hidden_layers == 4


def test_epoch_run_context_schedule_matches_batch_run(one_thread):
    phases = [{"seq_length": 16, "duration": "0.25dur"}, {"seq_length": 24, "duration": "0.25dur"},
              {"seq_length": 32}]
    runs = [_fit(_llama(), _packed_loader(), [ContextLengthSchedule(phases=phases, eval_batches=0,
                                                                    save_checkpoints=False, export_hf=False,
                                                                    verbose=False)], duration)[1]
            for duration in ("2ep", "8ba")]
    assert runs[0].lengths() == runs[1].lengths() == [16, 16, 24, 24, 32, 32, 32, 32]


class _Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(16):
            ids = torch.randint(5, VOCAB, (LENGTH,), generator=g)
            yield {"input_ids": ids, "labels": ids.clone()}


def test_epoch_progress_without_a_loader_length_fails_before_training(one_thread):
    # An epoch-long warmup in a run of batches needs batches per epoch. (A 'dur' time cannot meet an unknown
    # length: Composer itself rejects max_duration in epochs over a loader without one.)
    alg = SeqLengthWarmup(min_seq_length=8, max_seq_length=32, duration="1ep", preallocate=False)
    trainer = Trainer(model=_llama(), train_dataloader=DataLoader(_Stream(), batch_size=8), max_duration="2ba",
                      algorithms=[alg], optimizers=None, progress_bar=False, log_to_console=False)
    with pytest.raises(ConfigError, match=r"^duration='1ep': needs the train loader's length"):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0


@pytest.mark.parametrize("alg, match", [
    (lambda: StackLayers(at="4ba"), r"^at='4ba': must fall before the end of the run"),
    (lambda: SeqLengthWarmup(min_seq_length=8, max_seq_length=32, duration="5ba"),
     r"^duration='5ba': must end within max_duration"),
])
def test_batch_times_checked_against_an_epoch_run(one_thread, alg, match):
    # 1ep of a 4-batch loader: batch times compare with the run through the loader's length, before training
    trainer = Trainer(model=_llama(), train_dataloader=_packed_loader(), max_duration="1ep", algorithms=[alg()],
                      optimizers=None, progress_bar=False, log_to_console=False)
    with pytest.raises(ConfigError, match=match):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0


# -- growth before a torch scheduler's first step: no step-override warning -----------------------

def test_growth_before_the_first_scheduler_step_keeps_torch_step_wrapper(one_thread):
    model = _llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)  # Composer steps it per epoch
    trainer = Trainer(model=model, train_dataloader=_packed_loader(), max_duration="2ep", optimizers=opt,
                      schedulers=sched, algorithms=[StackLayers(at="2ba"), WidenMLP(at="4ba")],
                      seed=3, progress_bar=False, log_to_console=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Composer's test setting, for torch's scheduler warnings
        for text in ("has been overridden after learning rate scheduler", "before `optimizer.step\(\)`"):
            warnings.filterwarnings("error", message=f".*{text}")
        trainer.fit()
    assert [a.record["batch"] for a in trainer.state.algorithms] == [2, 4]
    new_opt = trainer.state.optimizers[0]
    assert new_opt is not opt and hasattr(new_opt.step, "_wrapped_by_lr_sched")
    assert trainer.state.schedulers[0].optimizer is new_opt
    assert new_opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)  # two epoch steps on the new optimizer


# -- state_dict keeps Composer's base 'repr' ---------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: SeqLengthWarmup(min_seq_length=8, max_seq_length=32),
    lambda: ContextLengthSchedule(phases=[{"seq_length": 16, "duration": "0.5dur"}, {"seq_length": 32}]),
    lambda: StackLayers(at="2ba"),
    lambda: WidenMLP(at="2ba"),
])
def test_state_dict_keeps_the_base_repr(make):
    alg = make()
    saved = alg.state_dict()
    assert saved["repr"] == repr(alg)
    again = make()
    again.load_state_dict(saved)
    assert {k: v for k, v in again.state_dict().items() if k != "repr"} == {k: v for k, v in saved.items()
                                                                          if k != "repr"}
    assert "repr" not in getattr(again, "record", {})


# -- ContextLengthSchedule reads no data at FIT_START ------------------------------------------------

class _CountingDataset(Dataset):
    def __init__(self):
        self.reads = []
        g = torch.Generator().manual_seed(0)
        self.rows = torch.randint(5, VOCAB, (16, LENGTH), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.reads.append(i)
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def test_context_schedule_reads_only_the_batches_it_trains(one_thread, capsys):
    data = _CountingDataset()
    alg = ContextLengthSchedule(phases=[{"seq_length": 16, "duration": "2ba"}, {"seq_length": 32}], eval_batches=0,
                                save_checkpoints=False, export_hf=False, verbose=True)
    trainer = Trainer(model=_llama(), train_dataloader=DataLoader(data, batch_size=4), max_duration="3ba",
                      algorithms=[alg], device_train_microbatch_size=4, progress_bar=False, log_to_console=False)
    trainer.fit()
    assert data.reads == list(range(12))  # the rows of the 3 batches, in order, nothing else
    assert alg.state_dict()["base_len"] == LENGTH and alg.state_dict()["tokens_per_step"] == 4 * LENGTH
    # no recipe manifest: the banner waits for the first batch, whose length gives the tokens per step
    banners = [line for line in capsys.readouterr().out.splitlines() if line.startswith("context_length_schedule: 2 phases")]
    assert banners == [f"context_length_schedule: 2 phases (reshape; {4 * LENGTH} tokens per step)"], banners

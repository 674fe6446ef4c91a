"""SeqLengthWarmup: the batch op against Composer's, reshape properties, and real Trainer runs."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml
from composer import Trainer
from composer.functional import set_batch_sequence_length as composer_set_length
from composer.models import ComposerModel
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from composer_growth import SeqLengthWarmup
from composer_growth.errors import ConfigError
from composer_growth.functional import set_batch_sequence_length
from composer_growth.recipe import run, validate

from conftest import launch, launch_failure, resume_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the batch op ------------------------------------------------------------------------------

def _batch(rows, length, seed, padded=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        lens = torch.randint(0, length + 1, (rows,), generator=g)
        mask = (torch.arange(length)[None, :] < lens[:, None]).long()
        ids = ids * mask
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), length=st.integers(2, 40), cut=st.integers(1, 40), seed=st.integers(0, 10_000),
       preserve=st.booleans(), padded=st.booleans())
def test_truncate_equals_composer(rows, length, cut, seed, preserve, padded):
    batch = _batch(rows, length, seed, padded=padded)
    if preserve and padded:  # Composer's end-of-sequence index needs at least one real token per row
        batch["attention_mask"][:, 0] = 1
    ours = set_batch_sequence_length(batch, cut, "truncate", preserve_end_of_sequence=preserve)
    theirs = composer_set_length({k: v.clone() for k, v in batch.items()}, cut, truncate=True,
                                 preserve_end_of_sequence=preserve)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), length=st.integers(2, 40), cut=st.integers(1, 39), seed=st.integers(0, 10_000))
def test_reshape_packed_keeps_every_token_that_fits(rows, length, cut, seed):
    batch = _batch(rows, length, seed)
    out = set_batch_sequence_length(batch, cut, "reshape")
    if cut >= length:
        assert torch.equal(out["input_ids"], batch["input_ids"])
        return
    keep = (rows * length // cut) * cut
    assert out["input_ids"].shape == (rows * length // cut, cut)
    for k in batch:
        assert torch.equal(out[k].flatten(), batch[k].flatten()[:keep]), k
    assert rows * length - keep < cut  # only less than one row is dropped


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), length=st.integers(2, 40), cut=st.integers(1, 39), seed=st.integers(0, 10_000))
def test_reshape_padded_never_mixes_rows_or_padding(rows, length, cut, seed):
    batch = _batch(rows, length, seed, padded=True)
    if bool(batch["attention_mask"].all()):
        batch["attention_mask"][0, -1] = 0
        batch["input_ids"][0, -1] = 0
        batch["labels"][0, -1] = -100
    out = set_batch_sequence_length(batch, min(cut, length - 1), "reshape")
    cut = min(cut, length - 1)
    mask = out["attention_mask"].bool()
    # each new row: real tokens first, then padding only
    assert torch.equal(mask, mask.cummin(dim=1).values)
    # alignment: labels and ids agree on real tokens, padding is ignored by the loss
    assert torch.equal(out["labels"][mask], out["input_ids"][mask])
    assert bool((out["labels"][~mask] == -100).all())
    # every real token of every original row, in order, and new rows come from one row each
    pieces = iter(range(out["input_ids"].shape[0]))
    for r in range(batch["input_ids"].shape[0]):
        real = batch["input_ids"][r][batch["attention_mask"][r].bool()]
        got = []
        for _ in range(-(-len(real) // cut)):
            i = next(pieces)
            got.append(out["input_ids"][i][mask[i]])
        assert torch.equal(torch.cat(got) if got else real[:0], real)
    assert next(pieces, None) is None


def test_op_errors():
    batch = _batch(2, 8, 0)
    with pytest.raises(ValueError, match="mode='shuffle'"):
        set_batch_sequence_length(batch, 4, "shuffle")
    with pytest.raises(ValueError, match="needs batch\\['input_ids'\\]"):
        set_batch_sequence_length({"tokens": batch["input_ids"]}, 4, "reshape")
    with pytest.raises(ValueError, match="needs a Mapping batch"):
        set_batch_sequence_length([batch["input_ids"]], 4)


# -- the algorithm on a real Trainer with a model that is not a HuggingFaceModel ----------------

class TinyLM(ComposerModel):
    def __init__(self, vocab: int = 64, dim: int = 16):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)
        self.seen: list[tuple[int, int]] = []

    def forward(self, batch):
        self.seen.append(tuple(batch["input_ids"].shape))
        return self.head(self.emb(batch["input_ids"]))

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs[:, :-1].reshape(-1, outputs.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)


def _loader(n=64, length=32, batch_size=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=g)
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _fit(alg, max_duration="8ba", microbatch=8, seed=3, loggers=None, **kw):
    torch.manual_seed(seed)
    model = TinyLM()
    trainer = Trainer(model=model, train_dataloader=_loader(**kw), max_duration=max_duration,
                      algorithms=[alg] if alg else [], optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      device_train_microbatch_size=microbatch, seed=seed, progress_bar=False, log_to_console=False,
                      loggers=loggers)
    trainer.fit()
    return trainer, model


@pytest.mark.parametrize("duration, lengths", [
    ("4ba", [8, 14, 20, 26, 32, 32, 32, 32]),
    ("0.5dur", [8, 14, 20, 26, 32, 32, 32, 32]),
    ("32sp", [8, 14, 20, 26, 32, 32, 32, 32]),
    ("1ep", [8, 11, 14, 17, 20, 23, 26, 29]),
])
def test_duration_units_linear(duration, lengths):
    alg = SeqLengthWarmup(min_seq_length=8, max_seq_length=32, step_size=1, duration=duration, preallocate=False)
    _, model = _fit(alg, max_duration="8ba", microbatch=8, n=64)
    assert [s[1] for s in model.seen] == lengths


def test_token_duration_counts_trained_tokens():
    # 64 tokens per row at full length; a warmup lasting 1024 trained tokens from length 16
    alg = SeqLengthWarmup(min_seq_length=16, max_seq_length=64, step_size=16, duration="1024tok", preallocate=False)
    trainer, model = _fit(alg, max_duration="3072tok", microbatch=8, n=256, length=64, batch_size=4)
    trained = sum(r * n for r, n in model.seen)
    assert int(trainer.state.timestamp.token) == trained
    assert trained >= 3072 and trained - 4 * 64 < 3072  # stopped at the first batch reaching the budget
    lengths = [n for _, n in model.seen]
    assert lengths[0] == 16 and lengths[-1] == 64 and lengths == sorted(lengths)
    assert int(trainer.state.timestamp.sample) == 4 * len(model.seen)  # samples still count loader rows


def test_root_and_step_schedules():
    root = SeqLengthWarmup(min_seq_length=8, max_seq_length=32, step_size=8, duration="4ba", schedule="root",
                           root_degree=2, preallocate=False)
    _, model = _fit(root, max_duration="6ba")
    assert [s[1] for s in model.seen] == [8, 16, 24, 24, 32, 32]
    steps = SeqLengthWarmup(min_seq_length=8, max_seq_length=32, schedule=[[0, 8], ["2ba", 16], ["5ba", 32]],
                            preallocate=False)
    _, model = _fit(steps, max_duration="6ba")
    assert [s[1] for s in model.seen] == [8, 8, 16, 16, 16, 32]


# 8 rows x 32 tokens per batch, microbatch 4; lengths 8, 8, 16, 24, 32, 32 (reshaped: 32, 32, 16, 10, 8, 8 rows)
MICROBATCHES = {
    # 4 x 32 = 128 tokens per microbatch at every length: two microbatches per batch, as at full length
    "tokens": [(16, 8)] * 4 + [(8, 16)] * 2 + [(5, 24)] * 2 + [(4, 32)] * 4,
    # 4 rows per microbatch at every length (Composer's reshape): more, shorter microbatches
    "rows": [(4, 8)] * 16 + [(4, 16)] * 4 + [(4, 24), (4, 24), (2, 24)] + [(4, 32)] * 4,
    # as "tokens", at most 2 x 4 rows
    "bounded": [(8, 8)] * 8 + [(8, 16)] * 2 + [(5, 24)] * 2 + [(4, 32)] * 4,
}


@pytest.mark.parametrize("policy", sorted(MICROBATCHES))
def test_reshape_microbatch_policy(policy):
    alg = SeqLengthWarmup(min_seq_length=8, max_seq_length=32, step_size=8, duration="4ba", mode="reshape",
                          preallocate=False, microbatch_policy=policy, max_microbatch_scale=2)
    trainer, model = _fit(alg, max_duration="6ba", microbatch=4)
    assert model.seen == MICROBATCHES[policy]
    assert int(trainer.state.timestamp.token) == 6 * 8 * 32 - 16  # only length 24 drops 256 % 24 tokens
    assert sum(r * n for r, n in model.seen) == 6 * 8 * 32 - 16
    assert trainer.state.device_train_microbatch_size == 4


def test_preallocation_draws_no_data_or_randomness():
    with_pre = SeqLengthWarmup(min_seq_length=8, max_seq_length=32, step_size=8, duration="4ba", preallocate=True)
    without = SeqLengthWarmup(min_seq_length=8, max_seq_length=32, step_size=8, duration="4ba", preallocate=False)
    t1, m1 = _fit(with_pre, max_duration="6ba")
    t2, m2 = _fit(without, max_duration="6ba")
    assert m1.seen[0] == (8, 32) and m1.seen[1:] == m2.seen  # one pass at full length, then the same batches
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert t1.state.total_loss_dict == t2.state.total_loss_dict


@pytest.mark.parametrize("kwargs, key", [
    (dict(min_seq_length=64, max_seq_length=32), "max_seq_length"),
    (dict(step_size=0), "step_size"),
    (dict(mode="pack"), "mode"),
    (dict(duration="3weeks"), "duration"),
    (dict(schedule="cubic"), "schedule"),
    (dict(preallocate="yes"), "preallocate"),
    (dict(preserve_end_of_sequence=1), "preserve_end_of_sequence"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(microbatch_policy="auto"), "microbatch_policy"),
    (dict(max_microbatch_scale=0.5), "max_microbatch_scale"),
    (dict(max_microbatch_scale="2"), "max_microbatch_scale"),
    (dict(schedule=[[0, 8], ["2ba", 16]], min_seq_length=8, max_seq_length=32), "schedule"),
    (dict(schedule=[[0, 8], ["2ba", 32], ["1ba", 32]], min_seq_length=8, max_seq_length=32), "schedule"),
])
def test_bad_arguments(kwargs, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        SeqLengthWarmup(**kwargs)


def test_step_size_warning():
    with pytest.warns(UserWarning, match="step_size=12 is not a multiple of 8"):
        SeqLengthWarmup(min_seq_length=12, max_seq_length=48, step_size=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SeqLengthWarmup(min_seq_length=8, max_seq_length=32, step_size=8)


def test_duration_longer_than_run_fails_before_training():
    alg = SeqLengthWarmup(min_seq_length=8, max_seq_length=32, step_size=8, duration="20ba")
    with pytest.raises(ConfigError, match=r"^duration='20ba': must end within max_duration"):
        _fit(alg, max_duration="8ba")


def test_missing_batch_key_is_named():
    alg = SeqLengthWarmup(min_seq_length=8, max_seq_length=32, step_size=8, mode="reshape", preallocate=False)
    torch.manual_seed(0)

    class NoIds(TinyLM):
        def forward(self, batch):
            return self.head(self.emb(batch["tokens"]))

    data = [{"tokens": torch.randint(0, 64, (32,))} for _ in range(16)]
    trainer = Trainer(model=NoIds(), train_dataloader=DataLoader(data, batch_size=8), max_duration="2ba",
                      algorithms=[alg], progress_bar=False, log_to_console=False)
    with pytest.raises(ValueError, match="needs batch\\['input_ids'\\]"):
        trainer.fit()


# -- the recipe path: registered name, validation against the data, resume, two ranks --------------

def _warmup_recipe(tiny_recipe, **kw):
    tiny_recipe["algorithms"] = {"seq_length_warmup": {"min_seq_length": 8, "max_seq_length": 32, "step_size": 8,
                                                       "duration": "6ba", **kw}}
    return tiny_recipe


def test_recipe_validation_against_run_and_data(tiny_recipe):
    with pytest.raises(ConfigError, match=r"^algorithms.seq_length_warmup.max_seq_length=64: at most the data"):
        validate(_warmup_recipe(tiny_recipe, max_seq_length=64))
    with pytest.raises(ConfigError, match=r"^algorithms.seq_length_warmup.step_size=0: a positive integer"):
        validate(_warmup_recipe(tiny_recipe, step_size=0))
    with pytest.raises(ConfigError, match=r"^algorithms.seq_length_warmup.duration='12ba': must end within"):
        validate(_warmup_recipe(tiny_recipe, duration="12ba"))
    with pytest.raises(ConfigError, match=r"^algorithms.seq_length_warmup.microbatch_policy='row': one of tokens, rows"):
        validate(_warmup_recipe(tiny_recipe, microbatch_policy="row"))


@pytest.mark.parametrize("mode, policy", [("truncate", "rows"), ("reshape", "rows"), ("reshape", "tokens"),
                                          ("reshape", "bounded")])
def test_resume_mid_warmup_matches_uninterrupted(tiny_recipe, tmp_path, mode, policy):
    full = _warmup_recipe(tiny_recipe, mode=mode, microbatch_policy=policy)
    run(validate(full))
    with open(full["summary_file"]) as f:
        uninterrupted = json.load(f)
    # lengths 8, 8, 16, 16, 24, 24, 32, 32 on 8 rows of 32 tokens: truncate trains each row's head; reshape
    # keeps every token but the tail of a batch that does not fill a whole 24-token row (256 % 24)
    trained = {"truncate": 8 * (8 + 8 + 16 + 16 + 24 + 24 + 32 + 32), "reshape": 8 * 8 * 32 - 2 * (256 % 24)}
    assert uninterrupted["tokens_trained"] == trained[mode]

    # one event line when the warmup ends (6ba: the 7th batch is the first at full length), as in the resumed run
    warmup_events = [(e["batch"], e["name"]) for e in uninterrupted["events"]]
    assert warmup_events == [(6, "seq_length_warmup")]

    _, after = resume_from(full, "ep0-ba4-rank0.pt", tmp_path)
    assert after["tokens_trained"] == uninterrupted["tokens_trained"]
    assert after["events"] == uninterrupted["events"]
    assert after["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-5)
    assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in uninterrupted["evals"]], rel=1e-5)


@pytest.mark.launcher
def test_two_ranks_count_trained_tokens(tiny_recipe, tmp_path):
    recipe = _warmup_recipe(tiny_recipe, duration="4ba")
    recipe.update(summary_file=str(tmp_path / "s-{rank}.json"), eval_first=False, max_duration="4ba",
                  eval_interval="4ba")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = launch(os.path.join(ROOT, "scripts", "train.py"), [str(path)], tmp_path)
    assert proc.returncode == 0, launch_failure(proc, tmp_path)
    s0, s1 = (json.load(open(tmp_path / f"s-{r}.json")) for r in (0, 1))
    # lengths 8, 14->8, 20->16, 26->24 for 4 batches of 8 global rows
    assert s0["tokens_trained"] == s1["tokens_trained"] == 8 * (8 + 8 + 16 + 24)
    assert s0["train_loss"] == s1["train_loss"]


def test_batches_pass_through_once_the_warmup_is_over():
    alg = SeqLengthWarmup(min_seq_length=8, max_seq_length=16, step_size=8, duration="2ba", preallocate=False)
    trainer, model = _fit(alg, max_duration="4ba")
    assert [n for _, n in model.seen] == [8, 8, 32, 32]
    assert [(e["batch"], e["text"].split(" (")[0]) for e in alg.run_events()] == [(2, "over after 2 batches")]
    assert int(trainer.state.timestamp.token) == 8 * (8 + 8 + 32 + 32)


def test_stops_matching_batch_events_once_the_warmup_is_over():
    from composer.core import Event

    alg = SeqLengthWarmup(min_seq_length=8, max_seq_length=16, step_size=8, duration="2ba", preallocate=False)
    trainer, model = _fit(alg, max_duration="4ba")
    assert not alg.match(Event.AFTER_DATALOADER, trainer.state) and not alg.match(Event.BATCH_END, trainer.state)
    assert alg.match(Event.FIT_START, trainer.state)
    trainer.fit(duration="2ba")  # a second fit matches again from FIT_START on; batches still pass through
    assert [n for _, n in model.seen] == [8, 8, 32, 32, 32, 32]


def test_logs_changes_only_and_nothing_after_the_warmup():
    from composer.loggers import InMemoryLogger

    memory = InMemoryLogger()
    alg = SeqLengthWarmup(min_seq_length=8, max_seq_length=32, step_size=8, duration="4ba", preallocate=False)
    trainer, model = _fit(alg, max_duration="8ba", loggers=[memory])
    assert [n for _, n in model.seen] == [8, 8, 16, 24] + [32] * 4
    assert [v for _, v in memory.data["seq_len"]] == [8, 16, 24, 32]  # once per length, not per batch
    assert [v for _, v in memory.data["tokens/trained"]] == [64, 128, 256, 448]  # the warmup's batches only
    assert int(trainer.state.timestamp.token) == 8 * (8 + 8 + 16 + 24 + 4 * 32)


@pytest.mark.parametrize("warmup_first", [True, False])
def test_warmup_inside_a_context_phase_whatever_the_listing_order(tiny_recipe, warmup_first):
    warmup = {"min_seq_length": 8, "max_seq_length": 16, "step_size": 8, "duration": "2ba", "preallocate": False}
    schedule = {"save_checkpoints": False, "export_hf": False, "phases": [
        {"name": "short", "seq_length": 16, "duration": "0.5dur"},
        {"name": "long", "seq_length": 32, "duration": "0.5dur"}]}
    items = [("seq_length_warmup", warmup), ("context_length_schedule", schedule)]
    tiny_recipe["algorithms"] = dict(items if warmup_first else items[::-1])
    tiny_recipe["eval_first"] = False
    run(validate(tiny_recipe))
    with open(tiny_recipe["summary_file"]) as f:
        info = json.load(f)
    # 256 tokens per step; the warmup halves the first two (16 -> 8 within the 16-token phase)
    assert info["tokens_trained"] == 2 * 128 + 6 * 256

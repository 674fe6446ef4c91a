"""Orchestrator on real Trainers: ops fired by loss and timeout, cascades, what each op changes, resume, DDP."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml
from composer.core import Callback, Event

from composer_growth import Orchestrator
from composer_growth.errors import ConfigError
from composer_growth.recipe import run, validate
from composer_growth.unwrap import composer_model, unwrap_hf

from conftest import fsdp_runs, launch, launch_failure, read_summary, resume_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the issue's example, verbatim
EXAMPLE = """[
  {"name": "change_lr",          "value": 2.0,  "trigger_loss": 6.0,  "max_wait_iters": 1000, "reevaluate": false},
  {"name": "stack_layers",       "value": 2,    "trigger_loss": 5.5,  "max_wait_iters": 2000, "reevaluate": true},
  {"name": "widen_mlp",          "value": 1.5,  "trigger_loss": 5.2,  "max_wait_iters": 2000, "reevaluate": true},
  {"name": "reset_lr_schedule",  "value": null, "trigger_loss": 5.19, "max_wait_iters": 500,  "reevaluate": false},
  {"name": "change_lora_alpha",  "value": 0.5,  "trigger_loss": 4.8,  "max_wait_iters": 3000, "reevaluate": false},
  {"name": "merge_lora_weights", "value": null, "trigger_loss": 4.5,  "max_wait_iters": 5000, "reevaluate": true}
]
"""


class Probe(Callback):
    """Per batch: rows, first ids, LR the optimizer steps with, microbatches; per eval: batch and eval batches."""

    def __init__(self):
        self.rows, self.ids, self.lr, self.microbatches, self.evals = {}, {}, {}, {}, []
        self._forwards = self._eval_batches = 0

    def run_event(self, event, state, logger):
        if event == Event.BATCH_START:
            b = int(state.timestamp.batch)
            self.rows[b] = int(state.batch["input_ids"].shape[0])
            self.ids[b] = state.batch["input_ids"][:, 0].tolist()
            self.lr[b] = state.optimizers[0].param_groups[0]["lr"]
            self._forwards = 0
        elif event == Event.BEFORE_FORWARD:
            self._forwards += 1
        elif event == Event.BATCH_END:
            self.microbatches[int(state.timestamp.batch) - 1] = self._forwards
        elif event == Event.EVAL_START:
            self._eval_batches = 0
        elif event == Event.EVAL_BATCH_END:
            self._eval_batches += 1
        elif event == Event.EVAL_END:
            self.evals.append((int(state.timestamp.batch), self._eval_batches))


def _run(recipe, schedule, **orchestrator):
    recipe["algorithms"] = {"orchestrator": {"schedule": schedule, **orchestrator}}
    plan = validate(recipe)
    probe = Probe()
    plan.callbacks.append(probe)
    trainer = run(plan)
    return trainer, probe


def _resume(recipe, checkpoint, tmp_path):
    """The run resumed from ``checkpoint``; checks that it trained from there on."""
    probe = Probe()
    trainer, summary = resume_from(recipe, checkpoint, tmp_path / checkpoint, callbacks=[probe])
    start = int(checkpoint.split("-ba")[1].split("-")[0])
    assert min(probe.rows) == start
    return trainer, summary, probe, start


def _fired(trainer):
    alg = next(a for a in trainer.state.algorithms if isinstance(a, Orchestrator))
    return [(r["index"], r["batch"], r["reason"], r["status"]) for r in alg.fired], alg


def _cosine(t, warmup, total, alpha_f=0.1):
    """Composer's cosine_with_warmup factor at time t (batches)."""
    if t < warmup:
        return t / warmup
    return alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_hyperparameter_ops_fire_by_loss_and_timeout_in_order_and_do_what_they_say(tiny_recipe, one_thread, tmp_path):
    tiny_recipe.update(max_duration="12ba", save_interval="10ba")
    schedule = [
        {"name": "change_lr", "value": 2.0, "trigger_loss": 100.0, "reevaluate": False},
        {"name": "change_batch_size", "value": 0.5, "trigger_loss": None, "max_wait_iters": 2},
        {"name": "set_microbatches", "value": 2, "trigger_loss": 100.0},
        {"name": "set_eval_interval", "value": 3, "trigger_loss": -1.0, "max_wait": "1ba"},
        {"name": "set_eval_iters", "value": 1, "trigger_loss": 100.0},
        {"name": "change_lr", "value": 3.0, "trigger_loss": -1.0},  # never fires
    ]
    trainer, probe = _run(tiny_recipe, schedule)
    fired, alg = _fired(trainer)
    # loss at the eval of batch 4; 2 batches later a timeout; the next eval (8); 1 batch later; the eval of 9
    assert fired == [(0, 4, "loss", "applied"), (1, 6, "timeout", "applied"), (2, 8, "loss", "applied"),
                     (3, 9, "timeout", "applied"), (4, 9, "loss", "applied")]
    # LR: the recipe's cosine (2ba warmup over 12ba) from the start, x2 from batch 4 on (batch b trains at f(b-1))
    for b, lr in probe.lr.items():
        expected = 3e-3 * _cosine(max(b - 1, 0), 2, 12) * (2.0 if b >= 4 else 1.0)
        assert lr == pytest.approx(expected, rel=1e-6), b
    # rows per step halve after batch 6; tokens counted exactly
    assert [probe.rows[b] for b in range(12)] == [8] * 6 + [4] * 6
    assert int(trainer.state.timestamp.token) == 32 * (6 * 8 + 6 * 4)
    # microbatches: 8 rows / 4, then 4 / 4, then 4 / 2
    assert [probe.microbatches[b] for b in range(12)] == [2] * 6 + [1] * 2 + [2] * 4
    # evals: eval_first, every 4 batches, then every 3 from batch 9; 2 eval batches, then 1
    assert probe.evals == [(0, 2), (4, 2), (8, 2), (9, 2), (12, 1)]
    # the summary has a line per fired op, and the records
    info = read_summary(tiny_recipe["summary_file"])
    section = info["algorithms"]["orchestrator"]
    assert [r["name"] for r in section["ops"]] == [s["name"] for s in schedule[:5]]
    assert len(section["lines"]) == 6 and "not fired" in section["lines"][-1]
    assert section["ops"][1]["waited"] == "2ba" and section["ops"][0]["trigger_loss"] == 100.0

    # resumed after the last op: rows, microbatches, LR, eval batches and interval as in the uninterrupted run
    _, after, again, _ = _resume(tiny_recipe, "ep0-ba10-rank0.pt", tmp_path)
    assert again.rows == {10: 4, 11: 4} and again.microbatches == {10: 2, 11: 2}
    assert again.lr == pytest.approx({b: probe.lr[b] for b in (10, 11)}, rel=1e-9)
    assert again.evals == [(12, 1)]
    assert after["train_loss"] == pytest.approx(info["train_loss"], rel=1e-5)


def test_reevaluate_cascades_and_architecture_ops_grow_the_model(tiny_recipe, one_thread, tmp_path):
    tiny_recipe.update(max_duration="8ba", save_interval="2ba")
    schedule = [
        {"name": "stack_layers", "value": 2, "trigger_loss": 100.0, "reevaluate": True,
         "args": {"init": "function_preserving"}},
        {"name": "widen_mlp", "value": 1.001, "trigger_loss": 100.0, "reevaluate": True},  # adds no unit: skipped
        {"name": "widen_mlp", "value": 1.5, "trigger_loss": 100.0, "reevaluate": True, "args": {"noise_std": 0.01}},
        {"name": "change_lr", "value": 0.5, "trigger_loss": 100.0, "reevaluate": False},
        {"name": "change_lr", "value": 2.0, "trigger_loss": 100.0},
    ]
    trainer, probe = _run(tiny_recipe, schedule)
    fired, alg = _fired(trainer)
    # each re-evaluated op lets the next fire at once; after change_lr (no reevaluate) the next waits for an eval
    assert fired == [(0, 4, "loss", "applied"), (1, 4, "loss", "skipped"), (2, 4, "loss", "applied"),
                     (3, 4, "loss", "applied"), (4, 8, "loss", "applied")]
    records = alg.fired
    assert records[0]["loss_after"] == pytest.approx(records[0]["loss_before"], abs=1e-4)  # function preserving
    assert records[1]["loss_before"] == records[0]["loss_after"] and "add a unit" in records[1]["did"]
    assert records[2]["loss_before"] == records[1]["loss_after"] and records[3]["loss_after"] is None
    hf = unwrap_hf(trainer.state.model)
    assert hf.config.num_hidden_layers == 4 and hf.config.intermediate_size == 96
    opt = trainer.state.optimizers[0]
    params = list(composer_model(trainer.state).parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}
    assert all(int(opt.state[p]["step"]) == 8 for p in params)  # state carried across both growths
    assert probe.lr[5] == pytest.approx(0.5 * 3e-3 * _cosine(4, 2, 8), rel=1e-6)

    # resume right after the ops (checkpoint of batch 4) and between them (6): the same run
    full = read_summary(tiny_recipe["summary_file"])
    for checkpoint in ("ep0-ba4-rank0.pt", "ep0-ba6-rank0.pt"):
        resumed, after, _, _ = _resume(tiny_recipe, checkpoint, tmp_path)
        assert _fired(resumed)[0] == fired
        assert unwrap_hf(resumed.state.model).config.intermediate_size == 96
        assert after["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
        assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in full["evals"]], rel=1e-5)


def test_batch_size_and_schedule_ops_resume_exactly_mid_batch(tiny_recipe, one_thread, tmp_path):
    tiny_recipe.update(max_duration="10ba", eval_interval="5ba", save_interval="2ba")
    schedule = [
        {"name": "change_batch_size", "value": 0.5, "trigger_loss": None, "max_wait_iters": 3},
        {"name": "change_warmup_iters", "value": 1.5, "trigger_loss": None, "max_wait_iters": 1},  # 2ba -> 3ba
        {"name": "reset_lr_schedule", "value": None, "trigger_loss": None, "max_wait_iters": 1},
        {"name": "change_batch_size", "value": 3, "trigger_loss": None, "max_wait": "2ba"},
    ]
    trainer, probe = _run(tiny_recipe, schedule)
    assert [f[:2] for f in _fired(trainer)[0]] == [(0, 3), (1, 4), (2, 5), (3, 7)]
    assert [probe.rows[b] for b in range(10)] == [8] * 3 + [4] * 4 + [12] * 3
    assert int(trainer.state.timestamp.token) == 32 * (3 * 8 + 4 * 4 + 3 * 12)
    # every row of the loader trained once, in order
    from composer_growth.data.loaders import build_lm_dataloader

    loader = build_lm_dataloader(tiny_recipe["data"]["path"], "train", 8, shuffle=True, seed=tiny_recipe["seed"])
    rows = [int(i) for batch, _ in zip(loader, range(10)) for i in batch["input_ids"][:, 0]]
    assert [i for b in range(10) for i in probe.ids[b]] == rows[:76]
    # LR: batches 0-3 the recipe's 2ba warmup; batch 4 with a 3ba warmup; from 5 the schedule restarted
    expected = {0: _cosine(0, 2, 10), 1: _cosine(0, 2, 10), 2: _cosine(1, 2, 10), 3: _cosine(2, 2, 10),
                4: _cosine(4, 3, 10), 5: 0.0, 6: 0.0, 7: _cosine(1, 3, 5), 8: _cosine(2, 3, 5), 9: _cosine(3, 3, 5)}
    assert [probe.lr[b] for b in range(10)] == pytest.approx([3e-3 * expected[b] for b in range(10)], abs=1e-12)

    # batch 4 and 8 checkpoints stop inside a loader batch (4 of its 8 rows trained)
    full = read_summary(tiny_recipe["summary_file"])
    for checkpoint in ("ep0-ba4-rank0.pt", "ep0-ba8-rank0.pt"):
        resumed, after, again, start = _resume(tiny_recipe, checkpoint, tmp_path)
        assert {b: again.ids[b] for b in range(start, 10)} == {b: probe.ids[b] for b in range(start, 10)}
        assert {b: again.lr[b] for b in range(start, 10)} == pytest.approx({b: probe.lr[b] for b in range(start, 10)})
        assert int(resumed.state.timestamp.token) == int(trainer.state.timestamp.token)
        assert after["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
        assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in full["evals"]], rel=1e-5)


# seed-style entries: {name, value, trigger_loss, max_wait_iters, reevaluate}; value multiplies the run's current value
SEED_MULTIPLIERS = """
- {name: change_batch_size, value: 0.5, trigger_loss: 100.0, max_wait_iters: 1000, reevaluate: true}
- {name: change_eval_interval, value: 0.5, trigger_loss: 100.0, max_wait_iters: 1000, reevaluate: true}
- {name: change_eval_iters, value: 0.5, trigger_loss: 100.0, max_wait_iters: 1000, reevaluate: false}
- {name: change_warmup_iters, value: 2.0, trigger_loss: null, max_wait_iters: 1, reevaluate: false}
- {name: change_grad_accum, value: 2.0, trigger_loss: null, max_wait_iters: 2, reevaluate: false}
"""


def test_seed_multipliers_scale_the_current_values_and_resume_exactly(tiny_recipe, one_thread, tmp_path):
    """Seed 004's multipliers: the batch halved with the eval interval (4ba x 0.5 = 2ba, a batch interval the
    resizable train loader can run), eval batches 2 x 0.5, warmup 2ba x 2, grad accumulation 1 x 2
    microbatches of 4 rows (the batch grows back to 8 rows)."""
    tiny_recipe.update(max_duration="12ba", save_interval="4ba")
    schedule = yaml.safe_load(SEED_MULTIPLIERS)
    trainer, probe = _run(tiny_recipe, schedule)
    fired, alg = _fired(trainer)
    assert fired == [(0, 4, "loss", "applied"), (1, 4, "loss", "applied"), (2, 4, "loss", "applied"),
                     (3, 5, "timeout", "applied"), (4, 7, "timeout", "applied")]
    assert alg.settings["eval_interval"] == "2ba" and alg.settings["eval_batches"] == 1
    assert alg.settings["warmup"] == "4ba" and alg.settings["rows"] == 8
    assert [probe.rows[b] for b in range(12)] == [8] * 4 + [4] * 3 + [8] * 5
    assert [probe.microbatches[b] for b in range(12)] == [2] * 4 + [1] * 3 + [2] * 5  # microbatches of 4 rows
    assert int(trainer.state.timestamp.token) == 32 * (4 * 8 + 3 * 4 + 5 * 8)
    assert probe.evals == [(0, 2), (4, 2), (6, 1), (8, 1), (10, 1), (12, 1)]
    # the warmup op (batch 5) rebuilt the cosine with a 4ba warmup: the LR from batch 5 on is that schedule's
    assert [probe.lr[b] for b in range(5, 12)] == pytest.approx(
        [3e-3 * _cosine(b if b == 5 else b - 1, 4, 12) for b in range(5, 12)], rel=1e-6)

    # resumed right after the first three ops (batch 4) and after all of them (batch 8): the same run
    full = read_summary(tiny_recipe["summary_file"])
    for checkpoint in ("ep0-ba4-rank0.pt", "ep0-ba8-rank0.pt"):
        resumed, after, again, start = _resume(tiny_recipe, checkpoint, tmp_path)
        assert _fired(resumed)[0] == fired
        assert {b: again.rows[b] for b in range(start, 12)} == {b: probe.rows[b] for b in range(start, 12)}
        assert {b: again.microbatches[b] for b in range(start, 12)} == {
            b: probe.microbatches[b] for b in range(start, 12)}
        assert {b: again.ids[b] for b in range(start, 12)} == {b: probe.ids[b] for b in range(start, 12)}
        assert again.lr == pytest.approx({b: probe.lr[b] for b in range(start, 12)}, rel=1e-9)
        assert again.evals == [e for e in probe.evals if e[0] > start]
        assert after["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
        assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in full["evals"]], rel=1e-5)


def test_a_dur_eval_interval_runs_as_batches_with_a_resizable_train_loader(tiny_recipe, one_thread):
    """The recipe's eval interval as a share of the run (0.25 x 8ba) with change_batch_size: evals every
    2 batches, then every 4 after change_eval_interval 2.0 (no sized train loader needed)."""
    tiny_recipe.update(eval_interval="0.25dur", save_folder=None)
    schedule = yaml.safe_load("""
- {name: change_batch_size, value: 0.5, trigger_loss: null, max_wait_iters: 1, reevaluate: false}
- {name: change_eval_interval, value: 2.0, trigger_loss: null, max_wait_iters: 2, reevaluate: false}
""")
    trainer, probe = _run(tiny_recipe, schedule)
    assert [f[:2] for f in _fired(trainer)[0]] == [(0, 1), (1, 3)]
    assert [probe.rows[b] for b in range(8)] == [8] + [4] * 7
    assert [e[0] for e in probe.evals] == [0, 2, 4, 8]


def test_grad_accum_keeps_a_microbatch_that_held_all_of_a_ranks_rows(tiny_recipe, one_thread):
    """8 rows per rank in one microbatch (device_train_microbatch_size 16): change_grad_accum 2.0 makes two
    microbatches of 8 rows, a batch of 16."""
    tiny_recipe.update(max_duration="4ba", device_train_microbatch_size=16, save_folder=None)
    schedule = [{"name": "change_grad_accum", "value": 2.0, "trigger_loss": None, "max_wait_iters": 2,
                 "reevaluate": False}]
    trainer, probe = _run(tiny_recipe, schedule)
    assert [probe.rows[b] for b in range(4)] == [8, 8, 16, 16]
    assert [probe.microbatches[b] for b in range(4)] == [1, 1, 2, 2]
    assert trainer.state.device_train_microbatch_size == 8


def _attention_lora_off_loss(trainer):
    """The monitored eval loss with the attention adapters computed as peft's disabled adapters (the base
    layer alone) and given a scaling of 1, which would count if they were on."""
    from peft.tuners.lora import LoraLayer

    from composer_growth.algorithms.orchestrator import eval_metric

    hf = unwrap_hf(trainer.state.model)
    attention = [m for n, m in hf.named_modules() if isinstance(m, LoraLayer) and n.endswith(("q_proj", "v_proj"))]
    for m in attention:
        m.scaling["default"] = 1.0
    on = eval_metric(trainer.state, "eval", "LanguageCrossEntropy")
    for m in attention:
        m.enable_adapters(False)
    off = eval_metric(trainer.state, "eval", "LanguageCrossEntropy")
    for m in attention:
        m.enable_adapters(True)
        m.scaling["default"] = 0.0
    return on, off


def test_lora_scaling_to_zero_turns_a_group_off_and_resumes(tiny_recipe, one_thread, tmp_path):
    """Seed 004's decrease_attn_lora_scaling: the attention adapters' scaling x0.5, then x0: the loss is the
    one of the model with those adapters off; the embedding adapters keep theirs; a resume replays both."""
    from composer_growth.algorithms.orchestrator import eval_metric

    tiny_recipe.update(max_duration="8ba", save_interval="2ba")
    tiny_recipe["model"]["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}
    schedule = yaml.safe_load("""
- {name: decrease_attn_lora_scaling, value: 0.5, trigger_loss: 100.0, max_wait_iters: 1000, reevaluate: false}
- {name: decrease_attn_lora_scaling, value: 0.0, trigger_loss: null, max_wait_iters: 2, reevaluate: true}
""")
    trainer, _ = _run(tiny_recipe, schedule)
    fired, alg = _fired(trainer)
    assert fired == [(0, 4, "loss", "applied"), (1, 6, "timeout", "applied")]
    assert "off" in alg.fired[1]["did"]
    assert set(_scalings(trainer, "q_proj").values()) == {(4, 0.0)}
    assert set(_scalings(trainer, "embed_tokens").values()) == {(4, 2.0)}
    now = eval_metric(trainer.state, "eval", "LanguageCrossEntropy")
    on, off = _attention_lora_off_loss(trainer)
    assert now == pytest.approx(off, abs=1e-7) and abs(on - off) > 1e-5  # the adapters would count if on

    full = read_summary(tiny_recipe["summary_file"])
    resumed, after, _, _ = _resume(tiny_recipe, "ep0-ba6-rank0.pt", tmp_path)
    assert _fired(resumed)[0] == fired
    assert set(_scalings(resumed, "q_proj").values()) == {(4, 0.0)}
    assert after["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in full["evals"]], rel=1e-5)


@pytest.mark.launcher
def test_two_ranks_apply_the_same_ops_and_hold_identical_parameters(tiny_recipe, tmp_path):
    recipe = dict(tiny_recipe, max_duration="6ba", eval_first=False, eval_interval="3ba", save_folder=None,
                  global_train_batch_size=16, summary_file=str(tmp_path / "s{rank}.json"))
    recipe["algorithms"] = {"orchestrator": {"schedule": [
        {"name": "stack_layers", "value": 2, "trigger_loss": 100.0, "reevaluate": True},
        {"name": "widen_mlp", "value": 1.5, "trigger_loss": 100.0, "args": {"noise_std": 0.01, "seed": 3}},
        {"name": "change_batch_size", "value": 0.5, "trigger_loss": None, "max_wait_iters": 1},
        {"name": "change_lr", "value": 0.5, "trigger_loss": None, "max_wait_iters": 1},
    ]}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = launch(os.path.join(ROOT, "tests", "scripts", "grow_ddp.py"), [str(path), str(tmp_path / "p{rank}.json")],
                  tmp_path)
    assert proc.returncode == 0, launch_failure(proc, tmp_path)
    p0, p1 = (json.loads((tmp_path / f"p{r}.json").read_text()) for r in (0, 1))
    s0, s1 = (json.loads((tmp_path / f"s{r}.json").read_text()) for r in (0, 1))
    ops = s0["algorithms"]["orchestrator"]["ops"]
    assert [(r["index"], r["batch"], r["status"]) for r in ops] == [(0, 3, "applied"), (1, 3, "applied"),
                                                                     (2, 4, "applied"), (3, 5, "applied")]
    untimed = [[{k: v for k, v in r.items() if k not in ("seconds", "did")}
                for r in s["algorithms"]["orchestrator"]["ops"]] for s in (s0, s1)]
    assert untimed[0] == untimed[1]  # rank 0's decisions, and the same losses, on both ranks
    assert p0["ddp"] and p0["layers"] == 4
    assert p0["params"] == p1["params"] and p0["loss"] == p1["loss"]
    assert s0["tokens_trained"] == 32 * (4 * 16 + 2 * 8)  # rows per step halved after batch 4


@pytest.mark.launcher
def test_lora_and_growth_ops_under_fsdp2_match_ddp_and_resume(tiny_recipe, tmp_path):
    """Under composer -n 2 on a peft-wrapped model (model.peft), DDP and FSDP2 (sharded checkpoints):
    the first eval's loss fires a merge (re-evaluated), whose loss fires the attention adapters' rank
    halving at once (through surgery.grow); then by timeout G_stack and a LoRA alpha change. Both fire
    the same ops at the same batches, train the same losses, and a run resumed from the sharded
    checkpoint written after them goes on exactly."""
    tiny_recipe["model"]["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}
    tiny_recipe["algorithms"] = {"orchestrator": {"verbose": False, "schedule": [
        {"name": "merge_lora_weights", "trigger_loss": 100.0, "reevaluate": True, "args": {"prune": "none"}},
        {"name": "divide_attn_lora_rank", "value": 2, "trigger_loss": 100.0},
        {"name": "stack_layers", "value": 2, "trigger_loss": None, "max_wait_iters": 1},
        {"name": "change_lora_alpha", "value": 2.0, "trigger_loss": None, "max_wait_iters": 1},
    ]}}
    tiny_recipe.update(max_duration="7ba", eval_first=False, eval_interval="3ba", save_interval="5ba")
    runs = ["ddp", "sharded", "sharded@ep0-ba5"]
    for results in fsdp_runs(tiny_recipe, runs, tmp_path):
        ddp, fsdp, resumed = (results[r] for r in runs)
        assert not ddp["fsdp"] and fsdp["fsdp"] and fsdp["units"] == 4 + 1
        fired = [[(r["index"], r["batch"], r["reason"], r["status"]) for r in run_["replayed"][0]["fired"]]
                 for run_ in (ddp, fsdp, resumed)]
        assert fired == [[(0, 3, "loss", "applied"), (1, 3, "loss", "applied"), (2, 4, "timeout", "applied"),
                          (3, 5, "timeout", "applied")]] * 3
        merge = [run_["replayed"][0]["fired"][0] for run_ in (ddp, fsdp)]
        assert merge[1]["loss_after"] == pytest.approx(merge[0]["loss_after"], abs=1e-5)
        assert merge[1]["loss_after"] == pytest.approx(merge[1]["loss_before"], abs=1e-5)  # the same function
        assert fsdp["layers"] == resumed["layers"] == 4
        assert fsdp["shapes"] == ddp["shapes"] == resumed["shapes"]
        ranks = {n.split(".")[-4]: shape[0] for n, shape in fsdp["shapes"].items()
                 if "layers.3." in n and "lora_A" in n}
        assert ranks == {"q_proj": 2, "v_proj": 2, "up_proj": 4}
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
        assert fsdp["params"] == pytest.approx(ddp["params"], rel=1e-3, abs=1e-3)
        assert resumed["losses"] == pytest.approx(fsdp["losses"][5:], abs=1e-6)
        assert resumed["params"] == pytest.approx(fsdp["params"], rel=1e-6, abs=1e-6)


def test_the_issue_example_is_accepted_verbatim_from_a_json_file(tmp_path, tiny_recipe):
    path = tmp_path / "schedule.json"
    path.write_text(EXAMPLE)
    alg = Orchestrator(schedule=str(path))
    assert [op.name for op in alg.ops] == ["change_lr", "stack_layers", "widen_mlp", "reset_lr_schedule",
                                          "change_lora_alpha", "merge_lora_weights"]
    assert [op.max_wait.value for op in alg.ops] == [1000, 2000, 2000, 500, 3000, 5000]
    assert [op.reevaluate for op in alg.ops] == [False, True, True, False, False, True]
    yaml_path = tmp_path / "schedule.yaml"
    yaml_path.write_text(yaml.safe_dump(json.loads(EXAMPLE)))
    assert [op.label() for op in Orchestrator(schedule=str(yaml_path)).ops] == [op.label() for op in alg.ops]
    # in a recipe: LoRA ops need adapters on the model
    tiny_recipe["algorithms"] = {"orchestrator": {"schedule": str(path)}}
    with pytest.raises(ConfigError, match=r"^algorithms.orchestrator.schedule\[4\].name='change_lora_alpha': needs a "
                                          r"model with LoRA adapters"):
        validate(tiny_recipe)


    # and on a model with adapters the example is a valid recipe
    tiny_recipe["model"]["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    plan = validate(tiny_recipe)
    assert [op.name for op in plan.algorithms[0].ops] == [op.name for op in alg.ops]


def _scalings(trainer, module):
    from peft.tuners.lora import LoraLayer

    hf = unwrap_hf(trainer.state.model)
    return {n: (m.r["default"], m.scaling["default"]) for n, m in hf.named_modules()
            if isinstance(m, LoraLayer) and n.endswith(module)}


def test_lora_ops_change_scaling_rank_and_merge_and_resume_exactly(tiny_recipe, one_thread, tmp_path):
    tiny_recipe.update(max_duration="8ba", save_interval="2ba")
    tiny_recipe["model"]["peft"] = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}
    schedule = [
        {"name": "change_lora_alpha", "value": 0.5, "trigger_loss": 100.0},
        {"name": "divide_attn_lora_rank", "value": 2, "trigger_loss": None, "max_wait_iters": 1},
        {"name": "divide_vocab_lora_rank", "value": 4, "trigger_loss": None, "max_wait_iters": 1},
        {"name": "merge_lora_weights", "value": None, "trigger_loss": None, "max_wait_iters": 2, "reevaluate": True,
         "args": {"prune": "reset"}},
    ]
    trainer, probe = _run(tiny_recipe, schedule)
    fired, alg = _fired(trainer)
    assert fired == [(0, 4, "loss", "applied"), (1, 5, "timeout", "applied"), (2, 6, "timeout", "applied"),
                     (3, 8, "timeout", "applied")]
    # alpha 16 -> 8 at rank 8 (scaling 2 -> 1), then attention rank 8 -> 4 (scaling alpha / r = 2); embedding 8 -> 2
    assert set(_scalings(trainer, "q_proj").values()) == {(4, 2.0)}
    assert set(_scalings(trainer, "embed_tokens").values()) == {(2, 4.0)}
    # merged at the last batch: the same function (loss measured right before and after), adapters restarted
    merge = alg.fired[3]
    assert merge["loss_after"] == pytest.approx(merge["loss_before"], abs=1e-4)
    hf = unwrap_hf(trainer.state.model)
    lora_b = [p for n, p in hf.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().max()) == 0 for p in lora_b)
    opt = trainer.state.optimizers[0]
    assert all(float(opt.state[p]["exp_avg"].abs().max()) == 0 for p in lora_b)

    # resumed between the rank changes and right after them: the same run
    full = read_summary(tiny_recipe["summary_file"])
    for checkpoint in ("ep0-ba4-rank0.pt", "ep0-ba6-rank0.pt"):
        resumed, after, _, _ = _resume(tiny_recipe, checkpoint, tmp_path)
        assert _fired(resumed)[0] == fired
        assert set(_scalings(resumed, "q_proj").values()) == {(4, 2.0)}
        assert after["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
        assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in full["evals"]], rel=1e-5)


def _op(name="change_lr", value=2.0, **kw):
    return {"name": name, "value": value, "trigger_loss": 5.0, **kw}


def test_surgery_ops_under_fsdp2_reject_activation_offload_before_training(tiny_recipe):
    tiny_recipe["algorithms"] = {"orchestrator": {"schedule": [_op("stack_layers", 2)]}}
    tiny_recipe["parallelism"] = {"fsdp": {"version": 2, "activation_cpu_offload": True}}
    with pytest.raises(ConfigError, match=r"^parallelism.fsdp.activation_cpu_offload=True: false with "
                                          r"schedule\[0\].name='stack_layers'"):
        validate(tiny_recipe)


@pytest.mark.parametrize("schedule, key, match", [
    ([], "schedule", "non-empty list"),
    ([_op("change_learning_rate")], "schedule[0].name", "one of change_lr, change_batch_size"),
    ([_op(), _op("foo")], "schedule[1].name", "one of change_lr"),
    ([_op(value="2")], "schedule[0].value", "a number > 0"),
    ([_op(value=0)], "schedule[0].value", "a number > 0"),
    ([_op(value=-1.5)], "schedule[0].value", "a number > 0"),
    ([_op("stack_layers", 1)], "schedule[0].value", "an integer >= 2"),
    ([_op("stack_layers", 2.5)], "schedule[0].value", "an integer >= 2"),
    ([_op("widen_mlp", 1.0)], "schedule[0].value", "a number > 1"),
    ([_op("reset_lr_schedule", 1)], "schedule[0].value", "null"),
    ([_op("set_eval_iters", 0)], "schedule[0].value", "an integer >= 1"),
    ([_op("set_eval_interval", "2weeks")], "schedule[0].value", "Composer time"),
    ([_op("change_eval_iters", 0)], "schedule[0].value", "a multiplier of the eval batches"),
    ([_op("change_eval_interval", "100ba")], "schedule[0].value", "set_eval_interval sets it outright"),
    ([_op("change_warmup_iters", "50ba")], "schedule[0].value", "a multiplier of the schedule's warmup"),
    ([_op("change_warmup_iters", -2)], "schedule[0].value", "a number > 0"),
    ([_op("change_batch_size", 0.3)], "schedule[0].value", "whole rows"),
    ([_op("change_batch_size", 1.25)], "schedule[0].value", "microbatches of 4"),
    ([_op("change_batch_size", 0.5), _op("change_batch_size", 0.1)], "schedule[1].value", "whole rows"),
    ([_op("change_grad_accum", 0.3)], "schedule[0].value", "whole number >= 1 of microbatches per step (2 of 4"),
    ([_op("change_grad_accum", 0)], "schedule[0].value", "set_microbatches sets it outright"),
    ([_op("set_microbatches", 3)], "schedule[0].value", "splits the 8 rows"),
    ([_op("set_microbatches", 16)], "schedule[0].value", "splits the 8 rows"),
    ([_op("merge_lora_weights", None)], "schedule[0].name", "needs a model with LoRA adapters"),
    ([_op("divide_attn_lora_rank", 2)], "schedule[0].name", "needs a model with LoRA adapters"),
    ([_op("decrease_attn_lora_scaling", 0)], "schedule[0].name", "needs a model with LoRA adapters"),
    ([_op("divide_vocab_lora_rank", 1.5)], "schedule[0].value", "an integer >= 1"),
    ([_op("decrease_vocab_lora_scaling", 1.5)], "schedule[0].value", "a number in [0, 1]"),
    ([_op("decrease_attn_lora_scaling", -0.5)], "schedule[0].value", "0 disables them"),
    ([_op("merge_lora_weights", None, args={"prune": "half"})], "schedule[0].args.prune", "one of reset"),
    ([_op(trigger_loss=None)], "schedule[0].trigger_loss", "could never fire"),
    ([_op(trigger_loss="low")], "schedule[0].trigger_loss", "a number or null"),
    ([_op(max_wait_iters=0)], "schedule[0].max_wait_iters", "an integer >= 1"),
    ([_op(max_wait="soon")], "schedule[0].max_wait", "Composer time"),
    ([_op(max_wait_iters=5, max_wait="5ba")], "schedule[0].max_wait", "not together"),
    ([_op(reevaluate="yes")], "schedule[0].reevaluate", "true or false"),
    ([_op(when=3)], "schedule[0].when", "unknown key"),
    ([_op("stack_layers", 2, args={"init": "zeros"})], "schedule[0].args.init", "one of copy"),
    ([_op("widen_mlp", 2, args={"times": 2})], "schedule[0].args.times", "allowed: noise_std, seed"),
    ("missing.json", "schedule", "no such file; give the path of a .json"),
])
def test_bad_schedules_fail_before_training_naming_index_and_key(tiny_recipe, schedule, key, match):
    tiny_recipe["algorithms"] = {"orchestrator": {"schedule": schedule}}
    with pytest.raises(ConfigError) as err:
        validate(tiny_recipe)
    assert str(err.value).startswith(f"algorithms.orchestrator.{key}="), str(err.value)
    assert match in str(err.value), str(err.value)


@pytest.mark.parametrize("options, key", [({"monitor": "eval/loss"}, "monitor"), ({"max_wait": "0ba"}, "max_wait"),
                                          ({"verbose": 1}, "verbose")])
def test_bad_options_fail_before_training(tiny_recipe, options, key):
    tiny_recipe["algorithms"] = {"orchestrator": {"schedule": [_op()], **options}}
    with pytest.raises(ConfigError, match=rf"^algorithms.orchestrator.{key}="):
        validate(tiny_recipe)


def test_architecture_op_on_a_family_outside_the_table_is_named():
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from transformers import OPTConfig, OPTForCausalLM

    model = HuggingFaceModel(OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                                      num_attention_heads=2, vocab_size=64)))
    alg = Orchestrator(schedule=[_op("change_lr"), _op("widen_mlp", 2)])
    with pytest.raises(ConfigError, match=r"^schedule\[1\].name='widen_mlp': model family='opt': supported"):
        Trainer(model=model, algorithms=[alg], max_duration="2ba")


def _script_trainer(scheduler, orchestrator, **kwargs):
    """A Composer script's Trainer (no recipe): a tiny llama, 8 batches, the given scheduler (or
    orchestrators, a list), ``kwargs`` for the Trainer."""
    import torch
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    ids = torch.randint(1, 64, (32, 8), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
    model = HuggingFaceModel(hf, use_logits=True, shift_labels=True)
    return Trainer(model=model, train_dataloader=DataLoader(rows, batch_size=4), max_duration="8ba",
                   optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2), schedulers=scheduler,
                   algorithms=orchestrator if isinstance(orchestrator, list) else [orchestrator], progress_bar=False,
                   **kwargs)


def test_lr_restart_in_a_composer_script_needs_a_restartable_schedule():
    from composer.optim import CosineAnnealingWithWarmupScheduler

    from composer_growth.algorithms.lr import RestartableSchedule

    def schedule():
        return Orchestrator(verbose=False, schedule=[_op("reset_lr_schedule", None, trigger_loss=None,
                                                         max_wait_iters=4)])

    with pytest.raises(ConfigError, match=r"^schedule\[0\].name='reset_lr_schedule': needs the recipe's scheduler"):
        _script_trainer(CosineAnnealingWithWarmupScheduler(t_warmup="2ba"), schedule()).fit()
    orchestrator = schedule()
    trainer = _script_trainer(RestartableSchedule(CosineAnnealingWithWarmupScheduler(t_warmup="2ba")), orchestrator)
    lrs = []
    trainer.state.callbacks.append(type("LR", (Callback,), {"batch_start": lambda self, state, logger: lrs.append(
        state.optimizers[0].param_groups[0]["lr"])})())
    trainer.fit()
    assert orchestrator.fired[0]["status"] == "applied" and orchestrator.fired[0]["batch"] == 4
    # from batch 4 the schedule runs again over the 4 batches left: the lrs of batches 0-3 once more
    assert lrs[:4] == pytest.approx([0.0, 0.0, 5e-3, 1e-2]) and lrs[4:] == pytest.approx(lrs[:4])


def test_two_orchestrators_in_a_script_each_resume_their_own_state(tmp_path):
    """Composer keys a checkpoint's algorithm states by class name (the last instance's wins); each of
    two orchestrators gets its own back, so the one that fired before the checkpoint does not fire again."""
    from composer.optim import ConstantScheduler

    def orchestrators():
        return [Orchestrator(verbose=False, schedule=[_op("change_lr", 0.5, trigger_loss=None, max_wait_iters=2)]),
                Orchestrator(verbose=False, schedule=[_op("change_lr", 0.25, trigger_loss=None, max_wait_iters=6)])]

    def lrs_of(trainer):
        seen = []
        trainer.state.callbacks.append(type("LR", (Callback,), {"batch_start": lambda self, state, logger: seen.append(
            state.optimizers[0].param_groups[0]["lr"])})())
        return seen

    whole = orchestrators()
    trainer = _script_trainer(ConstantScheduler(), whole, save_folder=str(tmp_path / "ckpt"), save_interval="4ba")
    lrs = lrs_of(trainer)
    trainer.fit()
    assert [[f["batch"] for f in o.fired] for o in whole] == [[2], [6]]
    resumed = orchestrators()
    trainer = _script_trainer(ConstantScheduler(), resumed, load_path=str(tmp_path / "ckpt" / "ep0-ba4-rank0.pt"))
    after = lrs_of(trainer)
    trainer.fit()
    assert [[f["batch"] for f in o.fired] for o in resumed] == [[2], [6]]
    assert after == pytest.approx(lrs[4:]) and lrs[4:] == pytest.approx([5e-3, 5e-3, 1.25e-3, 1.25e-3])


def test_change_lr_on_a_merge_batch_reports_the_schedule_and_the_ramp(tiny_recipe, one_thread):
    """On the batch of a LoRA merge, lora_merge's restart ramp holds the lr at 0: the op's line reports
    the scheduled lr it scales and the ramp's factor, not ``lr 0 -> 0``."""
    tiny_recipe["model"]["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    tiny_recipe["algorithms"] = {
        "lora_merge": {"interval": "4ba", "restart_warmup": "2ba"},
        "orchestrator": {"schedule": [{"name": "change_lr", "value": 0.5, "trigger_loss": None,
                                       "max_wait_iters": 4, "reevaluate": False}]},
    }
    tiny_recipe.update(max_duration="6ba", save_interval="6ba")
    trainer = run(validate(tiny_recipe))
    fired, alg = _fired(trainer)
    assert fired == [(0, 4, "timeout", "applied")]
    merge = next(a for a in trainer.state.algorithms if type(a).__name__ == "LoraMergeRestart")
    assert merge.merges == 1 and merge.history[0]["batch"] == 4
    line = next(e["text"] for e in alg.run_events())
    lr = float(line.split("scheduled lr ")[1].split(" ->")[0])
    assert lr > 0 and line.split(" -> ")[1].startswith(f"{lr * 0.5:.3g} ") and "x0 from lora_merge now" in line, line


def test_lora_ops_beside_lora_merge_start_at_skip_before_and_act_after(tiny_recipe, one_thread):
    """``lora_merge`` ``start_at`` adds the adapters mid-run: the orchestrator's LoRA ops are accepted (no
    ``model.peft``), one firing before the adapters exist is skipped with a line, one after acts."""
    tiny_recipe.update(max_duration="8ba", save_interval="8ba")
    schedule = [{"name": "change_lora_alpha", "value": 0.5, "trigger_loss": None, "max_wait_iters": 1},
                {"name": "change_lora_alpha", "value": 0.5, "trigger_loss": None, "max_wait_iters": 4}]
    tiny_recipe["algorithms"] = {"lora_merge": {"interval": "4ba", "start_at": "3ba", "rank": 4, "alpha": 8.0},
                                 "orchestrator": {"schedule": schedule}}
    plan = validate(tiny_recipe)
    trainer = run(plan)
    fired, alg = _fired(trainer)
    assert [(i, status) for i, _, _, status in fired] == [(0, "skipped"), (1, "applied")], fired
    assert fired[0][1] < 3 <= fired[1][1]
    assert "no LoRA adapters" in alg.fired[0]["did"]
    assert set(_scalings(trainer, "q_proj").values()) == {(4, 1.0)}  # alpha 8 -> 4 at rank 4

"""``trigger_plateau`` on real Trainers: the orchestrator's ops and StackLayers fire where the eval loss stops
improving (checked against the recorded eval losses), resume exactly, validate, and show in ``plan``."""

from __future__ import annotations

import os

import pytest
import yaml
from composer.core import Callback

from composer_growth import Orchestrator
from composer_growth.algorithms.growth import StackLayers
from composer_growth.algorithms.plateau import Plateau
from composer_growth.errors import ConfigError
from composer_growth.plan import format_plan, plan_file
from composer_growth.recipe import run, validate
from composer_growth.unwrap import unwrap_hf

from conftest import launch, launch_failure, read_summary, resume_from

PLATEAU = {"window": "4ba", "min_delta": 0.05}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EvalLosses(Callback):
    """(batch, monitored eval loss) of every eval, as the Trainer computed it."""

    def __init__(self):
        self.losses: list[tuple[int, float]] = []

    def eval_end(self, state, logger) -> None:
        self.losses.append((int(state.timestamp.batch), float(state.eval_metric_values["LanguageCrossEntropy"])))


def first_plateau(losses: list[tuple[int, float]], window: int, min_delta: float | str) -> int | None:
    """The first eval batch t where gain(t) = min(loss at or before t - window) - min(loss at or before t) is
    below ``min_delta`` nats, or for a share ``"P%"`` below P% of the largest gain(s) of any eval s <= t."""
    steepest = 0.0
    for t, _ in losses:
        past = [loss for s, loss in losses if s <= t - window]
        if not past:
            continue
        gain = min(past) - min(loss for s, loss in losses if s <= t)
        steepest = max(steepest, gain)
        limit = float(min_delta[:-1]) / 100 * steepest if isinstance(min_delta, str) else min_delta
        if gain < limit:
            return t
    return None


@pytest.fixture
def plateau_recipe(tiny_recipe):
    """20 batches, an eval every 2, a checkpoint every 2; no warmup, so the loss falls fast, then flattens."""
    tiny_recipe.update(max_duration="20ba", eval_interval="2ba", save_interval="2ba")
    tiny_recipe["optimizer"]["lr"] = 1e-2
    tiny_recipe["scheduler"]["t_warmup"] = "0ba"
    return tiny_recipe


def _run(recipe):
    plan = validate(recipe)
    probe = EvalLosses()
    plan.callbacks.append(probe)
    return run(plan), probe


def _orchestrator(trainer) -> Orchestrator:
    return next(a for a in trainer.state.algorithms if isinstance(a, Orchestrator))


def _stack(trainer) -> StackLayers:
    return next(a for a in trainer.state.algorithms if isinstance(a, StackLayers))


def test_orchestrator_op_fires_at_the_first_plateau_and_resumes_exactly(plateau_recipe, one_thread, tmp_path):
    plateau_recipe["algorithms"] = {"orchestrator": {"schedule": [
        {"name": "change_lr", "value": 0.5, "trigger_plateau": PLATEAU, "max_wait_iters": 19},
        {"name": "change_lr", "value": 0.5, "trigger_plateau": {"window": "8ba", "min_delta": 0.001}},
    ]}}
    trainer, probe = _run(plateau_recipe)
    alg = _orchestrator(trainer)
    expected = first_plateau(probe.losses, 4, 0.05)
    assert expected is not None and expected > 4  # not the first eval the window allows: the loss fell first
    assert [(r["index"], r["batch"], r["reason"]) for r in alg.fired] == [(0, expected, "plateau")]
    losses = dict(probe.losses)
    gain = min(v for b, v in probe.losses if b <= expected - 4) - min(v for b, v in probe.losses if b <= expected)
    assert alg.fired[0]["improvement"] == pytest.approx(gain, abs=1e-6) and gain < 0.05
    assert alg.fired[0]["loss_before"] == pytest.approx(losses[expected])
    # the second op's window opens when the first fired: no eval 8 batches after it within the run
    assert alg.ops[1].trigger_plateau.history[0][0] > expected
    summary = read_summary(plateau_recipe["summary_file"])
    assert "plateau: improved" in summary["algorithms"]["orchestrator"]["lines"][0]

    # resumed from a checkpoint after some evals but before the plateau: it fires at the same batch
    checkpoint = f"ep0-ba{expected - 2}-rank0.pt"
    resumed, after = resume_from(plateau_recipe, checkpoint, tmp_path / "resume", callbacks=[])
    again = _orchestrator(resumed)
    assert [(r["index"], r["batch"], r["reason"]) for r in again.fired] == [(0, expected, "plateau")]
    assert again.fired[0]["improvement"] == pytest.approx(alg.fired[0]["improvement"], abs=1e-6)
    assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in summary["evals"]], rel=1e-5)


@pytest.mark.parametrize("min_delta", [0.05, "20%"])
def test_stack_layers_grows_after_the_eval_that_finds_the_plateau_and_resumes_exactly(plateau_recipe, one_thread,
                                                                                     tmp_path, min_delta):
    plateau_recipe["algorithms"] = {"stack_layers": {"trigger_plateau": {"window": "4ba", "min_delta": min_delta},
                                                     "times": 2, "init": "function_preserving"}}
    trainer, probe = _run(plateau_recipe)
    expected = first_plateau(probe.losses, 4, min_delta)
    assert expected is not None and expected > 4
    stack = _stack(trainer)
    # judged at the eval of batch `expected`, grown at the next batch end, the same on every rank
    assert stack.record["plateau_eval_batch"] == expected and stack.record["batch"] == expected + 1
    assert unwrap_hf(trainer.state.model).config.num_hidden_layers == 4
    assert stack.at is None
    summary = read_summary(plateau_recipe["summary_file"])

    # from a checkpoint before the plateau, and from the one of the eval that found it (growth pending)
    for checkpoint in (f"ep0-ba{expected - 2}-rank0.pt", f"ep0-ba{expected}-rank0.pt"):
        resumed, after = resume_from(plateau_recipe, checkpoint, tmp_path / checkpoint, callbacks=[])
        again = _stack(resumed)
        assert (again.record["plateau_eval_batch"], again.record["batch"]) == (expected, expected + 1), checkpoint
        assert unwrap_hf(resumed.state.model).config.num_hidden_layers == 4
        assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in summary["evals"]], rel=1e-5)
        assert after["train_loss"] == pytest.approx(summary["train_loss"], rel=1e-5)


def test_plateau_rule_on_a_made_up_history():
    rule = Plateau.parse({"window": "0.25dur", "min_delta": 0.1})
    for t, loss in [(0.0, 6.0), (0.1, 5.0), (0.2, 4.5), (0.3, 4.45)]:
        rule.observe(t, loss)
    assert rule.improvement() == pytest.approx(6.0 - 4.45) and not rule.reached()  # at or before 0.05: 6.0
    rule.observe(0.45, 4.41)  # best at or before 0.2: 4.5
    assert rule.improvement() == pytest.approx(4.5 - 4.41) and rule.reached()
    assert [t for t, _ in rule.history] == [0.2, 0.3, 0.45]  # evals the window no longer reaches are folded
    fresh = Plateau.parse({"window": "0.25dur", "min_delta": 0.1})
    fresh.load_state_dict(rule.state_dict())
    assert fresh.history == rule.history and fresh.reached()


def test_relative_plateau_rule_on_a_made_up_history():
    """``min_delta: "10%"``: below a tenth of the largest improvement over one window so far, whatever the loss's scale."""
    for scale in (1.0, 0.01):
        rule = Plateau.parse({"window": "2ba", "min_delta": "10%"})
        assert rule.describe() == "window 2ba, min_delta 10%"
        gains = []
        for t, loss in [(0, 8.0), (2, 6.0), (4, 5.0), (6, 4.7), (8, 4.55), (10, 4.45), (12, 4.4)]:
            rule.observe(t, 4.0 + scale * (loss - 4.0))
            gains.append((rule.improvement(), rule.reached()))
        assert [g is None for g, _ in gains] == [True] + [False] * 6
        assert rule.steepest == pytest.approx(2.0 * scale)  # 8.0 -> 6.0 over the first window
        # improvements over each window: 2, 1, 0.3, 0.15, 0.1, 0.05 (x scale); below 10% of 2 from 0.15 on
        assert [round(g / scale, 6) for g, _ in gains[1:]] == [2.0, 1.0, 0.3, 0.15, 0.1, 0.05]
        assert [r for _, r in gains[1:]] == [False, False, False, True, True, True]
        saved = rule.state_dict()
        fresh = Plateau.parse({"window": "2ba", "min_delta": "10%"})
        fresh.load_state_dict(saved)
        assert fresh.steepest == rule.steepest and fresh.history == rule.history and fresh.reached()
    old = Plateau.parse({"window": "2ba", "min_delta": 0.1})
    old.load_state_dict([[0.0, 6.0], [2.0, 5.95]])  # a history saved before the largest improvement was kept
    assert old.reached() and old.steepest == 0.0


def test_at_is_the_latest_time_with_a_plateau(plateau_recipe, one_thread):
    plateau_recipe.update(max_duration="8ba", save_folder=None)
    plateau_recipe["algorithms"] = {"stack_layers": {"trigger_plateau": {"window": "2ba", "min_delta": 1e-9},
                                                     "at": "6ba", "times": 2}}
    trainer, probe = _run(plateau_recipe)
    assert first_plateau(probe.losses, 2, 1e-9) is None
    assert _stack(trainer).record["batch"] == 6 and "plateau_eval_batch" not in _stack(trainer).record
    assert unwrap_hf(trainer.state.model).config.num_hidden_layers == 4


@pytest.mark.parametrize("entry, key, match", [
    ({"trigger_plateau": "200ba"}, "schedule[0].trigger_plateau", "a mapping {window"),
    ({"trigger_plateau": {"min_delta": 0.1}}, "schedule[0].trigger_plateau.window", "a Composer time in ba, tok"),
    ({"trigger_plateau": {"window": "0ba", "min_delta": 0.1}}, "schedule[0].trigger_plateau.window", "a time > 0"),
    ({"trigger_plateau": {"window": "1ep", "min_delta": 0.1}}, "schedule[0].trigger_plateau.window", "ba, tok, sp"),
    ({"trigger_plateau": {"window": "soon", "min_delta": 0.1}}, "schedule[0].trigger_plateau.window", "Composer time"),
    ({"trigger_plateau": {"window": "4ba", "min_delta": 0}}, "schedule[0].trigger_plateau.min_delta", "a number > 0"),
    ({"trigger_plateau": {"window": "4ba"}}, "schedule[0].trigger_plateau.min_delta", "a number > 0"),
    ({"trigger_plateau": {"window": "4ba", "min_delta": "0%"}}, "schedule[0].trigger_plateau.min_delta", "'1%' to '99%'"),
    ({"trigger_plateau": {"window": "4ba", "min_delta": "100%"}}, "schedule[0].trigger_plateau.min_delta", "'99%'"),
    ({"trigger_plateau": {"window": "4ba", "min_delta": "ten%"}}, "schedule[0].trigger_plateau.min_delta", "share"),
    ({"trigger_plateau": {"window": "4ba", "min_delta": "0.1"}}, "schedule[0].trigger_plateau.min_delta", "nats"),
    ({"trigger_plateau": {"window": "4ba", "min_delta": 0.1, "patience": 3}}, "schedule[0].trigger_plateau.patience",
     "unknown key; allowed: window, min_delta"),
])
def test_bad_plateau_triggers_fail_before_training(tiny_recipe, entry, key, match):
    tiny_recipe["algorithms"] = {"orchestrator": {"schedule": [{"name": "change_lr", "value": 2.0, **entry}]}}
    with pytest.raises(ConfigError) as err:
        validate(tiny_recipe)
    assert str(err.value).startswith(f"algorithms.orchestrator.{key}="), str(err.value)
    assert match in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("options, key, match", [
    ({"trigger_plateau": {"window": "2ba", "min_delta": -1}}, "stack_layers.trigger_plateau.min_delta", "> 0"),
    ({"trigger_plateau": {"window": "8ba", "min_delta": 0.1}}, "stack_layers.trigger_plateau.window",
     "shorter than the run"),
    ({"trigger_plateau": {"window": "1ba", "min_delta": 0.1}, "monitor": "eval/loss"}, "stack_layers.monitor",
     "metrics/<evaluator label>/<metric name>"),
])
def test_bad_growth_plateau_options_fail_before_training(tiny_recipe, options, key, match):
    tiny_recipe["algorithms"] = {"stack_layers": options}
    with pytest.raises(ConfigError) as err:
        validate(tiny_recipe)
    assert str(err.value).startswith(f"algorithms.{key}="), str(err.value)
    assert match in str(err.value), str(err.value)


def test_plan_says_on_plateau_at_the_latest_by(tiny_recipe, tmp_path):
    tiny_recipe["max_duration"] = "16ba"
    tiny_recipe["algorithms"] = {
        "orchestrator": {"schedule": [{"name": "change_lr", "value": 2.0, "trigger_plateau": {"window": "200ba",
                                                                                             "min_delta": 0.01},
                                       "max_wait_iters": 6}]},
        "stack_layers": {"trigger_plateau": {"window": "0.25dur", "min_delta": 0.02}, "at": "10ba"},
        "widen_mlp": {"trigger_plateau": {"window": "4ba", "min_delta": "10%"}, "at": None},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    text = format_plan(plan_file(str(path)))
    assert "orchestrator change_lr(2): on plateau (window 200ba, min_delta 0.01), at the latest by batch 6" in text
    assert "stack_layers: layers 2 -> 4" in text
    assert "; on plateau (window 0.25dur, min_delta 0.02), at the latest by batch 10" in text
    assert "widen_mlp: on plateau (window 4ba, min_delta 10%), not by an `at` within the run" in text


@pytest.mark.launcher
def test_two_ranks_grow_at_the_same_plateau_batch(plateau_recipe, tmp_path):
    """Under composer -n 2: rank 0 judges the reduced eval loss, both ranks grow at the batch after it."""
    plateau_recipe.update(save_folder=None)
    plateau_recipe["algorithms"] = {"stack_layers": {"trigger_plateau": PLATEAU, "times": 2}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(plateau_recipe))
    proc = launch(os.path.join(ROOT, "tests", "scripts", "grow_ddp.py"), [str(path), str(tmp_path / "p{rank}.json")],
                  tmp_path)
    assert proc.returncode == 0, launch_failure(proc, tmp_path)
    r0, r1 = read_summary(tmp_path / "p0.json"), read_summary(tmp_path / "p1.json")
    assert r0["ddp"] and r0["layers"] == r1["layers"] == 4
    assert r0["params"] == r1["params"] and r0["loss"] == r1["loss"]
    summary = read_summary(plateau_recipe["summary_file"])
    expected = first_plateau([(e["batch"], e["loss"]) for e in summary["evals"]], 4, 0.05)
    assert expected is not None
    assert [e["batch"] for e in summary["events"] if e["name"] == "stack_layers"] == [expected + 1]

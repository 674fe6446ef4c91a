"""The composition matrix: every pair of the six algorithms, with and without a peft model, in one tiny
run each. Each run must not crash; the loss on a fixed batch right before and right after every change
of the model (at a batch end, or around an eval) agrees within 1e-4; parameters still train after the
last event; and a run resumed from the checkpoint written right after the last event ends as the
uninterrupted run does."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from composer.core import Algorithm, Callback, Event

from composer_growth.families import unwrap_hf
from composer_growth.recipe import run, validate

from conftest import read_summary, resume_from

pytestmark = [pytest.mark.matrix, pytest.mark.usefixtures("one_thread")]

PEFT = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}

ALGORITHMS = {
    "seq_length_warmup": {"min_seq_length": 8, "max_seq_length": 16, "step_size": 8, "duration": "0.25dur",
                          "preallocate": False},
    "context_length_schedule": {
        "phases": [{"name": "c16", "seq_length": 16, "duration": "0.5dur"},
                   {"name": "c32", "seq_length": 32, "duration": "0.5dur",
                    "rope_scaling": {"rope_type": "linear", "factor": 2.0}}],
        "save_checkpoints": False, "export_hf": False, "eval_batches": 0},
    "stack_layers": {"at": "3ba", "times": 2, "init": "function_preserving"},
    "widen_mlp": {"at": "5ba", "factor": 2.0},
    "lora_merge": {"interval": "2ba", "restart_warmup": "1ba", "prune": "magnitude", "ratio": 0.5},
    "orchestrator": {"schedule": [
        {"name": "change_lr", "value": 0.5, "trigger_loss": None, "max_wait": "2ba"},
        {"name": "widen_mlp", "value": 1.5, "trigger_loss": None, "max_wait": "2ba", "reevaluate": True}]},
}

PAIRS = list(itertools.combinations(ALGORITHMS, 2))


class Watch(Callback):
    """The loss on one fixed batch before and after each point where an algorithm may change the model,
    and whether each optimizer step changed the parameters."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 500, (2, 16), generator=g)
        self.batch = {"input_ids": ids, "labels": ids.clone()}
        self.pairs: list[tuple[str, int, float, float]] = []  # (where, batch, before, after)
        self.trained: dict[int, bool] = {}
        self._before: float | None = None
        self._params: torch.Tensor | None = None

    @torch.no_grad()
    def _loss(self, state) -> float:
        hf = unwrap_hf(state.model)
        was = hf.training
        hf.eval()
        loss = float(hf(**self.batch).loss)
        hf.train(was)
        return loss

    @staticmethod
    def _flat(state) -> torch.Tensor:
        return torch.stack([p.detach().float().sum() for p in state.model.parameters()])

    def before_surgery(self, state) -> None:
        """At BATCH_END, after the optimizer step, before any algorithm (see :class:`First`)."""
        after = self._flat(state)
        self.trained[int(state.timestamp.batch) - 1] = not torch.equal(after, self._params)
        self._before = self._loss(state)

    def run_event(self, event, state, logger):
        if event == Event.BATCH_START:
            self._params = self._flat(state)
        elif event == Event.BATCH_END:  # callbacks run after the algorithms' BATCH_END
            self.pairs.append(("batch end", int(state.timestamp.batch), self._before, self._loss(state)))
        elif event == Event.EVAL_BEFORE_ALL:
            self._before = self._loss(state)
        elif event == Event.EVAL_AFTER_ALL:
            self.pairs.append(("eval", int(state.timestamp.batch), self._before, self._loss(state)))


class First(Algorithm):
    """Listed first, so it runs before every other algorithm at BATCH_END (Composer's callbacks run after)."""

    def __init__(self, watch: Watch):
        self.watch = watch

    def match(self, event, state) -> bool:
        return event == Event.BATCH_END

    def apply(self, event, state, logger) -> None:
        self.watch.before_surgery(state)


def _recipe(base: dict, names: tuple[str, ...], peft: bool) -> dict:
    recipe = copy.deepcopy(base)
    recipe["algorithms"] = {n: copy.deepcopy(ALGORITHMS[n]) for n in names}
    recipe.update(save_interval="1ba", eval_interval="4ba")
    if peft or "lora_merge" in names:
        recipe["model"]["peft"] = dict(PEFT)
    if "lora_merge" in names and not peft:  # a full-rank start, then the adapters of the recipe's block
        recipe["algorithms"]["lora_merge"]["start_at"] = "2ba"
    return recipe


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap_hf(trainer.state.model).state_dict().items()}


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "peft"])
@pytest.mark.parametrize("names", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_pair(names, peft, tiny_recipe, tmp_path):
    _check_run(_recipe(tiny_recipe, names, peft), tmp_path)


@pytest.mark.parametrize("mode", ["append", "prepend", "repeat"])
def test_two_stacks_over_a_lora_trunk(mode, tiny_recipe, tmp_path):
    """StackWise: a second StackLayers over a model whose trunk and first stack carry LoRA adapters."""
    size = {"times": 2} if mode == "repeat" else {"num_new": 1}
    stack = {"mode": mode, "init": "function_preserving", "trunk": "lora", "lora_rank": 4, **size}
    recipe = copy.deepcopy(tiny_recipe)
    recipe["algorithms"] = {"stack_layers": [dict(stack, at="3ba", stack_lora=2), dict(stack, at="5ba")]}
    recipe.update(save_interval="1ba", eval_interval="4ba")
    trainer = _check_run(recipe, tmp_path)
    assert [a.record["batch"] for a in trainer.state.algorithms[1:3]] == [3, 5]


def _check_run(recipe, tmp_path):
    plan = validate(recipe)
    watch = Watch()
    plan.callbacks.append(watch)
    plan.algorithms.insert(0, First(watch))
    trainer = run(plan)
    summary = read_summary(recipe["summary_file"])
    assert int(trainer.state.timestamp.batch) == 8

    # the model's function is kept across every change
    for where, batch, before, after in watch.pairs:
        assert after == pytest.approx(before, abs=1e-4), (where, batch, before, after)

    # something trains after each event before the last batch (batches 0 and 1 train at LR 0: the warmup)
    events = [(e["batch"], e["name"]) for e in summary["events"]]
    quiet = set(recipe["algorithms"]) == {"seq_length_warmup", "context_length_schedule"} and "peft" not in recipe["model"]
    assert events or quiet, recipe["algorithms"]
    for batch, name in events:
        assert batch == 8 or any(watch.trained.get(b) for b in range(max(batch, 2), 8)), (name, batch, watch.trained)
    assert any(p.requires_grad for p in trainer.state.model.parameters())

    # resumed from the checkpoint right after the last event, the run ends where the uninterrupted one did
    last = min(max((b for b, _ in events), default=4), 7)
    expected = _params(trainer)
    resumed, again = resume_from(recipe, f"ep0-ba{last}-rank0.pt", tmp_path / "resume")
    got = _params(resumed)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    assert again["train_loss"] == pytest.approx(summary["train_loss"], rel=1e-6)
    return trainer

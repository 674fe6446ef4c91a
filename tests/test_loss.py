"""batch_loss / loss_sum / eval_batches: the one loss on a batch, and the one evaluation routine, on a real
tiny Composer HuggingFaceModel; every batch and the metric on the model's device."""

from __future__ import annotations

import math

import pytest
import torch
from composer import Trainer
from composer.devices import DeviceCPU
from composer.models import HuggingFaceModel
from transformers import AutoModelForCausalLM, BatchEncoding, LlamaConfig

from composer_growth.functional.loss import batch_loss, batch_mean_loss, loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(eval_metrics: list | None = None) -> HuggingFaceModel:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    return HuggingFaceModel(hf, use_logits=True, shift_labels=True, eval_metrics=eval_metrics)


def _batch(rows: int, length: int, seed: int) -> dict:
    ids = torch.randint(1, 64, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_batch_loss_is_the_models_loss_and_loss_sum_weights_by_tokens():
    model = _model()
    a, b = _batch(2, 8, 1), _batch(2, 8, 2)
    b["labels"][:, :5] = -100  # 3 of the 7 predicted positions per row left
    with torch.no_grad():
        ref = [float(model.loss(model(x), x)) for x in (a, b)]
        assert float(batch_loss(model, a)) == ref[0]
    model.train()
    total = loss_sum(model, [a, b, a], max_batches=2)
    assert model.training  # put back as it was
    assert total[1] == 2 * 7 + 2 * 3
    assert float(total[0]) == pytest.approx(ref[0] * 14 + ref[1] * 6, rel=1e-6)
    loss = batch_loss(model, a)  # gradients follow the caller
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class _RecordingDevice(DeviceCPU):
    """Composer's CPU device, recording the batches it is asked to move (the routine must move each one)."""

    def __init__(self):
        super().__init__()
        self.moved: list[type] = []

    def batch_to_device(self, batch):
        self.moved.append(type(batch))
        return super().batch_to_device(batch)


def _encodings(n: int, rows: int = 2, length: int = 8) -> list[BatchEncoding]:
    return [BatchEncoding(_batch(rows, length, seed)) for seed in range(n)]


def test_every_batch_goes_through_the_device_batch_encoding_included():
    model, device = _model(), _RecordingDevice()
    batches = _encodings(3)
    total = loss_sum(model, batches, max_batches=2, device=device)
    assert device.moved == [BatchEncoding, BatchEncoding]  # a Mapping that is not a dict, moved all the same
    assert torch.equal(total, loss_sum(model, [dict(b) for b in batches], max_batches=2))
    device.moved.clear()
    with torch.no_grad():
        assert batch_mean_loss(model, batches[0], device) == float(batch_loss(model, dict(batches[0])))
    assert device.moved == [BatchEncoding]


def _trainer(device, algorithms) -> Trainer:
    from torch.utils.data import DataLoader

    def collate(rows):
        return BatchEncoding({k: torch.stack([r[k] for r in rows]) for k in rows[0]})

    rows = [{k: v[0] for k, v in _batch(1, 8, seed).items()} for seed in range(16)]
    from composer.metrics.nlp import LanguageCrossEntropy

    return Trainer(model=_model([LanguageCrossEntropy()]), train_dataloader=DataLoader(rows, batch_size=4, collate_fn=collate),
                   eval_dataloader=DataLoader(rows[:8], batch_size=4, collate_fn=collate), eval_interval="100ba",
                   max_duration="3ba", device=device, algorithms=algorithms, progress_bar=False)


def _growth_and_reevaluation():
    from composer_growth.algorithms import Orchestrator, StackLayers

    schedule = [{"name": "set_eval_iters", "value": 2, "trigger_loss": None, "max_wait_iters": 1,
                 "reevaluate": True}]
    return StackLayers(at="2ba", probe_loss=True), Orchestrator(schedule=schedule, verbose=False)


def test_growth_probe_and_reevaluation_move_batches_and_metric_to_the_device():
    """The growth probe (the last train batch, a BatchEncoding) and the orchestrator's re-evaluation before
    the first eval (the Trainer's CPU eval metric) measure through the device; the re-evaluation equals
    the Trainer's own eval."""
    from composer_growth.algorithms.orchestrator import eval_metric

    device = _RecordingDevice()
    growth, orchestrator = _growth_and_reevaluation()
    trainer = _trainer(device, [growth, orchestrator])
    trainer.fit()
    assert orchestrator.fired[0]["loss_before"] is not None and orchestrator.fired[0]["batch"] == 1
    assert "loss_before" in growth.record and "loss_after" in growth.record
    state = trainer.state
    growth._batch = BatchEncoding(_batch(4, 8, 99))
    device.moved.clear()
    probe = growth._probe(state)
    assert device.moved == [BatchEncoding]
    assert probe == pytest.approx(float(batch_loss(state.model, _batch(4, 8, 99))), rel=1e-6)
    device.moved.clear()
    value = eval_metric(state, "eval", "LanguageCrossEntropy")
    assert device.moved == [BatchEncoding, BatchEncoding]  # the evaluator's 2 batches (set_eval_iters: 2)
    trainer.eval()
    assert value == pytest.approx(float(state.eval_metric_values["LanguageCrossEntropy"]), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_growth_probe_and_reevaluation_on_the_gpu():
    growth, orchestrator = _growth_and_reevaluation()
    trainer = _trainer("gpu", [growth, orchestrator])
    trainer.fit()
    assert math.isfinite(growth.record["loss_before"]) and math.isfinite(growth.record["loss_after"])
    assert math.isfinite(orchestrator.fired[0]["loss_before"])

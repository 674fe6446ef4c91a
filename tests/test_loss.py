"""batch_loss / loss_sum: the one loss on a batch, on a real tiny Composer HuggingFaceModel."""

from __future__ import annotations

import pytest
import torch
from composer.models import HuggingFaceModel
from transformers import AutoModelForCausalLM, LlamaConfig

from composer_growth.functional.loss import batch_loss, loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> HuggingFaceModel:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    return HuggingFaceModel(hf, use_logits=True, shift_labels=True)


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

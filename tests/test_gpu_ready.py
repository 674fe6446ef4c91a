"""What a first CUDA bf16 multi-GPU run needs, checked where it can be on the CPU: each test runs on
``cuda`` with ``amp_bf16`` where a GPU is present (the ``accel`` fixture), on the CPU otherwise."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import transformers as T

from composer_growth.functional import add_lora, merge_and_reinit_lora, merged_state_dict, widen_mlp

VOCAB = 128


def bf16_llama(device: str, seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(device, torch.bfloat16).eval()


# -- bf16 bases: deltas and scales in float32, rounded once ---------------------------------------
def test_relora_merge_into_bf16_base_rounds_once(accel):
    model = bf16_llama(accel.torch_device)
    add_lora(model, ["q_proj"], rank=4, alpha=4)
    layer = model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.normal_(0, 1e-3)  # a small delta, as early in a ReLoRA cycle
    base = layer.get_base_layer().weight
    delta = b.float() @ a.float() * layer.scaling["default"]
    expected = (base.float() + delta).to(torch.bfloat16)
    old_path = base + layer.get_delta_weight("default").to(torch.bfloat16)  # in the base's dtype
    assert not torch.equal(old_path, expected)  # the check below can tell the two apart

    merged = merged_state_dict(model)  # the export path
    assert merged["model.layers.0.self_attn.q_proj.weight"].device.type == "cpu"
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected.cpu(), atol=0, rtol=0)
    merge_and_reinit_lora(model, ["q_proj"], generator=torch.Generator().manual_seed(0))  # ReLoRA's in-place merge
    assert base.dtype == torch.bfloat16
    torch.testing.assert_close(base, expected, atol=0, rtol=0)


def test_widen_mlp_scales_bf16_weights_in_float32(accel):
    model = bf16_llama(accel.torch_device)
    old = [blk.mlp.down_proj.weight.detach().clone() for blk in model.model.layers]
    mapping = widen_mlp(model, factor=1.5, seed=3)
    differs = False
    for i, blk in enumerate(model.model.layers):
        src = mapping[f"model.layers.{i}.mlp.down_proj.weight"]
        picked = old[i].index_select(1, src.index.to(old[i].device))
        scale = src.scale.to(picked.device)
        expected = (picked.float() * scale).to(torch.bfloat16)
        torch.testing.assert_close(blk.mlp.down_proj.weight.detach(), expected, atol=0, rtol=0)
        differs |= not torch.equal(picked * scale.to(torch.bfloat16), expected)  # the scale rounded to bf16 first
    assert differs


# -- flash_attention_2 falls back to sdpa at validation -------------------------------------------
def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_flash_attention_falls_back_to_sdpa_at_validation(tiny_recipe, accel, capsys, one_thread, precision):
    from composer_growth.recipe import run, validate

    recipe = accel.recipe(tiny_recipe)
    recipe.update(precision=precision, max_duration="1ba", eval_first=False, save_folder=None)
    recipe["model"] = {**recipe["model"], "attn_implementation": "flash_attention_2"}
    plan = validate(recipe)
    line = capsys.readouterr().out
    reasons = [r for r, applies in [("flash-attn is not importable", not _has_flash_attn()),
                                    ("no CUDA device", not accel.cuda),
                                    ("precision is fp32", precision == "fp32")] if applies]
    if not reasons:
        pytest.skip("flash-attn runs here: nothing to fall back from")
    assert plan.recipe.model.attn_implementation == "sdpa"
    assert line.count("\n") == 1 and "flash_attention_2 -> sdpa" in line and all(r in line for r in reasons), line
    if precision != "fp32" and not accel.cuda:
        return  # Composer runs amp_bf16 on CUDA only
    trainer = run(plan)  # the first forward runs
    assert trainer.state.model.model.config._attn_implementation == "sdpa"

"""apply_rope_scaling on real tiny models: same logits as a model freshly built from the new config."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

from composer_growth.errors import ConfigError
from composer_growth.families import FAMILIES
from composer_growth.functional.rope import (
    SUPPORTED_ROPE_TYPES,
    apply_rope_scaling,
    max_addressable_positions,
    rope_snapshot,
    rope_target,
    rope_type,
    validate_rope_scaling,
)

MAX_POS = 64
SHORT, LONG = 24, 100  # below and above the original max positions
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               vocab_size=128, max_position_embeddings=MAX_POS, attn_implementation="eager")
CONFIGS = {
    "llama": (LlamaConfig, dict(_COMMON, num_key_value_heads=2)),
    "qwen2": (Qwen2Config, dict(_COMMON, num_key_value_heads=2)),
    "mistral": (MistralConfig, dict(_COMMON, num_key_value_heads=2)),  # head_dim left None on purpose
    "gpt_neox": (GPTNeoXConfig, dict(_COMMON, rotary_pct=0.5)),
}
HEAD_DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def rope_dim(family: str) -> int:
    return int(HEAD_DIM * CONFIGS[family][1].get("rotary_pct", 1.0))


def scaling_for(rope_type: str, family: str) -> tuple[dict, int | None]:
    """A rope_scaling dict of each type, and the max positions to declare with it."""
    half = rope_dim(family) // 2
    return {
        "linear": ({"rope_type": "linear", "factor": 4.0}, None),
        "dynamic": ({"type": "dynamic", "factor": 4.0}, None),  # legacy key
        "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": MAX_POS}, 4 * MAX_POS),
        "llama3": ({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": MAX_POS}, 4 * MAX_POS),
        "longrope": ({"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0] * half,
                      "long_factor": [1.0 + i for i in range(half)]}, None),
    }[rope_type]


def build(family: str, **overrides) -> torch.nn.Module:
    cls, kwargs = CONFIGS[family]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cls(**{**kwargs, **overrides})).eval()


def fresh_like(model, family: str, **overrides) -> torch.nn.Module:
    """An independent model built from the family's config kwargs + overrides, with model's weights."""
    other = build(family, head_dim=HEAD_DIM, **overrides)
    other.load_state_dict(model.state_dict(), strict=True)
    return other


@torch.no_grad()
def logits(model, length: int) -> torch.Tensor:
    ids = torch.arange(length).remainder(127).add(1)[None]
    return model(input_ids=ids).logits


def assert_same(a, b, lengths=(SHORT, LONG, SHORT)) -> None:
    for length in lengths:  # short again: dynamic rope must reset the same way in both
        assert (logits(a, length) - logits(b, length)).abs().max().item() <= 1e-5, length


ROPE_TYPES = [t for t in ("linear", "dynamic", "yarn", "llama3", "longrope") if t in SUPPORTED_ROPE_TYPES]


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_apply_matches_fresh_model(family, rope_type):
    model = build(family)
    logits(model, LONG)  # leave dynamic-style state behind; the rebuild must not carry it
    before = logits(model, LONG)
    scaling, max_pos = scaling_for(rope_type, family)
    report = apply_rope_scaling(model, copy.deepcopy(scaling), max_position_embeddings=max_pos)

    assert report["rotary_modules"] and report["new_rope_scaling"]["rope_type"] == rope_type
    assert model.config.rope_scaling["type"] == model.config.rope_scaling["rope_type"] == rope_type
    fresh = fresh_like(model, family, rope_scaling=copy.deepcopy(scaling),
                       **({"max_position_embeddings": max_pos} if max_pos else {}))
    assert_same(model, fresh)
    assert (logits(model, LONG) - before).abs().max().item() > 1e-4  # the op does something

    apply_rope_scaling(model, None, max_position_embeddings=MAX_POS)  # round trip to plain rope
    assert model.config.rope_scaling is None
    assert_same(model, fresh_like(model, family))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_rope_theta_and_wrapped_model(family):
    from composer.models import HuggingFaceModel

    model = build(family)
    wrapped = HuggingFaceModel(model, use_logits=True)
    report = apply_rope_scaling(wrapped, {"rope_theta": 500.0, "rope_type": "linear", "factor": 2.0})
    assert model.config.rope_theta == 500.0 and report["old_rope_theta"] == 10000.0
    assert "rope_theta" not in model.config.rope_scaling
    theta_key = "rotary_emb_base" if family == "gpt_neox" else "rope_theta"  # the constructor argument
    assert_same(model, fresh_like(model, family, rope_scaling={"rope_type": "linear", "factor": 2.0},
                                  **{theta_key: 500.0}))


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_save_and_reload_carries_rope(family, tmp_path):
    model = build(family)
    apply_rope_scaling(model, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000.0},
                       max_position_embeddings=2 * MAX_POS)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config.rope_scaling == model.config.rope_scaling
    assert loaded.config.rope_theta == 1000.0 and loaded.config.max_position_embeddings == 2 * MAX_POS
    assert_same(model, loaded, lengths=(SHORT, 3 * MAX_POS, SHORT))


def test_buffers_keep_dtype_and_rejected_change_leaves_model_alone():
    model = build("llama").to(torch.float64)
    apply_rope_scaling(model, {"rope_type": "linear", "factor": 2.0})
    assert model.model.rotary_emb.inv_freq.dtype == torch.float64
    state = copy.deepcopy(model.config.to_dict())
    with pytest.raises(ConfigError):
        apply_rope_scaling(model, {"rope_type": "yarn"})
    assert model.config.to_dict() == state


@pytest.mark.parametrize("scaling, needle", [
    ({"rope_type": "ntk-by-parts", "factor": 2.0}, "linear"),  # the error lists supported types
    ({"rope_type": "llama3", "factor": 4.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
     "low_freq_factor"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "yarn", "factor": 0.0}, "> 0"),
    ({"rope_type": "linear", "factor": 0.5}, ">= 1"),
    ({"rope_type": "linear", "factor": "4"}, "finite number"),
    ({"rope_type": "linear", "factor": 2.0, "type": "dynamic"}, "same rope type"),
    ({"rope_type": "linear", "factor": 2.0, "low_freq_factr": 1.0}, "Unrecognized"),
    ({"factor": 2.0}, "required"),
    ({"rope_theta": -1.0}, "> 0"),
    ({"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}, "length"),
])
def test_validation_errors(scaling, needle):
    with pytest.raises(ConfigError, match="rope_scaling") as err:
        validate_rope_scaling(scaling, config=build("llama").config)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_learned_positions_reject_rope():
    model = build_gpt2()
    with pytest.raises(ConfigError, match="learned positions"):
        apply_rope_scaling(model, {"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match="n_positions"):
        apply_rope_scaling(model, None, max_position_embeddings=128)
    assert apply_rope_scaling(model, None)["rotary_modules"] == []


def build_gpt2():
    return AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64))


def test_validate_normalises():
    assert validate_rope_scaling(None) is None
    assert validate_rope_scaling({"type": "linear", "factor": 2}) == {"rope_type": "linear", "type": "linear",
                                                                     "factor": 2.0}
    assert validate_rope_scaling({"rope_theta": 1e6}) == {"rope_type": "default", "type": "default",
                                                          "rope_theta": 1e6}
    assert "default" in SUPPORTED_ROPE_TYPES and "llama3" in SUPPORTED_ROPE_TYPES


@pytest.mark.parametrize("scaling, max_pos, expected", [
    (None, 64, 64),
    ({"rope_type": "linear", "factor": 4.0}, 64, 256),
    ({"rope_type": "dynamic", "factor": 2.0}, 64, math.inf),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256, 256),
    ({"rope_type": "yarn", "factor": 4.0}, 64, 256),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, 1024, 1024),
])
def test_max_addressable_positions(scaling, max_pos, expected):
    config = {"model_type": "llama", "rope_scaling": scaling, "max_position_embeddings": max_pos}
    assert max_addressable_positions(config) == expected
    assert max_addressable_positions(build_gpt2()) == 64


def test_rope_type_reads_either_key():
    assert rope_type(None) == rope_type({}) == "default"
    assert rope_type({"type": "linear", "factor": 2.0}) == rope_type({"rope_type": "linear"}) == "linear"
    assert rope_type({"rope_type": "yarn", "type": "linear"}) == "yarn"  # rope_type wins, as in transformers


@pytest.mark.parametrize("scaling, max_pos, declared, reach, shown", [
    (None, None, MAX_POS, MAX_POS, "rope default, theta 10000"),
    ({"rope_type": "linear", "factor": 2.0}, None, MAX_POS, 2 * MAX_POS, "rope linear x2, theta 10000"),
    ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e4}, None, MAX_POS, math.inf, "rope dynamic x2, theta 50000"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": MAX_POS}, None, 4 * MAX_POS,
     4 * MAX_POS, "rope yarn x4, theta 10000"),  # the declared context is the extended one
    ({"rope_type": "linear", "factor": 2.0}, 100, 100, 2 * 100, "rope linear x2, theta 10000"),
])
def test_rope_target_of_a_scaling_and_positions(scaling, max_pos, declared, reach, shown):
    model = build("llama")
    family = FAMILIES["llama"]
    clean = validate_rope_scaling(scaling) if scaling is not None else None
    target = rope_target(clean, rope_snapshot(model.config, family), family, model.config, seq_length=LONG,
                         max_position_embeddings=max_pos)
    assert (target.max_positions, target.reach, target.describe()) == (declared, reach, shown)
    apply_rope_scaling(model, target.scaling, max_position_embeddings=target.max_positions)  # what it applies
    assert max_addressable_positions(model) == reach
    gpt2 = build_gpt2()
    learned = rope_target(None, rope_snapshot(gpt2.config, FAMILIES["gpt2"]), FAMILIES["gpt2"], gpt2.config)
    assert (learned.kind, learned.reach, learned.describe()) == ("learned", 64, "learned positions")

"""FLOPs per trained token, against counts by hand."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, LlamaConfig

from composer_growth.errors import ConfigError
from composer_growth.functional import matmul_params, training_flops_per_token


def test_llama_by_hand():
    d, inter, layers, vocab, kv = 32, 64, 2, 100, 1  # 2 heads of 16, one kv head
    tied = LlamaConfig(hidden_size=d, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=2,
                       num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=True)
    # per layer: q and o d x d, k and v d x 16, gate/up/down d x inter, two RMSNorms; then the final norm;
    # the head (vocab x d) multiplies even when tied; the input embedding is a lookup
    per_layer = 2 * d * d + 2 * d * 16 + 3 * d * inter + 2 * d
    n = layers * per_layer + d + vocab * d
    assert matmul_params(tied) == n
    assert training_flops_per_token(tied, 16) == 6 * n + 12 * layers * 16 * d
    untied = LlamaConfig(**{**tied.to_dict(), "tie_word_embeddings": False})
    assert matmul_params(untied) == n  # the same multiplies: untying adds a lookup table, not work
    deeper = LlamaConfig(**{**tied.to_dict(), "num_hidden_layers": 4})
    assert training_flops_per_token(deeper, 64) == 6 * (4 * per_layer + d + vocab * d) + 12 * 4 * 64 * d


def test_gpt2_by_hand():
    d, layers, vocab, pos = 16, 3, 50, 40
    cfg = GPT2Config(n_embd=d, n_layer=layers, n_head=2, vocab_size=vocab, n_positions=pos)
    # per layer: c_attn d x 3d + 3d bias, c_proj d x d + d, c_fc d x 4d + 4d, mlp c_proj 4d x d + d, two LayerNorms
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    n = layers * per_layer + 2 * d + vocab * d  # final LayerNorm; the tied head; wte and wpe are lookups
    assert training_flops_per_token(cfg, 8) == 6 * n + 12 * layers * 8 * d


def test_unknown_family():
    from transformers import BertConfig

    with pytest.raises(ConfigError, match="^model='bert'"):
        training_flops_per_token(BertConfig(), 8)

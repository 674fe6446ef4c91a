"""benchmarks/growth_timing.py at a toy size: a baseline and a plateau-triggered growth x4, one seed, 8 batches."""

from __future__ import annotations

import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def data_128(tmp_path_factory) -> str:
    from composer_growth.data import prepare_dataset

    out = str(tmp_path_factory.mktemp("data") / "bench-128")
    prepare_dataset(out, source="python-source", seq_len=128, vocab_size=512, max_bytes=150_000, val_percent=10)
    return out


def test_study_records_plateau_growth_and_ratios_from_its_evals(data_128, tmp_path, monkeypatch, one_thread):
    monkeypatch.syspath_prepend(BENCH)
    import growth_timing
    import tokens_to_loss as ttl
    from common import loss_at, time_to_loss

    from composer_growth.functional import training_flops_per_token

    monkeypatch.setattr(ttl, "FINAL", dict(ttl.FINAL))  # main sizes the model through this module dict
    out = str(tmp_path / "study.json")
    argv = ["--data", data_128, "--seeds", "1", "--variants", "baseline,plateau", "--schedules", "plain",
            "--steps", "8", "--eval-interval", "2", "--eval-batches", "1", "--batch-size", "4", "--hidden", "32",
            "--mlp", "64", "--heads", "2", "--layers", "4", "--factor", "4", "--latest", "0.9", "--plateau-window", "2ba",
            "--plateau-min-delta", "100", "--out", out]
    result = growth_timing.main(argv)
    base, grown = result["runs"]["baseline"]["1"], result["runs"]["plateau"]["1"]
    assert result["complete"] and base["first_ids"] == grown["first_ids"]  # same data order within the seed

    # the plateau (min_delta 100: any window is one) is first judged at the eval of batch 4, the first
    # with an eval a window (2 batches) before it; the growth follows at the next batch end
    g = grown["growth"]
    assert (g["reason"], g["eval_batch"], g["batch"]) == ("plateau", 4, 5)
    assert [e["batch"] for e in grown["evals"]] == [2, 4, 6, 8]
    assert [e["params"] for e in grown["evals"]] == [grown["params_start"]] * 2 + [base["params_start"]] * 2
    assert result["growth_table"].splitlines()[2] == "| plateau | 5 (plateau, eval 4) |"

    # FLOPs: five batches of the 1-layer model, three of the 4-layer one (stacked x4)
    small = dict(ttl.FINAL, num_hidden_layers=1)
    from transformers import LlamaConfig

    per_batch = 4 * 128
    want = per_batch * (5 * training_flops_per_token(LlamaConfig(**small, vocab_size=512), 128)
                        + 3 * training_flops_per_token(LlamaConfig(**ttl.FINAL, vocab_size=512), 128))
    assert grown["flops"] == pytest.approx(want, rel=1e-9)

    # the comparison is read off the recorded evals against the seed's baseline
    c = result["per_seed"]["plateau"]["1"]
    target = base["evals"][-1]["loss"]
    assert c["target"] == target and c["final"] == grown["evals"][-1]["loss"]
    reached = time_to_loss(grown["evals"], target, "flops")
    assert c["flops_ratio"] == (None if reached is None else reached / time_to_loss(base["evals"], target, "flops"))
    assert c["gap_at_same_flops"] == pytest.approx(c["final"] - loss_at(base["evals"], grown["flops"], "flops"))
    assert result["per_seed"]["baseline"]["1"]["flops_ratio"] == pytest.approx(1.0)

    # --resume keeps what the file holds: nothing trains again
    again = growth_timing.main(argv + ["--resume"])
    assert again["runs"]["plateau"]["1"]["wall_s"] == grown["wall_s"]
    with pytest.raises(SystemExit, match="settings differ"):
        growth_timing.main([a if a != "100" else "50" for a in argv] + ["--resume"])

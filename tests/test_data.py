"""The data builder: determinism, split disjointness, manifest counts that match the shards, reuse."""

from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import torch
import pytest
from streaming.base.format import reader_from_json

from composer_growth.data import prepare_dataset
from composer_growth.data.prepare import _python_source_docs, is_val
from composer_growth.errors import ConfigError


def _read_split(path: str) -> list[np.ndarray]:
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    rows = []
    for info in index["shards"]:
        shard = reader_from_json(path, None, info)
        rows += [shard.get_item(i)["input_ids"] for i in range(shard.samples)]
    return rows


def test_manifest_counts_match_shards(tiny_data):
    with open(os.path.join(tiny_data, "manifest.json")) as f:
        manifest = json.load(f)
    for split in ("train", "val"):
        rows = _read_split(os.path.join(tiny_data, split))
        stats = manifest["splits"][split]
        assert len(rows) == stats["sequences"] > 0
        assert sum(len(r) for r in rows) == stats["tokens"]
        assert all(len(r) == manifest["seq_len"] for r in rows)
        assert max(int(r.max()) for r in rows) < manifest["vocab_size"]
    # documents are separated by EOS
    train = np.concatenate(_read_split(os.path.join(tiny_data, "train")))
    assert (train == manifest["eos_token_id"]).sum() >= manifest["splits"]["train"]["documents"] - 1


def test_build_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    kw = dict(seq_len=16, vocab_size=300, max_bytes=150_000, val_percent=20)
    ma, mb = prepare_dataset(a, **kw), prepare_dataset(b, **kw)
    assert ma == mb
    for split in ("train", "val"):
        names = sorted(os.listdir(os.path.join(a, split)))
        assert names == sorted(os.listdir(os.path.join(b, split)))
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(a, split), os.path.join(b, split), names,
                                                   shallow=False)
        assert not mismatch and not errors


def test_rerun_reuses_and_new_arguments_rebuild(tmp_path):
    out = str(tmp_path / "d")
    prepare_dataset(out, seq_len=16, vocab_size=300, max_bytes=100_000, val_percent=20)
    index = os.path.join(out, "train", "index.json")
    stamp = os.path.getmtime(index)
    prepare_dataset(out, seq_len=16, vocab_size=300, max_bytes=100_000, val_percent=20)
    assert os.path.getmtime(index) == stamp
    manifest = prepare_dataset(out, seq_len=24, vocab_size=300, max_bytes=100_000, val_percent=20)
    assert manifest["seq_len"] == 24
    assert all(len(r) == 24 for r in _read_split(os.path.join(out, "train")))


def test_split_is_disjoint_and_stable():
    docs = _python_source_docs(2_000_000)
    ids = [d for d, _ in docs]
    assert len(ids) == len(set(ids)) > 20
    val = {d for d in ids if is_val(d, 10)}
    train = set(ids) - val
    assert val and train and not (val & train)
    # the split depends on the document alone, not on what else was selected
    assert {d for d in ids[: len(ids) // 2] if is_val(d, 10)} == val & set(ids[: len(ids) // 2])
    # a larger cap keeps the smaller selection as its prefix
    assert [d for d, _ in _python_source_docs(4_000_000)][: len(ids)] == ids


def test_local_jsonl_and_text_files(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"document number {i} " * 40}) for i in range(60)))
    txt = tmp_path / "notes.txt"
    txt.write_text("plain text file " * 200)
    manifest = prepare_dataset(str(tmp_path / "out"), source="files", files=[str(jsonl), str(txt)], seq_len=16,
                               vocab_size=300, val_percent=25)
    total = manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]
    assert total == 61


@pytest.mark.parametrize("kwargs, key", [
    (dict(source="s3-magic"), "source"),
    (dict(seq_len=1), "seq_len"),
    (dict(val_percent=0), "val_percent"),
    (dict(source="files"), "files"),
    (dict(vocab_size=100), "vocab_size"),
])
def test_bad_arguments(tmp_path, kwargs, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        prepare_dataset(str(tmp_path / "x"), **kwargs)


def test_bad_column(tmp_path):
    with pytest.raises(ConfigError, match=r"^column="):
        prepare_dataset(str(tmp_path / "x"), column="text")


def _loader_rows(path, split="train"):
    from composer_growth.data.loaders import build_lm_dataloader

    return [b["input_ids"] for b in build_lm_dataloader(path, split, 4, shuffle=False, drop_last=False)]


def test_prepare_writes_llm_foundrys_tokens_column(tmp_path):
    kw = dict(seq_len=16, vocab_size=300, max_bytes=100_000, val_percent=20)
    ours = prepare_dataset(str(tmp_path / "ours"), **kw)
    foundry = prepare_dataset(str(tmp_path / "foundry"), column="tokens", **kw)
    assert foundry["column"] == "tokens" and foundry["splits"] == ours["splits"]
    with open(tmp_path / "foundry" / "train" / "index.json") as f:
        shard = json.load(f)["shards"][0]
    # llm-foundry's text loader reads a `tokens` column; convert_dataset_json writes ndarray:int32
    assert shard["column_names"] == ["tokens"] and shard["column_encodings"] == ["ndarray:int32"]
    a, b = _loader_rows(str(tmp_path / "ours")), _loader_rows(str(tmp_path / "foundry"))
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("encoding", ["ndarray:int32", "bytes"])
def test_recipes_read_an_mds_folder_with_a_tokens_column_and_no_manifest(tiny_data, tiny_recipe, tmp_path, encoding):
    """llm-foundry's convert_dataset_json output: `tokens` (int32 arrays; older converters: int64 bytes)."""
    from streaming import MDSWriter

    from composer_growth.data.prepare import read_manifest
    from composer_growth.recipe import run, validate

    folder = tmp_path / "converted"
    for split in ("train", "val"):
        with MDSWriter(out=str(folder / split), columns={"tokens": encoding}) as writer:
            for row in _read_split(os.path.join(tiny_data, split)):
                row = row.astype(np.int32 if encoding != "bytes" else np.int64)
                writer.write({"tokens": row if encoding != "bytes" else row.tobytes()})
    manifest = read_manifest(str(folder))
    assert manifest["inferred"] and manifest["seq_len"] == 32 and manifest["column"] == "tokens"
    assert set(manifest["splits"]) == {"train", "val"}
    a, b = _loader_rows(tiny_data, "val"), _loader_rows(str(folder), "val")
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))

    tiny_recipe.update(data={"path": str(folder)}, max_duration="2ba", eval_interval="2ba", save_folder=None)
    with pytest.raises(ConfigError, match=r"^tokenizer=None"):  # no tokenizer/ folder there: name one
        validate(tiny_recipe)
    tiny_recipe["tokenizer"] = os.path.join(tiny_data, "tokenizer")
    tiny_recipe["algorithms"] = {"seq_length_warmup": {"min_seq_length": 16, "max_seq_length": 32, "step_size": 16,
                                                       "duration": "1ba", "preallocate": False}}
    run(validate(tiny_recipe))
    with open(tiny_recipe["summary_file"]) as f:
        assert json.load(f)["tokens_trained"] == 8 * (16 + 32)


def test_check_manifest_names_what_the_run_cannot_use(tiny_data, tmp_path):
    from composer_growth.data.prepare import check_manifest, read_manifest

    assert check_manifest(str(tmp_path / "none"), "data.path") is None
    ok = check_manifest(tiny_data, "data.path", splits={"train": "data.train_split"}, seq_len=32, vocab_size=512,
                        tokenizer_key="tokenizer")
    assert ok == read_manifest(tiny_data)
    for kwargs, message in [
        (dict(splits={"test": "data.eval_split"}), r"^data.eval_split='test': splits in .*: train, val$"),
        (dict(seq_len=64, seq_len_key="phases[1].seq_length"),
         r"^data.path='.*': sequences of 32 tokens, shorter than phases\[1\].seq_length \(64\)$"),
        (dict(vocab_size=1000), r"^data.path='.*': its tokenizer has 512 tokens, data.path's 1000"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_manifest(tiny_data, "data.path", **kwargs)


def test_prepare_once_builds_a_missing_dataset_or_stops_with_one_line(tmp_path):
    from composer_growth.data.prepare import prepare_once

    path = str(tmp_path / "built")
    with pytest.raises(ConfigError, match=r"^phases\[2\].dataset='.*built': no dataset there \(no manifest.json\); "
                                          r"give it a prepare block$"):
        prepare_once(path, None, "phases[2].dataset", "give it a prepare block")
    calls = []

    def build():
        calls.append(path)
        prepare_dataset(path, seq_len=16, vocab_size=300, max_bytes=100_000, val_percent=20)

    assert prepare_once(path, build, "phases[2].dataset", "unused") is True
    assert prepare_once(path, build, "phases[2].dataset", "unused") is False  # there now: nothing to do
    assert calls == [path]


def test_runs_in_turn_release_their_trainers_and_shared_memory(tiny_recipe):
    """Composer's atexit registration keeps a closed Trainer's State, and streaming's keeps each
    dataset's shared memory open, until the process exits; released, a second run leaves no more open
    files than the first, and a live dataset keeps its blocks."""
    from composer.core import State

    from composer_growth.algorithms.composer_hooks import release_finished_trainers
    from composer_growth.data.loaders import build_lm_dataloader, release_shared_memory
    from composer_growth.recipe import run, validate

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    tiny_recipe.update(max_duration="2ba", eval_interval="2ba", save_folder=None, summary_file=None)
    counts = []
    for _ in range(3):
        run(validate(tiny_recipe)).close()
        counts.append(open_files())
    assert counts[2] > counts[1] > counts[0]  # unreleased, every run keeps its files
    release_finished_trainers()
    assert release_shared_memory() > 0
    assert not [o for o in __import__("gc").get_objects() if isinstance(o, State)]
    after = open_files()
    assert after < counts[0]

    live = build_lm_dataloader(tiny_recipe["data"]["path"], "train", 2)
    next(iter(live))
    run(validate(tiny_recipe)).close()
    release_finished_trainers()
    release_shared_memory()
    assert open_files() <= after + (counts[1] - counts[0])  # only the live dataset's files remain
    assert len(next(iter(live))["input_ids"]) == 2  # its shared memory still works

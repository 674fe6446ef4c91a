"""The data builder: determinism, split disjointness, manifest counts that match the shards, reuse."""

from __future__ import annotations

import filecmp
import json
import os

import numpy as np
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

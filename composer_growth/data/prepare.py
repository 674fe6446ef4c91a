"""Build a training dataset: documents -> (trained or given) tokenizer -> packed MDS shards.

Layout of ``out_dir``::

    tokenizer/      a transformers fast-tokenizer directory with an EOS token
    train/ val/     MDS shards; each sample is ``input_ids``: ``seq_len`` token ids,
                    documents packed back to back, separated by EOS (``column="tokens"``:
                    llm-foundry's layout instead, a ``tokens`` column of ``ndarray:int32``, as its
                    ``convert_dataset_json`` writes and its ``text`` loader reads)
    manifest.json   source, arguments, sizes and token counts

A build writes into ``<out_dir>.building`` (a sibling on the same filesystem) and moves the result
into ``out_dir`` only when it is complete, ``manifest.json`` last: a failed or killed build leaves no
dataset behind (the next build clears the stale ``.building`` folder). Re-running with the same
arguments reuses what is there. A folder without ``manifest.json``
whose splits are MDS shards with a ``tokens`` or ``input_ids`` column (llm-foundry's
``convert_dataset_json`` output) is read too: :func:`read_manifest` infers what a manifest says.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sysconfig
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from composer_growth.errors import ConfigError

SOURCES = ("python-source", "files", "hub")
COLUMNS = ("input_ids", "tokens")  # ours; llm-foundry's
EOS = "<|endoftext|>"
MANIFEST = "manifest.json"
_MAX_FILE_BYTES = 512 * 1024  # generated giants (tables, vendored bundles) are skipped


def _hash(text: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{salt}:{text}".encode()).digest()[:8], "big")


def is_val(doc_id: str, val_percent: float) -> bool:
    """Deterministic train/validation split by a hash of the document's id."""
    return (_hash(doc_id, "split") % 10_000) < val_percent * 100


def python_source_roots() -> list[tuple[str, str]]:
    """(label, directory) of the running Python's standard library and site-packages."""
    paths = sysconfig.get_paths()
    roots: list[tuple[str, str]] = []
    seen: set[str] = set()
    for label, key in (("stdlib", "stdlib"), ("site", "purelib"), ("site", "platlib")):
        path = os.path.realpath(paths.get(key, ""))
        if path and os.path.isdir(path) and path not in seen:
            seen.add(path)
            roots.append((label, path))
    return roots


def _python_source_docs(max_bytes: int) -> list[tuple[str, str]]:
    """(doc_id, path) of .py files, in a fixed pseudo-random order, capped at ``max_bytes``."""
    candidates: list[tuple[int, str, str, int]] = []
    for label, root in python_source_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for name in filenames:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    size = os.path.getsize(path)
                except OSError:
                    continue
                if 0 < size <= _MAX_FILE_BYTES:
                    doc_id = f"{label}/{os.path.relpath(path, root)}"
                    candidates.append((_hash(doc_id, "order"), doc_id, path, size))
    candidates.sort()
    chosen, total = [], 0
    for _, doc_id, path, size in candidates:
        if total >= max_bytes:
            break
        chosen.append((doc_id, path))
        total += size
    return chosen


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def iter_documents(source: str, files: list[str] | None, hub_name: str | None, hub_split: str,
                   text_field: str, max_bytes: int) -> Iterator[tuple[str, str]]:
    """Yield (doc_id, text) for a source; ids are stable across machines for a given input."""
    if source == "python-source":
        docs = _python_source_docs(max_bytes)
        for doc_id, path in tqdm(docs, desc="reading python source", unit="file", mininterval=1.0):
            text = _read(path)
            if text:
                yield doc_id, text
    elif source == "files":
        total = 0
        for path in sorted(files or []):
            if path.endswith((".jsonl", ".json")):
                with open(path, encoding="utf-8") as f:
                    for i, line in enumerate(f):
                        if line.strip():
                            text = json.loads(line)[text_field]
                            total += len(text)
                            yield f"{path}:{i}", text
                            if total >= max_bytes:
                                return
            else:
                text = _read(path)
                if text:
                    total += len(text)
                    yield path, text
            if total >= max_bytes:
                return
    elif source == "hub":
        import datasets  # only reachable with a hub connection

        ds = datasets.load_dataset(hub_name, split=hub_split, streaming=True)
        total = 0
        for i, row in enumerate(ds):
            text = row[text_field]
            total += len(text)
            yield f"{hub_name}:{i}", text
            if total >= max_bytes:
                return
    else:
        raise ConfigError("data.source", source, f"one of {', '.join(SOURCES)}")


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str):
    """Byte-level BPE trained here, saved as a transformers fast tokenizer with an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=EOS)
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.eos_token_id is None:
        raise ConfigError("data.tokenizer", name_or_path, "the tokenizer must define an EOS token")
    return tok


def _write_split(texts: list[str], tokenizer, seq_len: int, out_dir: str, desc: str,
                 column: str = "input_ids") -> dict[str, int]:
    from streaming import MDSWriter

    # llm-foundry's column holds int32 (its convert_dataset_json's encoding); ours the smallest that fits
    dtype = "int32" if column == "tokens" else "uint16" if len(tokenizer) <= 65535 else "uint32"
    eos = tokenizer.eos_token_id
    buf = np.empty(0, dtype=np.int64)
    n_seq = n_tok = 0
    batch = 256
    with MDSWriter(out=out_dir, columns={column: f"ndarray:{dtype}"}, size_limit="32mb") as writer:
        for start in tqdm(range(0, len(texts), batch), desc=desc, unit="chunk", mininterval=1.0):
            enc = tokenizer(texts[start:start + batch], add_special_tokens=False)["input_ids"]
            parts = [buf]
            for ids in enc:
                parts.append(np.asarray(ids, dtype=np.int64))
                parts.append(np.asarray([eos], dtype=np.int64))
            buf = np.concatenate(parts)
            n_full = len(buf) // seq_len
            for i in range(n_full):
                writer.write({column: buf[i * seq_len:(i + 1) * seq_len].astype(dtype)})
            n_seq += n_full
            buf = buf[n_full * seq_len:]
    n_tok = n_seq * seq_len
    return {"documents": len(texts), "sequences": n_seq, "tokens": n_tok, "dropped_tokens": int(len(buf))}


def prepare_dataset(out_dir: str, source: str = "python-source", seq_len: int = 256, vocab_size: int = 4096,
                    tokenizer: str | None = None, max_bytes: int = 8_000_000, val_percent: float = 5.0,
                    files: list[str] | None = None, hub_name: str | None = None, hub_split: str = "train",
                    text_field: str = "text", tokenizer_max_bytes: int = 20_000_000,
                    overwrite: bool = False, column: str = "input_ids") -> dict[str, Any]:
    """Build (or reuse) a dataset in ``out_dir`` and return its manifest.

    ``column``: ``input_ids`` (ours) or ``tokens`` (llm-foundry's ``text`` loader reads it; so do ours).
    Holds an exclusive lock on ``<out_dir>.lock`` while it checks and builds, so processes (or nodes
    sharing a filesystem) that ask for the same folder at once build it once; the others reuse it.
    """
    if source not in SOURCES:
        raise ConfigError("source", source, f"one of {', '.join(SOURCES)}")
    if column not in COLUMNS:
        raise ConfigError("column", column, f"one of {', '.join(COLUMNS)} (tokens: llm-foundry's layout)")
    if seq_len < 2:
        raise ConfigError("seq_len", seq_len, "an integer >= 2")
    if tokenizer is None and not 256 < vocab_size <= 65535 * 4:
        raise ConfigError("vocab_size", vocab_size, "an integer > 256 for a trained byte-level BPE")
    if not 0 < val_percent < 100:
        raise ConfigError("val_percent", val_percent, "a number in (0, 100)")
    if source == "files" and not files:
        raise ConfigError("files", files, "a list of text or JSONL files when source is 'files'")
    if source == "hub" and not hub_name:
        raise ConfigError("hub_name", hub_name, "a datasets hub name when source is 'hub'")
    args = dict(source=source, seq_len=seq_len, vocab_size=vocab_size if tokenizer is None else None,
                tokenizer=tokenizer, max_bytes=max_bytes, val_percent=val_percent,
                files=sorted(files) if files else None, hub_name=hub_name, hub_split=hub_split,
                text_field=text_field, tokenizer_max_bytes=tokenizer_max_bytes)
    if column != "input_ids":
        args["column"] = column  # manifests written before the option stay reusable
    with build_lock(out_dir):
        return _build(out_dir, args, overwrite, files)


@contextlib.contextmanager
def build_lock(out_dir: str):
    """An exclusive ``flock`` on ``<out_dir>.lock`` (next to the folder, on the same filesystem)."""
    import fcntl

    lock_path = os.path.abspath(out_dir).rstrip(os.sep) + ".lock"
    try:
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        f = open(lock_path, "a")
    except OSError:  # a read-only parent: nothing can be built there anyway, so nothing to guard
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(out_dir: str, args: dict[str, Any], overwrite: bool, files: list[str] | None) -> dict[str, Any]:
    manifest_path = os.path.join(out_dir, MANIFEST)
    if not overwrite and os.path.exists(manifest_path):
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError):
            manifest = {}
        if isinstance(manifest, dict) and manifest.get("args") == args:
            print(f"composer-growth: reusing dataset at {out_dir}")
            return manifest
    stage = os.path.abspath(out_dir).rstrip(os.sep) + ".building"
    shutil.rmtree(stage, ignore_errors=True)  # what a killed build left
    os.makedirs(stage)
    try:
        manifest = _build_into(stage, args, files)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _publish(stage, out_dir)
    return manifest


def _publish(stage: str, out_dir: str) -> None:
    """Move a complete build from ``stage`` into ``out_dir``: one rename when ``out_dir`` is absent or
    empty; else the old dataset goes (its manifest first) and the new one comes in, manifest last."""
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    if not os.path.exists(out_dir):
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        os.replace(stage, out_dir)
        return
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        os.remove(os.path.join(out_dir, MANIFEST))
    for sub in ("train", "val", "tokenizer"):
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    for name in sorted(os.listdir(stage), key=lambda n: n == MANIFEST):
        os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
    os.rmdir(stage)


def _build_into(out_dir: str, args: dict[str, Any], files: list[str] | None) -> dict[str, Any]:
    source, seq_len, vocab_size, tokenizer = args["source"], args["seq_len"], args["vocab_size"], args["tokenizer"]
    max_bytes, val_percent = args["max_bytes"], args["val_percent"]
    hub_name, hub_split, text_field = args["hub_name"], args["hub_split"], args["text_field"]
    tokenizer_max_bytes = args["tokenizer_max_bytes"]
    column = args.get("column", "input_ids")
    manifest_path = os.path.join(out_dir, MANIFEST)
    train_texts, val_texts, n_bytes = [], [], 0
    for doc_id, text in iter_documents(source, files, hub_name, hub_split, text_field, max_bytes):
        (val_texts if is_val(doc_id, val_percent) else train_texts).append(text)
        n_bytes += len(text.encode("utf-8", errors="ignore"))
    if not train_texts or not val_texts:
        raise ConfigError("max_bytes", max_bytes, "too small: the train or validation split is empty")

    tok_dir = os.path.join(out_dir, "tokenizer")
    if tokenizer is None:
        budget, sample = tokenizer_max_bytes, []
        for text in train_texts:
            if budget <= 0:
                break
            sample.append(text)
            budget -= len(text)
        print(f"composer-growth: training a {vocab_size}-token byte-level BPE on {len(sample)} documents")
        tok = train_tokenizer(sample, vocab_size, tok_dir)
    else:
        tok = load_tokenizer(tokenizer)
        tok.save_pretrained(tok_dir)

    splits = {
        "train": _write_split(train_texts, tok, seq_len, os.path.join(out_dir, "train"), "tokenizing train", column),
        "val": _write_split(val_texts, tok, seq_len, os.path.join(out_dir, "val"), "tokenizing val", column),
    }
    for name, stats in splits.items():
        if stats["sequences"] == 0:
            raise ConfigError("max_bytes", max_bytes, f"too small: split '{name}' holds no full sequence")
    manifest = {
        "args": args, "source": source, "bytes": n_bytes, "seq_len": seq_len, "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id, "tokenizer": "tokenizer", "splits": splits, "column": column,
    }
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest


def read_manifest(path: str) -> dict[str, Any] | None:
    """The dataset's ``manifest.json``; for a folder of MDS splits without one (llm-foundry's
    ``convert_dataset_json`` output), what :func:`infer_manifest` reads from the shards; else None."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        return infer_manifest(path)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # a damaged manifest: no dataset (a build replaces it)
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("splits"), dict) else None


def index_problem(split_dir: str) -> str | None:
    """What is wrong with the MDS split at ``split_dir`` as StreamingDataset will read it (its
    ``index.json`` parses, lists shards, each shard file exists with the size listed, and the split
    holds samples); None when nothing is."""
    index_path = os.path.join(split_dir, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except FileNotFoundError:
        return f"{index_path} is missing"
    except (OSError, ValueError) as e:
        return f"{index_path} is unreadable ({' '.join(str(e).split())})"
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list):
        return f"{index_path} lists no shards"
    samples = 0
    for shard in shards:
        try:
            data = shard.get("zip_data") or shard["raw_data"]
            name, size = data["basename"], int(data["bytes"])
            samples += int(shard["samples"])
        except (AttributeError, KeyError, TypeError, ValueError):
            return f"{index_path} has a malformed shard entry"
        file = os.path.join(split_dir, name)
        if not os.path.isfile(file):
            return f"{file} (listed in index.json) is missing"
        if os.path.getsize(file) != size:
            return f"{file} holds {os.path.getsize(file)} bytes, index.json lists {size}"
    if samples == 0:
        return f"{split_dir} holds no samples"
    return None


def no_dataset(key: str, path: str, hint: str, where: str = "") -> ConfigError:
    """The error for a folder that holds no dataset: one line, ``hint`` saying how to make one."""
    return ConfigError(key, path, f"no dataset there{where} (no manifest.json); {hint}")


def check_manifest(path: str, key: str, splits: Mapping[str, str] | None = None, seq_len: int | None = None,
                   seq_len_key: str = "seq_len", vocab_size: int | None = None,
                   tokenizer_key: str | None = None) -> dict[str, Any] | None:
    """:func:`read_manifest` of ``path``, checked against what a run reads from it; None: no dataset there.

    ``splits`` maps each split the run reads to the option naming it (the key of its error);
    ``seq_len``: the sequences must hold at least that many tokens (``seq_len_key`` asks for them);
    ``vocab_size``: data.path's token count, which the dataset's tokenizer must have when both are
    known; ``tokenizer_key``: the option that must name a tokenizer when ``path`` has no ``tokenizer/``.
    Other errors name ``key`` and ``path``.
    """
    manifest = read_manifest(path)
    if manifest is None:
        return None
    have = manifest.get("splits", {})
    for split, split_key in (splits or {}).items():
        if split not in have:
            raise ConfigError(split_key, split, f"splits in {path}: {', '.join(have)}")
        problem = index_problem(os.path.join(path, split))
        if problem is not None:
            raise ConfigError(key, path, f"split {split}: {problem}; rebuild it (prepare-data --overwrite)")
    if seq_len is not None and int(manifest["seq_len"]) < seq_len:
        raise ConfigError(key, path, f"sequences of {manifest['seq_len']} tokens, shorter than {seq_len_key} "
                                     f"({seq_len})")
    if vocab_size is not None and manifest.get("vocab_size") is not None and manifest["vocab_size"] != vocab_size:
        raise ConfigError(key, path, f"its tokenizer has {manifest['vocab_size']} tokens, data.path's {vocab_size}: "
                                     "prepare it with data.path's tokenizer")
    if tokenizer_key is not None and not os.path.isdir(os.path.join(path, "tokenizer")):
        raise ConfigError(tokenizer_key, None, f"{path} has no tokenizer/ folder (an MDS folder converted "
                                               "elsewhere): name the tokenizer its tokens come from")
    return manifest


def prepare_once(path: str, build: Callable[[], Any] | None, key: str, hint: str) -> bool:
    """Make sure every node has the dataset at ``path``; True when some node had to build it.

    Each node's local rank 0 decides whether its copy is missing and every rank learns the answers,
    so all take the same path. Without ``build`` every rank stops with the same one line (``key``,
    ``hint``: how to make the dataset). Otherwise local rank 0 of each node that lacks it calls
    ``build()`` (:func:`prepare_dataset` holds ``<path>.lock``: nodes sharing a filesystem build a shared
    folder once and the others reuse it), and every rank waits for it.
    """
    from composer.utils import dist

    from composer_growth.waiting import wait_for_all

    node = dist.get_node_rank()
    mine = (node, read_manifest(path) is None) if dist.get_local_rank() == 0 else None
    missing = sorted(n for n, lacks in filter(None, dist.all_gather_object(mine)) if lacks)
    if not missing:
        return False
    if build is None:
        several = dist.get_world_size() != dist.get_local_world_size()
        raise no_dataset(key, path, hint, f" on node {', '.join(map(str, missing))}" if several else "")
    if dist.get_local_rank() == 0 and node in missing:
        build()
    wait_for_all()  # the build may outlast dist_timeout
    return True


def infer_manifest(path: str) -> dict[str, Any] | None:
    """A manifest read from the MDS splits of ``path`` (subfolders with an ``index.json``): the token
    column (``tokens`` or ``input_ids``), ``seq_len`` (the first sample's length), samples per split.
    ``vocab_size`` and ``tokenizer`` are unknown (None). None when no split holds such a column."""
    splits, column, seq_len = {}, None, None
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(path, name, "index.json")) as f:
                index = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        shards = index.get("shards") or []
        found = [c for c in COLUMNS if shards and c in shards[0].get("column_names", [])]
        if not found:
            continue
        samples = sum(int(shard.get("samples", 0)) for shard in shards)
        if not samples:
            continue  # an empty split is no split
        column = column or found[-1]
        splits[name] = {"sequences": samples}
        if seq_len is None and samples:
            seq_len = _first_sample_length(os.path.join(path, name), shards[0], found[-1])
    if not splits or seq_len is None:
        return None
    return {"args": None, "source": "mds", "seq_len": seq_len, "vocab_size": None, "eos_token_id": None,
            "tokenizer": None, "splits": splits, "column": column, "inferred": True}


def _first_sample_length(split_dir: str, shard: dict[str, Any], column: str) -> int | None:
    from streaming.base.format import reader_from_json

    try:
        reader = reader_from_json(split_dir, None, shard)
        return len(sample_ids(reader.get_item(0), column))
    except Exception:  # noqa: BLE001 - shards we cannot read: no length, so no dataset
        return None


def sample_ids(sample: Any, column: str | None = None) -> np.ndarray:
    """The token ids of one MDS sample: ``input_ids`` (ours) or ``tokens`` (llm-foundry's: an ndarray, or
    bytes of int64 as its older converters wrote them); a bare sequence as is."""
    if not isinstance(sample, dict):
        return np.asarray(sample)
    ids = sample[column] if column else sample["input_ids"] if "input_ids" in sample else sample["tokens"]
    if isinstance(ids, (bytes, bytearray)):
        return np.frombuffer(ids, dtype=np.int64)
    return np.asarray(ids)

"""Batch surgery: change the sequence length of a batch, any ``Mapping`` of values.

A batch is a ``Mapping`` (a ``dict``, transformers' ``BatchEncoding``, a ``UserDict``, ...). Its values
are of three kinds, told apart by shape against the batch's rows and length (those of its first
tensor with two or more dims, ``input_ids`` when present):

* sequence values: ``[rows, length, ...]`` tensors (``input_ids``, ``attention_mask``, ``labels``);
  these are cut;
* per-row values: ``[rows, ...]`` tensors and lists or tuples of ``rows`` items (llm-foundry's
  ``total_tokens`` and ``loss_generating_tokens``, a per-row weight); these follow their rows;
* anything else (scalars, strings, tensors of another shape): passed through as is.

The per-row token counts llm-foundry's collator adds (``total_tokens``: the row's ``attention_mask``
sum, or its length without a mask; ``loss_generating_tokens``: the row's ``labels[1:]`` that are not
``-100``, or its total without labels) are recomputed on the cut batch, so they count what is trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

MODES = ("truncate", "reshape")
IGNORE_INDEX = -100
TOKEN_COUNT_KEYS = ("total_tokens", "loss_generating_tokens")


def _first_sequence_tensor(batch: Mapping[str, Any]) -> torch.Tensor:
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.ndim > 1:
        return ids
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 1:
            return value
    raise ValueError(f"batch has no [batch, seq] tensor; keys: {sorted(batch)}")


def batch_seq_length(batch: Mapping[str, Any]) -> int:
    """The sequence length of a batch: dim 1 of ``input_ids`` (else of its first tensor with two or more dims)."""
    return int(_first_sequence_tensor(batch).shape[1])


def batch_rows(batch: Mapping[str, Any]) -> int:
    """The rows of a batch: dim 0 of ``input_ids`` (else of its first tensor with two or more dims)."""
    return int(_first_sequence_tensor(batch).shape[0])


def batch_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens in a batch as Composer counts them: the sum of llm-foundry's per-row ``total_tokens`` when the
    batch has them (its data spec counts those), else rows x length (Composer's default count)."""
    counts = batch.get("total_tokens")
    if counts is not None and not isinstance(counts, (str, bytes)):
        if isinstance(counts, torch.Tensor):
            return int(counts.sum())
        if isinstance(counts, (list, tuple)):
            return int(sum(int(c) for c in counts))
        if isinstance(counts, (int, float)):
            return int(counts)
    ids = _first_sequence_tensor(batch)
    return int(ids.shape[0] * ids.shape[1])


def _kind(value: Any, rows: int, length: int) -> str:
    if isinstance(value, torch.Tensor):
        if value.ndim >= 2 and tuple(value.shape[:2]) == (rows, length):
            return "seq"
        if value.ndim >= 1 and value.shape[0] == rows:
            return "row"
        return "other"
    if isinstance(value, (list, tuple)) and len(value) == rows:
        return "row"
    return "other"


def _kinds(batch: Mapping[str, Any]) -> dict[str, str]:
    rows, length = batch_rows(batch), batch_seq_length(batch)
    return {k: _kind(v, rows, length) for k, v in batch.items()}


def _take_rows(value: Any, index: list[int]) -> Any:
    """The per-row ``value`` at rows ``index`` (a tensor, list or tuple, as given)."""
    if isinstance(value, torch.Tensor):
        return value[torch.as_tensor(index, dtype=torch.long, device=value.device)]
    picked = [value[i] for i in index]
    return tuple(picked) if isinstance(value, tuple) else picked


def select_rows(batch: Mapping[str, Any], rows: int) -> Mapping[str, Any]:
    """The first ``rows`` rows of a batch: sequence and per-row values sliced, others passed through."""
    return _like(batch, take_rows(batch, 0, rows))


def _like(template: Mapping[str, Any], values: dict[str, Any]) -> Mapping[str, Any]:
    """``values`` as the Mapping type of ``template`` where its constructor takes a dict, else a dict."""
    cls = type(template)
    if cls is dict:
        return values
    try:
        out = cls(values)
    except Exception:  # noqa: BLE001 - a Mapping type we cannot build from a dict: a plain dict
        return values
    return out if isinstance(out, Mapping) and set(out.keys()) == set(values) else values


def _row_counts(batch: Mapping[str, Any]) -> dict[str, list[int]]:
    """llm-foundry's per-row token counts of a batch (``get_tokens_per_batch_func`` applied row by row)."""
    ids = _first_sequence_tensor(batch)
    rows, length = int(ids.shape[0]), int(ids.shape[1])
    mask, labels = batch.get("attention_mask"), batch.get("labels")
    if isinstance(mask, torch.Tensor) and mask.ndim >= 2:
        total = [int(n) for n in mask.reshape(rows, -1).sum(dim=1).tolist()]
    else:
        total = [length] * rows
    if isinstance(labels, torch.Tensor) and labels.ndim >= 2:
        ignored = (labels[:, 1:] == IGNORE_INDEX).reshape(rows, -1).sum(dim=1).tolist()
        generating = [int(labels.shape[1] - 1 - n) for n in ignored]
    else:
        generating = list(total)
    return {"total_tokens": total, "loss_generating_tokens": generating}


def _as_given(counts: list[int], like: Any) -> Any:
    """Per-row ``counts`` in the container (and dtype) of the value they replace; a sum for a scalar."""
    if isinstance(like, torch.Tensor):
        if like.ndim == 0:
            return torch.tensor(sum(counts), dtype=like.dtype, device=like.device)
        return torch.tensor(counts, dtype=like.dtype, device=like.device)
    if isinstance(like, tuple):
        return tuple(counts)
    if isinstance(like, list):
        return list(counts)
    return type(like)(sum(counts)) if isinstance(like, (int, float)) else like


def _recount(out: dict[str, Any], given: Mapping[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
    keys = [k for k in TOKEN_COUNT_KEYS if k in out and (kinds[k] == "row" or isinstance(given[k], (int, float))
                                                          or (isinstance(given[k], torch.Tensor) and given[k].ndim == 0))]
    if keys:
        counts = _row_counts(out)
        for k in keys:
            out[k] = _as_given(counts[k], given[k])
    return out


def _truncate(batch: Mapping[str, Any], kinds: dict[str, str], seq_len: int,
              preserve_end_of_sequence: bool) -> dict[str, Any]:
    seq = [k for k, kind in kinds.items() if kind == "seq"]
    out = dict(batch)
    if not preserve_end_of_sequence:
        for k in seq:
            out[k] = batch[k][:, :seq_len].contiguous()
        return out
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or kinds.get("attention_mask") != "seq":
        raise ValueError("preserve_end_of_sequence needs batch['attention_mask'] to find each row's last token")
    rows = torch.arange(mask.shape[0], device=mask.device)
    last = mask.sum(dim=1).long() - 1
    last_kept = last.clamp(max=seq_len - 1)
    for k in seq:
        v = batch[k]
        end = v[rows, last]
        v = v[:, :seq_len].contiguous()
        v[rows, last_kept] = end
        out[k] = v
    return out


def _pad_value(key: str, pad_token_id: int) -> int:
    if key == "labels":
        return IGNORE_INDEX
    if key == "attention_mask":
        return 0
    return pad_token_id


def _reshape(batch: Mapping[str, Any], kinds: dict[str, str], seq_len: int, pad_token_id: int) -> dict[str, Any]:
    ids = batch["input_ids"]
    rows, length = int(ids.shape[0]), int(ids.shape[1])
    seq = [k for k, kind in kinds.items() if kind == "seq"]
    per_row = [k for k, kind in kinds.items() if kind == "row"]
    mask = batch.get("attention_mask") if kinds.get("attention_mask") == "seq" else None
    out = dict(batch)
    if mask is None or bool(mask.all()):
        # Packed rows: cut the whole batch into rows of seq_len, dropping only the last < seq_len tokens.
        # A new row takes the per-row values of the row its first token comes from.
        n_new = rows * length // seq_len
        keep = n_new * seq_len
        for k in seq:
            v = batch[k]
            out[k] = v.reshape(rows * length, *v.shape[2:])[:keep].reshape(-1, seq_len, *v.shape[2:])
        source = [i * seq_len // length for i in range(n_new)]
    else:
        # Padded rows: cut each row's real tokens into rows of their own, padding only their last piece,
        # so no new row mixes two examples or puts padding between real tokens.
        real = mask.bool()
        pieces: dict[str, list[torch.Tensor]] = {k: [] for k in seq}
        source = []
        for r in range(rows):
            n = int(real[r].sum())
            if n == 0:
                continue
            n_pieces = -(-n // seq_len)
            source.extend([r] * n_pieces)
            for k in seq:
                tokens = batch[k][r][real[r]]
                padded = tokens.new_full((n_pieces * seq_len, *tokens.shape[1:]), _pad_value(k, pad_token_id))
                padded[:n] = tokens
                pieces[k].append(padded.view(n_pieces, seq_len, *tokens.shape[1:]))
        for k in seq:
            out[k] = torch.cat(pieces[k]) if pieces[k] else batch[k][:0, :seq_len]
    for k in per_row:
        out[k] = _take_rows(batch[k], source)
    return out


def set_batch_sequence_length(batch: Mapping[str, Any], seq_len: int, mode: str = "truncate",
                              preserve_end_of_sequence: bool = False, pad_token_id: int = 0,
                              ) -> Mapping[str, Any]:
    """Return a new batch whose sequence values are ``seq_len`` long (unchanged if already no longer).

    ``truncate`` keeps the first ``seq_len`` tokens of each row (with ``preserve_end_of_sequence``,
    each row's last real token, found from ``attention_mask``, replaces the last kept one): the same
    result as ``composer.functional.set_batch_sequence_length(..., truncate=True)``.

    ``reshape`` keeps every token that fits: packed rows are cut into ``rows * length // seq_len``
    rows of ``seq_len``; padded rows (``attention_mask`` with zeros) are cut one by one, the last
    piece of each padded with ``pad_token_id`` (``-100`` for ``labels``, 0 for the mask). All
    sequence values stay aligned with ``input_ids``; per-row values follow their rows (a packed new
    row takes those of the row its first token comes from).

    Per-row token counts (``total_tokens``, ``loss_generating_tokens``) are recomputed on the result;
    other values pass through. The result is a new Mapping of the type given (``BatchEncoding``,
    ``UserDict``, ...) where that type can be built from a dict, else a ``dict``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: one of {', '.join(MODES)}")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    if not isinstance(batch, Mapping):
        raise ValueError(f"needs a Mapping batch (dict, BatchEncoding, ...), got {type(batch).__name__}")
    if mode == "reshape" and not (isinstance(batch.get("input_ids"), torch.Tensor) and batch["input_ids"].ndim > 1):
        raise ValueError(f"reshape mode needs batch['input_ids'] as a [batch, seq] tensor; keys: {sorted(batch)}")
    kinds = _kinds(batch)
    if seq_len >= batch_seq_length(batch):
        return _like(batch, dict(batch))
    if mode == "truncate":
        out = _truncate(batch, kinds, seq_len, preserve_end_of_sequence)
    else:
        out = _reshape(batch, kinds, seq_len, pad_token_id)
    return _like(batch, _recount(out, batch, kinds))


def take_rows(batch: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of a batch: sequence and per-row values sliced, others passed through."""
    kinds = _kinds(batch)
    index = list(range(start, min(stop, batch_rows(batch))))
    return {k: (_take_rows(v, index) if kinds[k] != "other" else v) for k, v in batch.items()}


def cat_rows(batches: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One batch holding the rows of ``batches`` in order (sequence and per-row values joined)."""
    kinds = _kinds(batches[0])
    out = {}
    for key, value in batches[0].items():
        if kinds[key] == "other":
            out[key] = value
        elif isinstance(value, torch.Tensor):
            out[key] = torch.cat([b[key] for b in batches])
        else:
            joined = [x for b in batches for x in b[key]]
            out[key] = tuple(joined) if isinstance(value, tuple) else joined
    return out

"""Batch surgery: change the sequence length of a mapping of [batch, seq] tensors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

MODES = ("truncate", "reshape")
IGNORE_INDEX = -100


def batch_seq_length(batch: Mapping[str, torch.Tensor]) -> int:
    """The sequence length of a batch: dim 1 of its first tensor with two or more dims."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 1:
            return int(value.shape[1])
    raise ValueError(f"batch has no [batch, seq] tensor; keys: {sorted(batch)}")


def batch_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Token positions in a batch: rows x length of ``input_ids`` (else of its first [batch, seq] tensor)."""
    ids = batch.get("input_ids")
    if ids is None:
        ids = next(v for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 1)
    return int(ids.shape[0] * ids.shape[1])


def _check_sequence_shaped(batch: Mapping[str, torch.Tensor], shape: torch.Size) -> None:
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.shape[:2] != shape[:2]:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"batch['{key}'] has shape {got}; every tensor must be [batch, seq] = {tuple(shape[:2])}")


def _truncate(batch: dict[str, torch.Tensor], seq_len: int, preserve_end_of_sequence: bool) -> dict[str, torch.Tensor]:
    if not preserve_end_of_sequence:
        return {k: v[:, :seq_len].contiguous() for k, v in batch.items()}
    if "attention_mask" not in batch:
        raise ValueError("preserve_end_of_sequence needs batch['attention_mask'] to find each row's last token")
    rows = torch.arange(batch["attention_mask"].shape[0], device=batch["attention_mask"].device)
    last = batch["attention_mask"].sum(dim=1).long() - 1
    last_kept = last.clamp(max=seq_len - 1)
    out = {}
    for k, v in batch.items():
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


def _reshape(batch: dict[str, torch.Tensor], seq_len: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    mask = batch.get("attention_mask")
    rows, length = batch["input_ids"].shape[:2]
    if mask is None or bool(mask.all()):
        # Packed rows: cut the whole batch into rows of seq_len, dropping only the last < seq_len tokens.
        keep = (rows * length // seq_len) * seq_len
        return {k: v.reshape(rows * length, *v.shape[2:])[:keep].reshape(-1, seq_len, *v.shape[2:])
                for k, v in batch.items()}
    # Padded rows: cut each row's real tokens into rows of their own, padding only their last piece,
    # so no new row mixes two examples or puts padding between real tokens.
    real = mask.bool()
    pieces: dict[str, list[torch.Tensor]] = {k: [] for k in batch}
    for r in range(rows):
        n = int(real[r].sum())
        if n == 0:
            continue
        n_pieces = -(-n // seq_len)
        for k, v in batch.items():
            tokens = v[r][real[r]]
            padded = tokens.new_full((n_pieces * seq_len, *tokens.shape[1:]), _pad_value(k, pad_token_id))
            padded[:n] = tokens
            pieces[k].append(padded.view(n_pieces, seq_len, *tokens.shape[1:]))
    return {k: torch.cat(v) if v else batch[k][:0, :seq_len] for k, v in pieces.items()}


def set_batch_sequence_length(batch: Mapping[str, torch.Tensor], seq_len: int, mode: str = "truncate",
                              preserve_end_of_sequence: bool = False, pad_token_id: int = 0,
                              ) -> dict[str, torch.Tensor]:
    """Return a new batch whose tensors are ``seq_len`` long (unchanged if already no longer).

    ``truncate`` keeps the first ``seq_len`` tokens of each row (with ``preserve_end_of_sequence``,
    each row's last real token, found from ``attention_mask``, replaces the last kept one): the same
    result as ``composer.functional.set_batch_sequence_length(..., truncate=True)``.

    ``reshape`` keeps every token that fits: packed rows are cut into ``rows * length // seq_len``
    rows of ``seq_len``; padded rows (``attention_mask`` with zeros) are cut one by one, the last
    piece of each padded with ``pad_token_id`` (``-100`` for ``labels``, 0 for the mask). All
    tensors stay aligned with ``input_ids``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: one of {', '.join(MODES)}")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    if mode == "reshape" and "input_ids" not in batch:
        raise ValueError(f"reshape mode needs batch['input_ids']; keys: {sorted(batch)}")
    length = batch_seq_length(batch)
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 1)
    _check_sequence_shaped(batch, first.shape)
    batch = dict(batch)
    if seq_len >= length:
        return batch
    if mode == "truncate":
        return _truncate(batch, seq_len, preserve_end_of_sequence)
    return _reshape(batch, seq_len, pad_token_id)


def batch_rows(batch: Any) -> int:
    """Rows of a batch: dim 0 of its first tensor (a mapping's values, or a list / tuple of tensors)."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ValueError(f"batch has no tensor with a row dimension: {type(batch).__name__}")


def take_rows(batch: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every per-row entry of a mapping batch (tensors and per-row lists)."""
    n = batch_rows(batch)
    out = {}
    for key, value in batch.items():
        per_row = (isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n) or (
            isinstance(value, list) and len(value) == n)
        out[key] = value[start:stop] if per_row else value
    return out


def cat_rows(batches: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One batch holding the rows of ``batches`` in order (tensors concatenated, per-row lists joined)."""
    first = batches[0]
    out = {}
    for key, value in first.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            out[key] = torch.cat([b[key] for b in batches])
        elif isinstance(value, list):
            out[key] = [x for b in batches for x in b[key]]
        else:
            out[key] = value
    return out

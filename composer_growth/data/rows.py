"""Batches of a settable number of rows, cut in order from a stream of batches of another size.

:class:`RowsLoader` lets the rows per optimizer step change in the middle of an epoch: the
Trainer holds it as its train loader; setting ``rows`` takes effect at the next batch. Every row
of the stream is trained once, in the stream's order, and the Trainer counts the tokens of the
batches it really gets.
"""

from __future__ import annotations

from typing import Any, Protocol

from composer_growth.functional.batch import batch_rows, cat_rows, take_rows


class BatchSource(Protocol):
    """An endless supply of batches with a resumable position (e.g. :class:`composer_growth.data.phased.LoaderSource`)."""

    def next(self) -> Any: ...

    def state_dict(self) -> dict[str, Any] | None: ...


class RowsLoader:
    """An endless iterable of batches of ``rows`` rows drawn in order from ``source``.

    A source batch that is not used up is kept for the next batch. :meth:`state_dict` gives the
    position as the source's position before its last batch was drawn plus the rows of that batch
    already used (``skip``); a loader built on a source resumed from that position, with
    :meth:`load_state_dict`, continues with the same rows.
    """

    def __init__(self, source: BatchSource, rows: int):
        self.source = source
        self.rows = int(rows)
        self._last: Any = None          # the source batch rows are being taken from
        self._used = 0                  # rows of it already handed out
        self._mark: dict[str, Any] | None = None  # source position before it was drawn
        self._skip = 0                  # resuming: rows of the first source batch already trained

    def __iter__(self):
        while True:
            yield self.next()

    def _left(self) -> int:
        return 0 if self._last is None else batch_rows(self._last) - self._used

    def _draw(self) -> None:
        self._mark = self.source.state_dict()
        self._last, self._used = self.source.next(), 0
        if self._skip:
            self._used, self._skip = min(self._skip, batch_rows(self._last)), 0

    def next(self) -> Any:
        if self._left() == 0:
            self._draw()
        if self._used == 0 and batch_rows(self._last) == self.rows:
            batch, self._used = self._last, self.rows  # a whole source batch: handed on as it is
            return batch
        parts, need = [], self.rows
        while need > 0:
            if self._left() == 0:
                self._draw()
            take = min(need, self._left())
            parts.append(take_rows(self._last, self._used, self._used + take))
            self._used += take
            need -= take
        return parts[0] if len(parts) == 1 else cat_rows(parts)

    def state_dict(self) -> dict[str, Any]:
        if self._left() == 0:
            return {"source": self.source.state_dict(), "skip": 0, "rows": self.rows}
        return {"source": self._mark, "skip": self._used, "rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take up a saved position; the source must already be set to resume from ``state['source']``."""
        self.rows = int(state.get("rows", self.rows))
        self._last, self._used, self._skip = None, 0, int(state.get("skip", 0))

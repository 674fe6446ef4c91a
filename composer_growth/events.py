"""Events that change a run: one console line when each happens, and a list for the run summary.

An algorithm that changes the run keeps its events (``{"batch": ..., "text": ...}``) in its state
(so a resumed run reports the whole run) and returns them from ``run_events()``;
:class:`composer_growth.callbacks.RunSummary` lists them at the end.
"""

from __future__ import annotations

from typing import Any

from composer.loggers import Logger
from composer.utils import dist


def announce(logger: Logger, name: str, batch: int, text: str) -> dict[str, Any]:
    """Print ``text`` once (rank 0), send it to the loggers as a trace, and return the event's record."""
    line = f"[batch {batch}] {name}: {text}"
    logger.log_traces({f"event/{name}": line})
    if dist.get_global_rank() == 0:
        print(line, flush=True)
    return {"batch": int(batch), "name": name, "text": text}


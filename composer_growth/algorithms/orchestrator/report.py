"""What the orchestrator says: the block printed when an op fires, the run summary, the plan's events."""

from __future__ import annotations

from typing import Any

from composer_growth.algorithms.orchestrator.schedule import Op


def plan_event(op: Op, batch: int, latest: bool = True) -> dict[str, Any]:
    """A ``composer-growth plan`` event: when ``op`` fires (``latest``: by its timeout at ``batch``)."""
    whens = ([f"when eval loss < {op.trigger_loss:g}"] if op.trigger_loss is not None else []) + (
        [f"on plateau ({op.trigger_plateau.describe()})"] if op.trigger_plateau is not None else [])
    when = " or ".join(whens) or "on its timeout"
    by = f"at the latest by batch {batch}" if latest else "not by a timeout within the run"
    return {"event": "orchestrator", "batch": batch if latest else None, "op": op.label(),
            "trigger_loss": op.trigger_loss,
            "trigger_plateau": op.trigger_plateau.describe() if op.trigger_plateau is not None else None,
            "latest_batch": batch if latest else None, "text": f"{when}, {by}"}


def fired_block(ops: list[Op], metric: str, r: dict[str, Any]) -> list[str]:
    """The lines printed when an op fires (record ``r``)."""
    op = ops[r["index"]]
    if r["reason"] == "loss":
        why = f"{metric} {r['loss_before']:.4f} < trigger_loss {r['trigger_loss']:g}"
    elif r["reason"] == "plateau":
        why = f"plateau: {metric} improved {r['improvement']:.4f} over the window ({r['plateau']})"
    else:
        why = f"timeout: {r['waited']} since the last op (max_wait {op.max_wait})"
    lines = [f"== orchestrator: schedule[{r['index']}] of {len(ops)}: {op.label()} "
             f"{'fired' if r['status'] == 'applied' else 'SKIPPED'} at batch {r['batch']} ==",
             f"  why          {why}"]
    if r["loss_before"] is not None:
        lines.append(f"  loss before  {r['loss_before']:.4f} (eval at batch {r['loss_before_batch']})")
    if r["loss_after"] is not None:
        lines.append(f"  loss after   {r['loss_after']:.4f} (re-evaluated)")
    done = r["status"] == "applied"
    lines.append(f"  {'did         ' if done else 'skipped     '} {r['did'].removeprefix('skipped: ')}")
    return lines


def run_summary(ops: list[Op], fired: list[dict[str, Any]]) -> dict[str, Any]:
    """One line per fired op for the run summary, and the records for its JSON."""
    lines = []
    for r in fired:
        why = (f"loss {r['loss_before']:.4f} < {r['trigger_loss']:g}" if r["reason"] == "loss"
               else f"plateau: improved {r['improvement']:.4f} ({r['plateau']})" if r["reason"] == "plateau"
               else f"timeout after {r['waited']}")
        after = f", after {r['loss_after']:.4f}" if r["loss_after"] is not None else ""
        lines.append(f"  [{r['index']}] {ops[r['index']].label():<28} batch {r['batch']:<6} "
                     f"{why}{after}{'' if r['status'] == 'applied' else '  SKIPPED: ' + r['did']}")
    pending = len(ops) - len(fired)
    if pending:
        lines.append(f"  ({pending} op{'s' if pending > 1 else ''} not fired)")
    return {"title": "orchestrator", "lines": lines, "ops": [dict(r) for r in fired]}

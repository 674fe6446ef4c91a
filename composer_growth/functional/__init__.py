"""Functional ops on plain objects (model, batch, optimizer): what to do, with no Trainer."""

__all__: list[str] = []

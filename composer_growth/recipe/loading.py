"""Reading a YAML recipe: overrides (``key=value``, list entries by index) and interpolations,
with one-line errors naming the file, line and column or the key."""

from __future__ import annotations

import os
from typing import Any

from composer_growth.errors import ConfigError


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML recipe, apply ``key=value`` overrides and resolve interpolations.

    An override's key is a dotted path; a number (``schedule.0.name``, or ``schedule[0].name``)
    indexes a list. A YAML syntax error names the file, line and column.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not os.path.isfile(path):
        raise ConfigError("recipe", path, "no such file")
    for item in overrides:
        if "=" not in item:
            raise ConfigError("override", item, "expected key=value")
    try:
        cfg = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError("recipe", where, f"YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError("recipe", path, f"YAML error: {str(e).splitlines()[0]}") from None
    try:
        data = OmegaConf.to_container(cfg, resolve=False)
        for item in overrides:
            apply_override(data, item)
        data = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "recipe"
        raise ConfigError(str(key), path, str(e).splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError("recipe", path, "the YAML file must hold a mapping")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``key=value`` in the recipe mapping ``data``; list entries by index (``a.0.b`` or ``a[0].b``)."""
    import re

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    key, _, text = item.partition("=")
    parts = [p for p in re.split(r"\.|\[|\]", key.strip()) if p != ""]
    if not parts:
        raise ConfigError("override", item, "expected key=value")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]), resolve=False)["v"]
    except OmegaConfBaseException as e:
        raise ConfigError(key, text, f"cannot read the value: {str(e).splitlines()[0]}") from None
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[:depth]) or "recipe"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(key, text, f"{here} is a list of {len(node)} entries: index it with 0..{len(node) - 1}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(key, text, f"{here} holds {node!r}, not a mapping or a list")

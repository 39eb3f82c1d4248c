"""Objects from LightningCLI-style YAML without jsonargparse: for the benchmarks and the ``sample`` command.

The GPU machines the benchmarks run on have no jsonargparse, and the ``sample`` command rebuilds a run's data
module from its saved ``config.yaml``; both need only the ``{class_path, init_args}`` convention, built here.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["instantiate"]


def instantiate(value: Any) -> Any:
    """Build ``{class_path, init_args}`` mappings (recursively) into objects, as LightningCLI does; other values,
    lists included (element by element), pass through."""
    if isinstance(value, dict) and "class_path" in value:
        module, _, name = value["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: instantiate(v) for k, v in (value.get("init_args") or {}).items()})
    if isinstance(value, list):
        return [instantiate(v) for v in value]
    return value

"""Out-of-core clustering of object embeddings.

Public API: :func:`load_config`, :class:`Config`, :func:`run` (see
:func:`pipeline.runner.run`), :class:`Catalog` (where the outputs are) and
:func:`make_demo_dataset`. Names are imported on first use, so ``import pipeline`` and the
CLI's ``--help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "config",
    "load_config": "config",
    "Catalog": "catalog",
    "RunResult": "runner",
    "run": "runner",
    "make_demo_dataset": "synthetic",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pipeline.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")

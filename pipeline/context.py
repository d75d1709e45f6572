"""What every stage function receives besides its own config sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .catalog import Catalog
from .executor import Executor
from .plan import RunPlan


@dataclass
class StageContext:
    """The run's plan, the live executor, the run metadata and whether to print."""

    plan: RunPlan
    executor: Executor
    #: Run metadata (config, seed, versions) for every Parquet file's schema.
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Print summaries (the CLI); the Python API prints nothing unless asked.
    verbose: bool = False

    @property
    def catalog(self) -> Catalog:
        return self.plan.catalog

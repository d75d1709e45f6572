"""The stage table: one record per stage, read by the runner, the markers, ``--dry-run``
and the CLI. Adding a stage is one entry here plus its function.

This module is deliberately light (no numpy, no dask): the CLI imports it to build its
commands, so ``python -m pipeline --help`` stays fast. Stage functions are named by
``"module:function"`` and imported only when the stage runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    """What a stage is.

    Attributes
    ----------
    name : str
        The CLI command and marker name.
    reads : tuple of str
        Config sections passed to the function as keyword arguments (its own sections).
    depends_on : tuple of str
        Config sections or ``section.key`` values whose change redoes the stage (and,
        through the chained markers, every stage after it).
    input_files : tuple of str
        Config keys naming input files or folders whose contents the outputs depend on.
    derived : tuple of str
        :class:`~pipeline.plan.RunPlan` values (computed from the config and the machine)
        the outputs depend on, e.g. the shuffle seed.
    upstream : str or None
        The stage whose outputs this one reads.
    function : str
        ``"module:function"`` under ``pipeline``, called as ``function(context, **sections)``
        with a :class:`pipeline.context.StageContext`.
    outputs : tuple of str
        :class:`~pipeline.catalog.Catalog` attributes the stage writes; a rerun redoes the
        stage when one is missing.
    """

    name: str
    reads: tuple[str, ...]
    depends_on: tuple[str, ...]
    input_files: tuple[str, ...]
    derived: tuple[str, ...]
    upstream: str | None
    function: str
    outputs: tuple[str, ...]

    def load(self) -> Callable[..., Any]:
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(f"pipeline.{module}"), attr)


STAGES: tuple[Stage, ...] = (
    Stage(
        name="ingest",
        reads=("input", "select", "ingest"),
        depends_on=(
            "input.objects_csv", "input.embeddings_root", "input.embeddings_template",
            "input.embeddings_matrix", "select", "ingest",
        ),
        input_files=("input.objects_csv", "input.embeddings_matrix", "input.embeddings_root"),
        derived=("shuffle_seed",),
        upstream=None,
        function="ingest:ingest_stage",
        outputs=("store", "objects", "embedding_files", "rejects", "ingest_summary"),
    ),
    Stage(
        name="train",
        reads=("train", "postprocess"),
        depends_on=("train",),
        input_files=(),
        derived=("blas_threads", "k_rules"),
        upstream="ingest",
        function="train:train_stage",
        outputs=("model",),
    ),
    Stage(
        name="predict",
        reads=(),
        depends_on=(),
        input_files=(),
        derived=(),
        upstream="train",
        function="predict:predict_stage",
        outputs=("assignments",),
    ),
    Stage(
        name="postprocess",
        reads=("postprocess",),
        depends_on=("postprocess",),
        input_files=(),
        derived=(),
        upstream="predict",
        function="postprocess:postprocess_stage",
        outputs=(
            "postprocessed", "clusters_csv", "clusters_parquet", "cluster_summary", "funnel",
        ),
    ),
    Stage(
        name="report",
        reads=("report", "input", "postprocess"),
        depends_on=("report", "input.images_root", "input.image_template"),
        input_files=("report.groups_file",),
        derived=(),
        upstream="postprocess",
        function="report:report_stage",
        outputs=("summary_markdown", "report_index"),
    ),
)  # fmt: skip

STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def downstream_of(name: str) -> tuple[str, ...]:
    """The stage and every stage after it, in order.

    >>> downstream_of("postprocess")
    ('postprocess', 'report')
    """
    return STAGE_NAMES[STAGE_NAMES.index(name) :]

"""Plan before executing: pure functions from config (and input shape) to frozen plans.

``plan_run`` needs only the config (paths and stages); ``plan_training`` also needs the
store's shape and fixes everything the fit depends on: the effective number of clusters,
batch size, k-means++ sample, and the seeded block order of every epoch. Because the order
comes from the seed alone, a local and a distributed run visit blocks identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Config
from .errors import ConfigError, InputError, must_be
from .store import is_local, join, parse_location

STAGES: tuple[str, ...] = ("ingest", "train", "predict", "postprocess", "report")


@dataclass(frozen=True)
class OutputPaths:
    """Where every stage reads and writes (paths or fsspec URLs)."""

    root: str
    staging: str
    memmap: str
    store: str
    objects: str
    rejects: str
    ingest_summary: str
    model: str
    assignments: str
    postprocessed: str
    clusters_parquet: str
    clusters_csv: str
    cluster_summary: str
    funnel: str
    summary_markdown: str
    report: str
    markers: str

    @classmethod
    def from_config(cls, cfg: Config) -> OutputPaths:
        root = parse_location(cfg.output.dir).rstrip("/")
        staging = cfg.output.staging_dir or (
            join(root, "_staging") if is_local(root) else str(Path("work") / "staging")
        )
        stem = Path(cfg.output.csv_name).stem
        return cls(
            root=root,
            staging=staging,
            memmap=join(staging, "embeddings.f32"),
            store=join(root, "embeddings.zarr"),
            objects=join(root, "objects.parquet"),
            rejects=join(root, "rejects.parquet"),
            ingest_summary=join(root, "ingest.json"),
            model=join(root, "model"),
            assignments=join(root, "assignments.parquet"),
            postprocessed=join(root, "postprocessed.parquet"),
            clusters_parquet=join(root, f"{stem}.parquet"),
            clusters_csv=join(root, cfg.output.csv_name),
            cluster_summary=join(root, "cluster_summary.parquet"),
            funnel=join(root, "funnel.parquet"),
            summary_markdown=join(root, "summary.md"),
            report=join(root, "report"),
            markers=join(root, "_markers"),
        )


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, before it does any of it."""

    stages: tuple[str, ...]
    paths: OutputPaths
    scheduler: str

    def __repr__(self) -> str:
        lines = [f"RunPlan(scheduler={self.scheduler!r})", f"  stages: {' -> '.join(self.stages)}"]
        for name, value in self.paths.__dict__.items():
            lines.append(f"  {name:<17} {value}")
        return "\n".join(lines)


@dataclass(frozen=True)
class TrainPlan:
    """Everything the fit depends on, derived from config and the store's shape."""

    n_rows: int
    dim: int
    chunk_rows: int
    n_clusters: int
    batch_size: int
    init_size: int
    epochs: int
    refine_iterations: int
    seed: int
    block_orders: tuple[tuple[int, ...], ...] = field(repr=False)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_rows)

    def __repr__(self) -> str:
        first = ", ".join(map(str, self.block_orders[0][:8])) if self.block_orders else ""
        more = ", ..." if self.n_blocks > 8 else ""
        return (
            f"TrainPlan(rows={self.n_rows:,}, dim={self.dim}, n_clusters={self.n_clusters}, "
            f"chunk_rows={self.chunk_rows}, blocks={self.n_blocks}, batch_size={self.batch_size}, "
            f"init_size={self.init_size}, epochs={self.epochs}, "
            f"refine_iterations={self.refine_iterations}, seed={self.seed}, "
            f"epoch 1 block order=[{first}{more}])"
        )


def plan_run(cfg: Config, stages: tuple[str, ...] = STAGES) -> RunPlan:
    """Build the run plan: which stages, in which order, writing where."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(must_be("Stage names", f"among {list(STAGES)}", unknown))
    if cfg.train.n_clusters != "auto":
        check_chunk_rows(cfg.ingest.chunk_rows, cfg.train.n_clusters)
    ordered = tuple(s for s in STAGES if s in stages)
    return RunPlan(
        stages=ordered, paths=OutputPaths.from_config(cfg), scheduler=cfg.executor.scheduler
    )


def check_chunk_rows(chunk_rows: int, n_clusters: int) -> None:
    """A store chunk must hold at least one row per centre (known from the config alone
    unless ``n_clusters`` is ``auto``, so checked before any stage runs)."""
    if chunk_rows < n_clusters:
        raise ConfigError(
            must_be(
                "ingest.chunk_rows",
                f">= train.n_clusters ({n_clusters}) so each mini-batch can cover every centre",
                chunk_rows,
                "Raise ingest.chunk_rows or lower train.n_clusters.",
            )
        )


def effective_n_clusters(cfg: Config, n_rows: int) -> int:
    """``train.n_clusters``, or ``rows / target_cluster_size`` when it is ``auto``.

    >>> from pipeline.config import Config
    >>> effective_n_clusters(Config.model_validate({"train": {"n_clusters": "auto"}}), 61751)
    618
    """
    if cfg.train.n_clusters == "auto":
        return max(1, round(n_rows / cfg.train.target_cluster_size))
    return int(cfg.train.n_clusters)


def plan_training(cfg: Config, n_rows: int, dim: int, chunk_rows: int) -> TrainPlan:
    """Check feasibility and fix the fit's derived parameters and block order.

    Raises
    ------
    InputError
        Fewer objects than clusters.
    ConfigError
        A store chunk smaller than the number of clusters (a mini-batch could not hold
        one row per centre).
    """
    k = effective_n_clusters(cfg, n_rows)
    if n_rows < k:
        raise InputError(
            must_be(
                "train.n_clusters",
                f"<= the number of ingested objects ({n_rows:,})",
                k,
                "Lower train.n_clusters, use 'auto', or add objects.",
            )
        )
    chunk_rows = min(chunk_rows, n_rows)
    check_chunk_rows(chunk_rows, k)
    batch_size = min(cfg.train.batch_size, chunk_rows)
    init_size = cfg.train.init_size or 32 * k
    init_size = min(max(init_size, k), n_rows)
    n_blocks = math.ceil(n_rows / chunk_rows)
    rng = np.random.default_rng(cfg.train.seed)
    orders = tuple(
        tuple(int(b) for b in rng.permutation(n_blocks)) for _ in range(cfg.train.epochs)
    )
    return TrainPlan(
        n_rows=n_rows,
        dim=dim,
        chunk_rows=chunk_rows,
        n_clusters=k,
        batch_size=batch_size,
        init_size=init_size,
        epochs=cfg.train.epochs,
        refine_iterations=cfg.train.refine_iterations,
        seed=cfg.train.seed,
        block_orders=orders,
    )

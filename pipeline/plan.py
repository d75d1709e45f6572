"""Plan before executing: pure functions from config (and input shape) to frozen plans.

``plan_run`` needs only the config: the stages, where outputs go (the catalog) and every
value derived from the config (shuffle seed, BLAS threads, worker counts), computed here
once and nowhere else. ``plan_training`` also needs the store's shape and fixes what the
fit depends on: the effective number of clusters, batch size, k-means++ sample, and the
seeded block order of every epoch. Because the order comes from the seed alone, a local
and a distributed run visit blocks identically. ``estimate_resources`` gives each stage's
peak memory and disk from rows, dims, chunk rows and k (what ``--dry-run`` prints).
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from .catalog import Catalog
from .config import Config, ExecutorConfig, TrainConfig
from .errors import ConfigError, InputError, must_be
from .stages import STAGE_NAMES


def local_cores() -> int:
    """CPU cores this process may run on (the one fallback for every "all cores" default):
    the affinity mask where the OS has one, so ``taskset -c 0`` means one core."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers and threads the executor starts (``local-cluster``) or uses."""

    n_workers: int
    threads_per_worker: int

    @property
    def n_cores(self) -> int:
        return self.n_workers * self.threads_per_worker


def plan_workers(cfg: ExecutorConfig, cores: int | None = None) -> WorkerPlan:
    """Workers and threads per worker for the configured scheduler.

    >>> plan_workers(ExecutorConfig(scheduler="local-cluster"), cores=16)
    WorkerPlan(n_workers=4, threads_per_worker=4)
    >>> plan_workers(ExecutorConfig(), cores=2)
    WorkerPlan(n_workers=2, threads_per_worker=1)
    """
    cores = cores or local_cores()
    if cfg.scheduler == "local-cluster":
        n_workers = cfg.n_workers or min(4, cores)
        return WorkerPlan(n_workers, cfg.threads_per_worker or max(1, cores // n_workers))
    # threads / processes / synchronous: one pool of n_workers; a remote cluster's size is
    # known only once connected (the executor reports it).
    return WorkerPlan(cfg.n_workers or cores, 1)


def shuffle_seed(cfg: Config) -> int:
    """Seed of the store's row shuffle: ``ingest.shuffle_seed``, else ``train.seed``."""
    return cfg.ingest.shuffle_seed if cfg.ingest.shuffle_seed is not None else cfg.train.seed


def effective_chunk_rows(chunk_rows: int, n_rows: int) -> int:
    """Rows per store chunk: the configured size, or all rows when there are fewer.

    >>> effective_chunk_rows(8192, 1000), effective_chunk_rows(8192, 10**6)
    (1000, 8192)
    """
    return max(1, min(chunk_rows, n_rows))


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, before it does any of it: stages, outputs, derived values."""

    stages: tuple[str, ...]
    catalog: Catalog
    run_id: str
    scheduler: str
    workers: WorkerPlan
    blas_threads: int
    shuffle_seed: int
    chunk_rows: int
    #: With ``n_clusters: auto``, the post-processing rules the k sweep scores by (so a
    #: change to them redoes the fit); ``None`` for a fixed k.
    k_rules: dict | None = None
    #: Settings that work but cost much more than they need to, with the estimated cost.
    warnings: tuple[str, ...] = ()

    def __repr__(self) -> str:
        lines = [
            f"RunPlan(run_id={self.run_id!r}, scheduler={self.scheduler!r}, workers={self.workers.n_workers}, "
            f"threads_per_worker={self.workers.threads_per_worker}, "
            f"blas_threads={self.blas_threads}, shuffle_seed={self.shuffle_seed}, "
            f"chunk_rows={self.chunk_rows})",
            f"  stages: {' -> '.join(self.stages)}",
        ]
        for name, value in self.catalog.__dict__.items():
            lines.append(f"  {name:<17} {value}")
        lines += [f"  warning: {w}" for w in self.warnings]
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
    blas_threads: int
    block_orders: tuple[tuple[int, ...], ...] = field(repr=False)
    metric: str = "euclidean"
    strategy: str = "sequential"

    @property
    def reseed_window(self) -> int:
        """Rows over which a centre must win ``reseed_min_members`` rows (cosine fit):
        16 per centre, so a typical cluster expects 16 members in it."""
        return 16 * self.n_clusters

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_rows)

    def block_bounds(self, block: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` of a store block."""
        start = block * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def __repr__(self) -> str:
        first = ", ".join(map(str, self.block_orders[0][:8])) if self.block_orders else ""
        more = ", ..." if self.n_blocks > 8 else ""
        metric = f"metric={self.metric}, " if self.metric != "euclidean" else ""
        if self.strategy != "sequential":
            sampled = len(self.block_orders[0]) if self.block_orders else 0
            metric += f"strategy={self.strategy} (chain on {sampled} sampled blocks), "
        return (
            f"TrainPlan({metric}rows={self.n_rows:,}, dim={self.dim}, n_clusters={self.n_clusters}, "
            f"chunk_rows={self.chunk_rows}, blocks={self.n_blocks}, batch_size={self.batch_size}, "
            f"init_size={self.init_size}, epochs={self.epochs}, "
            f"refine_iterations={self.refine_iterations}, seed={self.seed}, "
            f"blas_threads={self.blas_threads}, epoch 1 block order=[{first}{more}])"
        )


#: Fixed cost of one store chunk (a Zarr chunk, an objects Parquet part, a dask task per
#: stage), measured on the demo: chunk_rows 256 -> 1 made ingest and predict ~50x slower.
_SECONDS_PER_CHUNK = 0.004


def chunk_rows_warnings(chunk_rows: int, default: int = 8192) -> tuple[str, ...]:
    """A warning with the estimated cost when ``chunk_rows`` is far below the default.

    >>> chunk_rows_warnings(8192)
    ()
    >>> chunk_rows_warnings(16)[0][:60]
    'ingest.chunk_rows=16 is far below the default 8192: 62,500 c'
    """
    if chunk_rows * 64 >= default:
        return ()
    chunks = math.ceil(1_000_000 / chunk_rows)
    return (
        f"ingest.chunk_rows={chunk_rows} is far below the default {default}: {chunks:,} chunks "
        f"per million rows, ~{chunks * _SECONDS_PER_CHUNK:,.0f} s of fixed per-chunk cost "
        f"per stage and million rows (vs ~{math.ceil(1e6 / default) * _SECONDS_PER_CHUNK:.1f} "
        "s at the default). Raise it unless memory per block forces it.",
    )


def new_run_id() -> str:
    """A run's identity: start time and a random suffix (temporaries and markers carry it)."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def k_rules(cfg: Config) -> dict | None:
    """What the ``n_clusters: auto`` sweep scores k by (``None`` for a fixed k)."""
    if cfg.train.n_clusters != "auto":
        return None
    return cfg.postprocess.model_dump(mode="json")


def plan_run(cfg: Config, stages: tuple[str, ...] = STAGE_NAMES) -> RunPlan:
    """Build the run plan: which stages, in which order, writing where, with what."""
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise ConfigError(must_be("Stage names", f"among {list(STAGE_NAMES)}", unknown))
    if cfg.train.n_clusters != "auto":
        check_chunk_rows(cfg.ingest.chunk_rows, cfg.train.n_clusters)
        check_batch_size(cfg.train.batch_size, cfg.train.n_clusters)
    catalog = Catalog.from_config(cfg.output)
    catalog.check_layout(
        {
            "input.objects_csv": cfg.input.objects_csv,
            "input.embeddings_matrix": cfg.input.embeddings_matrix,
            "report.groups_file": cfg.report.groups_file,
        }
    )
    return RunPlan(
        stages=tuple(s for s in STAGE_NAMES if s in stages),
        catalog=catalog,
        run_id=new_run_id(),
        scheduler=cfg.executor.scheduler,
        workers=plan_workers(cfg.executor),
        blas_threads=cfg.train.blas_threads or local_cores(),
        shuffle_seed=shuffle_seed(cfg),
        chunk_rows=cfg.ingest.chunk_rows,
        k_rules=k_rules(cfg),
        warnings=chunk_rows_warnings(cfg.ingest.chunk_rows),
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


def check_batch_size(batch_size: int, n_clusters: int) -> None:
    """A mini-batch must hold at least one row per centre (scikit-learn's first
    ``partial_fit`` call needs ``n_clusters`` rows)."""
    if batch_size < n_clusters:
        raise ConfigError(
            must_be(
                "train.batch_size",
                f">= train.n_clusters ({n_clusters}) so each mini-batch can cover every centre",
                batch_size,
                "Raise train.batch_size or lower train.n_clusters.",
            )
        )


def effective_n_clusters(train: TrainConfig, n_rows: int) -> int:
    """``train.n_clusters``, or ``rows / target_cluster_size`` when it is ``auto`` (the
    centre of the sweep :mod:`pipeline.choose_k` runs at train time; estimates use it).

    >>> effective_n_clusters(TrainConfig(n_clusters="auto"), 61751)
    618
    """
    if train.n_clusters == "auto":
        return max(1, round(n_rows / train.target_cluster_size))
    return int(train.n_clusters)


#: ``train.strategy: parallel`` without ``refine_iterations``: Lloyd passes over all blocks.
PARALLEL_REFINE_ITERATIONS = 3


def sampled_blocks(train: TrainConfig, n_blocks: int) -> int:
    """Blocks the mini-batch chain visits per epoch: all of them (``sequential``), or
    ``train.sample_blocks`` (default a quarter, at least one) with ``parallel``.

    >>> sampled_blocks(TrainConfig(strategy="parallel"), 123), sampled_blocks(TrainConfig(), 123)
    (31, 123)
    """
    if train.strategy == "sequential":
        return n_blocks
    return min(n_blocks, train.sample_blocks or max(1, math.ceil(n_blocks / 4)))


#: ``sequential`` without ``refine_iterations``: a mini-batch chain of fewer steps than
#: this (a small store: rows < this x batch_size per epoch) is topped up with
#: :data:`SMALL_STORE_REFINE_ITERATIONS` full-batch passes, which cost little there.
SMALL_STORE_STEPS = 4
SMALL_STORE_REFINE_ITERATIONS = 10


def refine_iterations(train: TrainConfig, n_rows: int, batch_size: int) -> int:
    """Full-batch refinement passes: ``train.refine_iterations``, else
    :data:`PARALLEL_REFINE_ITERATIONS` for ``parallel``, and for ``sequential`` 0 unless
    the mini-batch chain makes fewer than :data:`SMALL_STORE_STEPS` steps.

    Why: mini-batch k-means converges over many steps; a store of 11,797 rows with
    batches of 8,192 gets two, and its clusters were visibly less pure than full-batch
    KMeans' (README, *A real embedding set*). Ten passes over so few rows take about as
    long as the chain over a store eight times larger.

    >>> t = TrainConfig()
    >>> refine_iterations(t, 11_797, 8192), refine_iterations(t, 61_751, 8192)
    (10, 0)
    >>> refine_iterations(TrainConfig(strategy="parallel"), 61_751, 8192)
    3
    """
    if train.refine_iterations is not None:
        return train.refine_iterations
    if train.strategy == "parallel":
        return PARALLEL_REFINE_ITERATIONS
    steps = train.epochs * math.ceil(n_rows / max(1, batch_size))
    return SMALL_STORE_REFINE_ITERATIONS if steps < SMALL_STORE_STEPS else 0


def plan_training(
    train: TrainConfig, n_rows: int, dim: int, chunk_rows: int, blas_threads: int
) -> TrainPlan:
    """Check feasibility and fix the fit's derived parameters and block order.

    With ``train.strategy: parallel`` each epoch's order is a seeded uniform sample of
    the blocks (:func:`sampled_blocks`); the refinement passes then cover every block.

    Raises
    ------
    InputError
        Fewer objects than clusters.
    ConfigError
        A store chunk smaller than the number of clusters (a mini-batch could not hold
        one row per centre).
    """
    k = effective_n_clusters(train, n_rows)
    if n_rows < k:
        raise InputError(
            must_be(
                "train.n_clusters",
                f"<= the number of ingested objects ({n_rows:,})",
                k,
                "Lower train.n_clusters, use 'auto', or add objects.",
            )
        )
    chunk_rows = effective_chunk_rows(chunk_rows, n_rows)
    check_chunk_rows(chunk_rows, k)
    check_batch_size(train.batch_size, k)
    batch_size = min(train.batch_size, chunk_rows)
    init_size = train.init_size or 32 * k
    init_size = min(max(init_size, k), n_rows)
    n_blocks = math.ceil(n_rows / chunk_rows)
    rng = np.random.default_rng(train.seed)
    orders = [[int(b) for b in rng.permutation(n_blocks)] for _ in range(train.epochs)]
    if n_blocks > 1 and n_rows - (n_blocks - 1) * chunk_rows < k and orders[0][0] == n_blocks - 1:
        # The first partial_fit call needs >= k rows: never start on a short last block.
        orders[0][0], orders[0][1] = orders[0][1], orders[0][0]
    n_sampled = sampled_blocks(train, n_blocks)
    orders = [order[:n_sampled] for order in orders]
    return TrainPlan(
        n_rows=n_rows,
        dim=dim,
        chunk_rows=chunk_rows,
        n_clusters=k,
        batch_size=batch_size,
        init_size=init_size,
        epochs=train.epochs,
        refine_iterations=refine_iterations(train, n_rows, batch_size),
        seed=train.seed,
        blas_threads=blas_threads,
        block_orders=tuple(tuple(order) for order in orders),
        metric=train.metric,
        strategy=train.strategy,
    )


#: Private memory of a worker process with the libraries loaded (measured: ~170 MiB).
_BASE_BYTES = 170 << 20


@dataclass(frozen=True)
class StageEstimate:
    """Rough peak private memory and disk a stage needs (``--dry-run`` prints these)."""

    peak_bytes: int
    disk_bytes: int


def estimate_resources(
    n_rows: int, dim: int, chunk_rows: int, n_clusters: int, n_workers: int
) -> dict[str, StageEstimate]:
    """Per-stage estimates from the shape of the run.

    The per-row constants are peaks measured at 1,000,000 x 256 against 61,751 x 256
    (README, *Memory flat in rows*): ingest streams the objects CSV through its checks and
    keeps the validated table memory-mapped; what grows is the transient grouping of the
    rows by embedding file (~170 bytes a row); predict holds one block and its score
    matrix per worker; post-processing one status byte per object, a cluster block and a
    Parquet row group of kept rows (~150 MiB); the report one block of members (~100,000
    rows) and the overview's picks per cluster. Disk counts what the stage leaves behind
    (the report's pages hold every member), plus the staging memmap for ingest.

    >>> e = estimate_resources(1_000_000, 1792, 8192, 600, 2)
    >>> round(e["ingest"].disk_bytes / 2**30, 1), round(e["ingest"].peak_bytes / 2**20)
    (13.6, 556)
    """
    chunk_rows = effective_chunk_rows(chunk_rows, n_rows)
    vectors = n_rows * dim * 4
    block = chunk_rows * dim * 4
    model = n_clusters * dim * 4
    init_rows = min(n_rows, 32 * n_clusters)
    return {
        "ingest": StageEstimate(_BASE_BYTES + 170 * n_rows + 4 * block, 2 * vectors + 320 * n_rows),
        "train": StageEstimate(_BASE_BYTES + 2 * init_rows * dim * 4 + 8 * model + 2 * block,
                               2 * model),
        "predict": StageEstimate(
            _BASE_BYTES + n_workers * (block + chunk_rows * n_clusters * 4) + 2 * model,
            140 * n_rows,
        ),
        "postprocess": StageEstimate(_BASE_BYTES + (150 << 20) + 4 * n_rows, 300 * n_rows),
        "report": StageEstimate(_BASE_BYTES + (150 << 20) + 20_000 * n_clusters,
                                750 * n_rows + n_clusters * 16 * 8_000),
    }  # fmt: skip


# --------------------------------------------------------------------------- time at scale

#: Measured on this project's 2-core box (README, *Benchmark results* and *At larger
#: scales*): the ingest's cost per row (CSV, one file open per image, the objects table)
#: and per byte of vectors (read once, written to the memmap and to the store); the fit's
#: and predict's time over their GEMM bound; post-processing and report per row and core.
INGEST_SECONDS_PER_ROW = 45e-6
INGEST_BYTES_PER_SECOND = 160e6
#: Ingest on the workers: the client's share per row (the repeated objects across the
#: CSV, the grouping by file, the task graph, the objects table), and each worker core's
#: per row (the CSV's checks, file opens and checks) and per byte of vectors (read,
#: staged, gathered and written once each); set so that 1M x 256 on a 2-worker
#: LocalCluster was 1.09x the local path when the client checked the CSV (20 us a row on
#: the client), then the CSV's checks moved to the workers: 9 us a row of client CPU
#: before, 1.3 after (1M rows, 216 MB of CSV, measured on this box).
INGEST_CLIENT_SECONDS_PER_ROW = 12e-6
INGEST_WORKER_CORE_SECONDS_PER_ROW = 69e-6
INGEST_WORKER_CORE_BYTES_PER_SECOND = 120e6
FIT_OVER_GEMM = 2.8
PREDICT_OVER_GEMM = 1.8
REFINE_OVER_GEMM = 1.8
POSTPROCESS_CORE_SECONDS_PER_ROW = 12e-6
#: The report: its split and two passes over the members on the client, and the cluster
#: pages on the client's cores (1M x 256 on this box: 40 s on 2 cores).
REPORT_CLIENT_SECONDS_PER_ROW = 25e-6
REPORT_PAGES_CORE_SECONDS_PER_ROW = 30e-6


@dataclass(frozen=True)
class ScaleEstimate:
    """One stage at a given scale: seconds, peak private memory and disk."""

    seconds: float
    peak_bytes: int
    disk_bytes: int
    bound: str


def estimate_at_scale(
    train: TrainConfig,
    n_rows: int,
    dim: int,
    n_clusters: int,
    n_workers: int,
    threads_per_worker: int,
    chunk_rows: int,
    gflops_per_core: float,
    ingest_on_workers: bool = False,
) -> dict[str, ScaleEstimate]:
    """Per-stage time, memory and disk of a run of ``n_rows x dim`` with ``n_clusters`` on
    ``n_workers`` workers of ``threads_per_worker`` cores, each core doing
    ``gflops_per_core`` float32 GFLOP/s (what ``--dry-run --rows ...`` prints).

    The sequential chain runs on one worker's cores; refinement passes, predict and
    post-processing spread over all; the local ingest runs on the client alone, the
    ingest on workers (``ingest_on_workers``) spreads the CSV's checks, the file reads
    and the chunk writes over all cores and keeps a pass over the rows on the client
    (the repeated objects, the grouping by file).

    >>> e = estimate_at_scale(TrainConfig(), 10**6, 1792, 600, 1, 2, 8192, 100.0)
    >>> round(e["train"].seconds), round(e["predict"].seconds), e["predict"].bound
    (30, 19, 'GEMM on 2 cores')
    """
    cores = n_workers * threads_per_worker
    flop = 2.0 * n_rows * n_clusters * dim
    n_blocks = math.ceil(n_rows / effective_chunk_rows(chunk_rows, n_rows))
    sampled = sampled_blocks(train, n_blocks) / n_blocks
    chain = train.epochs * sampled * flop / (gflops_per_core * 1e9 * threads_per_worker)
    batch = min(train.batch_size, effective_chunk_rows(chunk_rows, n_rows))
    refine = refine_iterations(train, n_rows, batch) * flop / (gflops_per_core * 1e9 * cores)
    # Memory per process: a worker runs threads_per_worker blocks at once.
    resources = estimate_resources(n_rows, dim, chunk_rows, n_clusters, threads_per_worker)
    vectors = n_rows * dim * 4
    if ingest_on_workers:
        client = INGEST_CLIENT_SECONDS_PER_ROW * n_rows
        spread = (INGEST_WORKER_CORE_SECONDS_PER_ROW * n_rows
                  + vectors / INGEST_WORKER_CORE_BYTES_PER_SECOND) / cores  # fmt: skip
        ingest = (client + spread, "the client's pass (repeats, grouping by file)"
                  if client >= spread
                  else f"CSV checks, file reads and chunk writes on {cores} cores")  # fmt: skip
    else:
        ingest = (
            INGEST_SECONDS_PER_ROW * n_rows + vectors / INGEST_BYTES_PER_SECOND,
            "the client: file reads and 2 writes of the vectors",
        )
    seconds = {
        "ingest": ingest,
        "train": (FIT_OVER_GEMM * chain + REFINE_OVER_GEMM * refine,
                  f"GEMM of the sequential chain on {threads_per_worker} cores"
                  if FIT_OVER_GEMM * chain >= REFINE_OVER_GEMM * refine
                  else f"GEMM of the refinement passes on {cores} cores"),
        "predict": (PREDICT_OVER_GEMM * flop / (gflops_per_core * 1e9 * cores),
                    f"GEMM on {cores} cores"),
        "postprocess": (POSTPROCESS_CORE_SECONDS_PER_ROW * n_rows / cores,
                        f"the shuffle and writes on {cores} cores"),
        "report": (REPORT_CLIENT_SECONDS_PER_ROW * n_rows
                   + REPORT_PAGES_CORE_SECONDS_PER_ROW * n_rows / threads_per_worker,
                   "the client's passes over the members"),
    }  # fmt: skip
    return {
        name: ScaleEstimate(t, resources[name].peak_bytes, resources[name].disk_bytes, why)
        for name, (t, why) in seconds.items()
    }

"""The command line: parse flags, load the config once, call :func:`pipeline.runner.run`.

User mistakes (:class:`PipelineError`) print one line per problem and exit 2 (config) or
1 (data); anything else is a bug and keeps its traceback. Heavy modules are imported
inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import ConfigError, PipelineError
from .stages import STAGE_NAMES

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Out-of-core clustering of object embeddings (ingest, train, predict, postprocess, report).",
)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config file (see config.yaml).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override one key, e.g. --set train.n_clusters=50 (repeatable)."
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="threads | processes | synchronous | local-cluster | a scheduler address (tcp://host:8786).",
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Redo stages even if their outputs are up to date.")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the plan and exit without running.")
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars or summary printout.")
]


def _fail(exc: Exception) -> None:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(getattr(exc, "exit_code", 1))


def _load(config: Path, overrides: list[str] | None, scheduler: str | None, quiet: bool):
    """The validated config, with the CLI's flags applied as overrides."""
    from .config import load_config

    overrides = list(overrides or [])
    if scheduler:
        overrides.append(f"executor.scheduler={scheduler}")
    if quiet:
        overrides.append("executor.progress=false")
    return load_config(config, overrides)


def _run_stages(
    stages: tuple[str, ...], config: Path, overrides: list[str] | None, scheduler: str | None,
    force: bool, dry_run: bool, quiet: bool,
) -> None:  # fmt: skip
    from .plan import plan_run
    from .runner import run

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        cfg = _load(config, overrides, scheduler, quiet)
        plan = plan_run(cfg, stages)
        if dry_run:
            from .runner import describe_plan

            typer.echo(describe_plan(cfg, plan, force))
            return
        result = run(cfg, stages, force=force, plan=plan, verbose=not quiet)
    except PipelineError as exc:
        _fail(exc)
    except KeyboardInterrupt:  # outside a stage (a stage's own is an InterruptedRunError)
        from .errors import InterruptedRunError

        _fail(InterruptedRunError("Interrupted before any stage ran; nothing changed."))
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    skipped = f"; skipped (up to date): {', '.join(result.skipped)}" if result.skipped else ""
    typer.echo(f"done: {timings or 'nothing to do'}{skipped}. Outputs in {result.catalog.root}")


def _stage_command(stage: str):
    def command(
        config: ConfigOpt = Path("config.yaml"),
        set_: SetOpt = None,
        scheduler: SchedulerOpt = None,
        force: ForceOpt = False,
        dry_run: DryRunOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        _run_stages((stage,), config, set_, scheduler, force, dry_run, quiet)

    command.__doc__ = f"Run only the '{stage}' stage (its upstream must be complete)."
    return command


def _scale_option(name: str, text: str):
    return Annotated[int | None, typer.Option(name, min=1, help=f"With --dry-run: {text}")]


@app.command()
def run(
    config: ConfigOpt = Path("config.yaml"),
    set_: SetOpt = None,
    scheduler: SchedulerOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    quiet: QuietOpt = False,
    rows: _scale_option("--rows", "estimate a run of this many rows (no data needed).") = None,
    dims: _scale_option("--dims", "embedding dimension of that run (default 1792).") = None,
    k: _scale_option("--k", "clusters of that run (default train.n_clusters or auto).") = None,
    workers: _scale_option("--workers", "workers of that run (default 1).") = None,
    threads: _scale_option("--threads", "cores per worker (default this machine's).") = None,
    gflops: Annotated[
        float | None,
        typer.Option(
            "--gflops",
            min=0.1,
            help="With --dry-run --rows: float32 GEMM GFLOP/s "
            "per core of the target machines (default: measured here).",
        ),
    ] = None,
) -> None:
    """Run every stage, skipping those already up to date."""
    if rows is not None:
        _describe_scale(config, set_, rows, dims, k, workers, threads, gflops, dry_run)
        return
    _run_stages(STAGE_NAMES, config, set_, scheduler, force, dry_run, quiet)


def _describe_scale(
    config: Path, overrides: list[str] | None, rows: int, dims: int | None, k: int | None,
    workers: int | None, threads: int | None, gflops: float | None, dry_run: bool,
) -> None:  # fmt: skip
    """``run --dry-run --rows N``: per-stage time, memory and disk at that scale."""
    from .plan import effective_n_clusters, local_cores
    from .runner import describe_scale

    if not dry_run:
        _fail(ConfigError("--rows (and --dims, --k, --workers, --threads) need --dry-run."))
    try:
        cfg = _load(config, overrides, None, True)
    except PipelineError as exc:
        _fail(exc)
    n_clusters = k or effective_n_clusters(cfg.train, rows)
    typer.echo(describe_scale(cfg, rows, dims or 1792, n_clusters, workers or 1,
                              threads or local_cores(), gflops))  # fmt: skip


for _stage in STAGE_NAMES:
    app.command(name=_stage)(_stage_command(_stage))


@app.command()
def validate(config: ConfigOpt = Path("config.yaml"), set_: SetOpt = None) -> None:
    """Check the config file and its input paths, and print the resolved configuration."""
    from .runner import check_inputs

    try:
        cfg = _load(config, set_, None, False)
        check_inputs(cfg)
    except PipelineError as exc:
        _fail(exc)
    import yaml

    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
def groups(
    config: ConfigOpt = Path("config.yaml"),
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", help="The reviewer's groups YAML (default: report.groups_file)."
        ),
    ] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Check the reviewer's groups file, write ins_posts_groups.csv/.parquet, show them in the report.

    The YAML file names each group, its kept clusters (ids from the report) and
    optionally object ids to leave out, e.g.:

    \b
    groups:
      - name: shoes
        clusters: [3, 17]
        exclude_objects: [1234]
      - name: bags
        clusters: [42]
    """
    from .groups import apply_groups
    from .runner import run

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        cfg = _load(config, set_, None, quiet)
        result = apply_groups(cfg, file)
        # The report shows the groups file it was built with (its contents are part of
        # the report's marker), so a later 'pipeline run' knows whether it is stale.
        grouped = cfg.model_copy(
            update={"report": cfg.report.model_copy(update={"groups_file": result.source})}
        )
        report = run(grouped, ("report",), force=True).catalog.report_index
    except PipelineError as exc:
        _fail(exc)
    counts = ", ".join(f"{name} {n:,}" for name, n in result.counts().items())
    typer.echo(f"groups: {counts} objects. Wrote {result.csv}, {result.parquet} and {report}")


@app.command()
def assign(
    config: ConfigOpt = Path("config.yaml"),
    csv: Annotated[
        Path | None, typer.Option("--csv", help="The new objects CSV (sets input.objects_csv).")
    ] = None,
    embeddings_root: Annotated[
        Path | None,
        typer.Option(
            "--embeddings-root", help="Their embedding files (sets input.embeddings_root)."
        ),
    ] = None,
    embeddings_matrix: Annotated[
        Path | None,
        typer.Option(
            "--embeddings-matrix", help="Or one CSV-aligned .npy (sets input.embeddings_matrix)."
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="A run's model/ folder (default: the model in output.dir)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: <output.dir>/assigned).")
    ] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Assign new objects (CSV + embeddings, the input layout) to a saved model, no refit.

    Same checks and rejects as ingest, the model's centres, metric and ids, the same
    post-processing within the model's clusters; writes assignments.parquet,
    ins_posts_clusters.csv/.parquet, rejects.parquet and assign.json to --out.
    """
    from .assign import assign_objects

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    overrides = list(set_ or [])
    for key, value in (("input.objects_csv", csv), ("input.embeddings_root", embeddings_root),
                       ("input.embeddings_matrix", embeddings_matrix)):  # fmt: skip
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        cfg = _load(config, overrides, None, quiet)
        result = assign_objects(
            cfg, str(model) if model else None, str(out) if out else None, progress=not quiet
        )
    except PipelineError as exc:
        _fail(exc)
    typer.echo(result.summary_line())


@app.command()
def stability(
    config: ConfigOpt = Path("config.yaml"),
    seeds: Annotated[
        int,
        typer.Option("--seeds", min=2, help="Fits to compare (seeds 0..n-1 added to train.seed)."),
    ] = 3,
    sample_rows: Annotated[
        int | None,
        typer.Option(
            "--sample-rows", min=1, help="Rows of the uniform sample (default: all rows)."
        ),
    ] = None,
    order: Annotated[
        str,
        typer.Option(
            "--order",
            help="shuffled (the store's uniform sample) | file (CSV-order batches) | both.",
        ),
    ] = "shuffled",
    set_: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the estimated cost and exit.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Refit on the uniform sample under several seeds and block orders, and compare.

    Prints the estimated cost first, then the ARI between the fits and how often each of
    the model's clusters is found again (best-match Jaccard); writes stability.parquet
    and stability.json to the output folder. --order file feeds CSV-order batches.
    """
    from .stability import run_stability

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    if order not in ("shuffled", "file", "both"):
        _fail(
            PipelineError(f"--order must be 'shuffled', 'file' or 'both'. Got {order!r} instead.")
        )
    try:
        cfg = _load(config, set_, None, quiet)
        orders = ("shuffled", "file") if order == "both" else (order,)
        report = run_stability(cfg, seeds, sample_rows, orders, echo=typer.echo, dry_run=dry_run)
    except PipelineError as exc:
        _fail(exc)
    typer.echo(report)


@app.command("make-demo")
def make_demo(
    root: Annotated[Path, typer.Option(help="Folder to write the dataset into.")] = Path(
        "data/demo"
    ),
    n_objects: Annotated[int, typer.Option(min=1, help="Number of objects (CSV rows).")] = 61_751,
    dim: Annotated[int, typer.Option(min=1, help="Embedding dimension.")] = 1792,
    n_true_clusters: Annotated[
        int, typer.Option(min=1, help="Clusters the data is drawn around.")
    ] = 600,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    layout: Annotated[
        str, typer.Option(help="per_image (one .npy per image) or matrix.")
    ] = "per_image",
    images: Annotated[bool, typer.Option(help="Also draw the images (for report crops).")] = False,
) -> None:
    """Generate a seeded synthetic dataset shaped like the write-up's."""
    from .synthetic import make_demo_dataset

    if layout not in ("per_image", "matrix"):
        _fail(PipelineError(f"--layout must be 'per_image' or 'matrix'. Got {layout!r} instead."))
    ds = make_demo_dataset(root, n_objects, dim, n_true_clusters, seed, layout, images)  # type: ignore[arg-type]
    typer.echo(f"wrote {ds.n_objects:,} objects x {ds.dim} dims under {ds.root}")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="pipeline")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

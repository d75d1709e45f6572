"""Run the stages in plan order, skipping those already complete.

Each stage deletes its completion marker and those of the stages after it, writes its
outputs atomically, then writes a marker holding a hash of its config sections and of its
upstream marker. A rerun skips a stage whose marker matches (and whose outputs exist)
unless ``force``; a changed config or input redoes that stage and, through the chained
hashes, every stage after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import joblib
import numpy as np
import pandas as pd
from dask import delayed

from . import ingest as ingest_stage
from . import postprocess as postprocess_stage
from . import predict as predict_stage
from . import schema, sinks, store, summarize
from . import train as train_stage
from .config import Config
from .errors import StageOrderError
from .executor import Executor, open_executor, timed
from .plan import STAGES, OutputPaths, RunPlan, TrainPlan, plan_run, plan_training

log = logging.getLogger("pipeline")

#: Config sections each stage's output depends on (besides its upstream stage).
#: Config sections (or ``section.key`` values) each stage's outputs depend on, besides
#: its upstream stage: the images only matter to the report.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "ingest": (
        "input.objects_csv", "input.embeddings_root", "input.embeddings_template",
        "input.embeddings_matrix", "select", "ingest",
    ),
    "train": ("train",),
    "predict": (),
    "postprocess": ("postprocess",),
    "report": ("report", "input.images_root", "input.image_template"),
}  # fmt: skip
UPSTREAM = {
    "train": "ingest",
    "predict": "train",
    "postprocess": "predict",
    "report": "postprocess",
}


@dataclass
class RunResult:
    """What a run did: stage timings, skipped stages, output paths and the funnel."""

    paths: OutputPaths
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    funnel: pd.DataFrame | None = None


def _input_fingerprint(cfg: Config) -> dict[str, Any]:
    """Size and mtime of the inputs whose change must redo the ingest (every embedding
    file included)."""
    out = {}
    for path in (cfg.input.objects_csv, cfg.input.embeddings_matrix):
        if path and Path(path).exists():
            st = Path(path).stat()
            out[path] = [st.st_size, st.st_mtime_ns]
    if not cfg.input.embeddings_matrix:
        out[cfg.input.embeddings_root] = ingest_stage.tree_fingerprint(cfg.input.embeddings_root)
    return out


def stage_key(cfg: Config, stage: str, upstream_key: str | None) -> str:
    """Hash of what a stage's outputs depend on: its config, seed and upstream stage."""
    payload: dict[str, Any] = {
        "stage": stage,
        "config": cfg.section_hash(*STAGE_SECTIONS[stage]) if STAGE_SECTIONS[stage] else "",
        "upstream": upstream_key or "",
    }
    if stage == "ingest":
        payload["inputs"] = _input_fingerprint(cfg)
        payload["shuffle_seed"] = _shuffle_seed(cfg)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _shuffle_seed(cfg: Config) -> int:
    return cfg.ingest.shuffle_seed if cfg.ingest.shuffle_seed is not None else cfg.train.seed


def _marker_url(paths: OutputPaths, stage: str) -> str:
    return store.join(paths.markers, f"{stage}.json")


def read_marker(paths: OutputPaths, stage: str) -> dict | None:
    fs, path = store.filesystem(_marker_url(paths, stage))
    if not fs.exists(path):
        return None
    try:
        return sinks.read_json(_marker_url(paths, stage))
    except (ValueError, OSError):
        return None


def _clear_marker(paths: OutputPaths, stage: str) -> None:
    fs, path = store.filesystem(_marker_url(paths, stage))
    if fs.exists(path):
        fs.rm(path)


def run_metadata(cfg: Config, extra: dict | None = None) -> dict[str, Any]:
    """What goes into every Parquet file's metadata: config, seed, package versions."""
    return {
        "config": cfg.model_dump(mode="json"),
        "seed": cfg.train.seed,
        "versions": sinks.package_versions(),
        **(extra or {}),
    }


# --------------------------------------------------------------------------- stages


def _store_shape(paths: OutputPaths) -> tuple[int, int, int]:
    attrs = store.open_store(paths.store).attrs
    return int(attrs["n_rows"]), int(attrs["dim"]), int(attrs["chunk_rows"])


def training_plan(cfg: Config, paths: OutputPaths) -> TrainPlan:
    """The fit's plan, from the config and the ingested store's shape."""
    return plan_training(cfg, *_store_shape(paths))


def run_ingest(cfg: Config, paths: OutputPaths, ex: Executor) -> None:
    ingest_stage.ingest(cfg, paths, progress=ex.progress)


def run_train(cfg: Config, paths: OutputPaths, ex: Executor) -> None:
    plan = training_plan(cfg, paths)
    log.info("%r", plan)
    blas_threads = cfg.train.blas_threads or (os.cpu_count() or 1)
    model = ex.compute(
        train_stage.fit_centroids(cfg, plan, paths.store, blas_threads), desc="train"
    )
    write_model(model, paths.model, {**run_metadata(cfg), "plan": repr(plan)})


def write_model(model: train_stage.FittedModel, url: str, metadata: dict) -> None:
    """Save the centres (``centers.npy``), the estimator (joblib) and a JSON description."""
    fs, _ = store.filesystem(url)
    with store.atomic_path(url) as tmp:
        _, tmp_path = store.filesystem(tmp)
        fs.makedirs(tmp_path, exist_ok=True)
        with fs.open(f"{tmp_path}/centers.npy", "wb") as handle:
            np.save(handle, model.centres.astype(np.float32))
        with fs.open(f"{tmp_path}/kmeans.joblib", "wb") as handle:
            joblib.dump(model.estimator, handle)
        params = {k: v for k, v in model.estimator.get_params().items() if k != "init"}
        with fs.open(f"{tmp_path}/model.json", "w") as handle:
            json.dump(
                {**metadata, "params": params, "history": model.history},
                handle,
                indent=2,
                default=str,
            )


def read_centres(url: str) -> np.ndarray:
    fs, path = store.filesystem(url)
    if not fs.exists(f"{path}/centers.npy"):
        raise StageOrderError(f"No model at {url}. Run the 'train' stage first.")
    with fs.open(f"{path}/centers.npy", "rb") as handle:
        return np.load(handle)


def run_predict(cfg: Config, paths: OutputPaths, ex: Executor) -> None:
    centres = read_centres(paths.model)
    assignments = predict_stage.assign_clusters(paths.store, paths.objects, centres)
    sinks.write_parquet_dataset(
        assignments,
        paths.assignments,
        schema.ASSIGNMENTS_SCHEMA.remove(schema.ASSIGNMENTS_SCHEMA.get_field_index(schema.STATUS)),
        run_metadata(cfg, {"n_clusters": len(centres)}),
        compute=lambda graph: ex.compute(graph, desc="predict"),
    )


def run_postprocess(cfg: Config, paths: OutputPaths, ex: Executor) -> pd.DataFrame:
    n_clusters = len(read_centres(paths.model))
    keys = dd.read_parquet(
        paths.assignments, columns=postprocess_stage.key_columns(cfg.postprocess)
    )
    statuses = ex.compute(
        postprocess_stage.apply_postprocessing(cfg.postprocess, keys)[
            [schema.OBJECT_ID, schema.STATUS]
        ],
        desc="postprocess",
    )
    codes = delayed(postprocess_stage.status_codes_by_object(statuses), pure=True)
    assignments = dd.read_parquet(paths.assignments)
    labelled = assignments.map_partitions(
        postprocess_stage.attach_status, codes,
        meta=postprocess_stage.attach_status(assignments._meta, np.zeros(0, np.int8)),
    )  # fmt: skip
    metadata = run_metadata(cfg, {"n_clusters": n_clusters})
    sinks.write_parquet_dataset(
        labelled, paths.postprocessed, schema.ASSIGNMENTS_SCHEMA, metadata,
        compute=lambda graph: ex.compute(graph, desc="postprocessed table"),
    )  # fmt: skip
    kept = sinks.read_parquet(
        paths.postprocessed, filters=[(schema.STATUS, "==", schema.STATUS_KEPT)]
    )
    kept = kept.sort_values(["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True])
    sinks.write_csv(kept, paths.clusters_csv, schema.OUTPUT_CSV_FIELDS, schema.CLUSTERS_SCHEMA)
    sinks.write_parquet(
        kept[[*schema.CLUSTERS_SCHEMA.names, schema.OBJECT_ID, schema.SOURCE_ROW]],
        paths.clusters_parquet, schema.CLUSTERS_SCHEMA, metadata,
    )  # fmt: skip
    del kept
    table = sinks.read_parquet(paths.postprocessed, columns=list(summarize.SUMMARY_COLUMNS))
    summary = summarize.cluster_summary(table, n_clusters)
    sinks.write_parquet(summary, paths.cluster_summary, schema.CLUSTER_SUMMARY_SCHEMA, metadata)
    info = sinks.read_json(paths.ingest_summary)
    funnel = summarize.funnel(info["n_input_rows"], info["rejected"], table)
    sinks.write_parquet(funnel, paths.funnel, schema.FUNNEL_SCHEMA, metadata)
    return funnel


def run_report(cfg: Config, paths: OutputPaths, ex: Executor) -> None:
    summary = sinks.read_parquet(paths.cluster_summary)
    funnel = sinks.read_parquet(paths.funnel)
    text = summarize.summary_markdown(summary, funnel, cfg.report.top_n)
    sinks.write_text(text, paths.summary_markdown)
    if ex.progress:
        print(text)
    from . import report as report_stage

    result = report_stage.write_report(cfg, paths, n_workers=ex.n_cores)
    if ex.progress:
        print(f"Review report: {result.index} ({result.seconds:.1f} s)")


STAGE_FUNCTIONS = {
    "ingest": run_ingest,
    "train": run_train,
    "predict": run_predict,
    "postprocess": run_postprocess,
    "report": run_report,
}


def _outputs_exist(paths: OutputPaths, stage: str) -> bool:
    main_output = {
        "ingest": paths.store,
        "train": paths.model,
        "predict": paths.assignments,
        "postprocess": paths.clusters_csv,
        "report": store.join(paths.report, "index.html"),
    }[stage]
    fs, path = store.filesystem(main_output)
    return fs.exists(path)


def run(
    cfg: Config,
    stages: tuple[str, ...] = STAGES,
    force: bool = False,
    plan: RunPlan | None = None,
) -> RunResult:
    """Run ``stages`` (in pipeline order) and return what happened.

    A stage whose marker matches its config and upstream is skipped unless ``force``.
    Running a stage whose upstream has never completed raises :class:`StageOrderError`.
    """
    plan = plan or plan_run(cfg, stages)
    paths = plan.paths
    result = RunResult(paths=paths)
    store.check_writable(paths.root, "output.dir")
    if "ingest" in plan.stages:
        store.check_writable(paths.staging, "output.staging_dir")
    store.remove_stale_temporaries(paths.root)
    store.remove_stale_temporaries(paths.markers)
    keys: dict[str, str] = {}
    with open_executor(cfg.executor) as ex:
        for stage in STAGES:
            upstream = UPSTREAM.get(stage)
            upstream_key = keys.get(upstream) if upstream else None
            if upstream and upstream_key is None:
                marker = read_marker(paths, upstream)
                upstream_key = marker["key"] if marker else None
            if stage not in plan.stages:
                marker = read_marker(paths, stage)
                if marker is not None:
                    keys[stage] = marker["key"]
                continue
            if upstream and upstream_key is None:
                raise StageOrderError(
                    f"Stage '{stage}' needs the outputs of '{upstream}', which has not completed "
                    f"in {paths.root}. Run 'pipeline {upstream}' (or 'pipeline run') first."
                )
            key = stage_key(cfg, stage, upstream_key)
            keys[stage] = key
            marker = read_marker(paths, stage)
            if not force and marker and marker.get("key") == key and _outputs_exist(paths, stage):
                log.info("%s: up to date (marker %s), skipped", stage, key)
                result.skipped.append(stage)
                continue
            # Its outputs are about to change: neither it nor any stage after it is complete.
            for later in STAGES[STAGES.index(stage) :]:
                _clear_marker(paths, later)
            with timed(stage, result.timings):
                out = STAGE_FUNCTIONS[stage](cfg, paths, ex)
            if stage == "postprocess":
                result.funnel = out
            sinks.write_json(
                {
                    "stage": stage,
                    "key": key,
                    "finished_at": time.time(),
                    "seconds": result.timings[stage],
                },
                _marker_url(paths, stage),
            )
    return result

"""Assign newly arrived objects to a saved model's clusters, without refitting.

The new objects come as a CSV and embedding files of the input layout
(``input.*``), checked exactly as the ingest checks them (same rejects, same
``ingest.on_bad_object`` / ``on_bad_bbox`` rules, :mod:`pipeline.ingest.objects` and
:mod:`pipeline.ingest.embeddings`); their vectors go to a private staging memmap, and every
block of rows is assigned by the very function predict uses
(:func:`pipeline.predict.assign_rows`) to the saved centres in the saved metric, so the
training objects get byte-for-byte the ``cluster, dist, sim`` of predict. The write-up's
post-processing (:func:`pipeline.postprocess.label_rows`) then runs within the model's
clusters: one row per image per cluster, ``sim > min_similarity``, and the size rule,
where a cluster the model's own run kept (its ``cluster_summary.parquet``, when it sits
beside the model and describes the same clusters) stays kept however few new rows it
gets: new objects join the clusters the reviewer already reviewed.

Outputs, in a folder of their own (default ``<output.dir>/assigned``):
``assignments.parquet`` (every assigned object with ``cluster, dist, sim, status``),
``ins_posts_clusters.csv`` / ``.parquet`` (the kept rows, the write-up's fields),
``rejects.parquet`` and ``assign.json`` (counts, the model and its fingerprint).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pyarrow as pa
from threadpoolctl import threadpool_limits

from . import kernels, postprocess, schema, sinks, store
from .catalog import Catalog, model_fingerprint_of, read_model_centres, read_model_ids, run_metadata
from .config import Config
from .errors import ConfigError, InputError, MissingInputError, OutputError
from .ingest import raise_on_bad_object
from .ingest.embeddings import (
    FILES_PER_TASK,
    FileGroups,
    fill_memmap_from_files,
    fill_memmap_from_matrix,
    infer_dim,
    open_matrix,
    open_memmap,
)
from .ingest.objects import read_objects_csv, rejects_frame, validate_rows
from .lock import output_lock
from .plan import effective_chunk_rows, new_run_id
from .predict import assign_rows

log = logging.getLogger("pipeline")

ASSIGNMENTS_NAME = "assignments.parquet"
REJECTS_NAME = "rejects.parquet"
SUMMARY_NAME = "assign.json"


@dataclass(frozen=True)
class SavedModel:
    """A fitted model as ``train`` saved it."""

    path: str
    centres: np.ndarray  # (k, dim) float32
    cluster_ids: np.ndarray  # (k,) int64 ascending
    metric: str
    fingerprint: str
    #: Clusters the model's own run kept after post-processing (None: not known).
    kept_by_run: frozenset[int] | None

    @property
    def dim(self) -> int:
        return int(self.centres.shape[1])


@dataclass(frozen=True)
class AssignResult:
    """What :func:`assign_objects` did and wrote."""

    out: str
    n_input_rows: int
    n_assigned: int
    n_kept: int
    rejected: dict[str, int]
    model: str
    model_fingerprint: str
    assignments: str
    csv: str
    parquet: str

    def summary_line(self) -> str:
        rejected = sum(self.rejected.values())
        return (
            f"assign: {self.n_assigned:,} of {self.n_input_rows:,} objects assigned to "
            f"{self.model} (fingerprint {self.model_fingerprint}), {self.n_kept:,} kept after "
            f"post-processing, {rejected:,} rejected. Outputs in {self.out}"
        )


def load_model(model: str) -> SavedModel:
    """Read a saved model folder: centres, ids, metric, fingerprint, and the clusters its
    run kept (from ``../cluster_summary.parquet`` when it describes these clusters)."""
    fs, path = store.filesystem(model)
    if not fs.exists(f"{path}/centers.npy"):
        raise MissingInputError(
            f"No model at {model} (no centers.npy). Run 'pipeline train' or name a run's "
            "model/ folder with --model."
        )
    centres = np.ascontiguousarray(read_model_centres(model), dtype=np.float32)
    cluster_ids = read_model_ids(model)
    description = sinks.read_json(f"{model}/model.json") if fs.exists(f"{path}/model.json") else {}
    metric = description.get("metric", "euclidean")
    if metric not in ("euclidean", "cosine"):
        raise InputError(
            f"{model}/model.json: metric must be 'euclidean' or 'cosine'. Got {metric!r} instead."
        )
    summary_url = store.join(model.rstrip("/").rsplit("/", 1)[0], "cluster_summary.parquet")
    kept = None
    if fs.exists(store.filesystem(summary_url)[1]):
        summary = sinks.read_parquet(summary_url, columns=["cluster", "size_final"])
        if sorted(summary["cluster"].tolist()) == cluster_ids.tolist():
            kept = frozenset(summary.loc[summary["size_final"] > 0, "cluster"].tolist())
    return SavedModel(model, centres, cluster_ids, metric, model_fingerprint_of(model), kept)


def check_model(model: SavedModel, metric: str, dim: int, embeddings: str) -> None:
    """The new objects' embeddings and the config must fit the model (one line if not)."""
    if metric != model.metric:
        raise ConfigError(
            f"train.metric must be the model's metric ('{model.metric}', {model.path}). Got "
            f"'{metric}' instead. Set --set train.metric={model.metric}, or assign to a model "
            f"fitted with '{metric}'."
        )
    if dim != model.dim:
        raise InputError(
            f"The embeddings of {embeddings} must have the model's dimension ({model.dim}, "
            f"{model.path}). Got {dim} instead. Assign embeddings of the same embedding model, "
            "or fit a model on these."
        )


def assign_block(
    block: np.ndarray, centres: np.ndarray, sq_norms: np.ndarray, metric: str, ids: np.ndarray
) -> np.ndarray:
    """One block of raw rows -> assignment records (one BLAS thread, as predict)."""
    with threadpool_limits(1):
        return assign_rows(np.ascontiguousarray(block, dtype=np.float32), centres, sq_norms,
                           metric, ids)  # fmt: skip


def assign_vectors(
    vectors: np.ndarray, model: SavedModel, chunk_rows: int, scheduler: str = "threads"
) -> np.ndarray:
    """Assignment records of every row of ``vectors`` (e.g. a memmap), in parallel blocks of
    ``chunk_rows`` rows; ``cluster`` holds the model's ids.

    Returns a structured array of :data:`pipeline.schema.ASSIGNMENT_DTYPE`, shape
    ``(n_rows,)``.
    """
    if len(vectors) == 0:
        return np.empty(0, dtype=schema.ASSIGNMENT_DTYPE)
    chunk_rows = effective_chunk_rows(chunk_rows, len(vectors))
    array = da.from_array(vectors, chunks=(chunk_rows, vectors.shape[1]), asarray=False)
    centres = model.centres
    records = da.map_blocks(
        assign_block,
        array,
        centres,
        kernels.row_sq_norms(centres),
        model.metric,
        model.cluster_ids.astype(np.int32),
        drop_axis=1,
        dtype=schema.ASSIGNMENT_DTYPE,
        meta=np.empty((0,), dtype=schema.ASSIGNMENT_DTYPE),
    )
    scheduler = scheduler if scheduler in ("threads", "synchronous", "processes") else "threads"
    with dask.config.set(scheduler="threads" if scheduler == "processes" else scheduler):
        return records.compute()


def label_within_model(
    frame: pd.DataFrame, cfg_postprocess, kept_by_run: frozenset[int] | None
) -> pd.DataFrame:
    """The write-up's post-processing of the new rows (:func:`postprocess.label_rows`),
    except that a cluster the model's run kept keeps its rows whatever their number."""
    labelled = postprocess.label_rows(
        frame,
        dedupe_key=cfg_postprocess.dedupe_key,
        min_similarity=cfg_postprocess.min_similarity,
        min_cluster_size=cfg_postprocess.min_cluster_size,
    )
    if kept_by_run:
        small = labelled[schema.STATUS] == schema.STATUS_SMALL_CLUSTER
        reviewed = labelled["cluster"].isin(list(kept_by_run))
        labelled.loc[small & reviewed, schema.STATUS] = schema.STATUS_KEPT
    return labelled


def default_out(cfg: Config) -> str:
    """``<output.dir>/assigned``: beside the model's run, never over its outputs."""
    return store.join(Catalog.from_config(cfg.output).root, "assigned")


def assign_objects(
    cfg: Config, model: str | None = None, out: str | None = None, progress: bool = False
) -> AssignResult:
    """Assign the objects of ``cfg.input`` to a saved model and write the outputs.

    Parameters
    ----------
    model : str, default=None
        A run's ``model/`` folder; ``None``: the model of ``cfg.output.dir``.
    out : str, default=None
        Output folder; ``None``: ``<output.dir>/assigned``.

    .. warning:: The staging memmap takes ``rows x dim x 4`` bytes of local disk under
       ``out`` while the objects are assigned.
    """
    catalog = Catalog.from_config(cfg.output)
    saved = load_model(model or catalog.model)
    out = str(store.parse_location(out or default_out(cfg))).rstrip("/")
    if out == catalog.root or out == saved.path.rstrip("/").rsplit("/", 1)[0]:
        raise OutputError(
            f"assign must write to a folder of its own, not the run's output folder {out}. "
            "Choose another --out."
        )
    if not store.is_local(out):
        raise OutputError(f"assign writes to a local folder. Got {out!r} instead.")
    Path(out).mkdir(parents=True, exist_ok=True)
    # One writer per folder, as every other command (a second one: a one-line error).
    with output_lock(out, new_run_id()):
        return _assign_into(cfg, saved, out, progress)


def _assign_into(cfg: Config, saved: SavedModel, out: str, progress: bool) -> AssignResult:
    """:func:`assign_objects` once ``out`` is checked and locked."""
    inputs, settings = cfg.input, cfg.ingest
    csv_path = inputs.objects_csv
    raw = read_objects_csv(csv_path)
    n_input_rows = len(raw)
    typed, reasons, details = validate_rows(raw, cfg.select, settings.on_bad_bbox)
    typed.insert(0, schema.SOURCE_ROW, np.arange(len(typed), dtype=np.int64))
    rejects = rejects_frame(typed[schema.SOURCE_ROW], raw, reasons.to_numpy(), details.to_numpy())
    raise_on_bad_object(settings, csv_path, rejects)
    clean = reasons.to_numpy() == ""
    candidates = typed[clean].copy()
    candidates.insert(0, schema.OBJECT_ID, np.arange(len(candidates), dtype=np.int64))
    del raw, typed
    if len(candidates) == 0:
        reason = rejects["reason"].value_counts().index[0]
        raise InputError(
            f"No object of {csv_path} is left to assign: all {len(rejects):,} rows were "
            f"rejected, most often as {reason!r}. Fix the input or select.*."
        )
    if inputs.embeddings_matrix:
        matrix = open_matrix(inputs.embeddings_matrix, n_input_rows)
        dim, source = int(matrix.shape[1]), inputs.embeddings_matrix
    else:
        files = FileGroups(candidates, inputs)
        dim = settings.dim or infer_dim(files)
        source = inputs.embeddings_root
    check_model(saved, cfg.train.metric, dim, source)

    memmap_path = os.path.join(out, f".staging-{new_run_id()}.f32")
    try:
        memmap = open_memmap(memmap_path, len(candidates), dim)
        if inputs.embeddings_matrix:
            emb_reasons, emb_details = fill_memmap_from_matrix(candidates, matrix, memmap, progress)
        else:
            emb_reasons, emb_details = fill_memmap_from_files(
                files.batches(FILES_PER_TASK), len(files), len(candidates), memmap, dim, progress
            )
        memmap.flush()
        late = rejects_frame(candidates[schema.SOURCE_ROW], candidates, emb_reasons, emb_details)
        rejects = pd.concat([rejects, late], ignore_index=True)
        rejects = rejects.sort_values(schema.SOURCE_ROW, kind="stable", ignore_index=True)
        raise_on_bad_object(settings, csv_path, rejects)
        good = np.flatnonzero(emb_reasons == "")
        # Every row, in blocks straight from the memmap (a rejected row is zeros): never
        # all vectors in memory; the rejected rows' records are dropped below.
        records = assign_vectors(memmap, saved, settings.chunk_rows, cfg.executor.scheduler)
        records = records[good]
        del memmap
    finally:
        Path(memmap_path).unlink(missing_ok=True)

    objects = candidates.iloc[good].reset_index(drop=True)
    for name in schema.ASSIGNMENT_DTYPE.names:
        objects[name] = records[name]
    labelled = label_within_model(objects, cfg.postprocess, saved.kept_by_run)
    labelled = labelled.sort_values(schema.OBJECT_ID, kind="stable", ignore_index=True)
    metadata = run_metadata(cfg, {"model": saved.path, "model_fingerprint": saved.fingerprint,
                                  "metric": saved.metric})  # fmt: skip
    source_schema = pa.Schema.from_pandas(candidates.iloc[:0], preserve_index=False)
    table_schema = schema.with_extra_fields(schema.ASSIGNMENTS_SCHEMA, source_schema)
    extra = table_schema.names[len(schema.ASSIGNMENTS_SCHEMA) :]
    assignments_url = store.join(out, ASSIGNMENTS_NAME)
    sinks.write_parquet(labelled[table_schema.names], assignments_url, table_schema, metadata)
    kept = labelled[labelled[schema.STATUS] == schema.STATUS_KEPT]
    kept = kept.sort_values(["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True])
    csv_name = cfg.output.csv_name
    csv_url = store.join(out, csv_name)
    parquet_url = store.join(out, f"{Path(csv_name).stem}.parquet")
    sinks.write_csv(kept, csv_url, schema.OUTPUT_CSV_FIELDS, schema.CLUSTERS_SCHEMA)
    sinks.write_parquet(
        kept[[*schema.CLUSTERS_SCHEMA.names, schema.OBJECT_ID, schema.SOURCE_ROW, *extra]],
        parquet_url, schema.CLUSTERS_SCHEMA, metadata,
    )  # fmt: skip
    sinks.write_parquet(rejects, store.join(out, REJECTS_NAME), schema.REJECTS_SCHEMA, metadata)
    result = AssignResult(
        out=out,
        n_input_rows=n_input_rows,
        n_assigned=len(labelled),
        n_kept=len(kept),
        rejected={k: int(v) for k, v in rejects["reason"].value_counts().sort_index().items()},
        model=saved.path,
        model_fingerprint=saved.fingerprint,
        assignments=assignments_url,
        csv=csv_url,
        parquet=parquet_url,
    )
    sinks.write_json({**result.__dict__, "metric": saved.metric,
                      "statuses": labelled[schema.STATUS].value_counts().to_dict()},
                     store.join(out, SUMMARY_NAME))  # fmt: skip
    log.debug("%s", result.summary_line())  # the CLI prints it
    return result

"""The catalog: where every output of a run lives, and how the small ones are read and
written (model files, stage markers, the ingest summary, run metadata).

Stages get their inputs and output locations from here, as Kedro nodes get theirs from a
data catalog: no other module builds an output path. Bulk data goes through
:mod:`pipeline.store` (the Zarr store) and :mod:`pipeline.sinks` (Parquet, CSV, JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import sinks, store
from .config import Config, OutputConfig
from .errors import ConfigError, StageOrderError

#: The ``n_clusters: auto`` sweep's curve, saved in the model folder.
K_SWEEP_TABLE = "k_sweep.parquet"
#: Reviewer's groups outputs (see :mod:`pipeline.groups`).
GROUPS_CSV_NAME = "ins_posts_groups.csv"
GROUPS_PARQUET_NAME = "ins_posts_groups.parquet"


@dataclass(frozen=True)
class Catalog:
    """Where every stage reads and writes (local paths or fsspec URLs)."""

    root: str
    staging: str
    store: str
    objects: str
    embedding_files: str
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
    manifest: str
    groups_csv: str
    groups_parquet: str
    stability: str
    stability_summary: str

    @classmethod
    def from_config(cls, output: OutputConfig | Config) -> Catalog:
        """The layout of ``output.dir`` (accepts the whole config for convenience)."""
        output = output.output if isinstance(output, Config) else output
        root = store.parse_location(output.dir).rstrip("/")
        shared = output.staging_dir or (
            store.join(root, "_staging") if store.is_local(root) else str(Path("work", "staging"))
        )
        # A folder per output folder, so runs sharing staging_dir never share files.
        staging = store.join(shared, hashlib.sha256(root.encode()).hexdigest()[:12])
        stem = Path(output.csv_name).stem
        at = lambda name: store.join(root, name)  # noqa: E731
        return cls(
            root=root,
            staging=staging,
            store=at("embeddings.zarr"),
            objects=at("objects.parquet"),
            embedding_files=at("embedding_files.parquet"),
            rejects=at("rejects.parquet"),
            ingest_summary=at("ingest.json"),
            model=at("model"),
            assignments=at("assignments.parquet"),
            postprocessed=at("postprocessed.parquet"),
            clusters_parquet=at(f"{stem}.parquet"),
            clusters_csv=at(output.csv_name),
            cluster_summary=at("cluster_summary.parquet"),
            funnel=at("funnel.parquet"),
            summary_markdown=at("summary.md"),
            report=at("report"),
            markers=at("_markers"),
            manifest=at("_manifest.json"),
            groups_csv=at(GROUPS_CSV_NAME),
            groups_parquet=at(GROUPS_PARQUET_NAME),
            stability=at("stability.parquet"),
            stability_summary=at("stability.json"),
        )

    @property
    def report_index(self) -> str:
        return store.join(self.report, "index.html")

    def check_layout(self, inputs: dict[str, str | None]) -> None:
        """Every output has its own path, and none is an input (``{config key: path}``).

        Raises :class:`ConfigError` naming the clash, e.g. ``output.csv_name`` equal to the
        input CSV or to another output's name.
        """
        seen: dict[str, str] = {}
        for name, value in self.__dict__.items():
            if name in ("root", "staging"):
                continue
            if value in seen:
                raise ConfigError(
                    f"output.csv_name makes '{name}' and '{seen[value]}' the same file "
                    f"({value}). Choose another output.csv_name."
                )
            seen[value] = name
        for key, path in inputs.items():
            if path and store.is_local(self.root):
                resolved = str(Path(path).absolute())
                if resolved in seen:
                    raise ConfigError(
                        f"{key} ({resolved}) is also an output ({seen[resolved]}): the run "
                        "would overwrite its own input. Choose another output.dir or csv_name."
                    )

    def owned_names(self) -> tuple[str, ...]:
        """Names of the entries this package writes directly in the output folder."""
        prefix = self.root.rstrip("/") + "/"
        return tuple(
            value[len(prefix) :].split("/", 1)[0]
            for value in self.__dict__.values()
            if isinstance(value, str) and value.startswith(prefix)
        )

    def memmap(self, run_id: str) -> str:
        """The ingest's staging memmap of run ``run_id`` (private to the run)."""
        return store.join(self.staging, f"embeddings-{run_id}.f32")

    def staging_parts(self, run_id: str) -> str:
        """The folder of the workers' staging parts of run ``run_id`` (ingest on workers)."""
        return store.join(self.staging, f"parts-{run_id}")

    def objects_staging(self, run_id: str) -> str:
        """The ingest's validated objects of run ``run_id`` (an Arrow file read
        memory-mapped, so the table is not held in the process's private memory)."""
        return store.join(self.staging, f"objects-{run_id}.arrow")

    def objects_staging_parts(self, run_id: str) -> str:
        """The folder of the validated objects of run ``run_id`` when the workers check
        the CSV: an Arrow file per byte range of the file."""
        return store.join(self.staging, f"objects-{run_id}")

    # ------------------------------------------------------------------ existence

    @staticmethod
    def exists(url: str) -> bool:
        fs, path = store.filesystem(url)
        return fs.exists(path)

    # ------------------------------------------------------------------ markers

    def marker_url(self, stage: str) -> str:
        return store.join(self.markers, f"{stage}.json")

    def read_marker(self, stage: str) -> dict | None:
        """A stage's completion marker, or ``None`` if absent or unreadable."""
        url = self.marker_url(stage)
        if not self.exists(url):
            return None
        try:
            marker = sinks.read_json(url)
        except (ValueError, OSError):
            return None
        return marker if isinstance(marker, dict) and "key" in marker else None

    def write_marker(self, stage: str, marker: dict) -> None:
        sinks.write_json(marker, self.marker_url(stage))

    def clear_marker(self, stage: str) -> None:
        fs, path = store.filesystem(self.marker_url(stage))
        if fs.exists(path):
            fs.rm(path)

    # ------------------------------------------------------------------ manifest
    # Every top-level entry the pipeline writes in the output folder, with the files it
    # held when its stage finished ({relative path: bytes}); ``None`` while a stage is
    # writing it. Only entries listed here are ever replaced or deleted, and a rerun
    # notices an output whose files changed since.

    def read_manifest(self) -> dict[str, dict]:
        """``{entry name: {"stage", "run_id", "files"}}``; ``{}`` when there is none."""
        if not self.exists(self.manifest):
            return {}
        try:
            manifest = sinks.read_json(self.manifest)
        except (ValueError, OSError):
            return {}
        return manifest.get("entries", {}) if isinstance(manifest, dict) else {}

    def write_manifest(self, entries: dict[str, dict]) -> None:
        sinks.write_json({"entries": entries}, self.manifest)

    def entry_name(self, output: str) -> str:
        """The top-level entry of the output folder that catalog attribute ``output`` is
        in (``report_index`` -> ``report``)."""
        return getattr(self, output)[len(self.root.rstrip("/")) + 1 :].split("/", 1)[0]

    def entry_files(self, name: str) -> dict[str, int] | None:
        """The files under the top-level entry ``name`` with their sizes (``{"": size}``
        for a file); ``None`` if it does not exist."""
        url = store.join(self.root, name)
        if store.is_local(url):
            return _local_files(store.filesystem(url)[1])
        fs, path = store.filesystem(url)
        if not fs.exists(path):
            return None
        if not fs.isdir(path):
            return {"": int(fs.size(path))}
        found = fs.find(path, detail=True)
        prefix = path.rstrip("/") + "/"
        return {
            key[len(prefix) :] if key.startswith(prefix) else key: int(info.get("size") or 0)
            for key, info in found.items()
        }

    # ------------------------------------------------------------------ store

    def store_shape(self) -> tuple[int, int, int]:
        """``(n_rows, dim, chunk_rows)`` of the ingested store."""
        attrs = store.open_store(self.store).attrs
        return int(attrs["n_rows"]), int(attrs["dim"]), int(attrs["chunk_rows"])

    def objects_schema(self) -> pa.Schema:
        """The objects table's Arrow schema (with the input CSV's extra columns)."""
        fs, path = store.filesystem(store.join(self.objects, "part-00000.parquet"))
        with fs.open(path, "rb") as handle:
            return pq.read_schema(handle)

    # ------------------------------------------------------------------ ingest summary

    def write_ingest_summary(self, summary: dict) -> None:
        sinks.write_json(summary, self.ingest_summary)

    def read_ingest_summary(self) -> dict:
        return sinks.read_json(self.ingest_summary)

    # ------------------------------------------------------------------ model

    def write_model(
        self,
        centres: np.ndarray,
        estimator: Any,
        description: dict,
        tables: dict[str, pd.DataFrame] | None = None,
        cluster_ids: np.ndarray | None = None,
    ) -> None:
        """Save the centres (``centers.npy``), their ids (``cluster_ids.npy``, ascending;
        default ``0..k-1``), the estimator (joblib), ``model.json`` and any ``tables``
        (``{file name: frame}``, as Parquet) in the model folder."""
        import joblib

        ids = np.arange(len(centres)) if cluster_ids is None else np.asarray(cluster_ids)
        if len(ids) != len(centres) or (len(ids) > 1 and not (np.diff(ids) > 0).all()):
            raise ValueError(f"cluster_ids must be {len(centres)} ascending ids.")

        fs, _ = store.filesystem(self.model)
        with store.atomic_path(self.model) as tmp:
            _, tmp_path = store.filesystem(tmp)
            fs.makedirs(tmp_path, exist_ok=True)
            with fs.open(f"{tmp_path}/centers.npy", "wb") as handle:
                np.save(handle, np.asarray(centres, dtype=np.float32))
            with fs.open(f"{tmp_path}/cluster_ids.npy", "wb") as handle:
                np.save(handle, ids.astype(np.int64))
            with fs.open(f"{tmp_path}/kmeans.joblib", "wb") as handle:
                joblib.dump(estimator, handle)
            with fs.open(f"{tmp_path}/model.json", "w") as handle:
                json.dump(description, handle, indent=2, default=str)
            for name, frame in (tables or {}).items():
                with fs.open(f"{tmp_path}/{name}", "wb") as handle:
                    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), handle)

    def read_model_table(self, name: str) -> pd.DataFrame | None:
        """A table saved with the model (e.g. the k sweep's curve), or ``None``."""
        url = store.join(self.model, name)
        return sinks.read_parquet(url) if self.exists(url) else None

    def read_centres(self) -> np.ndarray:
        """The fitted centres, ``(n_clusters, n_features)`` float32."""
        fs, path = store.filesystem(self.model)
        if not fs.exists(f"{path}/centers.npy"):
            raise StageOrderError(f"No model at {self.model}. Run the 'train' stage first.")
        with fs.open(f"{path}/centers.npy", "rb") as handle:
            return np.load(handle)

    def read_cluster_ids(self) -> np.ndarray:
        """The id of each centre row, ``(n_clusters,)`` int64 ascending (``cluster_ids.npy``;
        a model saved before ids were kept numbers its rows ``0..k-1``)."""
        return read_model_ids(self.model)

    def read_model_description(self) -> dict:
        """``model.json`` (``{}`` when absent)."""
        fs, path = store.filesystem(self.model)
        if not fs.exists(f"{path}/model.json"):
            return {}
        with fs.open(f"{path}/model.json", "r") as handle:
            return json.load(handle)

    def retired_cluster_ids(self) -> set[int]:
        """Ids of clusters gone in a re-fit of this folder's model (never reused)."""
        return set(self.read_model_description().get("ids", {}).get("retired", []))

    def previously_kept_cluster_ids(self) -> set[int]:
        """Ids the previous model's run kept after post-processing (recorded by a re-fit)."""
        return set(self.read_model_description().get("ids", {}).get("previous_kept_ids", []))

    def model_fingerprint(self) -> str:
        """A short fingerprint of the fitted centres (sha256 of ``centers.npy``'s bytes).

        Outputs made against a model (groups, assignments) record it, so that they can be
        recognised as stale when the clustering changes.
        """
        return model_fingerprint_of(self.model)

    def read_metric(self) -> str:
        """The metric the model was fitted in (``model.json``; models saved before the
        key existed are Euclidean)."""
        fs, path = store.filesystem(self.model)
        if not fs.exists(f"{path}/model.json"):
            return "euclidean"
        with fs.open(f"{path}/model.json", "r") as handle:
            return json.load(handle).get("metric", "euclidean")


def read_model_centres(model: str) -> np.ndarray:
    """The centres of the model folder ``model`` (any run's ``model/``)."""
    fs, path = store.filesystem(model)
    if not fs.exists(f"{path}/centers.npy"):
        raise StageOrderError(f"No model at {model} (no centers.npy). Run the 'train' stage first.")
    with fs.open(f"{path}/centers.npy", "rb") as handle:
        return np.load(handle)


def model_fingerprint_of(model: str) -> str:
    """The fingerprint of the model folder ``model`` (see :meth:`Catalog.model_fingerprint`)."""
    fs, path = store.filesystem(model)
    if not fs.exists(f"{path}/centers.npy"):
        raise StageOrderError(f"No model at {model}. Run the 'train' stage first.")
    with fs.open(f"{path}/centers.npy", "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:16]


def read_model_ids(model: str) -> np.ndarray:
    """The cluster id of each centre row of the model folder ``model``."""
    fs, path = store.filesystem(model)
    if fs.exists(f"{path}/cluster_ids.npy"):
        with fs.open(f"{path}/cluster_ids.npy", "rb") as handle:
            return np.load(handle).astype(np.int64)
    return np.arange(len(read_model_centres(model)), dtype=np.int64)


def _local_files(path: str) -> dict[str, int] | None:
    """:meth:`Catalog.entry_files` of a local path: one ``scandir`` per folder (a report
    folder holds thousands of files; fsspec's ``find`` stats each one several times)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return {"": st.st_size}
    files: dict[str, int] = {}
    folders = [("", path)]
    while folders:
        prefix, folder = folders.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append((f"{prefix}{entry.name}/", entry.path))
                else:
                    files[prefix + entry.name] = entry.stat(follow_symlinks=False).st_size
    return files


def run_metadata(cfg: Config, extra: dict | None = None) -> dict[str, Any]:
    """What goes into every Parquet file's metadata: config, seed, package versions."""
    return {
        "config": cfg.model_dump(mode="json"),
        "seed": cfg.train.seed,
        "versions": sinks.package_versions(),
        **(extra or {}),
    }

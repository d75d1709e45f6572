"""Shared fixtures: tiny seeded datasets written to disk, configs pointing at them, and
the schedulers every end-to-end check runs on."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pipeline.catalog import Catalog
from pipeline.config import Config
from pipeline.ingest import IngestResult, ingest_objects
from pipeline.plan import shuffle_seed
from pipeline.synthetic import DemoDataset, make_demo_dataset


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> DemoDataset:
    """2,000 objects x 32 dims around 20 clusters, per-image .npy files: big enough for
    several store blocks and a non-trivial funnel, small enough to run in a second."""
    root = tmp_path_factory.mktemp("small")
    return make_demo_dataset(root, n_objects=2000, dim=32, n_true_clusters=20, seed=1)


@pytest.fixture(scope="session")
def matrix_dataset(tmp_path_factory) -> DemoDataset:
    """The same shape as ``small_dataset`` but with one CSV-aligned matrix file."""
    root = tmp_path_factory.mktemp("matrix")
    return make_demo_dataset(
        root, n_objects=1500, dim=24, n_true_clusters=15, seed=2, layout="matrix"
    )


def config_for(dataset: DemoDataset, out: Path, **sections) -> Config:
    """A config that runs ``dataset`` into ``out`` quickly (no progress output)."""
    data = {
        "input": {
            "objects_csv": str(dataset.objects_csv),
            "embeddings_root": str(dataset.embeddings_root),
            "embeddings_matrix": str(dataset.embeddings_matrix)
            if dataset.embeddings_matrix
            else None,
        },
        "ingest": {"chunk_rows": 256},
        # The Euclidean fit, pinned: these tests check it against Euclidean oracles; the
        # cosine fit has its own tests (test_cosine.py).
        "train": {
            "n_clusters": 20,
            "batch_size": 256,
            "epochs": 2,
            "refine_iterations": 1,
            "metric": "euclidean",
        },
        "output": {"dir": str(out)},
        "executor": {"progress": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.model_validate(data)


@pytest.fixture
def small_config(small_dataset, tmp_path) -> Config:
    """Config for ``small_dataset`` writing under this test's ``tmp_path``."""
    return config_for(small_dataset, tmp_path / "out")


def load_vectors(dataset: DemoDataset, frame) -> np.ndarray:
    """The input vector of each row of ``frame`` (username, image_name, idx), read directly
    from the embedding files: the independent oracle for the ingest round trip."""
    if dataset.embeddings_matrix is not None:
        return np.load(dataset.embeddings_matrix)[frame["source_row"].to_numpy()]
    rows = []
    for user, image, idx in frame[["username", "image_name", "idx"]].itertuples(index=False):
        rows.append(np.load(dataset.embeddings_root / user / "embeddings" / f"{image}.npy")[idx])
    return np.stack(rows)


def ingest_only(cfg: Config) -> tuple[IngestResult, Catalog]:
    """Run just the ingest of ``cfg`` (no runner, no markers); its counts and catalog."""
    catalog = Catalog.from_config(cfg.output)
    result = ingest_objects(cfg.input, cfg.select, cfg.ingest, shuffle_seed(cfg), catalog)
    return result, catalog


def render_report(cfg: Config, n_workers: int = 1):
    """Render the report of the run ``cfg`` describes (its groups file included)."""
    from pipeline.report import write_report

    return write_report(cfg.report, cfg.input, cfg.postprocess, Catalog.from_config(cfg),
                        n_workers=n_workers, groups_file=cfg.report.groups_file)  # fmt: skip


@contextmanager
def lock_held_by_another_process(folder: Path) -> Iterator[subprocess.Popen]:
    """A separate process holding ``folder``'s output lock (as run 'holder-run') for the
    block; it is killed after, and the kernel drops the lock with it."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pipeline.lock import output_lock\n"
         "with output_lock(sys.argv[1], 'holder-run'):\n"
         "    print('held', flush=True); time.sleep(60)", str(folder)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()

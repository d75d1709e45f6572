"""One run per output folder, and runs that share a staging folder never share files.

Real processes: runs started with ``python -m pipeline`` at the same time, each checked
against its own input vectors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from pipeline import lock, sinks
from pipeline.errors import OutputBusyError
from pipeline.synthetic import make_demo_dataset
from tests.conftest import load_vectors, lock_held_by_another_process

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, dataset, out: Path, staging: Path | None = None) -> Path:
    config = {
        "input": {"objects_csv": str(dataset.objects_csv),
                  "embeddings_root": str(dataset.embeddings_root), "images_root": None},
        "ingest": {"chunk_rows": 256},
        "train": {"n_clusters": 10, "batch_size": 256},
        "output": {"dir": str(out), "staging_dir": str(staging) if staging else None},
        "executor": {"progress": False},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "-c", str(config), "-q"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def assert_store_holds_its_own_vectors(dataset, out: Path) -> None:
    objects = sinks.read_parquet(str(out / "objects.parquet"))
    vectors = zarr.open_group(str(out / "embeddings.zarr"), mode="r")["vectors"][:]
    np.testing.assert_array_equal(vectors, load_vectors(dataset, objects))


@pytest.fixture(scope="module")
def second_dataset(tmp_path_factory):
    """Another dataset of the same layout and size (other seed): mixing would show."""
    root = tmp_path_factory.mktemp("second")
    return make_demo_dataset(root, n_objects=2000, dim=32, n_true_clusters=20, seed=7)


def test_a_held_folder_refuses_a_second_run_naming_the_holder(tmp_path, small_dataset):
    out = tmp_path / "out"
    out.mkdir()
    with lock_held_by_another_process(out) as holder:
        config = write_config(tmp_path / "c.yaml", small_dataset, out)
        result = start(config)
        _, err = result.communicate(timeout=120)
        assert result.returncode == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "is in use by another run" in lines[0]
        assert f"pid {holder.pid}" in lines[0] and "run holder-run" in lines[0]
        assert not (out / "embeddings.zarr").exists()  # nothing of the refused run
    # The kernel drops the lock with its holder: the next run goes ahead.
    assert start(config).wait(timeout=300) == 0
    assert_store_holds_its_own_vectors(small_dataset, out)


def test_two_runs_on_one_folder_one_refused_the_other_correct(
    tmp_path, small_dataset, second_dataset
):
    out = tmp_path / "out"
    runs = [
        start(write_config(tmp_path / f"c{i}.yaml", ds, out))
        for i, ds in enumerate((small_dataset, second_dataset))
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    if codes == [0, 1]:
        winner = [small_dataset, second_dataset][[c for c, _ in results].index(0)]
        loser_err = next(err for code, err in results if code == 1)
        assert "is in use by another run" in loser_err
        assert_store_holds_its_own_vectors(winner, out)
    else:  # the first finished before the second started: both ran, one after the other
        assert codes == [0, 0], results


def test_shared_staging_dir_keeps_runs_apart(tmp_path, small_dataset, second_dataset):
    staging = tmp_path / "staging"
    outs = [tmp_path / "a", tmp_path / "b"]
    runs = [
        start(write_config(tmp_path / f"c{i}.yaml", ds, out, staging))
        for i, (ds, out) in enumerate(zip((small_dataset, second_dataset), outs, strict=True))
    ]
    for p in runs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    assert_store_holds_its_own_vectors(small_dataset, outs[0])
    assert_store_holds_its_own_vectors(second_dataset, outs[1])
    # Each output folder had its own staging folder, and no memmap is left behind.
    assert len(list(staging.iterdir())) == 2
    assert not list(staging.rglob("*.f32"))


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with lock.output_lock(str(tmp_path), "r1"), lock.output_lock(str(tmp_path), "r1"):
        holder = json.loads((tmp_path / lock.LOCAL_LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["run_id"] == "r1"
    assert (tmp_path / lock.LOCAL_LOCK_NAME).read_text() == ""  # released


def test_object_store_lock_heartbeat_and_takeover(monkeypatch):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "memory://bucket/run-lock"
    with lock.output_lock(root, "first"):
        record = json.loads(fs.cat("/bucket/run-lock/_lock.json"))
        assert record["run_id"] == "first" and time.time() - record["heartbeat"] < 5
        # A second holder (another process: clear the re-entrancy bookkeeping) is refused.
        held = dict(lock._held)
        lock._held.clear()
        with pytest.raises(OutputBusyError, match="run first"):
            with lock.output_lock(root, "second"):
                pass
        lock._held.update(held)
    assert not fs.exists("/bucket/run-lock/_lock.json")  # released
    # A lock whose heartbeat stopped long ago belongs to a dead run: taken over.
    fs.pipe("/bucket/run-lock/_lock.json", json.dumps({"run_id": "dead", "heartbeat": 0}).encode())
    with lock.output_lock(root, "third"):
        assert json.loads(fs.cat("/bucket/run-lock/_lock.json"))["run_id"] == "third"

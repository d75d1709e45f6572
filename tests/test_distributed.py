"""Runs on a real dask cluster: a `dask scheduler` and `dask worker` processes started as
subprocesses on 127.0.0.1, compared byte for byte with a local threaded run."""

from __future__ import annotations

import csv as csv_module
import glob
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from pipeline.errors import ConfigError, SchedulerError
from pipeline.ingest.objects import csv_partitions
from pipeline.runner import run
from pipeline.synthetic import make_demo_dataset
from tests.conftest import config_for

BIN = Path(sys.executable).parent


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HandStartedCluster:
    """A scheduler and ``n`` single-threaded workers, each its own OS process."""

    def __init__(self, tmp: Path, n_workers: int = 2):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        common = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
        self.scheduler = subprocess.Popen(
            [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1],
             "--no-dashboard"], **common,
        )  # fmt: skip
        self.workers = [
            subprocess.Popen(
                [
                    BIN / "dask",
                    "worker",
                    self.address,
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                    "--memory-limit",
                    "0",
                    "--local-directory",
                    str(tmp / f"w{i}"),
                ],
                **common,
            )  # fmt: skip
            for i in range(n_workers)
        ]
        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(n_workers, timeout=60)

    def close(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.workers, self.scheduler]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6,000 objects x 64 dims in 47 blocks: enough tasks that a worker dies mid-stage."""
    return make_demo_dataset(
        tmp_path_factory.mktemp("dist"), n_objects=6000, dim=64, n_true_clusters=30, seed=3
    )


def cfg_for(dataset, out, **executor):
    return config_for(
        dataset, out, ingest={"chunk_rows": 128}, train={"n_clusters": 30, "batch_size": 128},
        executor={"progress": False, **executor},
    )  # fmt: skip


@pytest.fixture(scope="module")
def local_run(dataset, tmp_path_factory):
    return run(cfg_for(dataset, tmp_path_factory.mktemp("local") / "out"))


@pytest.fixture
def cluster(tmp_path):
    c = HandStartedCluster(tmp_path)
    yield c
    c.close()


def test_run_against_hand_started_scheduler_equals_local(dataset, local_run, cluster, tmp_path):
    result = run(cfg_for(dataset, tmp_path / "out", scheduler=cluster.address))
    assert digest(result.catalog.clusters_csv) == digest(local_run.catalog.clusters_csv)
    np.testing.assert_array_equal(result.catalog.read_centres(), local_run.catalog.read_centres())


@pytest.mark.parametrize("stage_output", ["assignments.parquet", "postprocessed.parquet"])
def test_worker_killed_mid_stage_gives_the_same_output(
    dataset, local_run, cluster, tmp_path, stage_output
):
    out = tmp_path / "out"
    victim = cluster.workers[0]
    killed = threading.Event()

    def kill_when_parts_appear() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed.is_set():
            parts = glob.glob(str(out / f"{stage_output}.tmp-*" / "part-*.parquet"))
            if len(parts) >= 3:
                os.kill(victim.pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_when_parts_appear, daemon=True)
    watcher.start()
    result = run(cfg_for(dataset, out, scheduler=cluster.address))
    watcher.join(timeout=1)
    assert killed.is_set(), "the worker was not killed during the stage"
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert digest(result.catalog.clusters_csv) == digest(local_run.catalog.clusters_csv)


def test_a_worker_that_cannot_import_the_package_is_one_line(tmp_path, small_dataset):
    # One healthy worker and one whose interpreter cannot import 'pipeline' (as on a
    # machine where it was never installed): the run stops at connect, naming the worker.
    cluster = HandStartedCluster(tmp_path, n_workers=1)
    code = (
        "import sys; sys.modules['pipeline'] = None\n"  # 'import pipeline' now fails
        "from distributed.cli.dask_worker import main\n"
        f"sys.argv = ['dask-worker', '{cluster.address}', '--nthreads', '1', '--no-nanny',"
        " '--no-dashboard', '--memory-limit', '0']\nmain()"
    )
    broken = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        with Client(cluster.address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        cfg = config_for(small_dataset, tmp_path / "out", executor={"scheduler": cluster.address})
        start = time.monotonic()
        with pytest.raises(SchedulerError) as err:
            run(cfg)
        message = str(err.value)
        assert "cannot import the pipeline package" in message and "\n" not in message
        assert "Workers need the package" in message
        assert time.monotonic() - start < 60
    finally:
        broken.terminate()
        broken.wait(timeout=10)
        cluster.close()


def test_a_scheduler_without_workers_is_one_line(tmp_path, small_dataset):
    port = free_port()
    scheduler = subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        cfg = config_for(small_dataset, tmp_path / "out",
                         executor={"scheduler": f"tcp://127.0.0.1:{port}", "connect_timeout_s": 5})  # fmt: skip
        deadline = time.monotonic() + 30
        while True:  # the scheduler needs a moment to listen
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        with pytest.raises(SchedulerError, match="has no worker after 5 s"):
            run(cfg)
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=10)


def _when_parts_appear(out: Path, output: str, action) -> threading.Event:
    """Call ``action`` once a stage has written 3 parts of ``output`` (mid-stage)."""
    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(glob.glob(str(out / f"{output}.tmp-*" / "part-*.parquet"))) >= 3:
                action()
                done.set()
                return
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    return done


def test_a_scheduler_lost_mid_predict_is_one_line(dataset, cluster, tmp_path):
    out = tmp_path / "out"
    run(cfg_for(dataset, out), ("ingest", "train"))  # locally: the cluster only predicts
    killed = _when_parts_appear(out, "assignments.parquet", cluster.scheduler.kill)
    start = time.monotonic()
    with pytest.raises(SchedulerError) as err:
        run(cfg_for(dataset, out, scheduler=cluster.address, connect_timeout_s=3))
    assert killed.is_set()
    message = str(err.value)
    assert message.startswith(f"Lost the dask scheduler at {cluster.address} during predict")
    assert "\n" not in message
    assert time.monotonic() - start < 90
    # Nothing after the lost stage is marked complete; ingest and train are kept.
    markers = sorted(p.stem for p in (out / "_markers").glob("*.json"))
    assert markers == ["ingest", "train"]


def test_a_cluster_that_stops_making_progress_is_one_line(dataset, cluster, tmp_path):
    out = tmp_path / "out"
    run(cfg_for(dataset, out), ("ingest", "train"))  # locally: the cluster only predicts

    def pause_workers() -> None:
        for worker in cluster.workers:
            os.kill(worker.pid, signal.SIGSTOP)

    paused = _when_parts_appear(out, "assignments.parquet", pause_workers)
    try:
        start = time.monotonic()
        with pytest.raises(SchedulerError) as err:
            run(cfg_for(dataset, out, scheduler=cluster.address, stall_timeout_s=3))
        assert paused.is_set()
        message = str(err.value)
        assert message.startswith("No task finished for ") and "during predict" in message
        assert "executor.stall_timeout_s" in message and "\n" not in message
        assert time.monotonic() - start < 90
    finally:
        for worker in cluster.workers:
            os.kill(worker.pid, signal.SIGCONT)


# --------------------------------------------------------------------------- ingest on workers


@pytest.fixture(scope="module", params=["per_image", "matrix"])
def damaged(request, tmp_path_factory):
    """3,000 objects x 16 dims with bad vectors: a NaN row and an all-zero row, and for
    per-image files also a missing, a truncated and a wrong-width file."""
    layout = request.param
    ds = make_demo_dataset(tmp_path_factory.mktemp(f"damaged-{layout}"), n_objects=3000, dim=16,
                           n_true_clusters=20, seed=5, layout=layout)  # fmt: skip
    if layout == "matrix":
        matrix = np.load(ds.embeddings_matrix)
        matrix[7, 3], matrix[1500] = np.nan, 0.0
        np.save(ds.embeddings_matrix, matrix)
        return ds
    files = sorted(glob.glob(str(ds.embeddings_root / "**" / "*.npy"), recursive=True))
    vectors = np.load(files[3])
    vectors[0, 2] = np.nan
    vectors[-1] = 0.0
    np.save(files[3], vectors)
    os.remove(files[10])
    Path(files[20]).write_bytes(Path(files[20]).read_bytes()[:60])
    np.save(files[30], np.ones((4, 9), np.float32))
    return ds


def ingest_cfg(dataset, out, **executor):
    return config_for(
        dataset, out, ingest={"chunk_rows": 128}, executor={"progress": False, **executor}
    )


@pytest.fixture(scope="module")
def local_ingest(damaged, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-ingest") / "out"
    run(ingest_cfg(damaged, out), ("ingest",))
    return out


def ingest_bytes(out: Path) -> dict[str, str]:
    """Digests of what the ingest wrote: the store's arrays (chunks and metadata), the
    objects parts, the rejects and the embedding files read. (The store group's attributes
    hold the run's config, which names its scheduler.)"""
    paths = [
        *glob.glob(str(out / "embeddings.zarr" / "*" / "**"), recursive=True),
        *glob.glob(str(out / "objects.parquet" / "*")),
        str(out / "rejects.parquet"),
        str(out / "embedding_files.parquet"),
    ]
    return {os.path.relpath(p, out): digest(p) for p in sorted(paths) if os.path.isfile(p)}


def task_prefixes(address: str) -> set[str]:
    with Client(address, timeout="10s") as client:
        return client.run_on_scheduler(lambda dask_scheduler: set(dask_scheduler.task_prefixes))


#: Bytes of CSV per range checked by a task in these tests: the damaged dataset's CSV
#: (~650 KB) in ~20 ranges.
SMALL_CSV_PARTITIONS = 32 << 10


@pytest.fixture
def csv_on_workers_only(monkeypatch):
    """Cut the objects CSV into small ranges, and fail if the client reads it itself
    (its streamed read is the fallback only). Yields the client's read calls."""
    import pipeline.ingest
    from pipeline.ingest import objects

    monkeypatch.setattr(objects, "CSV_PARTITION_BYTES", SMALL_CSV_PARTITIONS)
    calls: list[str] = []
    client_read = pipeline.ingest.stream_objects_csv

    def watched(path, *args, **kwargs):
        calls.append(path)
        return client_read(path, *args, **kwargs)

    monkeypatch.setattr(pipeline.ingest, "stream_objects_csv", watched)
    yield calls


def no_staging_left(out: Path) -> bool:
    return not glob.glob(str(out / "_staging" / "*" / "parts-*")) and not glob.glob(
        str(out / "_staging" / "*" / "objects-*")
    )


def test_ingest_on_hand_started_workers_equals_local(
    damaged, local_ingest, cluster, tmp_path, csv_on_workers_only
):
    out = tmp_path / "out"
    run(ingest_cfg(damaged, out, scheduler=cluster.address), ("ingest",))
    expected = ingest_bytes(local_ingest)
    assert len([p for p in expected if "/c/" in p]) >= 2 * (3000 // 128)  # vectors + ids chunks
    assert ingest_bytes(out) == expected
    assert json.loads((out / "ingest.json").read_text()) == json.loads(
        (local_ingest / "ingest.json").read_text()
    )
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert len(rejects) >= 2 and set(rejects["reason"]) >= {"non_finite_vector", "zero_vector"}
    # The CSV checks, the reads and the chunk writes ran as tasks on the cluster (the
    # CSV in several ranges, never read by the client), and left no staging.
    assert csv_on_workers_only == []
    assert len(csv_partitions(damaged.objects_csv, SMALL_CSV_PARTITIONS)) >= 10
    read_task = "check_matrix_rows" if damaged.embeddings_matrix else "read_files_part"
    assert {"check_partition", read_task, "write_chunk"} <= task_prefixes(cluster.address)
    assert no_staging_left(out)


def test_ingest_on_a_local_cluster_equals_local(
    damaged, local_ingest, tmp_path, csv_on_workers_only
):
    out = tmp_path / "out"
    run(ingest_cfg(damaged, out, scheduler="local-cluster", n_workers=2, threads_per_worker=1),
        ("ingest",))  # fmt: skip
    assert ingest_bytes(out) == ingest_bytes(local_ingest)
    assert csv_on_workers_only == [] and no_staging_left(out)


@pytest.mark.parametrize("during", ["csv", "embeddings"])
def test_ingest_on_workers_survives_a_worker_killed_mid_read(
    damaged, local_ingest, tmp_path, csv_on_workers_only, during
):
    if damaged.embeddings_matrix and during == "embeddings":
        pytest.skip("the matrix layout writes no staging parts to watch")
    cluster = HandStartedCluster(tmp_path)
    try:
        out = tmp_path / "out"
        victim = cluster.workers[0]
        killed = threading.Event()
        seen: list[int] = []
        # The pass's parts, once 3 exist (the CSV's ranges are each written by a task).
        parts = {"csv": ("objects-*", "part-*.arrow"), "embeddings": ("parts-*", "part-*.npy")}
        pattern = str(out / "_staging" / "*" / parts[during][0] / parts[during][1])

        def kill_when_parts_appear() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if len(found := glob.glob(pattern)) >= 3:
                    os.kill(victim.pid, signal.SIGKILL)
                    seen.append(len(found))
                    killed.set()
                    return
                time.sleep(0.002)

        threading.Thread(target=kill_when_parts_appear, daemon=True).start()
        run(ingest_cfg(damaged, out, scheduler=cluster.address), ("ingest",))
        assert killed.is_set(), "the worker was not killed during the ingest"
        assert victim.wait(timeout=10) == -signal.SIGKILL
        if during == "csv":  # killed before the last range's file: mid-pass
            assert seen[0] < len(csv_partitions(damaged.objects_csv, SMALL_CSV_PARTITIONS))
        assert ingest_bytes(out) == ingest_bytes(local_ingest)
        assert csv_on_workers_only == [] and no_staging_left(out)
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """1,500 objects x 16 dims in per-image files: the seed of the CSV variants below."""
    return make_demo_dataset(tmp_path_factory.mktemp("plain"), n_objects=1500, dim=16,
                             n_true_clusters=10, seed=7)  # fmt: skip


@pytest.mark.parametrize("variant", ["repeats_across_ranges", "quoted_line_break"])
def test_csv_variants_on_a_local_cluster_equal_local(plain, tmp_path, csv_on_workers_only, variant):
    """Objects repeated in later ranges are rejected as locally (the first copy kept, the
    detail naming its row); a value with a quoted line break sends the CSV to the
    client's read (the fallback), with the local path's results."""
    lines = plain.objects_csv.read_bytes().splitlines(keepends=True)
    if variant == "repeats_across_ranges":
        lines += [lines[1], lines[2], lines[700]]  # data rows 0, 1 and 699, again at the end
        # Rows the per-row checks reject, in later ranges (their source rows are offset).
        for line, column, value in [(900, 5, "nan"), (1201, 1, " "), (1499, 6, "-3")]:
            fields = next(csv_module.reader([lines[line].decode()]))
            fields[column] = value
            text = io.StringIO()
            csv_module.writer(text, lineterminator="\n").writerow(fields)
            lines[line] = text.getvalue().encode()
    else:
        lines[300] = lines[300].replace(b'.json"', b'\n.json"', 1)  # in res_name
        assert b'\n.json"' in lines[300]
    csv = tmp_path / "objects.csv"
    csv.write_bytes(b"".join(lines))
    dataset = replace(plain, objects_csv=csv)
    run(ingest_cfg(dataset, tmp_path / "local"), ("ingest",))
    csv_on_workers_only.clear()
    out = tmp_path / "cluster"
    run(ingest_cfg(dataset, out, scheduler="local-cluster", n_workers=2, threads_per_worker=1),
        ("ingest",))  # fmt: skip
    assert ingest_bytes(out) == ingest_bytes(tmp_path / "local")
    assert len(csv_partitions(csv, SMALL_CSV_PARTITIONS)) >= 5
    rejects = pd.read_parquet(out / "rejects.parquet")
    if variant == "repeats_across_ranges":
        assert csv_on_workers_only == []  # read by the workers
        n = len(lines) - 1
        dup = rejects[rejects["reason"] == "duplicate_object"]
        assert dup["source_row"].tolist() == [n - 3, n - 2, n - 1]
        assert [d.split("repeats data row ")[1].split(";")[0] for d in dup["detail"]] == [
            "0", "1", "699"]  # fmt: skip
        bad = rejects[rejects["reason"].isin(["bad_score", "missing_key", "bad_idx"])]
        assert bad["source_row"].tolist() == [899, 1200, 1498]
    else:
        assert csv_on_workers_only == [str(csv)]  # read by the client (the fallback)
        assert len(pd.read_parquet(out / "objects.parquet")) + len(rejects) == len(lines) - 1
    assert no_staging_left(out)


def test_ingest_on_workers_needs_workers(small_dataset, tmp_path):
    cfg = config_for(small_dataset, tmp_path / "out", ingest={"on_workers": True})
    with pytest.raises(ConfigError, match=r"^ingest.on_workers is true, but executor.scheduler"):
        run(cfg, ("ingest",))

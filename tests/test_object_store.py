"""Outputs on an object store: the whole run writes to s3:// through s3fs, against an
S3-compatible server (moto) on 127.0.0.1, and equals a local run byte for byte."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runner import run
from tests.conftest import config_for

s3fs = pytest.importorskip("s3fs", reason="the s3 test needs the s3fs and moto[server] test extras")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_env(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield env
    server.terminate()
    server.wait(timeout=10)


def test_run_with_s3_output_equals_local_run(small_dataset, tmp_path, s3_env):
    local = run(config_for(small_dataset, tmp_path / "local"))
    fs = s3fs.S3FileSystem(key="test", secret="test", endpoint_url=s3_env["FSSPEC_S3_ENDPOINT_URL"])
    fs.mkdir("runs")
    cfg = tmp_path / "s3.yaml"
    cfg.write_text(
        f"""
input: {{objects_csv: {small_dataset.objects_csv}, embeddings_root: {small_dataset.embeddings_root}}}
ingest: {{chunk_rows: 256}}
train: {{n_clusters: 20, batch_size: 256, epochs: 2, refine_iterations: 1, metric: euclidean}}
output: {{dir: "s3://runs/demo", staging_dir: {tmp_path / "staging"}}}
executor: {{progress: false}}
"""
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "-q", "-c", str(cfg)],
        env=s3_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    remote = fs.cat("runs/demo/ins_posts_clusters.csv")
    assert (
        hashlib.sha256(remote).hexdigest()
        == hashlib.sha256(Path(local.catalog.clusters_csv).read_bytes()).hexdigest()
    )
    listing = {p.rsplit("/", 1)[-1] for p in fs.ls("runs/demo")}
    assert {"embeddings.zarr", "assignments.parquet", "model", "_markers"} <= listing
    assert not [name for name in listing if ".tmp-" in name]
    # A rerun finds every stage's marker on the object store and skips them all.
    again = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "-c", str(cfg), "--set", "executor.progress=false"],
        env=s3_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (
        again.returncode == 0
        and "skipped (up to date): ingest, train, predict, postprocess, report" in again.stdout
    )

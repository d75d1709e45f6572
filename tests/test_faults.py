"""Faults end in one line and a rerun finishes the job: a file-size limit (the way a full
disk looks to the program), Ctrl-C in the middle of a stage. Real processes."""

from __future__ import annotations

import hashlib
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, dataset) -> Path:
    config = {
        "input": {"objects_csv": str(dataset.objects_csv),
                  "embeddings_root": str(dataset.embeddings_root), "images_root": None},
        "ingest": {"chunk_rows": 256},
        "train": {"n_clusters": 20, "batch_size": 256, "epochs": 40},  # a long train
        "output": {"dir": str(tmp_path / "out")},
        "executor": {"progress": False},
    }  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(config: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "-c", str(config), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def limit_file_size() -> None:
    # Writes beyond 64 KB fail with EFBIG (SIGXFSZ ignored), as ENOSPC would on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_a_full_disk_is_one_line_and_a_rerun_finishes(tmp_path, small_dataset):
    config = write_config(tmp_path, small_dataset)
    limited = cli(config, "-q", preexec_fn=limit_file_size)
    _, err = limited.communicate(timeout=300)
    assert limited.returncode == 1, err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert "No space left while running ingest" in line and "rerun to continue" in line
    assert not (tmp_path / "out" / "_markers" / "ingest.json").exists()
    again = cli(config, "-q")
    assert again.wait(timeout=600) == 0, again.stderr.read()
    first = tmp_path / "out" / "ins_posts_clusters.csv"
    before = digest(first)
    assert cli(config, "-q", "--force").wait(timeout=600) == 0
    assert digest(first) == before  # the rerun after the fault equals an undisturbed run


def test_ctrl_c_during_a_stage_is_one_line_and_a_rerun_continues(tmp_path, small_dataset):
    config = write_config(tmp_path, small_dataset)
    # Not quiet: the log says when train starts. Ctrl-C as a terminal delivers it, also
    # when the suite itself runs as a background job (which starts with SIGINT ignored).
    run = cli(config, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    seen = []
    while time.monotonic() < deadline:
        line = run.stderr.readline()
        seen.append(line)
        if "train: started" in line:
            break
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)
    _, rest = run.communicate(timeout=120)
    err = "".join(seen) + rest
    assert run.returncode == 130, err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert line == "error: Interrupted during train; completed stages are kept. Rerun to continue."
    assert "train: finished" not in err and "train: stopped after" in err
    markers = sorted(p.stem for p in (tmp_path / "out" / "_markers").glob("*.json"))
    assert markers == ["ingest"]
    again = cli(config)
    _, log = again.communicate(timeout=600)
    assert again.returncode == 0, log
    assert "ingest: up to date" in log and "train: finished" in log

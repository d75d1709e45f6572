"""Out-of-core: a whole run on a matrix larger than a memory budget stays under it.

The run happens in a subprocess whose private (anonymous) memory is sampled from /proc:
page cache of the store and the memmap is file-backed and not the program's memory.
"""

import subprocess
import sys
import time

import pandas as pd

from pipeline.synthetic import make_demo_dataset

SCRIPT = """
import sys
from pipeline.config import Config
from pipeline.runner import run
cfg = Config.model_validate({
    "input": {"objects_csv": sys.argv[1], "embeddings_matrix": sys.argv[2]},
    "ingest": {"chunk_rows": 512},
    "train": {"n_clusters": 50, "batch_size": 512, "epochs": 1, "refine_iterations": 1},
    "output": {"dir": sys.argv[3]},
    "executor": {"progress": False, "n_workers": 2},
})
run(cfg)
"""


def rss_anon_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_private_memory(args: list[str]) -> tuple[int, int]:
    proc = subprocess.Popen(args)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, rss_anon_bytes(proc.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    return proc.wait(), peak


def test_run_on_matrix_larger_than_budget_stays_under_it(tmp_path):
    n, dim = 30_000, 4096  # 492 MB of float32, in blocks of 8 MB
    ds = make_demo_dataset(
        tmp_path / "data", n_objects=n, dim=dim, n_true_clusters=50, layout="matrix"
    )
    matrix_bytes = n * dim * 4
    # What the interpreter and libraries alone take, measured the same way.
    _, baseline = peak_private_memory(
        [
            sys.executable,
            "-c",
            "import pipeline.runner, sklearn.cluster, dask.dataframe, zarr, time; time.sleep(0.5)",
        ]
    )
    rc, peak = peak_private_memory(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(ds.objects_csv),
            str(ds.embeddings_matrix),
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    used = peak - baseline
    budget = matrix_bytes // 2
    print(f"matrix {matrix_bytes / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB, "
          f"peak {peak / 2**20:.0f} MiB, used {used / 2**20:.0f} MiB")  # fmt: skip
    assert used < budget, (
        f"run used {used / 2**20:.0f} MiB above baseline; budget {budget / 2**20:.0f} MiB"
    )
    # The run did the whole job (not an early exit that would use no memory).
    clusters = pd.read_csv(tmp_path / "out" / "ins_posts_clusters.csv")
    assert len(clusters) > 0 and used > 0

"""Run the whole pipeline once on a dataset and report time per row and peak private
memory per process (the driver and, on a LocalCluster, each worker and the scheduler).

    .venv/bin/python scripts/scale_run.py DATA OUT [--scheduler local-cluster] [--set k=v ...]

``DATA`` is a generated dataset folder (``pipeline make-demo`` / ``scripts/bench``'s
layout, per-image files or one matrix). Prints one JSON line: rows, seconds per stage,
microseconds per row, and the peak RssAnon (MiB) of every process of the run's tree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
from pipeline.config import load_config
from pipeline.runner import run
cfg = load_config(sys.argv[1], overrides=sys.argv[2:])
start = time.perf_counter()
result = run(cfg, force=True)
print("TIMINGS " + json.dumps({**result.timings, "whole": time.perf_counter() - start}))
"""


def rss_anon_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--scheduler", default="threads")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    data = args.data.resolve()
    matrix = data / "embeddings.npy"
    overrides = [
        f"input.objects_csv={data / 'ins_posts_object_tags_cleaned.csv'}",
        f"input.embeddings_root={data / 'ins_posts'}",
        *([f"input.embeddings_matrix={matrix}"] if matrix.exists() else []),
        f"input.images_root={data / 'images' if (data / 'images').is_dir() else 'null'}",
        f"output.dir={args.out.resolve()}",
        f"executor.scheduler={args.scheduler}",
        "executor.progress=false",
        *args.overrides,
    ]
    config = Path(__file__).resolve().parent.parent / "config.yaml"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(config), *overrides],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    peaks: dict[int, float] = {}
    names: dict[int, str] = {}
    while proc.poll() is None:
        for pid in process_tree(proc.pid):
            peak = rss_anon_mib(pid)
            if peak > peaks.get(pid, 0.0):
                peaks[pid] = peak
                if pid not in names:
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()[:60]
                        names[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        names[pid] = "?"
        time.sleep(0.05)
    output = proc.stdout.read()
    if proc.returncode:
        sys.exit(proc.returncode)
    timings = json.loads(output.split("TIMINGS ", 1)[1].splitlines()[0])
    n_rows = json.loads((args.out / "ingest.json").read_text())["n_rows"]
    print(json.dumps({
        "scheduler": args.scheduler, "rows": n_rows,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "us_per_row": {k: round(v / n_rows * 1e6, 2) for k, v in timings.items()},
        "peak_rss_anon_mib": {f"{pid} {names.get(pid, '?')}": round(v) for pid, v in
                              sorted(peaks.items(), key=lambda kv: -kv[1]) if v > 20},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

"""Benchmark: our pipeline against the write-up's method, faiss and scikit-learn KMeans.

Generates (once, seeded) a dataset shaped like the real one at ``--rows`` x ``--dim``, then
runs each method in its own subprocess on the same data, several times, and prints one
table: wall seconds per stage (medians), peak private memory (RssAnon of the process,
sampled from /proc: page cache of the store is not the program's memory), inertia on the
full data over full-batch KMeans' inertia, ARI/NMI against the generator's true clusters,
the share of objects with cosine similarity above 0.7, and time ratios against the
write-up's method. It also prints the machine's bound for one assignment pass.

    scripts/bench --rows 61751                 # the write-up's scale (with sklearn KMeans)
    scripts/bench --rows 1000000 --methods writeup,ours
    scripts/bench --setting hard               # the harder generator setting
    scripts/bench --dataset bench/real/NAME --k 40   # an existing dataset with truth.parquet
                                               # (e.g. from scripts/real_embeddings.py)

For each method it also prints the reviewer's table: the method's assignment through the
write-up's post-processing (rows kept, kept clusters, purity of kept clusters and true
groups leading a kept cluster against the generator's truth, clusters with <= 2 members).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("read_files", "writeup", "writeup3", "ours", "ours_euclidean", "ours_cosine",
           "ours_parallel", "ours_euclidean_parallel", "ours_auto", "mbk3", "faiss", "faiss_sph",
           "sklearn")  # fmt: skip
LABELS = {
    "read_files": "read the .npy files once",
    "writeup": "write-up: memmap, file order, 1 pass",
    "writeup3": "write-up: same, 3 passes",
    "ours": "ours (pipeline run, default config)",
    "ours_euclidean": "ours, metric euclidean",
    "ours_cosine": "ours, metric cosine",
    "ours_parallel": "ours, default metric, train.strategy parallel",
    "ours_euclidean_parallel": "ours, metric euclidean, train.strategy parallel",
    "ours_auto": "ours, default metric, n_clusters auto",
    "mbk3": "shuffled MiniBatchKMeans, batch 1024, 3 epochs",
    "faiss": "faiss Kmeans, 20 iter",
    "faiss_sph": "faiss Kmeans(spherical), L2-normalised rows, 20 iter",
    "sklearn": "sklearn KMeans, 20 iter",
}
#: Methods that fit in the cosine metric (no Euclidean inertia shown; ours_auto: the default).
COSINE_METHODS = {"ours_cosine", "faiss_sph", "ours_parallel", "ours_auto"}
#: Slow or in-memory anchors: run once whatever --repeats says.
RUN_ONCE = {"sklearn", "faiss", "faiss_sph", "mbk3"}
#: Generator settings (pipeline.synthetic.make_demo_dataset knobs); "demo" is the demo.
SETTINGS = {
    "demo": {},
    "hard": {"noise_spread": 0.6, "outlier_fraction": 0.08, "rows_per_user": 600,
             "style_scale": 0.8},
}  # fmt: skip


# --------------------------------------------------------------------------- workers
# Each runs in a fresh interpreter so its peak private memory is its own.


def _save(
    out: Path, timings: dict, centres: np.ndarray, labels_csv_order: np.ndarray, sims: np.ndarray
) -> None:
    np.save(out / "centres.npy", centres.astype(np.float32))
    np.save(out / "labels.npy", labels_csv_order.astype(np.int64))
    np.save(out / "sims.npy", sims.astype(np.float32))
    (out / "timings.json").write_text(json.dumps(timings))


def _memmap(data: Path) -> np.ndarray:
    meta = json.loads((data / "memmap.json").read_text())
    return np.memmap(
        data / "embeddings.f32", dtype=np.float32, mode="r", shape=(meta["rows"], meta["dim"])
    )


def _batched_predict(x: np.ndarray, centres: np.ndarray, predict, batch: int = 1024):
    """What a user writes after the write-up: predict per batch, then distance and cosine."""
    labels, sims = [], []
    for s in range(0, len(x), batch):
        b = np.asarray(x[s : s + batch])
        lab = predict(b)
        c = centres[lab]
        _dist = np.linalg.norm(b - c, axis=1)
        sims.append((b * c).sum(1) / (np.linalg.norm(b, axis=1) * np.linalg.norm(c, axis=1)))
        labels.append(lab)
    return np.concatenate(labels), np.concatenate(sims)


def worker_read_files(data: Path, out: Path, args) -> None:
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(data / "ins_posts_object_tags_cleaned.csv", convert_options=pacsv.ConvertOptions(
        include_columns=["username", "image_name"]))  # fmt: skip
    t = time.perf_counter()
    seen = set()
    total = 0
    for user, image in zip(
        table["username"].to_pylist(), table["image_name"].to_pylist(), strict=True
    ):
        if (user, image) in seen:
            continue
        seen.add((user, image))
        total += np.load(data / "ins_posts" / user / "embeddings" / f"{image}.npy").shape[0]
    (out / "timings.json").write_text(json.dumps({"read": time.perf_counter() - t, "rows": total}))


def worker_writeup(data: Path, out: Path, args, passes: int = 1) -> None:
    from sklearn.cluster import MiniBatchKMeans

    x = _memmap(data)
    t = time.perf_counter()
    model = MiniBatchKMeans(n_clusters=args.k, random_state=args.seed)
    for _ in range(passes):
        for s in range(0, len(x), 1024):
            model.partial_fit(x[s : s + 1024])
    fit = time.perf_counter() - t
    t = time.perf_counter()
    labels, sims = _batched_predict(x, model.cluster_centers_, model.predict)
    predict = time.perf_counter() - t
    _save(out, {"fit": fit, "predict": predict}, model.cluster_centers_, labels, sims)


def _ours_config(data: Path, out: Path, train: dict):
    """Our pipeline's config for a bench dataset (default settings, ``train`` overrides)."""
    from pipeline.config import Config

    return Config.model_validate(
        {
            "input": {"objects_csv": str(data / "ins_posts_object_tags_cleaned.csv"),
                      "embeddings_root": str(data / "ins_posts"), "images_root": None},
            "train": train,
            "output": {"dir": str(out / "run")},
            "executor": {"progress": False},
        }
    )  # fmt: skip


def worker_ours(
    data: Path,
    out: Path,
    args,
    metric: str | None = None,
    strategy: str | None = None,
    n_clusters: int | str | None = None,
) -> None:
    from pipeline import sinks
    from pipeline.runner import run

    train = {"n_clusters": n_clusters or args.k, "seed": args.seed,
             **({"metric": metric} if metric else {})}  # fmt: skip
    strategy = strategy or getattr(args, "strategy", None)
    if strategy:
        train["strategy"] = strategy
    cfg = _ours_config(data, out, train)
    result = run(cfg, force=True)
    timings = {("fit" if k == "train" else k): v for k, v in result.timings.items()}
    table = sinks.read_parquet(result.catalog.assignments, columns=["source_row", "cluster", "sim"])
    table = table.sort_values("source_row")
    # Cluster ids may be kept from the folder's previous run (train.keep_ids): the
    # reviewer's columns count centres by row, so labels become centre rows.
    rows = np.searchsorted(result.catalog.read_cluster_ids(), table["cluster"].to_numpy())
    _save(out, timings, result.catalog.read_centres(), rows, table["sim"].to_numpy())


def worker_ours_stages(data: Path, out: Path, args) -> None:
    """Our pipeline one stage at a time, recording each stage's wall time and the CPU time
    of all its threads (``getrusage``): CPU / wall is how many cores the stage kept busy,
    a measure of its parallelism that other load on a shared machine does not hide."""
    import resource

    from pipeline.runner import run
    from pipeline.stages import STAGE_NAMES

    train = {"n_clusters": args.k, "seed": args.seed}
    if args.strategy:
        train["strategy"] = args.strategy
    cfg = _ours_config(data, out, train)
    timings = {}
    for stage in STAGE_NAMES:
        before = resource.getrusage(resource.RUSAGE_SELF)
        result = run(cfg, stages=(stage,), force=True)
        after = resource.getrusage(resource.RUSAGE_SELF)
        name = "fit" if stage == "train" else stage
        timings[name] = result.timings[stage]
        timings[f"{name}_cpu"] = (after.ru_utime - before.ru_utime) + (
            after.ru_stime - before.ru_stime
        )
    (out / "timings.json").write_text(json.dumps(timings))


def worker_faiss(data: Path, out: Path, args, spherical: bool = False) -> None:
    """faiss ``Kmeans``, 20 iterations, in memory; with ``spherical``, spherical k-means on
    L2-normalised rows (what issue 11 measured)."""
    import faiss

    t = time.perf_counter()
    x = np.array(_memmap(data))
    load = time.perf_counter() - t
    t = time.perf_counter()
    if spherical:
        faiss.normalize_L2(x)
    km = faiss.Kmeans(
        x.shape[1], args.k, niter=20, seed=args.seed, spherical=spherical, verbose=False
    )
    km.train(x)
    fit = time.perf_counter() - t
    t = time.perf_counter()
    labels, sims = _batched_predict(
        x, km.centroids, lambda b: km.index.search(b, 1)[1][:, 0], batch=8192
    )
    predict = time.perf_counter() - t
    _save(out, {"load": load, "fit": fit, "predict": predict}, km.centroids, labels, sims)


def worker_mbk3(data: Path, out: Path, args) -> None:
    """What a user tries next: scikit-learn MiniBatchKMeans on the matrix in RAM, batches
    of 1,024 drawn at random (shuffled), 3 epochs, no early stop."""
    from sklearn.cluster import MiniBatchKMeans

    t = time.perf_counter()
    x = np.array(_memmap(data))
    load = time.perf_counter() - t
    t = time.perf_counter()
    km = MiniBatchKMeans(n_clusters=args.k, batch_size=1024, max_iter=3, n_init=1, tol=0.0,
                         max_no_improvement=None, random_state=args.seed).fit(x)  # fmt: skip
    fit = time.perf_counter() - t
    t = time.perf_counter()
    labels, sims = _batched_predict(x, km.cluster_centers_, km.predict, batch=8192)
    predict = time.perf_counter() - t
    _save(out, {"load": load, "fit": fit, "predict": predict}, km.cluster_centers_, labels, sims)


def worker_sklearn(data: Path, out: Path, args) -> None:
    from sklearn.cluster import KMeans

    t = time.perf_counter()
    x = np.array(_memmap(data))
    load = time.perf_counter() - t
    t = time.perf_counter()
    km = KMeans(n_clusters=args.k, n_init=1, max_iter=20, random_state=args.seed).fit(x)
    fit = time.perf_counter() - t
    t = time.perf_counter()
    labels, sims = _batched_predict(x, km.cluster_centers_, km.predict, batch=8192)
    predict = time.perf_counter() - t
    _save(out, {"load": load, "fit": fit, "predict": predict}, km.cluster_centers_, labels, sims)


def worker_copy(data: Path, out: Path, args) -> None:
    """A plain copy of the ingest's input bytes: every embedding file the CSV names, read
    once and appended to one file on the output's disk (what ``cat files > one`` does),
    the floor an ingest that reads and writes the vectors once could reach."""
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(data / "ins_posts_object_tags_cleaned.csv", convert_options=pacsv.ConvertOptions(
        include_columns=["username", "image_name"]))  # fmt: skip
    t = time.perf_counter()
    pairs = dict.fromkeys(zip(table["username"].to_pylist(), table["image_name"].to_pylist(),
                              strict=True))  # fmt: skip
    total = 0
    target = out / "copy.bin"
    with target.open("wb") as sink:
        for user, image in pairs:
            with open(data / "ins_posts" / user / "embeddings" / f"{image}.npy", "rb") as src:
                total += sink.write(src.read())
    elapsed = time.perf_counter() - t
    target.unlink()
    (out / "timings.json").write_text(json.dumps({"copy": elapsed, "bytes": total}))


def worker_gemm(data: Path, out: Path, args) -> None:
    """The float32 GEMM rate on the cores this process may use (taskset)."""
    (out / "timings.json").write_text(json.dumps({"gflops": gemm_rate_gflops(args.dim, args.k)}))


WORKERS = {
    "copy": worker_copy,
    "gemm": worker_gemm,
    "read_files": worker_read_files,
    "writeup": lambda d, o, a: worker_writeup(d, o, a, 1),
    "writeup3": lambda d, o, a: worker_writeup(d, o, a, 3),
    "ours": worker_ours,
    "ours_stages": worker_ours_stages,
    "ours_euclidean": lambda d, o, a: worker_ours(d, o, a, "euclidean"),
    "ours_cosine": lambda d, o, a: worker_ours(d, o, a, "cosine"),
    "ours_parallel": lambda d, o, a: worker_ours(d, o, a, None, "parallel"),
    "ours_euclidean_parallel": lambda d, o, a: worker_ours(d, o, a, "euclidean", "parallel"),
    "ours_auto": lambda d, o, a: worker_ours(d, o, a, n_clusters="auto"),
    "mbk3": worker_mbk3,
    "faiss": worker_faiss,
    "faiss_sph": lambda d, o, a: worker_faiss(d, o, a, spherical=True),
    "sklearn": worker_sklearn,
}


# --------------------------------------------------------------------------- parent


def rss_anon_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_worker(
    method: str, data: Path, out: Path, args, cpus: str | None = None
) -> tuple[dict, float]:
    """Run one method in a fresh interpreter (pinned to ``cpus`` with ``taskset`` when
    given); returns its timings and its peak private memory in MiB."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", method, "--data", str(data), "--out", str(out),
           "--k", str(args.k), "--seed", str(args.seed), "--dim", str(args.dim)]  # fmt: skip
    if method.startswith("ours") and args.strategy:
        cmd += ["--strategy", args.strategy]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    proc = subprocess.Popen(cmd)
    peak = 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, rss_anon_mib(proc.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    if proc.wait() != 0:
        raise SystemExit(f"benchmark worker {method} failed")
    return json.loads((out / "timings.json").read_text()), peak


def prepare_data(args) -> Path:
    """Generate the dataset and the write-up's memmap (CSV order) once per size.

    With ``--dataset`` the given folder is used as it is (it must hold ``truth.parquet``);
    ``args.rows``, ``args.dim`` and ``args.true_k`` are then read from it."""
    from pipeline.catalog import Catalog
    from pipeline.config import Config
    from pipeline.ingest import ingest_objects
    from pipeline.plan import shuffle_seed
    from pipeline.synthetic import make_demo_dataset

    knobs = SETTINGS[args.setting]
    suffix = "" if args.setting == "demo" else f"-{args.setting}"
    data = Path(args.root) / f"rows{args.rows}-d{args.dim}-k{args.true_k}-s{args.seed}{suffix}"
    if args.dataset:
        data = Path(args.dataset).resolve()
        if not (data / "truth.parquet").exists():
            raise SystemExit(f"--dataset {data}: no truth.parquet (source_row, true_cluster)")
    elif not (data / "truth.parquet").exists():
        print(f"generating {args.rows:,} x {args.dim} ({args.setting}: {knobs}) under {data} ...",
              flush=True)  # fmt: skip
        make_demo_dataset(data, args.rows, args.dim, args.true_k, seed=args.seed, **knobs)
    if not (data / "memmap.json").exists():
        # The write-up's memmap: every object's vector appended in CSV order.
        cfg = Config.model_validate({
            "input": {"objects_csv": str(data / "ins_posts_object_tags_cleaned.csv"),
                      "embeddings_root": str(data / "ins_posts")},
            "ingest": {"keep_memmap": True},
            "output": {"dir": str(data / "_ingest"), "staging_dir": str(data)},
            "executor": {"progress": False},
        })  # fmt: skip
        result = ingest_objects(
            cfg.input,
            cfg.select,
            cfg.ingest,
            shuffle_seed(cfg),
            Catalog.from_config(cfg),
            progress=True,
        )
        os.replace(result.memmap, data / "embeddings.f32")
        shutil.rmtree(data / "_ingest")
        (data / "memmap.json").write_text(json.dumps({"rows": result.n_rows, "dim": result.dim}))
    if args.dataset:
        import pyarrow.parquet as pq

        meta = json.loads((data / "memmap.json").read_text())
        args.rows, args.dim = meta["rows"], meta["dim"]
        truth = pq.read_table(data / "truth.parquet").column("true_cluster").to_numpy()
        args.true_k = int(np.unique(truth[truth >= 0]).size)
    return data


def gemm_rate_gflops(dim: int, k: int) -> float:
    """Measured float32 matrix-product rate for (8192 x dim) @ (dim x k), all cores."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8192, dim), dtype=np.float32)
    b = rng.standard_normal((dim, k), dtype=np.float32)
    a @ b
    times = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        times.append((time.perf_counter() - t) / 5)
    return 2 * 8192 * dim * k / statistics.median(times) / 1e9


def quality(data: Path, out: Path, k: int, euclidean: bool = True) -> dict:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from pipeline import kernels

    x = _memmap(data)
    centres = np.load(out / "centres.npy")
    k = len(centres)  # the chosen k where n_clusters is auto
    norms = kernels.row_sq_norms(centres)
    inertia = (
        sum(
            kernels.inertia_of(np.asarray(x[s : s + 16384]), centres, norms)
            for s in range(0, len(x), 16384)
        )
        if euclidean
        else None
    )
    labels = np.load(out / "labels.npy")
    truth = pq.read_table(data / "truth.parquet").column("true_cluster").to_numpy()
    sims = np.load(out / "sims.npy")
    images = pacsv.read_csv(
        data / "ins_posts_object_tags_cleaned.csv",
        convert_options=pacsv.ConvertOptions(include_columns=["image_name"]),
    )
    images = images.column("image_name").to_numpy(zero_copy_only=False)  # fmt: skip
    return {
        "inertia": inertia,
        "ari": adjusted_rand_score(truth, labels),
        "nmi": normalized_mutual_info_score(truth, labels),
        "sim_share": float((sims > 0.7).mean()),
        "k": k,
        **reviewer_table(labels, sims, truth, images, k),
    }


def reviewer_table(
    labels: np.ndarray,
    sims: np.ndarray,
    truth: np.ndarray,
    image_names: np.ndarray,
    k: int,
    dedupe_key: str | None = "image_name",
    min_similarity: float = 0.7,
    min_cluster_size: int = 10,
) -> dict:
    """What the reviewer keeps: the write-up's post-processing
    (:func:`pipeline.postprocess.label_rows`) applied to one method's assignment (rows in
    CSV order), scored against the generator's truth.

    - rows kept, kept clusters;
    - purity of kept clusters: the share of kept rows whose true group is their cluster's
      majority group (outliers, true group -1, never count as pure);
    - true groups leading a kept cluster: distinct true groups that are the majority of at
      least one kept cluster (groups the reviewer can find);
    - clusters with <= 2 members (of all k centres, before post-processing).
    """
    import pandas as pd

    from pipeline.postprocess import label_rows

    frame = pd.DataFrame({"object_id": np.arange(len(labels)), "cluster": labels,
                          "sim": sims.astype(np.float32), "image_name": image_names})  # fmt: skip
    out = label_rows(frame, dedupe_key, min_similarity, min_cluster_size)
    kept = out[out["status"] == "kept"]
    kept_truth = truth[kept["object_id"].to_numpy()]
    pure = 0
    leaders = set()
    for _cluster, groups in pd.Series(kept_truth).groupby(kept["cluster"].to_numpy()):
        real = groups[groups >= 0]
        if len(real) == 0:
            continue
        counts = real.value_counts()
        pure += int(counts.iloc[0])
        leaders.add(int(counts.index[0]))
    sizes = np.bincount(labels, minlength=k)
    return {
        "kept_rows": len(kept),
        "kept_clusters": int(kept["cluster"].nunique()),
        "purity": pure / max(1, len(kept)),
        "groups_led": len(leaders),
        "small_clusters": int((sizes <= 2).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=61_751)
    parser.add_argument("--dim", type=int, default=1792)
    parser.add_argument("--k", type=int, default=600, help="n_clusters of every method")
    parser.add_argument("--true-k", type=int, default=600, help="clusters the data is drawn around")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per method (medians are shown)"
    )
    parser.add_argument(
        "--methods",
        default="writeup,ours_euclidean,ours_cosine,mbk3,faiss,faiss_sph,sklearn",
    )
    parser.add_argument(
        "--setting", choices=sorted(SETTINGS), default="demo",
        help="generator setting: demo (the demo's dataset) or hard (very unequal row noise, "
             f"more outliers, fewer users with stronger style: {SETTINGS['hard']})",
    )  # fmt: skip
    parser.add_argument(
        "--root", default=str(ROOT / "bench"), help="where data and runs go (git-ignored)"
    )
    parser.add_argument(
        "--cores", help="core counts to compare, e.g. 1,2: run our pipeline pinned with taskset "
        "to each (plus a plain copy of the ingest's input bytes and the GEMM rate on those "
        "cores) and print each stage side by side with ratios",
    )  # fmt: skip
    parser.add_argument(
        "--strategy", choices=("sequential", "parallel"), help="train.strategy for our runs"
    )
    parser.add_argument(
        "--dataset", help="an existing dataset folder in the input layout with truth.parquet "
        "(e.g. from scripts/real_embeddings.py): benchmark it instead of a generated one; "
        "--rows, --dim and --true-k are read from it",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        WORKERS[args.worker](Path(args.data), Path(args.out), args)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    data = prepare_data(args)
    # Runs and results are filed under the setting's name, or the dataset's folder name.
    args.label = Path(args.dataset).resolve().name if args.dataset else args.setting
    if args.cores:
        compare_cores(data, args, [int(c) for c in args.cores.split(",")])
        return
    rate = gemm_rate_gflops(args.dim, args.k)
    pass_flop = 2 * args.rows * args.k * args.dim
    print(f"\nmachine: {os.cpu_count()} cores; float32 GEMM {rate:.0f} GFLOP/s; one assignment pass "
          f"= {pass_flop / 1e9:.1f} GFLOP = {pass_flop / 1e9 / rate:.2f} s at that rate\n", flush=True)  # fmt: skip

    rows = {}
    for method in methods:
        repeats = 1 if method in RUN_ONCE else args.repeats
        runs = []
        for r in range(repeats):
            timings, peak = run_worker(
                method, data, Path(args.root) / "runs" / args.label / method / str(r), args
            )
            runs.append((timings, peak))
            print(f"  {method} run {r + 1}/{repeats}: {json.dumps({k: round(v, 2) for k, v in timings.items()})} "
                  f"peak {peak:.0f} MiB", flush=True)  # fmt: skip
        keys = runs[0][0].keys()
        med = {key: statistics.median(t[key] for t, _ in runs) for key in keys}
        peak = statistics.median(p for _, p in runs)
        q = (
            quality(data, Path(args.root) / "runs" / args.label / method / "0", args.k,
                    euclidean=method not in COSINE_METHODS)
            if method != "read_files"
            else {}
        )  # fmt: skip
        rows[method] = {"t": med, "peak": peak, **q}

    print_table(rows, args, rate, pass_flop)


def compare_cores(data: Path, args, counts: list[int]) -> None:
    """Each stage of our pipeline pinned to 1, 2, ... cores (``taskset``), side by side.

    Repeats are interleaved (1 core, 2 cores, 1 core, ...) so that a noisy minute on a
    shared machine hits every core count alike. With each run: a plain copy of the ingest's
    input bytes on the same disk and the GEMM rate on the same cores, so ingest and predict
    are also shown against their bounds.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if max(counts) > len(allowed):
        raise SystemExit(f"--cores {max(counts)} but this process may use {len(allowed)} cores")
    pass_flop = 2 * args.rows * args.k * args.dim
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    for r in range(args.repeats):
        for n in counts:
            cpus = ",".join(map(str, allowed[:n]))
            base = Path(args.root) / "runs" / "cores" / str(n)
            gemm, _ = run_worker("gemm", data, base / "gemm", args, cpus)
            copy, _ = run_worker("copy", data, base / "copy", args, cpus)
            ours, peak = run_worker("ours_stages", data, base / "ours" / str(r), args, cpus)
            row = {**ours, "copy": copy["copy"], "gflops": gemm["gflops"], "peak": peak}
            runs[n].append(row)
            print(f"  {n} core(s) run {r + 1}/{args.repeats}: "
                  f"{json.dumps({k: round(v, 2) for k, v in row.items()})}", flush=True)  # fmt: skip
    med = {n: {key: statistics.median(run[key] for run in runs[n]) for key in runs[n][0]}
           for n in counts}  # fmt: skip
    stages = [
        s for s in ("ingest", "fit", "predict", "postprocess", "report") if s in med[counts[0]]
    ]
    for n in counts:
        med[n]["whole run"] = sum(med[n][s] for s in stages)
    names = {"fit": "train"}
    head = ["stage", *(f"{n} core{'s' if n > 1 else ''} s" for n in counts),
            *(f"{n} vs {counts[0]}" for n in counts[1:]),
            *(f"cores busy at {n} (CPU s / wall s)" for n in counts)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in counts:
        med[n]["whole run_cpu"] = sum(med[n][f"{s}_cpu"] for s in stages)
    for stage in [*stages, "whole run"]:
        cells = [f"{med[n][stage]:.2f}" for n in counts]
        ratios = [f"{med[n][stage] / med[counts[0]][stage]:.2f}x" for n in counts[1:]]
        busy = [f"{med[n][f'{stage}_cpu'] / med[n][stage]:.2f}" for n in counts]
        lines.append(f"| {names.get(stage, stage)} | " + " | ".join(cells + ratios + busy) + " |")
    lines.append("")
    head = ["bound", *(f"{n} core{'s' if n > 1 else ''}" for n in counts)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    bound_rows = {
        "plain copy of the input bytes s": lambda m: f"{m['copy']:.2f}",
        "ingest / copy": lambda m: f"{m['ingest'] / m['copy']:.2f}x",
        "GEMM GFLOP/s": lambda m: f"{m['gflops']:.0f}",
        "predict pass at GEMM rate s": lambda m: f"{pass_flop / 1e9 / m['gflops']:.2f}",
        "predict / GEMM bound": lambda m: f"{m['predict'] / (pass_flop / 1e9 / m['gflops']):.2f}x",
        "peak private MiB": lambda m: f"{m['peak']:.0f}",
    }
    for name, cell in bound_rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(med[n]) for n in counts) + " |")
    text = (f"**cores** {args.rows:,} rows x {args.dim} dims, k = {args.k}, "
            f"train.strategy {args.strategy or 'default'}; medians of {args.repeats} interleaved "
            f"runs per core count (taskset)\n\n" + "\n".join(lines))  # fmt: skip
    print("\n" + text)
    out = Path(args.root) / f"results-{args.rows}-cores-{'-'.join(map(str, counts))}.md"
    out.write_text(text + "\n")
    print(f"\nwritten to {out}")


def print_table(rows: dict, args, rate: float, pass_flop: float) -> None:
    from pipeline.config import IngestConfig, TrainConfig
    from pipeline.plan import refine_iterations

    default_metric = TrainConfig().metric
    batch = min(TrainConfig().batch_size, IngestConfig().chunk_rows, args.rows)
    refine = {s: refine_iterations(TrainConfig(strategy=s), args.rows, batch)
              for s in ("sequential", "parallel")}  # fmt: skip
    ours, ours_parallel = 2 + refine["sequential"], 2 + refine["parallel"]
    ref_inertia = rows.get("sklearn", {}).get("inertia")
    base = rows.get("writeup")
    base_fp = base["t"]["fit"] + base["t"]["predict"] if base else None
    passes = {"writeup": 2, "writeup3": 4, "ours": ours, "ours_euclidean": ours, "ours_cosine": ours,
              "ours_parallel": ours_parallel, "ours_euclidean_parallel": ours_parallel, "ours_auto": ours,
              "mbk3": 4, "faiss": 21, "faiss_sph": 21, "sklearn": 21}  # fmt: skip

    def label(method: str) -> str:
        default = method == f"ours_{default_metric}"
        name = LABELS[method]
        if method == "ours_auto" and "k" in rows[method]:
            name += f" (chose k = {rows[method]['k']})"
        return f"**{name}** (default)" if default else name

    # The reviewer's table: what survives the write-up's post-processing.
    header = ("method", "rows kept", "kept clusters", "purity of kept", "true groups leading a kept cluster",
              "clusters <= 2 members", "ARI", "NMI", "sim > 0.7", "inertia / KMeans",
              "fit+pred s", "vs write-up")  # fmt: skip
    review = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in rows.items():
        if method == "read_files":
            continue
        fp = row["t"]["fit"] + row["t"]["predict"]
        if row["inertia"] is None:
            inertia = "-"
        elif ref_inertia:
            inertia = f"{row['inertia'] / ref_inertia:.3f}"
        else:
            inertia = f"{row['inertia']:.4g}"
        review.append(
            f"| {label(method)} | {row['kept_rows']:,} | {row['kept_clusters']} | "
            f"{row['purity']:.3f} | {row['groups_led']} | {row['small_clusters']} | "
            f"{row['ari']:.3f} | {row['nmi']:.3f} | {row['sim_share']:.3f} | {inertia} | "
            f"{fp:.2f} | {fp / base_fp if base_fp else float('nan'):.2f}x |"
        )

    header = ("method", "ingest s", "fit s", "predict s", "post+out s", "fit+pred s", "vs write-up",
              "x bound", "peak MiB")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in rows.items():
        t = row["t"]
        if method == "read_files":
            lines.append(f"| {LABELS[method]} | {t['read']:.2f} | | | | | | | {row['peak']:.0f} |")
            continue
        fp = t["fit"] + t["predict"]
        bound = passes[method] * pass_flop / 1e9 / rate
        post = t.get("postprocess", 0) + t.get("report", 0)
        lines.append(
            f"| {label(method)} | {t.get('ingest', t.get('load', 0)):.2f} | {t['fit']:.2f} | "
            f"{t['predict']:.2f} | {post:.2f} | {fp:.2f} | "
            f"{fp / base_fp if base_fp else float('nan'):.2f}x | {fp / bound:.1f}x | {row['peak']:.0f} |"
        )
    knobs = SETTINGS[args.setting]
    what = (
        f"**dataset {args.label}**"
        if args.dataset
        else f"**{args.setting} setting** ({knobs or 'the demo generator'})"
    )
    text = (f"{what}: {args.rows:,} rows x "
            f"{args.dim} dims, {args.true_k} true groups, k = {args.k}\n\n"
            + "\n".join(review) + "\n\n" + "\n".join(lines))  # fmt: skip
    notes = (f"\nReviewer columns: each method's assignment through the write-up's post-processing "
             f"(pipeline.postprocess.label_rows: one row per image per cluster, sim > 0.7, clusters >= 10); "
             f"purity = kept rows in their cluster's majority true group (outliers never pure); "
             f"clusters <= 2 members counts all k centres before post-processing. "
             f"Times: medians of {args.repeats} runs for write-up and ours, one run for "
             f"{', '.join(sorted(RUN_ONCE))}. 'x bound': fit+predict over the time of the passes made at the measured "
             f"GEMM rate ({rate:.0f} GFLOP/s); passes: write-up 1 fit + 1 predict (3 + 1), ours 1 epoch + {refine['sequential']} refinement + 1 predict "
             f"(k-means++ seeding on a sample not counted), MiniBatchKMeans 3 + 1, faiss/sklearn 20 + 1 (faiss trains on at "
             f"most 256 rows per centroid). ingest column: ours = per-image files -> memmap + Zarr; "
             f"the in-memory methods = loading the matrix into RAM. Inertia (Euclidean fits only) is "
             f"{'relative to sklearn KMeans' if ref_inertia else 'absolute (no sklearn run)'}.")  # fmt: skip
    print("\n" + text + notes)
    out = Path(args.root) / f"results-{args.rows}-{args.label}.md"
    out.write_text(text + "\n" + notes + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

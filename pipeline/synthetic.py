"""Seeded generator of a dataset shaped like the write-up's (the demo and the tests).

It streams one user at a time, so it never holds the whole matrix in memory. What it
imitates, because each property matters to the pipeline:

- users are contiguous in the CSV and each has a few favourite clusters, so file-order
  mini-batches are biased (what the shuffled store fixes);
- true cluster sizes are very unequal (Zipf-like) and their tightness varies, so some
  clusters survive the similarity filter and some vanish (the write-up's cluster 202);
- a user's vectors share a small style offset; some objects are outliers;
- objects of one image often share a cluster (left and right shoe), so the per-image
  dedupe removes rows.

Layout written under ``root`` (the documented input layout)::

    ins_posts_object_tags_cleaned.csv        one row per object, users contiguous
    ins_posts/<username>/embeddings/<image_name>.npy   (n_objects_in_image, dim) float32,
                                              row i is the object with idx == i
    embeddings.npy                            (layout="matrix") one matrix aligned to the CSV
    images/<username>/<image_name>.jpg       (images=True) pictures whose shapes follow
                                              the clusters, one shape per object bbox
    truth.parquet                             source_row, true_cluster (-1 = outlier)
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import multiprocessing as mp
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

TAGS = (
    "shoe", "bag", "face", "forehead", "hat", "dress", "watch", "sunglasses", "car", "dog",
    "cup", "plant", "chair", "bottle", "necklace", "jacket", "book", "laptop", "cake", "bike",
)  # fmt: skip
IMAGE_PX = 320
CSV_NAME = "ins_posts_object_tags_cleaned.csv"


@dataclass(frozen=True)
class DemoDataset:
    """Paths of a generated dataset."""

    root: Path
    objects_csv: Path
    embeddings_root: Path
    embeddings_matrix: Path | None
    images_root: Path | None
    truth: Path
    n_objects: int
    dim: int


def _user_sizes(rng: np.random.Generator, n_objects: int, n_users: int) -> np.ndarray:
    weights = rng.lognormal(0.0, 0.8, n_users)
    sizes = np.floor(weights / weights.sum() * n_objects).astype(np.int64)
    sizes = np.maximum(sizes, 1)
    # Give or take the remainder one row at a time so the total is exact.
    diff = n_objects - int(sizes.sum())
    order = np.argsort(-sizes)
    i = 0
    while diff != 0:
        j = order[i % n_users]
        if diff > 0:
            sizes[j] += 1
            diff -= 1
        elif sizes[j] > 1:
            sizes[j] -= 1
            diff += 1
        i += 1
    return sizes


def _split_into_images(rng: np.random.Generator, n: int) -> list[int]:
    counts = []
    while n > 0:
        k = int(min(n, rng.geometric(0.45)))
        k = min(k, 6)
        counts.append(k)
        n -= k
    return counts


def _cluster_colour(cluster: int) -> tuple[int, int, int]:
    hue = (cluster * 0.61803398875) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _image_seed(image_name: str) -> int:
    """The drawing seed of an image, from its (seeded, hex) name: the same picture whether
    drawn with the dataset or later from its CSV (:func:`draw_demo_images`)."""
    return int(hashlib.md5(image_name.encode()).hexdigest()[:8], 16)


def _draw_image(path: Path, bboxes: list[list[float]], clusters: list[int], seed: int) -> None:
    """Draw one ``IMAGE_PX`` square picture: a smooth background and one shape per object
    in its bbox, whose shape, colour and stripes follow the object's true cluster.

    The background is a coarse noise field scaled up (not per-pixel noise): it compresses
    to a few kB and draws in about 2 ms, so 30,000 demo images take seconds, not minutes.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    base = rng.integers(30, 90, size=3)
    coarse = np.clip(base + rng.normal(0, 12, (8, 8, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((IMAGE_PX, IMAGE_PX), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for (x1, y1, x2, y2), cluster in zip(bboxes, clusters, strict=True):
        box = [x1, y1, x2, y2]
        if cluster < 0:  # outliers: grey scribbles
            draw.line(box, fill=(160, 160, 160), width=3)
            draw.line([x1, y2, x2, y1], fill=(120, 120, 120), width=2)
            continue
        colour = _cluster_colour(cluster)
        shape = cluster % 4
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        elif shape == 2:
            draw.polygon([(x1, y2), ((x1 + x2) / 2, y1), (x2, y2)], fill=colour)
        else:
            draw.rectangle(box, outline=colour, width=max(2, int((x2 - x1) / 6)))
        stripes = 1 + (cluster // 4) % 4
        for s in range(stripes):
            y = y1 + (s + 1) * (y2 - y1) / (stripes + 1)
            draw.line([x1, y, x2, y], fill=(255, 255, 255), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=85)


ImageJob = tuple[str, list[list[float]], list[int]]


def _draw_images(jobs: list[ImageJob]) -> int:
    """Draw a batch of ``(path, bboxes, clusters)`` images (one pool task)."""
    for path, bboxes, clusters in jobs:
        _draw_image(Path(path), bboxes, clusters, _image_seed(Path(path).stem))
    return len(jobs)


class _ImageDrawer:
    """Draws batches of pictures in spawned worker processes while the caller goes on.

    Spawned, not forked: the caller may hold threads (dask, pytest) that fork would copy.
    Where workers cannot start (a parent script read from stdin cannot be re-imported by
    spawn), the batches are drawn here instead: slower, same pictures.
    """

    def __init__(self, n_workers: int | None = None) -> None:
        self.pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=n_workers or os.cpu_count() or 1, mp_context=mp.get_context("spawn")
        )
        self.pending: list[tuple[list[ImageJob], Future]] = []

    def submit(self, jobs: list[ImageJob]) -> None:
        if self.pool is not None:
            try:
                self.pending.append((jobs, self.pool.submit(_draw_images, jobs)))
                return
            except BrokenProcessPool:
                self.pool = None
        _draw_images(jobs)

    def finish(self) -> None:
        """Wait for every batch (drawing here any that a broken pool lost)."""
        for jobs, future in self.pending:
            try:
                future.result()
            except BrokenProcessPool:
                _draw_images(jobs)
        self.pending = []
        self.cancel()

    def cancel(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def draw_demo_images(root: str | Path, n_workers: int | None = None) -> Path:
    """Draw the pictures of an existing demo dataset from its CSV and ``truth.parquet``.

    The result is identical to ``make_demo_dataset(..., images=True)``: use it to add
    images to a dataset generated without them (the vectors are not touched).

    Parameters
    ----------
    root : str or Path
        The dataset folder (holds the objects CSV and ``truth.parquet``).
    n_workers : int, default=None
        Drawing processes; ``None`` = all cores.
    """
    root = Path(root)
    objects = pacsv.read_csv(
        root / CSV_NAME,
        convert_options=pacsv.ConvertOptions(include_columns=["username", "image_name", "bbox"]),
    ).to_pandas()
    truth = pq.read_table(root / "truth.parquet").to_pandas()
    objects["true_cluster"] = truth.sort_values("source_row")["true_cluster"].to_numpy()
    img_root = root / "images"
    jobs: list[ImageJob] = []
    keys = objects["username"] + "/" + objects["image_name"]
    for key, rows in objects.groupby(keys, sort=False):
        jobs.append(
            (
                str(img_root / f"{key}.jpg"),
                [json.loads(b) for b in rows["bbox"]],
                [int(c) for c in rows["true_cluster"]],
            )
        )
    drawer = _ImageDrawer(n_workers)
    try:
        for start in range(0, len(jobs), 256):
            drawer.submit(jobs[start : start + 256])
        drawer.finish()
    finally:
        drawer.cancel()
    return img_root


#: Columns of the objects CSV that :class:`DatasetWriter` writes (the documented minimum
#: plus ``raw_tag``).
CSV_COLUMNS = ("batch_folder", "username", "res_name", "bbox", "tag", "score", "idx",
               "image_name", "raw_tag")  # fmt: skip


class DatasetWriter:
    """Writes a dataset in the documented input layout, one user at a time.

    The writer behind :func:`make_demo_dataset`, also used by scripts that build a dataset
    from real embeddings (``scripts/real_embeddings.py``): call :meth:`add_image` for each
    image of a user (users contiguous, as the write-up's CSV is), :meth:`end_user` after
    each user, then :meth:`close`, which writes ``truth.parquet`` (``source_row``,
    ``true_cluster``; -1 = outlier) and returns its path.

    Parameters
    ----------
    root : Path
        The dataset folder (created by the caller).
    matrix : numpy.ndarray, optional
        An open ``(n_rows, dim)`` memmap for ``layout="matrix"``; without it each image's
        vectors go to ``ins_posts/<username>/embeddings/<image_name>.npy``.
    """

    def __init__(self, root: Path, matrix: np.ndarray | None = None) -> None:
        self.root = Path(root)
        self.csv_path = self.root / CSV_NAME
        self.emb_root = self.root / "ins_posts"
        self.matrix = matrix
        self.row = 0
        self._truth: list[np.ndarray] = []
        self._columns: dict[str, list] = {name: [] for name in CSV_COLUMNS}
        self._writer: pacsv.CSVWriter | None = None

    def add_image(
        self,
        username: str,
        batch_folder: str,
        image_name: str,
        vectors: np.ndarray,
        bboxes: list[list[float]],
        tags: list[str],
        scores: list[float],
        raw_tags: list[str],
        truth: np.ndarray,
    ) -> None:
        """Add one image: its ``(n_objects, dim)`` vectors (row ``i`` is object ``idx ==
        i``), and per object its bbox, tag, score, raw tag and true group."""
        n = len(vectors)
        if self.matrix is not None:
            self.matrix[self.row : self.row + n] = vectors
        else:
            path = self.emb_root / username / "embeddings" / f"{image_name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, vectors)
        columns = self._columns
        for j in range(n):
            columns["batch_folder"].append(batch_folder)
            columns["username"].append(username)
            columns["res_name"].append(f"{image_name}.json")
            columns["bbox"].append(json.dumps(bboxes[j]))
            columns["tag"].append(str(tags[j]))
            columns["score"].append(scores[j])
            columns["idx"].append(j)
            columns["image_name"].append(image_name)
            columns["raw_tag"].append(raw_tags[j])
        self._truth.append(np.asarray(truth))
        self.row += n

    def end_user(self) -> None:
        """Append the current user's rows to the CSV."""
        table = pa.table(self._columns)
        if self._writer is None:
            self._writer = pacsv.CSVWriter(str(self.csv_path), table.schema)
        self._writer.write_table(table)
        self._columns = {name: [] for name in CSV_COLUMNS}

    def close(self) -> Path:
        """Close the CSV and write ``truth.parquet``; returns its path."""
        assert self._writer is not None, "no user was written"
        self._writer.close()
        if self.matrix is not None:
            self.matrix.flush()
        truth = np.concatenate(self._truth)
        path = self.root / "truth.parquet"
        pq.write_table(
            pa.table({"source_row": np.arange(len(truth), dtype=np.int64), "true_cluster": truth}),
            path,
        )
        return path


def make_demo_dataset(
    root: str | Path,
    n_objects: int = 61_751,
    dim: int = 1792,
    n_true_clusters: int = 600,
    seed: int = 0,
    layout: Literal["per_image", "matrix"] = "per_image",
    images: bool = False,
    outlier_fraction: float = 0.02,
    noise_spread: float = 0.2,
    rows_per_user: int = 120,
    style_scale: float = 0.3,
) -> DemoDataset:
    """Write a seeded synthetic dataset under ``root`` and return its paths.

    Parameters
    ----------
    n_objects : int, default=61751
        Rows of the objects CSV (the write-up's count).
    dim : int, default=1792
        Embedding dimension.
    n_true_clusters : int, default=600
        Clusters the vectors are drawn around.
    layout : {"per_image", "matrix"}, default="per_image"
        One ``.npy`` per image, or one matrix aligned to the CSV rows.
    images : bool, default=False
        Also draw a picture per image whose shapes follow the clusters (in worker
        processes, alongside the vectors; see :func:`draw_demo_images`).
    outlier_fraction : float, default=0.02
        Share of objects that are pure noise (true cluster -1).
    noise_spread : float, default=0.2
        Sigma of the log-normal factor on each row's noise: larger = rows of very unequal
        noise inside one cluster (0.6 makes a tenth of the rows over twice as noisy).
    rows_per_user : int, default=120
        Mean objects per user (users = n_objects // rows_per_user): larger = fewer users,
        each a bigger share of the file.
    style_scale : float, default=0.3
        Norm of each user's style offset (centres and noise have norm ~1): larger = a
        stronger per-user style that pulls a user's objects together across clusters.

    The defaults give the demo dataset; changing none of them leaves its bytes unchanged.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = int(n_true_clusters)

    centres = rng.standard_normal((k, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    popularity = 1.0 / np.arange(1, k + 1) ** 0.45
    popularity = rng.permutation(popularity)
    popularity /= popularity.sum()
    tightness = rng.uniform(0.55, 1.45, k).astype(np.float32)
    cluster_tag = np.array([TAGS[(c * 7) % len(TAGS)] for c in range(k)])

    n_users = max(1, n_objects // rows_per_user)
    sizes = _user_sizes(rng, n_objects, n_users)

    csv_path = root / CSV_NAME
    emb_root = root / "ins_posts"
    img_root = root / "images" if images else None
    matrix_path = root / "embeddings.npy" if layout == "matrix" else None
    matrix = (
        np.lib.format.open_memmap(matrix_path, mode="w+", dtype=np.float32, shape=(n_objects, dim))
        if matrix_path is not None
        else None
    )
    out = DatasetWriter(root, matrix)
    # Pictures are drawn by worker processes while this one draws vectors; their seeds come
    # from the image names, so the vectors' random stream is the same with or without them.
    drawer = _ImageDrawer() if img_root is not None else None
    try:
        for u in range(n_users):
            username = f"user_{hashlib.md5(f'{seed}-{u}'.encode()).hexdigest()[:10]}"
            batch_folder = f"ins_posts_{1 + u % 3}"
            favourites = rng.choice(k, size=min(k, 5), replace=False, p=popularity)
            user_p = 0.6 * popularity
            user_p[favourites] += 0.4 * rng.dirichlet(np.ones(len(favourites)))
            user_p /= user_p.sum()
            style = rng.standard_normal(dim, dtype=np.float32) * np.float32(
                style_scale / np.sqrt(dim)
            )
            user_images: list[ImageJob] = []
            for i, n_in_image in enumerate(_split_into_images(rng, int(sizes[u]))):
                image_name = hashlib.md5(f"{seed}-{u}-{i}".encode()).hexdigest()
                first = int(rng.choice(k, p=user_p))
                clusters = [first]
                for _ in range(n_in_image - 1):
                    clusters.append(first if rng.random() < 0.2 else int(rng.choice(k, p=user_p)))
                clusters_arr = np.array(clusters)
                outlier = rng.random(n_in_image) < outlier_fraction
                clusters_arr[outlier] = -1
                spread = tightness[np.maximum(clusters_arr, 0)] * rng.lognormal(
                    0, noise_spread, n_in_image
                )
                noise_scale = np.where(outlier, 1.0, spread).astype(np.float32)
                noise = rng.standard_normal((n_in_image, dim), dtype=np.float32)
                noise *= (noise_scale / np.sqrt(dim)).astype(np.float32)[:, None]
                vectors = np.where(outlier[:, None], 0.0, centres[np.maximum(clusters_arr, 0)])
                vectors = (vectors + style + noise).astype(np.float32)
                bboxes, tags, scores, raw_tags = [], [], [], []
                for j in range(n_in_image):
                    w, h = rng.uniform(40, 160, 2)
                    x1, y1 = rng.uniform(0, IMAGE_PX - w), rng.uniform(0, IMAGE_PX - h)
                    bboxes.append([float(x1), float(y1), float(x1 + w), float(y1 + h)])
                    c = int(clusters_arr[j])
                    own = c >= 0 and rng.random() < 0.9
                    tag = cluster_tag[c] if own else TAGS[rng.integers(len(TAGS))]
                    tags.append(str(tag))
                    scores.append(round(float(rng.uniform(0.3, 1.0)), 2))
                    raw_tags.append(f"{tag}|{TAGS[(TAGS.index(str(tag)) + 1) % len(TAGS)]}")
                out.add_image(username, batch_folder, image_name, vectors, bboxes, tags, scores,
                              raw_tags, clusters_arr)  # fmt: skip
                if img_root is not None:
                    image_path = str(img_root / username / f"{image_name}.jpg")
                    user_images.append((image_path, bboxes, clusters_arr.tolist()))
            if drawer is not None:
                drawer.submit(user_images)
            out.end_user()
        if drawer is not None:
            drawer.finish()
    finally:
        if drawer is not None:
            drawer.cancel()
    truth_path = out.close()
    del matrix, out
    return DemoDataset(
        root=root,
        objects_csv=csv_path,
        embeddings_root=emb_root,
        embeddings_matrix=matrix_path,
        images_root=img_root,
        truth=truth_path,
        n_objects=n_objects,
        dim=dim,
    )

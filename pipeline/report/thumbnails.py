"""Thumbnails: crops of the objects' boxes from their source images.

Drawn only for the members the overview pages show (the index strips, the gallery tiles,
the nearest clusters' strips) whose source image is large: a local source of at most
:data:`SOURCE_CROP_MAX_BYTES` (its file size, from the folder listing: nothing is decoded
to decide) is shown by the page itself, scaled and clipped to the box, like every other
member card (see :func:`source_urls`). The thumbnails left are drawn in worker processes
(:data:`PROCESS_MIN_IMAGES`), a chunk of source images per task, one decode per source
image, while the report's main process goes on; a thumbnail whose source, box and size are
unchanged is reused from the previous report instead of being redrawn.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import math
import multiprocessing
import os
import shutil
import stat
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import schema, store
from ..config import InputConfig

log = logging.getLogger("pipeline")

#: Fields an ``input.image_template`` may use (a row of the objects table).
IMAGE_TEMPLATE_FIELDS = ("batch_folder", "username", "res_name", "image_name", "idx", "tag")
THUMB_VERSION = "2"  # bump when the crop rule changes, so old thumbnails are not reused
#: A local source image of at most this many bytes is not thumbnailed: the page shows the
#: source itself, scaled and clipped to the box (lazily loaded, as a thumbnail is). 32 KiB
#: is a JPEG of some 300-400 px a side (the demo's 320 px sources are 5-20 KB), a few
#: times a 96 px thumbnail's bytes; a photo of several megapixels (100 KB to 10 MB) still
#: gets a thumbnail, so the overview pages stay light on real data.
SOURCE_CROP_MAX_BYTES = 32 * 1024
#: Fewer source images to decode than this are drawn in threads of the calling process;
#: more go to worker processes (one per core), which decode in parallel without the GIL
#: and cost a fork each.
PROCESS_MIN_IMAGES = 200
#: Source images per worker-process task, at most (a task's pickling and scheduling are
#: amortised over many decodes; at least 4 tasks per worker keep the workers even).
PROCESS_CHUNK = 256


def crop_box(bbox: str, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The whole-pixel box of ``bbox`` (see :func:`pipeline.schema.parse_bbox`) in an image.

    Edges go outwards to whole pixels and are clipped to the image; ``None`` when the
    text is not a box or nothing of it lies inside.

    >>> crop_box("[10.2, 5.7, 30.5, 20.0]", 100, 100)
    (10, 5, 31, 20)
    >>> crop_box("[90, 90, 130, 130]", 100, 100)
    (90, 90, 100, 100)
    >>> crop_box("[120, 0, 130, 10]", 100, 100) is None
    True
    """
    box = schema.parse_bbox(bbox) if isinstance(bbox, str) else None
    if box is None:
        return None
    x1, y1, x2, y2 = box
    left, top = max(0, math.floor(min(x1, x2))), max(0, math.floor(min(y1, y2)))
    right, bottom = min(width, math.ceil(max(x1, x2))), min(height, math.ceil(max(y1, y2)))
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


def thumbnail_size(box: tuple[int, int, int, int], px: int) -> tuple[int, int]:
    """Width and height of a box scaled so its longer side is ``px``.

    >>> thumbnail_size((0, 0, 40, 20), 96)
    (96, 48)
    """
    w, h = box[2] - box[0], box[3] - box[1]
    scale = px / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def crop_thumbnail(image, box: tuple[int, int, int, int], size: tuple[int, int]):
    """The ``box`` region of a PIL ``image``, resized (bicubic) to ``size``."""
    from PIL import Image

    crop = image.crop(box)
    if crop.mode != "RGB":
        crop = crop.convert("RGB")
    return crop.resize(size, Image.Resampling.BICUBIC)


def _decode_reduced(image, boxes: list[tuple[int, int, int, int]], px: int) -> float:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when every box still gets ``px`` pixels
    on its longer side (a large photo then decodes several times faster). Returns the
    scale the image now has."""
    if not boxes or image.format != "JPEG":
        return 1.0
    need = max(px / max(b[2] - b[0], b[3] - b[1]) for b in boxes)
    if need > 0.5:
        return 1.0
    width, height = image.size
    image.draft("RGB", (math.ceil(width * need), math.ceil(height * need)))
    return image.size[0] / width


@dataclass(frozen=True)
class Thumb:
    """A thumbnail file under ``thumbs/`` and its pixel size."""

    name: str
    width: int
    height: int


@dataclass
class ThumbStats:
    made: int = 0
    reused: int = 0
    missing_images: int = 0
    bad_boxes: int = 0
    unreadable: int = 0
    outside_root: int = 0
    first_missing: str = ""


def image_path(cfg: InputConfig, row: dict) -> str:
    """The source image of an object: ``{images_root}/{image_template}`` with its fields."""
    assert cfg.images_root is not None
    relative = cfg.image_template.format(**{k: row[k] for k in IMAGE_TEMPLATE_FIELDS if k in row})
    return store.join(cfg.images_root, relative)


def _open_source(source: str):
    """A source image's identity stamp (path, size, mtime) and an open binary handle."""
    if "://" not in source:  # plain local path: skip fsspec, this runs once per image
        st = os.stat(source)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the decoder for ever
            raise OSError(f"{source} is not a regular file")
        return f"{source}|{st.st_size}|{st.st_mtime_ns}", open(source, "rb")  # noqa: SIM115
    fs, path = store.filesystem(source)
    info = fs.info(path)
    stamp = f"{source}|{info.get('size')}|{info.get('mtime') or info.get('LastModified')}"
    return stamp, fs.open(path, "rb")


def _thumbs_of_images(
    jobs: list[tuple[str, list[tuple[int, str]]]],
    px: int,
    out_dir: Path,
    reuse_dir: Path | None,
) -> tuple[dict[int, Thumb], ThumbStats]:
    """Make the thumbnails of a batch of source images (one pool task).

    Each image is decoded at most once, and not at all when every thumbnail it feeds can
    be reused (its name hashes the source's stamp, the box and the size).
    """
    from PIL import Image, UnidentifiedImageError

    thumbs: dict[int, Thumb] = {}
    stats = ThumbStats()
    for source, items in jobs:
        try:
            stamp, handle = _open_source(source)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
            stats.missing_images += len(items)
            stats.first_missing = stats.first_missing or source
            continue
        except OSError:  # not a regular file
            stats.unreadable += len(items)
            stats.first_missing = stats.first_missing or source
            continue
        done: dict[int, Thumb] = {}
        try:
            with handle, Image.open(handle) as image:
                boxes = [(object_id, crop_box(bbox, *image.size)) for object_id, bbox in items]
                stats.bad_boxes += sum(box is None for _, box in boxes)
                todo = []
                for object_id, box in boxes:
                    if box is None:
                        continue
                    key = hashlib.md5(f"{stamp}|{box}|{px}|{THUMB_VERSION}".encode()).hexdigest()
                    name = f"{object_id}-{key[:10]}.jpg"
                    done[object_id] = Thumb(name, *thumbnail_size(box, px))
                    if reuse_dir is not None and _reuse(reuse_dir / name, out_dir / name):
                        stats.reused += 1
                    else:
                        todo.append((box, done[object_id]))
                scale = _decode_reduced(image, [box for box, _ in todo], px)
                for box, thumb in todo:
                    if scale != 1.0:
                        box = (math.floor(box[0] * scale), math.floor(box[1] * scale),
                               math.ceil(box[2] * scale), math.ceil(box[3] * scale))  # fmt: skip
                    crop = crop_thumbnail(image, box, (thumb.width, thumb.height))
                    crop.save(out_dir / thumb.name, "JPEG", quality=88, subsampling=0)
                    stats.made += 1
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise  # writing the thumbnail failed: a full disk, not a bad image
            stats.unreadable += len(items)
            stats.first_missing = stats.first_missing or source
            continue
        thumbs.update(done)
    return thumbs, stats


def _reuse(old: Path, new: Path) -> bool:
    """Hard-link (or copy) a thumbnail of the previous report; False if it has none."""
    try:
        os.link(old, new)
    except FileNotFoundError:
        return False
    except OSError:
        try:
            shutil.copyfile(old, new)
        except OSError:
            return False
    return True


def _process_context():
    """The start method of the drawing processes: ``fork`` where there is one (a worker
    starts in milliseconds and imports nothing; it only decodes, crops and writes files),
    else the platform's default."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


@dataclass
class ThumbnailJob:
    """Thumbnails being drawn (see :func:`start_thumbnails`); :meth:`result` waits."""

    futures: list[Future] = field(default_factory=list)
    stats: ThumbStats = field(default_factory=ThumbStats)
    n_samples: int = 0
    pool: Executor | None = None
    processes: bool = False

    def result(self) -> tuple[dict[int, Thumb], ThumbStats]:
        """Every thumbnail drawn or reused, by object id, and the counts (logged)."""
        thumbs: dict[int, Thumb] = {}
        stats = self.stats
        try:
            for future in self.futures:
                part, part_stats = future.result()
                thumbs.update(part)
                stats.made += part_stats.made
                stats.reused += part_stats.reused
                stats.missing_images += part_stats.missing_images
                stats.bad_boxes += part_stats.bad_boxes
                stats.unreadable += part_stats.unreadable
                stats.first_missing = stats.first_missing or part_stats.first_missing
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None
        self.futures = []
        lost = stats.missing_images + stats.unreadable + stats.bad_boxes + stats.outside_root
        if lost and self.n_samples:
            log.warning(
                "report: %d of %d samples have no crop (%d missing images, %d unreadable, %d "
                "boxes outside their image, %d paths outside input.images_root; first: %s); "
                "they are shown as metadata cards.",
                lost, self.n_samples, stats.missing_images, stats.unreadable, stats.bad_boxes,
                stats.outside_root, stats.first_missing or "-",
            )  # fmt: skip
        return thumbs, stats


def start_thumbnails(
    samples: pd.DataFrame,
    cfg: InputConfig,
    px: int,
    out_dir: Path,
    reuse_dir: Path | None = None,
    n_workers: int = 1,
) -> ThumbnailJob:
    """Start cropping each sample's ``bbox`` from its source image into ``out_dir``.

    The source images are grouped (one decode each) into tasks for ``n_workers`` worker
    processes (threads below :data:`PROCESS_MIN_IMAGES` images); this returns at once, and
    the job's :meth:`ThumbnailJob.result` waits for them. Samples whose image is missing or
    unreadable, or whose box lies outside it, get no thumbnail (their card shows the
    metadata).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    job = ThumbnailJob()
    if cfg.images_root is None or samples.empty:
        return job
    fs, root = store.filesystem(cfg.images_root)
    if not fs.isdir(root):
        log.warning(
            "report: input.images_root %s does not exist; samples are shown as metadata cards. "
            "Point it at the images (or make them: pipeline make-demo --images).",
            cfg.images_root,
        )
        job.stats.missing_images = len(samples)
        return job
    unique = samples.drop_duplicates(schema.OBJECT_ID)
    job.n_samples = len(unique)
    by_image: dict[str, list[tuple[int, str]]] = {}
    real_root = os.path.realpath(root) if store.is_local(cfg.images_root) else None
    try:
        for row in unique.to_dict("records"):
            source = image_path(cfg, row)
            if real_root is not None and not store.resolves_inside(source, real_root):
                job.stats.outside_root += 1  # a name with '..' or a link out: never opened
                continue
            by_image.setdefault(source, []).append((int(row[schema.OBJECT_ID]), row["bbox"]))
    except (KeyError, IndexError, ValueError) as exc:
        log.warning(
            "report: input.image_template %r cannot be filled from an object's fields %s (%s); "
            "samples are shown as metadata cards.",
            cfg.image_template, list(IMAGE_TEMPLATE_FIELDS), exc,
        )  # fmt: skip
        return ThumbnailJob()
    jobs = list(by_image.items())
    n_workers = max(1, n_workers)
    job.processes = n_workers > 1 and len(jobs) >= PROCESS_MIN_IMAGES
    if job.processes:
        batch = max(16, min(PROCESS_CHUNK, math.ceil(len(jobs) / (4 * n_workers))))
        job.pool = ProcessPoolExecutor(n_workers, mp_context=_process_context())
    else:
        batch = max(1, min(64, len(jobs) // (4 * n_workers) or 1))
        job.pool = ThreadPoolExecutor(max_workers=n_workers)
    draw = functools.partial(_thumbs_of_images, px=px, out_dir=out_dir, reuse_dir=reuse_dir)
    try:
        job.futures = [
            job.pool.submit(draw, jobs[i : i + batch]) for i in range(0, len(jobs), batch)
        ]
    except BaseException:
        job.pool.shutdown(wait=True, cancel_futures=True)
        raise
    return job


def make_thumbnails(
    samples: pd.DataFrame,
    cfg: InputConfig,
    px: int,
    out_dir: Path,
    reuse_dir: Path | None = None,
    n_workers: int = 1,
) -> tuple[dict[int, Thumb], ThumbStats]:
    """Crop each sample's ``bbox`` from its source image into ``out_dir`` (in parallel):
    :func:`start_thumbnails`, waited for.

    Returns the thumbnail of every object that got one; samples whose image is missing or
    unreadable, or whose box lies outside it, get none (their card shows the metadata).
    """
    return start_thumbnails(samples, cfg, px, out_dir, reuse_dir, n_workers).result()


def source_urls(rows: pd.DataFrame, cfg: InputConfig, page_dir: str, sized=None) -> dict[int, str]:
    """The source image of each object in ``rows``, as a URL relative to ``page_dir``, for
    the members shown without a thumbnail (the page crops it to the box).

    Only for a local ``images_root``: each image is checked once (a regular file that
    resolves inside the root, as for thumbnails), from one ``scandir`` per folder (a
    ``stat`` only for a link), never decoded here. See :func:`source_files` for the sizes.
    """
    return source_files(rows, cfg, page_dir, sized)[0]


def source_files(
    rows: pd.DataFrame, cfg: InputConfig, page_dir: str, sized=None, listings=None
) -> tuple[dict[int, str], dict[int, int]]:
    """:func:`source_urls`, and the file size in bytes of the source image of each object
    id in ``sized`` that has one (one ``stat`` per such image, nothing read).

    ``listings``: the folders listed so far (a dict this fills), to share between calls."""
    from urllib.parse import quote

    if cfg.images_root is None or rows.empty or not store.is_local(cfg.images_root):
        return {}, {}
    _, root = store.filesystem(cfg.images_root)
    if not os.path.isdir(root):
        return {}, {}
    real_root = os.path.realpath(root)
    fields = [f for f in IMAGE_TEMPLATE_FIELDS if f in rows.columns]
    try:
        relatives = [
            cfg.image_template.format(**dict(zip(fields, values, strict=True)))
            for values in zip(*(rows[f].tolist() for f in fields), strict=True)
        ]
    except (KeyError, IndexError, ValueError):
        return {}, {}  # a template the fields cannot fill: make_thumbnails has warned
    sized = sized or ()
    base = Path(os.path.relpath(root, page_dir)).as_posix()
    listings: dict[str, dict[str, os.DirEntry | None] | None] = {} if listings is None else listings
    checked: dict[str, tuple[str, os.DirEntry | str] | None] = {}
    out: dict[int, str] = {}
    sizes: dict[int, int] = {}
    for object_id, relative in zip(rows[schema.OBJECT_ID].tolist(), relatives, strict=True):
        found = checked.get(relative, False)
        if found is False:
            source = os.path.abspath(store.join(root, relative))
            folder, name = os.path.split(source)
            if folder not in listings:
                listings[folder] = _folder_listing(folder, real_root)
            listing = listings[folder]
            found = None
            entry = None if listing is None else listing.get(name, False)
            if entry is None:  # a link: only when it resolves inside the root
                try:
                    real = os.path.realpath(source)
                    if store._inside(real, real_root) and stat.S_ISREG(os.stat(real).st_mode):
                        found = (quote(f"{base}/{relative}"), real)
                except (OSError, ValueError):  # ValueError: a NUL in a name
                    pass
            elif entry is not False:
                found = (quote(f"{base}/{relative}"), entry)
            checked[relative] = found
        if found is not None:
            out[int(object_id)] = found[0]
            if object_id in sized:
                try:
                    file = found[1]
                    if isinstance(file, os.DirEntry):
                        sizes[int(object_id)] = file.stat(follow_symlinks=False).st_size
                    else:
                        sizes[int(object_id)] = os.stat(file).st_size
                except OSError:
                    pass
    return out, sizes


def _folder_listing(folder: str, real_root: str) -> dict[str, os.DirEntry | None] | None:
    """The regular files (their ``DirEntry``) and links (``None``) of a folder that
    resolves inside ``real_root``, by name, from one ``scandir`` (no ``stat`` per file);
    ``None`` for a folder outside the root or that cannot be listed."""
    try:
        if not store._inside(store._real_folder(folder), real_root):
            return None
        out: dict[str, os.DirEntry | None] = {}
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_symlink():
                    out[entry.name] = None
                elif entry.is_file(follow_symlinks=False):
                    out[entry.name] = entry
        return out
    except (OSError, ValueError):
        return None

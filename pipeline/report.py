"""Render the review report: an HTML folder that opens from ``file://`` with no server.

Every number on it comes from the tables the pipeline wrote (``cluster_summary.parquet``,
``funnel.parquet``, ``postprocessed.parquet``) through :mod:`pipeline.summarize`, so the
report, ``summary.md`` and the Parquet files agree. Plots are inline SVG drawn here; the
only script sorts and filters the cluster index. Layout::

    report/
      index.html               funnel, top/tail tables, comparison, plots, groups, cluster index
      clusters/<cluster>.html  sizes after each step, dominant tags, top/tail samples
      thumbs/<object>-<key>.jpg  crops of the samples shown (when input.images_root is set)
      report.css, report.js

Thumbnails are made only for the samples shown (top and tail ``samples_per_cluster`` of
each cluster), in a thread pool, one decode per source image. A thumbnail whose source,
box and size are unchanged is reused from the previous report instead of being redrawn.
"""

from __future__ import annotations

import errno
import hashlib
import html
import logging
import math
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from . import groups as groups_module
from . import schema, sinks, store, summarize
from .catalog import Catalog
from .config import InputConfig, PostprocessConfig, ReportConfig
from .context import StageContext
from .errors import PipelineError

log = logging.getLogger("pipeline")

#: Columns of ``postprocessed.parquet`` the report reads.
SAMPLE_COLUMNS: tuple[str, ...] = (
    schema.OBJECT_ID, "cluster", "sim", "dist", schema.STATUS, "tag", "score",
    "batch_folder", "username", "res_name", "image_name", "idx", "bbox",
)  # fmt: skip
#: Edges of the similarity histograms: 0.02 wide over the whole cosine range.
SIM_BIN_EDGES = np.linspace(-1.0, 1.0, 101)
#: Fields an ``input.image_template`` may use (a row of the objects table).
IMAGE_TEMPLATE_FIELDS = ("batch_folder", "username", "res_name", "image_name", "idx", "tag")
THUMB_VERSION = "2"  # bump when the crop rule changes, so old thumbnails are not reused

STATUS_LABELS = {
    schema.STATUS_KEPT: "kept",
    schema.STATUS_DUPLICATE: "duplicate image",
    schema.STATUS_LOW_SIMILARITY: "low similarity",
    schema.STATUS_SMALL_CLUSTER: "small cluster",
}

#: Column-sized names of the removing steps, as the cluster index shows them.
SHORT_LABELS = {
    schema.STATUS_DUPLICATE: "dup",
    schema.STATUS_LOW_SIMILARITY: "sim",
    schema.STATUS_SMALL_CLUSTER: "size",
}


# --------------------------------------------------------------------------- data (pure)


def candidate_samples(labelled: pd.DataFrame, n: int) -> pd.DataFrame:
    """Rows that may be among the top or tail ``n`` of their cluster by ``sim``.

    Applied to each part of ``postprocessed.parquet`` on its own: the top ``n`` of a
    cluster over all parts is among the union of each part's top ``n`` (same for the tail),
    so the report never holds the whole table.
    """
    ordered = labelled.sort_values(
        ["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True], kind="stable"
    )
    by_cluster = ordered.groupby("cluster", sort=False)
    rank = by_cluster.cumcount().to_numpy()
    size = by_cluster["cluster"].transform("size").to_numpy()
    return ordered[(rank < n) | (rank >= size - n)]


def select_samples(candidates: pd.DataFrame, n: int) -> pd.DataFrame:
    """The top and tail ``n`` members of every cluster by cosine similarity.

    The rule of :func:`summarize.cluster_samples` (descending ``sim``, ties by ascending
    ``object_id``; the tail least similar first), vectorised over all clusters at once.
    Returns the rows with ``which`` (``"top"`` or ``"tail"``) and ``rank`` (1 = the most,
    or in the tail the least, similar member).

    >>> t = pd.DataFrame({"object_id": [0, 1, 2], "cluster": [5, 5, 5], "sim": [.5, .9, .7]})
    >>> select_samples(t, 2)[["which", "rank", "object_id"]].values.tolist()
    [['top', 1, 1], ['top', 2, 2], ['tail', 1, 0], ['tail', 2, 2]]
    """
    ordered = candidates.sort_values(
        ["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True], kind="stable"
    )
    by_cluster = ordered.groupby("cluster", sort=False)
    rank = by_cluster.cumcount().to_numpy()
    size = by_cluster["cluster"].transform("size").to_numpy()
    is_top, is_tail = rank < n, rank >= size - n
    top = ordered[is_top].assign(which="top", rank=rank[is_top] + 1)
    tail = ordered[is_tail].assign(which="tail", rank=(size - rank)[is_tail])
    tail = tail.sort_values(["cluster", "rank"], kind="stable")
    return pd.concat([top, tail], ignore_index=True)


def similarity_counts(labelled: pd.DataFrame) -> dict[str, np.ndarray]:
    """Histogram counts over :data:`SIM_BIN_EDGES`: all rows, and the rows kept."""
    sim = np.clip(labelled["sim"].to_numpy(dtype=np.float64), -1.0, 1.0)  # float32 may pass 1
    kept = (labelled[schema.STATUS] == schema.STATUS_KEPT).to_numpy()
    return {
        "all": np.histogram(sim, SIM_BIN_EDGES)[0],
        "kept": np.histogram(sim[kept], SIM_BIN_EDGES)[0],
    }


def size_histogram(sizes: pd.Series) -> tuple[list[str], np.ndarray]:
    """Counts of non-empty cluster sizes in powers-of-two bins, with labels.

    >>> size_histogram(pd.Series([0, 1, 2, 3, 9]))
    (['1', '2–3', '4–7', '8–15'], array([1, 2, 0, 1]))
    """
    live = sizes[sizes > 0].to_numpy()
    top = int(live.max()) if len(live) else 1
    n_bins = int(math.floor(math.log2(top))) + 1
    edges = 2 ** np.arange(n_bins + 1)
    counts = np.histogram(live, edges)[0]
    pairs = zip(edges[:-1], edges[1:], strict=True)
    labels = [f"{lo}" if hi - lo == 1 else f"{lo}–{hi - 1}" for lo, hi in pairs]
    return labels, counts


@dataclass(frozen=True)
class ClusterState:
    """How post-processing left a cluster: ``whole``, ``shrunk``, ``removed`` or ``empty``."""

    state: str
    removed_by: dict[str, int]

    @property
    def explanation(self) -> str:
        parts = [f"{n:,} {STATUS_LABELS[s]} ({s})" for s, n in self.removed_by.items() if n]
        return "; ".join(parts)

    @property
    def short(self) -> str:
        """E.g. ``"dup 3 · sim 40"``: the rows each step removed (see :data:`SHORT_LABELS`)."""
        return " · ".join(f"{SHORT_LABELS[s]} {n:,}" for s, n in self.removed_by.items() if n)


def cluster_state(row: pd.Series | dict) -> ClusterState:
    """Classify one ``cluster_summary`` row and count the members each step removed.

    >>> state = cluster_state({"size": 12, "size_after_dedupe": 10,
    ...                        "size_after_similarity": 4, "size_final": 0})
    >>> state.state, state.short
    ('removed', 'dup 2 · sim 6 · size 4')
    """
    size, dedupe = int(row["size"]), int(row["size_after_dedupe"])
    similar, final = int(row["size_after_similarity"]), int(row["size_final"])
    removed_by = {
        schema.STATUS_DUPLICATE: size - dedupe,
        schema.STATUS_LOW_SIMILARITY: dedupe - similar,
        schema.STATUS_SMALL_CLUSTER: similar - final,
    }
    if size == 0:
        state = "empty"
    elif final == 0:
        state = "removed"
    elif final < size:
        state = "shrunk"
    else:
        state = "whole"
    return ClusterState(state, removed_by)


# --------------------------------------------------------------------------- thumbnails


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


def make_thumbnails(
    samples: pd.DataFrame,
    cfg: InputConfig,
    px: int,
    out_dir: Path,
    reuse_dir: Path | None = None,
    n_workers: int = 1,
) -> tuple[dict[int, Thumb], ThumbStats]:
    """Crop each sample's ``bbox`` from its source image into ``out_dir`` (in parallel).

    Returns the thumbnail of every object that got one; samples whose image is missing or
    unreadable, or whose box lies outside it, get none (their card shows the metadata).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = ThumbStats()
    if cfg.images_root is None or samples.empty:
        return {}, stats
    fs, root = store.filesystem(cfg.images_root)
    if not fs.isdir(root):
        log.warning(
            "report: input.images_root %s does not exist; samples are shown as metadata cards. "
            "Point it at the images (or make them: pipeline make-demo --images).",
            cfg.images_root,
        )
        stats.missing_images = len(samples)
        return {}, stats
    unique = samples.drop_duplicates(schema.OBJECT_ID)
    by_image: dict[str, list[tuple[int, str]]] = {}
    real_root = os.path.realpath(root) if store.is_local(cfg.images_root) else None
    try:
        for row in unique.to_dict("records"):
            source = image_path(cfg, row)
            if real_root is not None and not store.resolves_inside(source, real_root):
                stats.outside_root += 1  # a name with '..' or a link out: never opened
                continue
            by_image.setdefault(source, []).append((int(row[schema.OBJECT_ID]), row["bbox"]))
    except (KeyError, IndexError, ValueError) as exc:
        log.warning(
            "report: input.image_template %r cannot be filled from an object's fields %s (%s); "
            "samples are shown as metadata cards.",
            cfg.image_template, list(IMAGE_TEMPLATE_FIELDS), exc,
        )  # fmt: skip
        return {}, stats
    jobs = list(by_image.items())
    batch = max(1, min(64, len(jobs) // (4 * n_workers) or 1))
    batches = [jobs[i : i + batch] for i in range(0, len(jobs), batch)]
    thumbs: dict[int, Thumb] = {}
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        for part, part_stats in pool.map(
            lambda b: _thumbs_of_images(b, px, out_dir, reuse_dir), batches
        ):
            thumbs.update(part)
            stats.made += part_stats.made
            stats.reused += part_stats.reused
            stats.missing_images += part_stats.missing_images
            stats.bad_boxes += part_stats.bad_boxes
            stats.unreadable += part_stats.unreadable
            stats.first_missing = stats.first_missing or part_stats.first_missing
    lost = stats.missing_images + stats.unreadable + stats.bad_boxes + stats.outside_root
    if lost:
        log.warning(
            "report: %d of %d samples have no crop (%d missing images, %d unreadable, %d boxes "
            "outside their image, %d paths outside input.images_root; first: %s); they are "
            "shown as metadata cards.",
            lost, len(unique), stats.missing_images, stats.unreadable, stats.bad_boxes,
            stats.outside_root, stats.first_missing or "-",
        )  # fmt: skip
    return thumbs, stats


# --------------------------------------------------------------------------- HTML pieces


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _is_missing(value: object) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def fmt_int(value: object) -> str:
    return "" if _is_missing(value) else f"{int(value):,}"


def fmt_float(value: object, digits: int = 3) -> str:
    return "–" if _is_missing(value) else f"{float(value):.{digits}f}"


def raw(value: object) -> str:
    """The exact value behind a cell, for sorting and for tests (``data-value``)."""
    if _is_missing(value):
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def cluster_link(cluster: object, prefix: str = "") -> str:
    if _is_missing(cluster):
        return ""
    return f'<a href="{prefix}clusters/{int(cluster)}.html">{int(cluster)}</a>'


def html_table(
    frame: pd.DataFrame,
    headers: dict[str, str],
    table_id: str,
    links: tuple[str, ...] = (),
    prefix: str = "",
) -> str:
    """A small frame as an HTML table; cells carry their exact value in ``data-value``."""
    numeric = {c for c in headers if pd.api.types.is_numeric_dtype(frame[c])}
    align = {c: ' class="num"' if c in numeric else "" for c in headers}
    head = "".join(f'<th{align[c]} data-col="{esc(c)}">{esc(h)}</th>' for c, h in headers.items())
    rows = []
    for record in frame[list(headers)].to_dict("records"):
        cells = []
        for col, value in record.items():
            if col in links:
                shown = cluster_link(value, prefix)
            elif isinstance(value, (float, np.floating)) and not float(value).is_integer():
                shown = fmt_float(value)
            elif isinstance(value, str):
                shown = esc(value)
            else:
                shown = fmt_int(value)
            kind = "" if isinstance(value, str) else ' class="num"'
            cells.append(
                f'<td{kind} data-col="{esc(col)}" data-value="{esc(raw(value))}">{shown}</td>'
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table id="{esc(table_id)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def nice_ticks(top: float, n: int = 4) -> list[float]:
    """Axis ticks from 0 to at least ``top`` in about ``n`` round steps (1, 2 or 5 x 10^k).

    >>> nice_ticks(250)
    [0, 100, 200, 300]
    >>> nice_ticks(3)
    [0, 1, 2, 3]
    """
    if top <= 0:
        return [0, 1]
    raw = top / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    step = max(step, 1) if top >= 1 else step
    count = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) if step < 1 else int(i * step) for i in range(count + 1)]


def svg_bars(
    labels: list[str],
    series: list[tuple[str, np.ndarray, str]],
    title: str,
    x_label: str,
    y_label: str,
    overlay: bool = False,
    marker: tuple[float, str] | None = None,
    width: int = 760,
    height: int = 280,
) -> str:
    """A bar chart as inline SVG: grouped (or overlaid) bars, axes, ticks, legend.

    ``series`` is ``(name, values, colour)``; ``marker`` is ``(x in bar units, label)``
    for a dashed vertical line (the similarity threshold). Each bar has a tooltip.
    """
    left, right, top, bottom = 64, 16, 34, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(1, len(labels))
    ticks = nice_ticks(max((float(np.max(v)) for _, v, _ in series if len(v)), default=1.0))
    y_max = ticks[-1]
    slot = plot_w / n
    out = [
        f'<svg class="chart" role="img" aria-label="{esc(title)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left}" y="18" class="chart-title">{esc(title)}</text>',
    ]
    for value in ticks:
        y = top + plot_h - plot_h * value / y_max
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
        )
        label = f"{value:,}" if isinstance(value, int) else f"{value:g}"
        out.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{label}</text>'
        )
    inner = 0.86 * slot
    bar_w = inner if overlay else inner / max(1, len(series))
    for s, (name, values, colour) in enumerate(series):
        for i, value in enumerate(values):
            if value <= 0:
                continue
            h = plot_h * float(value) / y_max
            x = left + i * slot + 0.07 * slot + (0 if overlay else s * bar_w)
            opacity = ' fill-opacity="0.85"' if overlay and s else ""
            out.append(
                f'<rect x="{x:.2f}" y="{top + plot_h - h:.2f}" width="{max(bar_w, 0.6):.2f}" '
                f'height="{h:.2f}" fill="{colour}"{opacity}><title>{esc(labels[i])}: '
                f"{int(value):,} ({esc(name)})</title></rect>"
            )
    longest = max((len(label) for label in labels), default=1)
    step = max(1, math.ceil(n / 14), math.ceil(longest * 6.5 / slot))
    for i in range(0, n, step):
        x = left + (i + 0.5) * slot
        out.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" class="tick" text-anchor="middle">'
            f"{esc(labels[i])}</text>"
        )
    out.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" '
        'class="axis"/>'
    )
    if marker is not None:
        x = left + marker[0] * slot
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" class="marker"/>'
        )
        out.append(
            f'<text x="{x + 4:.1f}" y="{top + 12}" class="tick marker-label">'
            f"{esc(marker[1])}</text>"
        )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" class="axis-label" '
        f'text-anchor="middle">{esc(x_label)}</text>'
    )
    out.append(
        f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" class="axis-label" '
        f'text-anchor="middle">{esc(y_label)}</text>'
    )
    lx = left + plot_w
    for name, _, colour in reversed(series):
        lx -= 12 + 7 * len(name) + 18
        out.append(f'<rect x="{lx}" y="8" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{lx + 16}" y="18" class="tick">{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_funnel(funnel_table: pd.DataFrame, width: int = 760) -> str:
    """Horizontal bars: rows left after each funnel step."""
    row_h, left, right = 26, 250, 90
    height = row_h * len(funnel_table) + 12
    top_rows = max(1, int(funnel_table["rows"].max()))
    out = [
        f'<svg class="chart" role="img" aria-label="Funnel" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, rec in enumerate(funnel_table.to_dict("records")):
        y = 6 + i * row_h
        w = (width - left - right) * int(rec["rows"]) / top_rows
        out.append(
            f'<text x="{left - 8}" y="{y + 16}" class="tick" text-anchor="end">'
            f"{esc(rec['step'])}</text>"
        )
        out.append(
            f'<rect x="{left}" y="{y + 3}" width="{max(w, 1):.1f}" height="{row_h - 8}" '
            'fill="#2563eb">'
            f"<title>{esc(rec['step'])}: {int(rec['rows']):,} rows</title></rect>"
        )
        out.append(
            f'<text x="{left + w + 6:.1f}" y="{y + 16}" class="tick">{int(rec["rows"]):,}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def page(title: str, body: str, prefix: str = "") -> str:
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><link rel="stylesheet" href="{prefix}report.css"></head>'
        f'<body>{body}<script src="{prefix}report.js"></script></body></html>\n'
    )


def picture(thumb: Thumb | None, row: dict, px: int, prefix: str) -> str:
    """A sample's crop, or a metadata card when it has none."""
    if thumb is not None:
        return (
            f'<img src="{prefix}thumbs/{esc(thumb.name)}" width="{thumb.width}" '
            f'height="{thumb.height}" alt="{esc(row["tag"])}, object {int(row[schema.OBJECT_ID])}">'
        )
    box = crop_box(row["bbox"], 10**9, 10**9)
    size = f"{box[2] - box[0]}×{box[3] - box[1]} px" if box else "no box"
    return (
        f'<div class="meta-card" title="no image: metadata only"><span class="meta-tag">'
        f"{esc(row['tag'])}</span><span>{esc(size)}</span><span>score "
        f"{fmt_float(row['score'], 2)}</span>"
        f'<span class="muted">no image</span></div>'
    )


def sample_card(row: dict, thumb: Thumb | None, px: int, prefix: str) -> str:
    status = str(row[schema.STATUS])
    kind = "kept" if status == schema.STATUS_KEPT else "removed"
    return (
        f'<figure class="card {kind}" data-object="{int(row[schema.OBJECT_ID])}">'
        f'<div class="pic">{picture(thumb, row, px, prefix)}</div><figcaption>'
        f"<div><b>sim {fmt_float(row['sim'])}</b> · dist {fmt_float(row['dist'])}</div>"
        f'<div class="status {kind}" title="{esc(status)}">'
        f"{esc(STATUS_LABELS.get(status, status))}</div>"
        f"<div>{esc(row['tag'])} · score {fmt_float(row['score'], 2)}</div>"
        f'<div class="muted" title="{esc(row["username"])}/{esc(row["image_name"])} idx '
        f'{esc(row["idx"])}">'
        f"{esc(row['username'])}<br>{esc(str(row['image_name'])[:12])}… #{esc(row['idx'])}</div>"
        f'<div class="muted">object {int(row[schema.OBJECT_ID])}</div>'
        "</figcaption></figure>"
    )


def badge(state: str) -> str:
    return f'<span class="badge {esc(state)}">{esc(state)}</span>'


# --------------------------------------------------------------------------- pages


@dataclass
class ReportInputs:
    """Everything the pages are rendered from (read once, then pure rendering)."""

    report: ReportConfig
    postprocess: PostprocessConfig
    summary: pd.DataFrame
    funnel: pd.DataFrame
    samples: pd.DataFrame
    sim_counts: dict[str, np.ndarray]
    thumbs: dict[int, Thumb] = field(default_factory=dict)
    groups: pd.DataFrame | None = None
    groups_source: str | None = None
    groups_error: str | None = None
    root: str = ""

    @cached_property
    def group_of(self) -> dict[int, str]:
        """The group of each grouped cluster."""
        if self.groups is None:
            return {}
        pairs = self.groups[["cluster", schema.GROUP]].drop_duplicates()
        return {int(c): str(g) for c, g in pairs.itertuples(index=False)}

    @cached_property
    def first_samples(self) -> dict[int, dict]:
        """The most similar member of each cluster (its preview)."""
        top = self.samples[(self.samples["which"] == "top") & (self.samples["rank"] == 1)]
        return {int(r["cluster"]): r for r in top.to_dict("records")}


def _header(inputs: ReportInputs) -> str:
    summary = inputs.summary
    pp = inputs.postprocess
    dedupe = f"one row per {pp.dedupe_key} per cluster, " if pp.dedupe_key else ""
    return (
        '<header><h1>Cluster review</h1><p class="sub">'
        f"{esc(inputs.root)} · {int(summary['size'].sum()):,} clustered objects in "
        f"{len(summary):,} clusters → {int(summary['size_final'].sum()):,} selected objects in "
        f"{int((summary['size_final'] > 0).sum()):,} clusters · post-processing: {esc(dedupe)}"
        f"cosine similarity &gt; {pp.min_similarity}, clusters of at least "
        f"{pp.min_cluster_size}</p>"
        '<nav><a href="#funnel">Funnel</a><a href="#sizes">Top and tail</a>'
        '<a href="#plots">Distributions</a><a href="#groups">Groups</a>'
        '<a href="#clusters">All clusters</a></nav></header>'
    )


def _funnel_section(funnel_table: pd.DataFrame) -> str:
    accounted = summarize.is_accounted(funnel_table)
    note = (
        "Every input row is accounted for: rows left + removed by each step = input rows."
        if accounted
        else "WARNING: the funnel does not add up to the input rows."
    )
    table = html_table(
        funnel_table,
        {"step": "Step", "rows": "Rows left", "clusters": "Clusters", "removed": "Removed by step"},
        "funnel-table",
    )
    return (
        '<section id="funnel"><h2>Funnel</h2><div class="split">'
        f"{table}{svg_funnel(funnel_table, 620)}</div>"
        f'<p class="muted">{esc(note)}</p></section>'
    )


TOP_TAIL_HEADERS = {
    "top_cluster": "Top clusters",
    "top_size": "Num samples",
    "tail_cluster": "Tail clusters",
    "tail_size": "Num samples",
}
COMPARISON_HEADERS = {
    "original_top_cluster": "Original top clusters",
    "original_size": "Original num samples",
    "original_after": "After post-processing",
    "new_top_cluster": "New top clusters",
    "new_original_size": "Original num samples",
    "new_after": "After post-processing",
}


def _sizes_section(summary: pd.DataFrame, n: int) -> str:
    before = html_table(
        summarize.top_tail(summary, "size", n), TOP_TAIL_HEADERS, "top-tail-before",
        links=("top_cluster", "tail_cluster"),
    )  # fmt: skip
    after = html_table(
        summarize.top_tail(summary, "size_final", n), TOP_TAIL_HEADERS, "top-tail-after",
        links=("top_cluster", "tail_cluster"),
    )  # fmt: skip
    comparison = html_table(
        summarize.top_comparison(summary, n), COMPARISON_HEADERS, "top-comparison",
        links=("original_top_cluster", "new_top_cluster"),
    )  # fmt: skip
    return (
        f'<section id="sizes"><h2>Top {n} and tail {n} clusters by size</h2><div class="split">'
        f"<div><h3>Before post-processing</h3>{before}</div>"
        f"<div><h3>After post-processing</h3>{after}</div></div>"
        f"<h3>Original top clusters and new top clusters</h3>{comparison}</section>"
    )


def _plots_section(inputs: ReportInputs) -> str:
    summary = inputs.summary
    labels, before = size_histogram(summary["size"])
    _, after = size_histogram(summary["size_final"].where(summary["size_final"] > 0, 0))
    after = np.pad(after, (0, len(before) - len(after)))[: len(before)]
    sizes = svg_bars(
        labels,
        [("before", before, "#9aa5b1"), ("after", after, "#2563eb")],
        "Cluster sizes before and after post-processing",
        "members per cluster (log₂ bins)",
        "clusters",
    )
    counts_all, counts_kept = inputs.sim_counts["all"], inputs.sim_counts["kept"]
    nonzero = np.flatnonzero(counts_all)
    lo, hi = (nonzero[0], nonzero[-1] + 1) if len(nonzero) else (0, len(counts_all))
    threshold = inputs.postprocess.min_similarity
    t_bin = int(np.clip(np.searchsorted(SIM_BIN_EDGES, threshold), lo, hi))
    lo = min(lo, t_bin)
    hi = max(hi, t_bin)
    edges = SIM_BIN_EDGES[lo : hi + 1]
    bin_w = SIM_BIN_EDGES[1] - SIM_BIN_EDGES[0]
    sims = svg_bars(
        [f"{e:.2f}" for e in edges[:-1]],
        [("all objects", counts_all[lo:hi], "#9aa5b1"), ("kept", counts_kept[lo:hi], "#2563eb")],
        "Cosine similarity to the cluster centre",
        "cosine similarity (bin start)",
        "objects",
        overlay=True,
        marker=((threshold - edges[0]) / bin_w, f"threshold {threshold}"),
    )
    return (
        f'<section id="plots"><h2>Distributions</h2><div class="split">{sizes}{sims}</div>'
        "</section>"
    )


def _preview(inputs: ReportInputs, cluster: int, prefix: str, px: int) -> str:
    row = inputs.first_samples.get(cluster)
    if row is None:
        return ""
    thumb = inputs.thumbs.get(int(row[schema.OBJECT_ID]))
    if thumb is None:
        return f'<span class="chip">{esc(row["tag"])}</span>'
    scale = min(1.0, 48 / max(thumb.width, thumb.height))
    return (
        f'<img src="{prefix}thumbs/{esc(thumb.name)}" width="{round(thumb.width * scale)}" '
        f'height="{round(thumb.height * scale)}" alt="cluster {cluster}">'
    )


def _groups_section(inputs: ReportInputs, firsts: dict[int, str]) -> str:
    if inputs.groups_source is None:
        return (
            '<section id="groups"><h2>Groups</h2><p class="muted">No groups file. Pick clusters '
            "below, list them in a YAML file (<code>groups: [{name: shoes, clusters: [3, "
            "17]}]</code>), "
            "set <code>report.groups_file</code> and run <code>pipeline groups</code>.</p>"
            "</section>"
        )
    if inputs.groups_error is not None:
        return (
            f'<section id="groups"><h2>Groups</h2><p class="error">The groups file '
            f"{esc(inputs.groups_source)} is not valid: {esc(inputs.groups_error)}</p></section>"
        )
    assert inputs.groups is not None
    rows = []
    for name, members in inputs.groups.groupby(schema.GROUP, sort=False):
        clusters = sorted(members["cluster"].unique().tolist())
        chips = " ".join(
            f'<a class="chip" href="clusters/{c}.html">{firsts.get(c, "")}<span>{c}</span></a>'
            for c in clusters
        )
        rows.append(
            f'<tr data-group="{esc(name)}"><td>{esc(name)}</td><td class="num" '
            f'data-value="{len(members)}">'
            f'{len(members):,}</td><td class="num">{len(clusters)}</td><td>{chips}</td></tr>'
        )
    return (
        f'<section id="groups"><h2>Groups</h2><p class="muted">From {esc(inputs.groups_source)}; '
        f"<code>pipeline groups</code> writes them to <code>ins_posts_groups.csv</code>.</p>"
        '<table id="groups-table"><thead><tr><th>Group</th><th class="num">Objects</th>'
        '<th class="num">Clusters</th><th>Clusters (top sample)</th></tr></thead><tbody>'
        f"{''.join(rows)}"
        "</tbody></table></section>"
    )


INDEX_COLUMNS = (
    ("cluster", "Cluster", "num"),
    ("preview", "Top sample", None),
    ("state", "State", "text"),
    ("size", "Size", "num"),
    ("size_after_dedupe", "After dedupe", "num"),
    ("size_after_similarity", "After similarity", "num"),
    ("size_final", "Final", "num"),
    ("mean_sim", "Mean sim", "num"),
    ("mean_sim_final", "Mean sim (kept)", "num"),
    ("mean_dist", "Mean dist", "num"),
    ("removed_by", "Removed by", "text"),
    ("dominant_tags", "Dominant tags", "text"),
    ("group", "Group", "text"),
)


def _index_section(inputs: ReportInputs, firsts: dict[int, str]) -> str:
    groups = inputs.group_of
    head = "".join(
        f'<th data-col="{c}"'
        + (f' data-type="{t}"' if t else "")
        + (' class="num"' if t == "num" else "")
        + (' aria-sort="descending"' if c == "size" else "") + f">{esc(h)}</th>"
        for c, h, t in INDEX_COLUMNS
    )  # fmt: skip
    ordered = inputs.summary.sort_values(["size", "cluster"], ascending=[False, True])
    rows = []
    for rec in ordered.to_dict("records"):
        c = int(rec["cluster"])
        state = cluster_state(rec)
        cells = [
            f'<td class="num" data-col="cluster" data-value="{c}">{cluster_link(c)}</td>',
            f'<td class="preview">{firsts.get(c, "")}</td>',
            f'<td data-col="state" data-value="{state.state}" title="{esc(state.explanation)}">'
            f"{badge(state.state)}</td>",
        ]
        for col in ("size", "size_after_dedupe", "size_after_similarity", "size_final"):
            cells.append(
                f'<td class="num" data-col="{col}" data-value="{int(rec[col])}">'
                f"{int(rec[col]):,}</td>"
            )
        for col in ("mean_sim", "mean_sim_final", "mean_dist"):
            cells.append(
                f'<td class="num" data-col="{col}" data-value="{raw(rec[col])}">'
                f"{fmt_float(rec[col])}</td>"
            )
        cells.append(f'<td data-col="removed_by" class="small">{esc(state.short)}</td>')
        cells.append(f'<td data-col="dominant_tags">{esc(rec["dominant_tags"])}</td>')
        cells.append(f'<td data-col="group">{esc(groups.get(c, ""))}</td>')
        rows.append(f'<tr data-cluster="{c}" data-state="{state.state}">{"".join(cells)}</tr>')
    states = ["whole", "shrunk", "removed", "empty"]
    counts = {s: 0 for s in states}
    for rec in inputs.summary.to_dict("records"):
        counts[cluster_state(rec).state] += 1
    options = "".join(f'<option value="{s}">{s} ({counts[s]})</option>' for s in states)
    return (
        f'<section id="clusters"><h2>All clusters</h2><p class="muted">Click a column to sort; '
        "<b>whole</b>: every member kept, <b>shrunk</b>: some removed, <b>removed</b>: none left "
        "(hover the badge for what removed them). Removed by: rows each step removed "
        "(<b>dup</b>: duplicate image, <b>sim</b>: low similarity, <b>size</b>: small cluster)."
        "</p>"
        '<div class="controls"><input id="cluster-filter" type="search" placeholder="Filter by '
        "tag, "
        'id or group">'
        f'<select id="state-filter"><option value="">all states ({len(inputs.summary)})</option>'
        f"{options}</select>"
        '<span id="cluster-count" class="muted"></span></div>'
        f'<table id="cluster-index" class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def render_index(inputs: ReportInputs) -> str:
    """The overview page."""
    px = inputs.report.thumbnail_px
    firsts = {int(c): _preview(inputs, int(c), "", px) for c in inputs.summary["cluster"]}
    body = (
        _header(inputs)
        + "<main>"
        + _funnel_section(inputs.funnel)
        + _sizes_section(inputs.summary, inputs.report.top_n)
        + _plots_section(inputs)
        + _groups_section(inputs, firsts)
        + _index_section(inputs, firsts)
        + "</main>"
    )
    return page("Cluster review", body)


def render_cluster_page(
    inputs: ReportInputs,
    rec: dict,
    samples: list[dict],
    neighbours: tuple[int | None, int | None],
) -> str:
    """One cluster's page: sizes after each step, what removed members, top/tail samples.

    ``rec`` is the cluster's ``cluster_summary`` row; ``samples`` its rows of
    :func:`select_samples` (as records).
    """
    c = int(rec["cluster"])
    state = cluster_state(rec)
    pp = inputs.postprocess
    steps = [
        ("assigned by k-means", int(rec["size"]), "", 0),
        (
            f"one row per {pp.dedupe_key}" if pp.dedupe_key else "no dedupe",
            int(rec["size_after_dedupe"]), schema.STATUS_DUPLICATE,
            state.removed_by[schema.STATUS_DUPLICATE],
        ),
        (f"cosine similarity > {pp.min_similarity}", int(rec["size_after_similarity"]),
         schema.STATUS_LOW_SIMILARITY, state.removed_by[schema.STATUS_LOW_SIMILARITY]),
        (f"cluster of at least {pp.min_cluster_size}", int(rec["size_final"]),
         schema.STATUS_SMALL_CLUSTER, state.removed_by[schema.STATUS_SMALL_CLUSTER]),
    ]  # fmt: skip
    step_rows = "".join(
        f'<tr><td>{esc(name)}</td><td class="num" data-col="rows" data-value="{rows}">{rows:,}</td>'
        f'<td class="num" data-col="removed" data-value="{removed}">{removed:,}</td>'
        f"<td><code>{esc(status)}</code></td></tr>"
        for name, rows, status, removed in steps
    )
    prev_link = (
        f'<a href="{neighbours[0]}.html">← cluster {neighbours[0]}</a>'
        if neighbours[0] is not None
        else ""
    )
    next_link = (
        f'<a href="{neighbours[1]}.html">cluster {neighbours[1]} →</a>'
        if neighbours[1] is not None
        else ""
    )
    group = inputs.group_of.get(c)
    group_html = (
        f'<p>In group <a class="chip" href="../index.html#groups">{esc(group)}</a></p>'
        if group
        else ""
    )
    if state.state == "removed":
        if rec["size_after_similarity"] > 0:
            left = int(rec["size_after_similarity"])
            verdict = (
                f"Removed: {left} member{'s' if left != 1 else ''} passed the similarity "
                f"filter, fewer than the minimum cluster size {pp.min_cluster_size}."
            )
        else:
            verdict = f"Removed: no member has cosine similarity above {pp.min_similarity}."
    elif state.state == "shrunk":
        verdict = f"Shrunk from {int(rec['size']):,} to {int(rec['size_final']):,} members."
    elif state.state == "whole":
        verdict = "Every member kept."
    else:
        verdict = "No object was assigned to this centre."
    px = inputs.report.thumbnail_px
    n = inputs.report.samples_per_cluster
    sections = []
    top = sorted((r for r in samples if r["which"] == "top"), key=lambda r: r["rank"])
    tail = sorted((r for r in samples if r["which"] == "tail"), key=lambda r: r["rank"])
    if int(rec["size"]) <= n:
        sections.append(("All members by cosine similarity", "samples-top", top))
    else:
        sections.append((f"Top {n} samples by cosine similarity", "samples-top", top))
        sections.append((f"Tail {n} samples (least similar first)", "samples-tail", tail))
    grids = "".join(
        f'<h2>{esc(title)}</h2><div class="grid" id="{gid}" style="--px:{px}px">'
        + "".join(
            sample_card(r, inputs.thumbs.get(int(r[schema.OBJECT_ID])), px, "../") for r in part
        )
        + "</div>"
        for title, gid, part in sections
        if part
    )
    body = (
        '<header><nav><a href="../index.html" id="back">← Overview</a>'
        f"{prev_link}{next_link}</nav>"
        f"<h1>Cluster {c} {badge(state.state)}</h1>"
        f'<p class="sub">Dominant tags: {esc(rec["dominant_tags"] or "–")} · mean similarity '
        f"{fmt_float(rec['mean_sim'])} (kept: {fmt_float(rec['mean_sim_final'])}) · mean distance "
        f"{fmt_float(rec['mean_dist'])}</p></header><main>"
        f'<section><h2>Sizes after each step</h2><p class="verdict {state.state}">'
        f"{esc(verdict)}</p>"
        f"{group_html}"
        '<table id="cluster-steps"><thead><tr><th>Step</th><th class="num">Rows left</th>'
        '<th class="num">Removed</th><th>Status of removed rows</th></tr></thead><tbody>'
        f"{step_rows}"
        "</tbody></table></section>"
        f"{health_section(rec)}"
        f"<section>{grids or '<p class=muted>No members.</p>'}</section></main>"
    )
    return page(f"Cluster {c}", body, prefix="../")


def health_section(rec: dict) -> str:
    """The cluster's health (``cluster_summary``'s health columns): its users, the spread
    of its cosines, its nearest cluster, and the flags, each flag with its rule."""
    if int(rec.get("size", 0) or 0) == 0 or "n_users" not in rec:
        return ""
    flags = []
    if rec.get("single_user"):
        flags.append("single user: one user holds more than half of the members")
    if rec.get("sink"):
        flags.append("sink: large, with a mean cosine under half the typical one")
    if not _is_missing(rec.get("near_duplicate_of")):
        other = int(rec["near_duplicate_of"])
        flags.append(f"near duplicate of {cluster_link(other, '../')} (centre cosine >= 0.95)")
    nearest = rec.get("nearest_cluster")
    near = (
        f"nearest cluster {cluster_link(int(nearest), '../')} (centre cosine "
        f"{fmt_float(rec['nearest_cos'])})"
        if not _is_missing(nearest) and int(nearest) >= 0
        else ""
    )
    flag_html = "".join(f'<li class="flag">{flag}</li>' for flag in flags)  # ids only
    return (
        '<section id="health"><h2>Health</h2><p>'
        f"{int(rec['n_users']):,} users; top user {esc(rec['top_user'] or '–')} with "
        f"{fmt_float(100 * rec['top_user_share'], 0)} % of the members · cosine min "
        f"{fmt_float(rec['sim_min'])}, median {fmt_float(rec['sim_median'])}, spread "
        f"{fmt_float(rec['sim_std'])} · {near}</p>"
        + (f"<ul>{flag_html}</ul>" if flags else '<p class="muted">No health flag.</p>')
        + "</section>"
    )


# --------------------------------------------------------------------------- assets

CSS = """
:root { --fg: #1f2933; --muted: #616e7c; --line: #e4e7eb; --kept: #0f7b3f;
  --shrunk: #b7791f; --removed: #c53030; --accent: #2563eb; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  margin: 0; background: #f5f6f8; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 12px 28px; }
header h1 { margin: 4px 0; font-size: 22px; }
header nav a { margin-right: 18px; }
main { padding: 4px 28px 40px; }
section { overflow-x: auto; background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 8px 20px 16px;
  margin: 16px 0; }
h2 { font-size: 17px; margin: 14px 0 8px; } h3 { font-size: 14px; margin: 10px 0 6px; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
.sub, .muted { color: var(--muted); } .error { color: var(--removed); font-weight: 600; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: middle; }
th { background: #f0f2f5; font-weight: 600; white-space: nowrap; }
.num { text-align: right; }
th[data-type] { cursor: pointer; user-select: none; }
th[aria-sort="descending"]::after { content: " ▼"; }
th[aria-sort="ascending"]::after { content: " ▲"; }
.split { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px;
  font-weight: 600;
  color: #fff; vertical-align: middle; }
.badge.whole { background: var(--kept); } .badge.shrunk { background: var(--shrunk); }
.badge.removed { background: var(--removed); } .badge.empty { background: #9aa5b1; }
.verdict.removed { color: var(--removed); font-weight: 600; }
.verdict.shrunk { color: var(--shrunk); }
.controls { display: flex; gap: 12px; align-items: center; margin: 8px 0; }
.controls input { width: 260px; padding: 4px 8px; }
td.preview { padding: 2px 6px; } td.preview img { display: block; border-radius: 3px; }
.chip { display: inline-flex; align-items: center; gap: 4px; padding: 2px 6px; margin: 2px;
  border: 1px solid var(--line); border-radius: 12px; background: #f0f4ff; }
.chip img { border-radius: 3px; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.card { margin: 0; width: calc(var(--px) + 58px); background: #fff; border: 1px solid var(--line);
  border-radius: 6px; padding: 6px; font-size: 12px; line-height: 1.35; }
.card.removed { background: #fff6f6; border-color: #f3c4c4; }
.card .pic { height: var(--px); display: flex; align-items: center; justify-content: center;
  background: #e9ecf0; border-radius: 4px; overflow: hidden; margin-bottom: 4px; }
.status { font-weight: 600; } .status.kept { color: var(--kept); }
.status.removed { color: var(--removed); }
.meta-card { display: flex; flex-direction: column; align-items: center; justify-content: center;
  gap: 2px; width: 100%; height: 100%; border: 2px dashed #b8c2cc; border-radius: 4px;
  font-size: 11px; }
.meta-tag { font-size: 15px; font-weight: 700; }
td.small { font-size: 12px; color: var(--muted); white-space: nowrap; }
svg.chart { max-width: 100%; height: auto; font-size: 11px; }
svg .chart-title { font-size: 13px; font-weight: 600; fill: var(--fg); }
svg .tick { fill: var(--muted); } svg .axis-label { fill: var(--fg); font-size: 12px; }
svg .grid { stroke: #eceef1; } svg .axis { stroke: #7b8794; }
svg .marker { stroke: var(--removed); stroke-dasharray: 4 3; stroke-width: 1.5; }
svg .marker-label { fill: var(--removed); }
"""

JS = """'use strict';
(function () {
  function value(row, index, numeric) {
    var cell = row.cells[index];
    var text = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
    if (!numeric) { return text.toLowerCase(); }
    var v = parseFloat(text);
    return isNaN(v) ? -Infinity : v;
  }
  function sort(table, th) {
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var numeric = th.dataset.type === 'num';
    var descending = th.getAttribute('aria-sort') !== 'descending';
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a, index, numeric), y = value(b, index, numeric);
      return (x < y ? -1 : x > y ? 1 : 0) * (descending ? -1 : 1);
    });
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', descending ? 'descending' : 'ascending');
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll('table.sortable th[data-type]').forEach(function (th) {
    th.addEventListener('click', function () { sort(th.closest('table'), th); });
  });
  var text = document.getElementById('cluster-filter');
  var state = document.getElementById('state-filter');
  var count = document.getElementById('cluster-count');
  var table = document.getElementById('cluster-index');
  function filter() {
    var q = text.value.trim().toLowerCase(), s = state.value, shown = 0;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      var ok = (!s || row.dataset.state === s) &&
        (!q || row.textContent.toLowerCase().indexOf(q) >= 0);
      row.hidden = !ok;
      if (ok) { shown += 1; }
    });
    count.textContent = shown + ' shown';
  }
  if (table && text && state) {
    text.addEventListener('input', filter);
    state.addEventListener('change', filter);
    filter();
  }
})();
"""


# --------------------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class ReportResult:
    """What :func:`write_report` wrote."""

    index: str
    n_cluster_pages: int
    thumbnails: ThumbStats
    seconds: float


#: The columns the sample selection and the histograms need (read for every row).
KEY_COLUMNS: tuple[str, ...] = (schema.OBJECT_ID, "cluster", "sim", schema.STATUS)


def _scan_labelled(url: str, n: int, n_workers: int) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Pick the samples and count the similarity histograms of ``postprocessed.parquet``.

    The first pass reads only :data:`KEY_COLUMNS`, part by part (memory bounded by one
    part); the second reads the full rows of the few chosen objects, by a row filter.
    """

    def scan(part_url: str) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
        part = sinks.read_parquet(part_url, columns=list(KEY_COLUMNS))
        return candidate_samples(part, n), similarity_counts(part)

    fs, path = store.filesystem(url)
    parts = sinks.part_urls(url) if fs.isdir(path) else [url]
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        results = list(pool.map(scan, parts))
    candidates = pd.concat([r[0] for r in results], ignore_index=True)
    counts = {k: sum(r[1][k] for r in results) for k in ("all", "kept")}
    chosen = select_samples(candidates[[schema.OBJECT_ID, "cluster", "sim"]], n)
    ids = sorted(set(chosen[schema.OBJECT_ID].tolist()))
    if not ids:
        missing = {c: pd.Series(dtype=object) for c in SAMPLE_COLUMNS if c not in chosen}
        return chosen.assign(**missing), counts
    rest = [c for c in SAMPLE_COLUMNS if c not in ("cluster", "sim")]
    rows = sinks.read_parquet(url, columns=rest, filters=[(schema.OBJECT_ID, "in", ids)])
    return chosen.merge(rows, on=schema.OBJECT_ID, how="left", validate="many_to_one"), counts


def _load_groups(catalog: Catalog, groups_file: str | None) -> dict:
    """The reviewer's groups to show; a file that no longer fits the run is reported on
    the page (and logged) instead of failing the report."""
    if groups_file is None:
        return {}
    try:
        table = groups_module.resolve_groups(catalog, groups_file)
    except PipelineError as exc:
        log.warning("report: groups not shown: %s", exc)
        return {"groups_source": str(groups_file), "groups_error": str(exc)}
    return {
        "groups_source": str(groups_file),
        "groups": table[["cluster", schema.OBJECT_ID, schema.GROUP]],
    }


@contextmanager
def _report_folder(url: str) -> Iterator[tuple[Path, Path | None]]:
    """Yield a local folder to render into and the previous report (for thumbnails); the
    folder replaces ``url`` atomically when the block succeeds."""
    if store.is_local(url):
        previous = Path(url) if Path(url, "index.html").exists() else None
        with store.atomic_path(url) as tmp:
            Path(tmp).mkdir(parents=True)
            yield Path(tmp), previous
        return
    with tempfile.TemporaryDirectory(prefix="report-") as local, store.atomic_path(url) as tmp:
        yield Path(local), None
        fs, tmp_path = store.filesystem(tmp)
        fs.put(local, tmp_path, recursive=True)


def write_report(
    report: ReportConfig,
    input: InputConfig,
    postprocess: PostprocessConfig,
    catalog: Catalog,
    n_workers: int = 1,
    groups_file: str | None = None,
) -> ReportResult:
    """Render the report folder ``catalog.report`` from the run's summary tables.

    Parameters
    ----------
    n_workers : int, default=1
        Threads reading the table parts and making thumbnails.
    groups_file : str, default=None
        The reviewer's groups YAML to show (``None``: no groups).
    """
    start = time.perf_counter()
    summary = sinks.read_parquet(catalog.cluster_summary)
    funnel_table = sinks.read_parquet(catalog.funnel)
    samples, sim_counts = _scan_labelled(
        catalog.postprocessed, report.samples_per_cluster, n_workers
    )
    inputs = ReportInputs(
        report=report, postprocess=postprocess, summary=summary, funnel=funnel_table,
        samples=samples, sim_counts=sim_counts, root=catalog.root,
        **_load_groups(catalog, groups_file),
    )  # fmt: skip
    with _report_folder(catalog.report) as (folder, previous):
        inputs.thumbs, stats = make_thumbnails(
            samples, input, report.thumbnail_px, folder / "thumbs",
            previous / "thumbs" if previous else None, n_workers,
        )  # fmt: skip
        (folder / "report.css").write_text(CSS.lstrip(), encoding="utf-8")
        (folder / "report.js").write_text(JS, encoding="utf-8")
        (folder / "index.html").write_text(render_index(inputs), encoding="utf-8")
        pages = folder / "clusters"
        pages.mkdir()
        by_cluster: dict[int, list[dict]] = {}
        for record in samples.to_dict("records"):
            by_cluster.setdefault(int(record["cluster"]), []).append(record)
        ids = summary["cluster"].astype(int).tolist()
        for i, rec in enumerate(summary.to_dict("records")):
            c = int(rec["cluster"])
            neighbours = (ids[i - 1] if i > 0 else None, ids[i + 1] if i + 1 < len(ids) else None)
            text = render_cluster_page(inputs, rec, by_cluster.get(c, []), neighbours)
            (pages / f"{c}.html").write_text(text, encoding="utf-8")
    seconds = time.perf_counter() - start
    log.info(
        "report: %d cluster pages, %d thumbnails made, %d reused, in %.1f s: %s",
        len(ids), stats.made, stats.reused, seconds, catalog.report_index,
    )  # fmt: skip
    return ReportResult(catalog.report_index, len(ids), stats, seconds)


def report_stage(
    context: StageContext,
    report: ReportConfig,
    input: InputConfig,
    postprocess: PostprocessConfig,
) -> None:
    """Stage 5: ``summary.md`` (printed when verbose) and the HTML review report."""
    catalog = context.catalog
    summary = sinks.read_parquet(catalog.cluster_summary)
    funnel_table = sinks.read_parquet(catalog.funnel)
    text = summarize.summary_markdown(summary, funnel_table, report.top_n)
    sinks.write_text(text, catalog.summary_markdown)
    if context.verbose:
        print(text)
    result = write_report(
        report, input, postprocess, catalog, context.executor.n_cores, report.groups_file
    )
    if context.verbose:
        print(f"Review report: {result.index} ({result.seconds:.1f} s)")

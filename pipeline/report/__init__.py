"""Stage 5, the review report: an HTML folder that opens from ``file://`` with no server,
the reviewer's workbench for picking and combining clusters.

Every number on it comes from the tables the pipeline wrote (``cluster_summary.parquet``,
``funnel.parquet``, ``postprocessed.parquet``) and the model's centres, through the pure
view-models of :mod:`.views`; :mod:`.render` lays them out with the package's Jinja2
templates (autoescape on); :mod:`.thumbnails` crops the pictures. Layout::

    report/
      index.html                 cluster index (pick boxes, crop strips, filters), map of the
                                 centres, size x cosine, groups, funnel, top/tail, histograms
      gallery.html               one tile of the most similar members per cluster
      clusters/<c>.html          verdict (and the setting that would keep a removed cluster),
                                 sizes, health, nearest clusters, top / weakest kept / removed,
                                 and every member (JSON once; ``#kept-<p>``, ``#removed-<p>``:
                                 100 a page, by cosine, laid out by the page's script)
      thumbs/<object>-<key>.jpg  crops the overview pages show, of source images > 32 KiB
      report.css, report.js      copied from the package's ``static/``

Picks (clusters ticked into named groups, members excluded) live in the browser's
``localStorage`` and are exported as a ``groups.yaml`` that ``pipeline groups`` applies.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import schema, sinks, store, summarize
from ..catalog import K_SWEEP_TABLE, Catalog
from ..config import InputConfig, PostprocessConfig, ReportConfig
from ..context import StageContext
from ..errors import PipelineError
from . import render, thumbnails, views
from .members import MemberBlocks
from .thumbnails import (
    Thumb,
    ThumbStats,
    crop_box,
    crop_thumbnail,
    make_thumbnails,
    source_files,
    source_urls,
    start_thumbnails,
    thumbnail_size,
)
from .views import SIM_BIN_EDGES, ClusterState, cluster_state, similarity_counts, size_histogram

__all__ = [
    "ReportResult", "write_report", "report_stage", "cluster_state", "ClusterState",
    "crop_box", "crop_thumbnail", "thumbnail_size", "make_thumbnails", "Thumb", "ThumbStats",
    "source_urls", "source_files", "start_thumbnails", "SIM_BIN_EDGES", "similarity_counts", "size_histogram", "SAMPLE_COLUMNS",
]  # fmt: skip

log = logging.getLogger("pipeline")

#: Columns of ``postprocessed.parquet`` the report reads.
SAMPLE_COLUMNS: tuple[str, ...] = (
    schema.OBJECT_ID, "cluster", "sim", "dist", schema.STATUS, "tag", "score",
    "batch_folder", "username", "res_name", "image_name", "idx", "bbox",
)  # fmt: skip
#: Crops per gallery tile (and most similar members on a cluster page).
GALLERY_CROPS = 9
#: Weakest kept members at the end of an index row's strip.
STRIP_WEAKEST = 2
#: Weakest kept members shown on the index strip's end and on each cluster page.
WEAKEST_KEPT = 4
#: Members per page of the all-members pages.
MEMBERS_PER_PAGE = 100
#: Nearest clusters (by centre cosine) on each cluster page.
NEAREST = 6


@dataclass(frozen=True)
class ReportResult:
    """What :func:`write_report` wrote."""

    index: str
    n_cluster_pages: int
    thumbnails: ThumbStats
    seconds: float
    n_pages: int = 0
    bytes: int = 0


def _load_groups(catalog: Catalog, groups_file: str | None) -> dict:
    """The reviewer's groups to show; a file that no longer fits the run is reported on
    the page (and logged) instead of failing the report."""
    from .. import groups as groups_module

    if groups_file is None:
        return {}
    try:
        level = groups_module.warning_level(catalog, groups_file)  # once per gone cluster
        table = groups_module.resolve_groups(catalog, groups_file, level)
    except PipelineError as exc:
        log.warning("report: groups not shown: %s", exc)
        return {"source": str(groups_file), "error": str(exc)}
    rows = []
    for name, members in table.groupby(schema.GROUP, sort=False):
        rows.append((str(name), len(members), sorted(members["cluster"].astype(int).unique())))
    pairs = table[["cluster", schema.GROUP]].drop_duplicates()
    return {
        "source": str(groups_file),
        "rows": rows,
        "group_of": {int(c): str(g) for c, g in pairs.itertuples(index=False)},
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


def _folder_bytes(folder: Path) -> tuple[int, int]:
    """Files and bytes under ``folder``."""
    n = size = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            n += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return n, size


def _model_fingerprint(catalog: Catalog) -> str:
    try:
        return catalog.model_fingerprint()
    except PipelineError:
        return "none"


class _ClusterColumns:
    """The columns of :func:`views.order_members`' table the cluster pages need, as arrays,
    and each cluster's rows as a slice (the table is sorted by cluster)."""

    def __init__(self, ordered: pd.DataFrame) -> None:
        self.cluster = ordered["cluster"].to_numpy(dtype=np.int64)
        status = ordered[schema.STATUS]
        self.kept = (status == schema.STATUS_KEPT).to_numpy(dtype=bool)
        self.duplicate = (status == schema.STATUS_DUPLICATE).to_numpy(dtype=bool)
        self.sim = ordered["sim"].to_numpy(dtype=np.float64)
        clipped = np.clip(self.sim, -1.0, 1.0)
        self.bins = np.clip(
            np.searchsorted(SIM_BIN_EDGES, clipped, side="right") - 1, 0, len(SIM_BIN_EDGES) - 2
        )
        uniq, starts = np.unique(self.cluster, return_index=True)
        ends = np.append(starts[1:], len(self.cluster))[: len(starts)]
        self._spans = {
            int(c): slice(int(a), int(b)) for c, a, b in zip(uniq, starts, ends, strict=True)
        }

    def span(self, cluster: int) -> slice:
        return self._spans.get(cluster, slice(0, 0))

    def clusters(self) -> list[int]:
        return list(self._spans)

    def histogram(self, span: slice) -> dict[str, np.ndarray]:
        """The cosine histogram (all and kept members) of one cluster's rows."""
        n_bins = len(SIM_BIN_EDGES) - 1
        bins = self.bins[span]
        return {
            "all": np.bincount(bins, minlength=n_bins),
            "kept": np.bincount(bins[self.kept[span]], minlength=n_bins),
        }


@dataclass
class _Overview:
    """What the overview pages need of the members, gathered a block at a time: the
    similarity histograms, each cluster's picks and user mix, and the picked members' rows
    (every member an overview page or a cluster page's grids show)."""

    sim_counts: dict[str, np.ndarray]
    picks: dict[int, views.Picks]
    mixes: dict[int, list]
    picked: pd.DataFrame

    @classmethod
    def gather(cls, blocks: MemberBlocks, samples_per_cluster: int) -> _Overview:
        counts: dict[str, np.ndarray] = {}
        picks: dict[int, views.Picks] = {}
        mixes: dict[int, list] = {}
        picked = []
        for ordered in blocks:
            for name, n in similarity_counts(ordered).items():
                counts[name] = counts.get(name, 0) + n
            block_picks = views.cluster_picks(
                ordered, GALLERY_CROPS, WEAKEST_KEPT, samples_per_cluster
            )
            picks.update(block_picks)
            mixes.update(views.user_mixes(ordered["cluster"].to_numpy(), ordered["username"].array))
            ids = {i for p in block_picks.values() for i in p.ids()}
            picked.append(ordered[ordered[schema.OBJECT_ID].isin(ids)])
            ordered = None  # not held while the next block is read
        return cls(counts, picks, mixes, pd.concat(picked, ignore_index=True))


@dataclass
class _ClusterPages:
    """Writes the cluster pages: what every page shares (the overview's cards of the picked
    members, the nearest clusters, the summary), with each block's members."""

    site: render.Site
    folder: Path
    summary_records: list[dict]
    states: dict[int, ClusterState]
    catalogue: render.Catalogue
    near_ids: np.ndarray
    near_cos: np.ndarray
    mixes: dict[int, list]
    group_of: dict[int, str]
    postprocess: PostprocessConfig

    def write(self, i: int, columns: _ClusterColumns, cards: render.MemberCards) -> None:
        """The page of summary row ``i``, whose members are in ``columns`` and ``cards``."""
        rec, records, pp = self.summary_records[i], self.summary_records, self.postprocess
        c = int(rec["cluster"])
        state = self.states[c]
        span = columns.span(c)
        cards_of_cluster = cards.cluster(c)
        by_kind = {
            "kept": [m for m in cards_of_cluster if m["k"]],
            "removed": [m for m in cards_of_cluster if not m["k"]],
        }
        pager = []
        for kind, chosen in by_kind.items():
            links = []
            for p in range(1, views.page_count(len(chosen), MEMBERS_PER_PAGE) + 1):
                first = (p - 1) * MEMBERS_PER_PAGE
                last = min(len(chosen), first + MEMBERS_PER_PAGE)
                links.append(
                    {"anchor": views.member_page_anchor(kind, p), "label": f"{first + 1}–{last}"}
                )
            pager.append((kind, len(chosen), links))
        nearest = []
        if int(rec["size"]) > 0:
            for other, cos in zip(self.near_ids[i], self.near_cos[i], strict=True):
                orec = records[int(other)]
                oc = int(orec["cluster"])
                if int(orec["size"]) == 0:
                    continue
                nearest.append(
                    {"cluster": oc, "state": self.states[oc].state, "cos": views.fmt_float(cos),
                     "cos_raw": views.raw(float(cos)), "size_final": int(orec["size_final"]),
                     "tags": orec["dominant_tags"],
                     "strip": self.catalogue.strip(oc, 4, 56, "../")}
                )  # fmt: skip
        rescue: list[str] = []
        if state.state == "removed":
            sims = columns.sim[span][~columns.duplicate[span]]
            rescue = views.rescue_settings(sims, pp.min_similarity, pp.min_cluster_size)
        histogram = views.similarity_chart(
            columns.histogram(span), pp.min_similarity, "Cosine to the centre", small=True
        )
        prev_c = int(records[i - 1]["cluster"]) if i > 0 else None
        next_c = int(records[i + 1]["cluster"]) if i + 1 < len(records) else None
        text = render.render_cluster_page(
            self.site, rec, self.catalogue, pp, (prev_c, next_c), nearest,
            self.mixes.get(c, []), histogram, rescue, pager, self.group_of.get(c), by_kind,
            MEMBERS_PER_PAGE,
        )  # fmt: skip
        (self.folder / f"{c}.html").write_text(text, encoding="utf-8")


def write_report(
    report: ReportConfig,
    input: InputConfig,
    postprocess: PostprocessConfig,
    catalog: Catalog,
    n_workers: int = 1,
    groups_file: str | None = None,
    staging: str | None = None,
) -> ReportResult:
    """Render the report folder ``catalog.report`` from the run's tables.

    Parameters
    ----------
    n_workers : int, default=1
        Threads reading the table parts; worker processes (threads for a few) drawing
        the thumbnails.
    groups_file : str, default=None
        The reviewer's groups YAML to show (``None``: no groups).
    staging : str, default=None
        A folder (made and removed here) for the members split by cluster block, when
        they are more than one block (default: ``report-<random>`` in the run's staging).
    """
    start = time.perf_counter()
    summary = sinks.read_parquet(catalog.cluster_summary)
    funnel_table = sinks.read_parquet(catalog.funnel)
    states = {int(r["cluster"]): cluster_state(r) for r in summary.to_dict("records")}
    removed = {c for c, st in states.items() if st.state == "removed"}
    staging = staging or store.join(catalog.staging, f"report-{os.urandom(6).hex()}")
    sizes = summary.set_index("cluster")["size"]
    blocks = MemberBlocks(
        catalog.postprocessed, list(SAMPLE_COLUMNS), sizes, staging, n_threads=n_workers
    )
    with blocks, _report_folder(catalog.report) as (folder, previous):
        overview = _Overview.gather(blocks, report.samples_per_cluster)
        picked = overview.picked
        # Thumbnails only for what the overview pages show, and there only of large source
        # images; every other crop is the source image, scaled and clipped by the page's
        # script (nothing decoded here).
        shown = {
            i for p in overview.picks.values() for i in p.top + p.weakest_kept[-STRIP_WEAKEST:]
        }
        # Source images (URLs relative to the report's folder), and the sizes of those the
        # overview shows: one scandir per folder, a stat per shown image, nothing read.
        local = store.is_local(catalog.report)
        report_dir = os.path.abspath(catalog.report)
        listings: dict = {}  # the source folders listed, shared with the first block
        sources, sizes = (
            source_files(picked, input, report_dir, shown, listings) if local else ({}, {})
        )
        small = {i for i, n in sizes.items() if n <= thumbnails.SOURCE_CROP_MAX_BYTES}
        ids_col = picked[schema.OBJECT_ID]
        # The thumbnails left (large sources) are drawn by worker processes while the
        # first block's pages are prepared here.
        thumbs_job = start_thumbnails(
            picked[ids_col.isin(shown) & ~ids_col.isin(small)], input, report.thumbnail_px,
            folder / "thumbs", previous / "thumbs" if previous else None, n_workers,
        )  # fmt: skip
        try:
            page_blocks = _page_blocks(blocks, input, report_dir if local else None, listings)
            first = next(page_blocks)
        finally:
            thumbs, stats = thumbs_job.result()
        crops = {i: url for i, url in sources.items() if i not in thumbs}
        catalogue = render.Catalogue(
            members=render.MemberCards(picked, thumbs, crops, removed), picks=overview.picks
        )
        ids = summary["cluster"].astype(int).to_numpy()
        try:  # the centre of each summary row (a re-fit's ids need not be 0..k-1)
            row_of = {int(c): i for i, c in enumerate(catalog.read_cluster_ids())}
            centres = catalog.read_centres()[[row_of[c] for c in ids]]
        except (PipelineError, KeyError):
            centres = np.zeros((len(ids), 2), dtype=np.float32)
        near_ids, near_cos = views.nearest_clusters(centres, NEAREST)
        fingerprint = _model_fingerprint(catalog)
        site = render.Site(
            root=catalog.root,
            model=fingerprint,
            report_id=hashlib.sha256(f"model|{fingerprint}".encode()).hexdigest()[:12],
            px=report.thumbnail_px,
        )
        groups = _load_groups(catalog, groups_file)
        static = Path(__file__).with_name("static")
        shutil.copyfile(static / "report.css", folder / "report.css")
        shutil.copyfile(static / "report.js", folder / "report.js")
        (folder / "clusters").mkdir()
        summary_records = summary.to_dict("records")
        pages = _ClusterPages(
            site, folder / "clusters", summary_records, states, catalogue, near_ids, near_cos,
            overview.mixes, groups.get("group_of", {}), postprocess,
        )  # fmt: skip
        row_of_cluster = {int(r["cluster"]): i for i, r in enumerate(summary_records)}
        written: set[int] = set()
        n_processes = min(n_workers, len(os.sched_getaffinity(0)))
        for b, (ordered, columns, urls) in enumerate(itertools.chain([first], page_blocks)):
            block_crops = {i: u for i, u in urls.items() if i not in thumbs}
            cards = render.MemberCards(ordered, thumbs, block_crops, removed, cached_rows=0)
            clusters = [c for c in columns.clusters() if c in row_of_cluster]
            rows = [row_of_cluster[c] for c in clusters]
            with _writing_pages(pages, rows, columns, cards, n_processes):
                if b == 0:  # the overview pages, while the first block's pages are written
                    index_html = render.render_index(
                        site, summary, funnel_table, overview.sim_counts,
                        views.centre_map(centres), catalogue, groups, postprocess,
                        report.top_n, k_sweep_table(catalog),
                    )  # fmt: skip
                    (folder / "index.html").write_text(index_html, encoding="utf-8")
                    gallery_html = render.render_gallery(site, summary, catalogue, GALLERY_CROPS)
                    (folder / "gallery.html").write_text(gallery_html, encoding="utf-8")
            written.update(clusters)
            # Nothing of this block is held while the next one is read.
            first = ordered = columns = urls = block_crops = cards = None
        no_members = _ClusterColumns(picked.iloc[:0])
        for c, i in row_of_cluster.items():
            if c not in written:  # empty clusters
                pages.write(i, no_members, render.MemberCards(picked.iloc[:0], {}, {}, removed))
        n_files, n_bytes = _folder_bytes(folder)
    seconds = time.perf_counter() - start
    log.info(
        "report: %d cluster pages (every member, %d a page), %d thumbnails made, %d reused "
        "(%d overview crops from small sources), %d source crops on the overview, in %.1f s; "
        "%d files, %.1f MiB: %s",
        len(ids), MEMBERS_PER_PAGE, stats.made, stats.reused, len(small & crops.keys()),
        len(crops), seconds, n_files, n_bytes / 2**20, catalog.report_index,
    )  # fmt: skip
    return ReportResult(catalog.report_index, len(ids), stats, seconds, len(ids) + 2, n_bytes)


def _page_blocks(
    blocks: MemberBlocks, input: InputConfig, report_dir: str | None, listings: dict
) -> Iterator[tuple[pd.DataFrame, _ClusterColumns, dict[int, str]]]:
    """Each block of members with its columns and its members' source images (URLs
    relative to the report's folder, ``report_dir``; none where it is not local).
    ``listings``: the source folders listed so far, kept for the first block only (they
    would grow with the run)."""
    for b, ordered in enumerate(blocks):
        if b:
            listings.clear()
        urls = source_files(ordered, input, report_dir, None, listings)[0] if report_dir else {}
        yield ordered, _ClusterColumns(ordered), urls
        ordered = urls = None  # not held while the next block is read


#: Cluster pages below which a block's pages are written here, not by forked processes.
PARALLEL_MIN_PAGES = 8
#: What the forked page writers inherit (see :func:`_writing_pages`).
_FORKED_PAGES: tuple | None = None


def _write_pages(rows: list[int]) -> None:
    pages, columns, cards = _FORKED_PAGES
    for i in rows:
        pages.write(i, columns, cards)


@contextmanager
def _writing_pages(
    pages: _ClusterPages, rows: list[int], columns: _ClusterColumns,
    cards: render.MemberCards, n_processes: int,
) -> Iterator[None]:  # fmt: skip
    """Write the pages of summary rows ``rows`` (of one block) while the ``with`` body
    runs: by ``n_processes`` forked processes, which inherit the block and every page's
    shared data (nothing is pickled but row numbers), or here after the body where
    there is no ``fork``, one process or a few pages."""
    global _FORKED_PAGES
    context = thumbnails._process_context()
    if n_processes < 2 or len(rows) < PARALLEL_MIN_PAGES or context.get_start_method() != "fork":
        yield
        for i in rows:
            pages.write(i, columns, cards)
        return
    _FORKED_PAGES = (pages, columns, cards)
    try:
        with ProcessPoolExecutor(n_processes, mp_context=context) as pool:
            futures = [pool.submit(_write_pages, rows[w::n_processes]) for w in range(n_processes)]
            try:
                yield
                for future in futures:
                    future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        _FORKED_PAGES = None


def k_sweep_table(catalog: Catalog) -> pd.DataFrame | None:
    """The ``n_clusters: auto`` curve saved with the model, for display (``None``: fixed k)."""
    table = catalog.read_model_table(K_SWEEP_TABLE)
    if table is None:
        return None
    return table.assign(chosen_mark=np.where(table["chosen"], "chosen", ""))


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
    sweep = k_sweep_table(catalog)
    extra = "" if sweep is None else summarize.k_sweep_markdown(sweep)
    text = summarize.summary_markdown(summary, funnel_table, report.top_n, extra)
    sinks.write_text(text, catalog.summary_markdown)
    if context.verbose:
        print(text)
    from .. import groups

    groups.set_aside_stale(catalog)
    groups_file = report.groups_file or groups.applied_groups_file(catalog)
    result = write_report(
        report,
        input,
        postprocess,
        catalog,
        context.executor.n_cores,
        groups_file,
        store.join(catalog.staging, f"report-{context.plan.run_id}"),
    )
    if context.verbose:
        print(
            f"Review report: {result.index} ({result.seconds:.1f} s, "
            f"{result.bytes / 2**20:.1f} MiB)"
        )

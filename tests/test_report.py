"""The review report: its numbers are the summary tables', its crops are the boxes' pixels,
every member is reachable, and the workbench works in a real headless browser (Debian's
chromium driven by Playwright): pick clusters, exclude a member, download groups.yaml,
apply it with 'pipeline groups' and find the group after the rebuild."""

from __future__ import annotations

import json
import logging
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline import report, schema, sinks, summarize
from pipeline.cli import app
from pipeline.report import members, thumbnails, views
from pipeline.runner import run
from pipeline.synthetic import make_demo_dataset
from tests.conftest import config_for, render_report

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory):
    """1,200 objects x 16 dims around 12 clusters, with drawn images: a report with real
    crops, removed and shrunk clusters, in a few seconds."""
    return make_demo_dataset(
        tmp_path_factory.mktemp("img"), n_objects=1200, dim=16, n_true_clusters=12, seed=7,
        images=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def report_run(image_dataset, tmp_path_factory):
    """A whole run over ``image_dataset`` (its report stage renders the report); the
    minimum cluster size of 30 removes some clusters, the similarity filter empties one."""
    cfg = config_for(
        image_dataset, tmp_path_factory.mktemp("report") / "out",
        input={"images_root": str(image_dataset.images_root)},
        train={"n_clusters": 20}, postprocess={"min_cluster_size": 30},
        report={"samples_per_cluster": 4},
    )  # fmt: skip
    result = run(cfg)
    return cfg, result.catalog


@pytest.fixture(scope="module")
def thumbs_run(report_run, tmp_path_factory):
    """The report of ``report_run`` rendered again with the larger half of the source
    images thumbnailed (the rest shown cropped from the source by the page), the
    thumbnails drawn by worker processes: ``(cfg, catalog, threshold in bytes)``."""
    from pipeline.catalog import Catalog

    cfg, paths = report_run
    copy = tmp_path_factory.mktemp("thumbs") / "out"
    shutil.copytree(paths.root, copy, ignore=shutil.ignore_patterns("report", "embeddings.zarr"))
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(copy)})})
    sizes = [p.stat().st_size for p in Path(cfg.input.images_root).rglob("*.jpg")]
    threshold = int(np.median(sizes))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(thumbnails, "SOURCE_CROP_MAX_BYTES", threshold)
        mp.setattr(thumbnails, "PROCESS_MIN_IMAGES", 1)
        result = render_report(cfg, n_workers=2)
    assert result.thumbnails.made > 0
    return cfg, Catalog.from_config(cfg), threshold


class Tables(HTMLParser):
    """Every ``<table id=...>`` of a page as rows of ``{data-col: data-value}``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[dict[str, str]]] = {}
        self.links: list[str] = []
        self.images: list[str] = []
        self._table: str | None = None
        self._row: dict[str, str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "id" in a:
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = {}
        elif tag == "td" and self._row is not None and "data-col" in a:
            self._row[a["data-col"]] = a.get("data-value", "")
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "tr" and self._row:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def json_block(text: str, block_id: str):
    """The JSON of the page's ``<script type="application/json" id=block_id ...>``."""
    marker = f'<script type="application/json" id="{block_id}"'
    if marker not in text:
        return {}
    block = text.split(marker)[1].split(">", 1)[1]
    return json.loads(block.split("</script>")[0])


def members_of(text: str) -> dict[str, list[dict]]:
    """The member cards of a page (the JSON its script lays out): by grid, and every
    member (``kept``, ``removed``: what the member pages of the cluster page show)."""
    return {**json_block(text, "members-data"), **json_block(text, "all-members")}


GRIDS = ("samples-top", "samples-weakest", "samples-removed")


def shown_objects(text: str) -> list[int]:
    """The members a page shows at its top, in page order."""
    grids = members_of(text)
    return [m["id"] for name in GRIDS for m in grids.get(name, [])]


def read_page(path: Path) -> Tables:
    return Tables(path.read_text(encoding="utf-8"))


def as_int(value: str):
    return None if value == "" else int(value)


def test_overview_numbers_equal_the_summary_tables(report_run):
    cfg, paths = report_run
    summary = sinks.read_parquet(paths.cluster_summary)
    funnel = sinks.read_parquet(paths.funnel)
    page = read_page(Path(paths.report) / "index.html")

    shown = page.tables["funnel-table"]
    assert [r["step"] for r in shown] == funnel["step"].tolist()
    for col in ("rows", "removed"):
        assert [int(r[col]) for r in shown] == funnel[col].tolist()
    assert [as_int(r["clusters"]) for r in shown] == [
        None if pd.isna(v) else int(v) for v in funnel["clusters"]
    ]

    index = {int(r["cluster"]): r for r in page.tables["cluster-index"]}
    assert sorted(index) == summary["cluster"].tolist()
    for rec in summary.to_dict("records"):
        row = index[rec["cluster"]]
        for col in ("size", "size_final"):
            assert int(row[col]) == rec[col], (rec["cluster"], col)
        for col in ("mean_sim", "mean_sim_final"):
            if pd.isna(rec[col]):
                assert row[col] == ""
            else:
                assert float(row[col]) == rec[col]
        assert row["state"] == report.cluster_state(rec).state

    n = cfg.report.top_n
    expected_tables = {
        "top-tail-before": summarize.top_tail(summary, "size", n),
        "top-tail-after": summarize.top_tail(summary, "size_final", n),
        "top-comparison": summarize.top_comparison(summary, n),
    }
    for table_id, expected in expected_tables.items():
        rows = page.tables[table_id]
        assert len(rows) == len(expected), table_id
        for col in expected.columns:
            want = [None if pd.isna(v) else int(v) for v in expected[col]]
            assert [as_int(r[col]) for r in rows] == want, (table_id, col)


def test_cluster_pages_show_sizes_and_every_member(report_run):
    cfg, paths = report_run
    summary = sinks.read_parquet(paths.cluster_summary)
    labelled = sinks.read_parquet(paths.postprocessed)
    folder = Path(paths.report) / "clusters"
    states = set()
    for rec in summary.to_dict("records"):
        c = rec["cluster"]
        text = (folder / f"{c}.html").read_text(encoding="utf-8")
        steps = Tables(text).tables["cluster-steps"]
        assert [int(r["rows"]) for r in steps] == [
            rec["size"], rec["size_after_dedupe"], rec["size_after_similarity"], rec["size_final"]
        ]  # fmt: skip
        assert sum(int(r["removed"]) for r in steps) == rec["size"] - rec["size_final"]
        state = report.cluster_state(rec).state
        states.add(state)
        assert f'class="badge {state}"' in text
        members = labelled[labelled["cluster"] == c].sort_values(
            ["sim", schema.OBJECT_ID], ascending=[False, True]
        )
        kept = members[members[schema.STATUS] == schema.STATUS_KEPT]
        removed = members[members[schema.STATUS] != schema.STATUS_KEPT]
        # The top of the page: the most similar members (summarize's rule), then the
        # weakest kept ones (least similar last), then the least similar removed ones.
        top, _ = summarize.cluster_samples(labelled, c, report.GALLERY_CROPS)
        shown = shown_objects(text)
        n_top = min(len(members), report.GALLERY_CROPS)
        assert shown[:n_top] == top[schema.OBJECT_ID].tolist()[:n_top], c
        weakest = kept[schema.OBJECT_ID].tolist()[-report.WEAKEST_KEPT :]
        assert shown[n_top : n_top + len(weakest)] == weakest, c
        # Every member on the page's member pages (its script shows them 100 a page),
        # kept and removed apart, by cosine, each page linked.
        every = members_of(text)
        for kind, part in (("kept", kept), ("removed", removed)):
            assert [m["id"] for m in every[kind]] == part[schema.OBJECT_ID].tolist(), (c, kind)
            for p in range(1, views.page_count(len(part), report.MEMBERS_PER_PAGE) + 1):
                assert f'href="#{views.member_page_anchor(kind, p)}"' in text
        if state == "removed":
            assert "Removed:" in text and "removed:" in text
            assert 'id="rescue"' in text and "postprocess.min_" in text
    assert {"removed", "shrunk"} <= states, "the fixture should cover removed and shrunk clusters"


@pytest.mark.parametrize("run_fixture", ["report_run", "thumbs_run"])
def test_every_link_resolves_and_every_image_exists(run_fixture, request):
    paths = request.getfixturevalue(run_fixture)[1]
    folder = Path(paths.report)
    pages = [
        folder / "index.html",
        folder / "gallery.html",
        *sorted(folder.glob("clusters/*.html")),
    ]
    n_images = n_sources = 0
    for path in pages:
        text = path.read_text(encoding="utf-8")
        page = Tables(text)
        for link in page.links:
            target = link.split("#")[0]
            if target:
                assert (path.parent / target).is_file(), (path.name, link)
        for src in page.images:
            assert (path.parent / unquote(src)).is_file(), (path.name, src)
            n_images += 1
        for m in (m for grid in members_of(text).values() for m in grid):
            if "t" in m:
                assert (folder / "thumbs" / m["t"][0]).is_file()
            else:  # the source image, relative to the page
                assert (path.parent / unquote(m["src"])).resolve().is_file(), m
                n_sources += 1
    assert n_images > 0 and n_sources > 0


def gradient_image(width: int, height: int) -> Image.Image:
    """Pixel (x, y) = (x, y, 7): every pixel says where it came from."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.dstack([x, y, np.full_like(x, 7)]).astype(np.uint8), "RGB")


def test_crop_is_the_bbox_region_by_hand():
    image = gradient_image(200, 120)
    box = report.crop_box("[10.4, 20.0, 105.2, 67.9]", *image.size)
    assert box == (10, 20, 106, 68)  # edges outwards to whole pixels: 96 x 48
    thumb = np.asarray(report.crop_thumbnail(image, box, report.thumbnail_size(box, 96)))
    assert thumb.shape == (48, 96, 3)  # longer side 96 -> no resampling needed
    assert (thumb[:, :, 0] == np.arange(10, 106)[None, :]).all()
    assert (thumb[:, :, 1] == np.arange(20, 68)[:, None]).all()


def test_crop_files_are_the_bbox_region_of_the_source_image(thumbs_run):
    cfg, paths, _ = thumbs_run
    labelled = sinks.read_parquet(paths.postprocessed).set_index(schema.OBJECT_ID)
    folder = Path(paths.report)
    names = sorted((folder / "thumbs").glob("*.jpg"))
    assert names
    errors, others = [], []
    for path in names[:: max(1, len(names) // 25)]:
        row = labelled.loc[int(path.name.split("-")[0])]
        source = Image.open(
            Path(cfg.input.images_root) / row["username"] / f"{row['image_name']}.jpg"
        ).convert("RGB")
        x1, y1, x2, y2 = json.loads(row["bbox"])
        box = (int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2)))
        thumb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        assert max(thumb.shape[:2]) == cfg.report.thumbnail_px
        size = (thumb.shape[1], thumb.shape[0])
        expected = np.asarray(source.crop(box).resize(size, Image.Resampling.BICUBIC), np.float64)
        # The same region of the picture, up to JPEG noise, and clearly not a shifted one.
        error = np.abs(thumb - expected).mean()
        shifted = (box[0] + 17, box[1] + 11, box[2] + 17, box[3] + 11)
        other = np.asarray(source.crop(shifted).resize(size, Image.Resampling.BICUBIC), np.float64)
        assert error < 4.0, (path.name, error)  # JPEG q88 noise on sharp drawn edges
        errors.append(error)
        others.append(np.abs(thumb - other).mean())
    assert len(errors) >= 10
    assert np.mean(others) > 5 * np.mean(errors)


def test_thumbnails_only_for_members_shown_and_reused_on_rerun(thumbs_run, monkeypatch):
    cfg, paths, threshold = thumbs_run
    folder = Path(paths.report)
    shown = set()
    for page in [folder / "index.html", folder / "gallery.html", *folder.glob("clusters/*.html")]:
        shown.update(src.rsplit("/", 1)[1] for src in read_page(page).images if "thumbs/" in src)
    made = {p.name for p in (folder / "thumbs").glob("*.jpg")}
    assert made and made == shown
    monkeypatch.setattr(thumbnails, "SOURCE_CROP_MAX_BYTES", threshold)
    again = render_report(cfg, n_workers=2)
    assert again.thumbnails.made == 0 and again.thumbnails.reused == len(made)


def test_report_by_cluster_blocks_equals_one_block(thumbs_run, tmp_path, monkeypatch):
    # A run larger than one block of members is read and rendered a block of whole
    # clusters at a time (memory bounded by the block), each block's pages by forked
    # processes: every file of the report must be the one-block report's (written by this
    # process alone), byte for byte, and the split files gone afterwards.
    cfg, paths, threshold = thumbs_run
    folder = Path(paths.report)
    one_block = tmp_path / "one-block"
    shutil.copytree(folder, one_block)
    sizes = sinks.read_parquet(paths.cluster_summary)["size"]
    block_rows = 100
    assert sizes.max() > block_rows and (sizes.sum() / block_rows) > 4  # several blocks
    monkeypatch.setattr(thumbnails, "SOURCE_CROP_MAX_BYTES", threshold)
    monkeypatch.setattr(members, "BLOCK_ROWS", block_rows)
    monkeypatch.setattr(report, "PARALLEL_MIN_PAGES", 1)  # each block's pages by 2 processes
    staging = tmp_path / "staging"
    from pipeline.catalog import Catalog

    result = report.write_report(cfg.report, cfg.input, cfg.postprocess,
                                 Catalog.from_config(cfg), 2, None, str(staging))  # fmt: skip
    assert result.thumbnails.reused > 0 and not staging.exists()
    expected = {
        p.relative_to(one_block): p.read_bytes() for p in one_block.rglob("*") if p.is_file()
    }
    got = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert got.keys() == expected.keys()
    assert [name for name in expected if got[name] != expected[name]] == []


def test_report_removes_a_killed_runs_split_files_only(report_run):
    # A report killed while its members were split by block leaves report-<run id> in the
    # staging folder: the next report run removes it, and nothing else there.
    cfg, paths = report_run
    staging = Path(paths.staging)
    stale = staging / "report-20260101T000000-abcdef"
    stale.mkdir(parents=True)
    (stale / "split-00000.arrow").write_bytes(b"partial")
    users = staging / "report-notes"
    users.mkdir()
    run(cfg, stages=("report",), force=True)
    assert not stale.exists() and users.exists()
    users.rmdir()


def source_of(cfg, row) -> Path:
    return Path(cfg.input.images_root) / row["username"] / f"{row['image_name']}.jpg"


@pytest.mark.parametrize("run_fixture", ["report_run", "thumbs_run"])
def test_overview_thumbnails_only_of_large_sources(run_fixture, request):
    # A source image of at most SOURCE_CROP_MAX_BYTES is shown on the overview pages
    # cropped from itself (a frame of the crop's size, the box for the page's script); a
    # larger one gets a thumbnail. By default every source of the fixture is small.
    cfg, paths, *rest = request.getfixturevalue(run_fixture)
    threshold = rest[0] if rest else thumbnails.SOURCE_CROP_MAX_BYTES
    labelled = sinks.read_parquet(paths.postprocessed).set_index(schema.OBJECT_ID)
    folder = Path(paths.report)
    small = large = 0
    for page in [folder / "index.html", folder / "gallery.html", *folder.glob("clusters/*.html")]:
        text = page.read_text(encoding="utf-8")
        for src in read_page(page).images:
            if "thumbs/" in src:
                row = labelled.loc[int(src.rsplit("/", 1)[1].split("-")[0])]
                assert source_of(cfg, row).stat().st_size > threshold, src
                large += 1
            else:
                source = (page.parent / unquote(src)).resolve()
                assert source.stat().st_size <= threshold, src
                small += 1
                assert f'class="src-crop" src="{src}" data-box="' in text
    assert small > 0 and (large > 0) == (run_fixture == "thumbs_run")


def test_missing_images_root_gives_metadata_cards(report_run, tmp_path, caplog):
    cfg, paths = report_run
    copy = tmp_path / "out"
    shutil.copytree(paths.root, copy, ignore=shutil.ignore_patterns("report", "embeddings.zarr"))
    missing = cfg.model_copy(
        update={
            "input": cfg.input.model_copy(update={"images_root": str(tmp_path / "nowhere")}),
            "output": cfg.output.model_copy(update={"dir": str(copy)}),
        }
    )
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        result = render_report(missing, n_workers=1)
    assert "does not exist" in caplog.text and "metadata cards" in caplog.text
    page = (copy / "report" / "clusters" / "0.html").read_text(encoding="utf-8")
    cards = [m for grid in members_of(page).values() for m in grid]
    assert cards and not any("t" in m or "src" in m for m in cards)  # metadata cards
    assert "<img" not in (copy / "report" / "index.html").read_text(encoding="utf-8")
    assert result.thumbnails.made == 0
    assert not list((copy / "report" / "thumbs").glob("*"))


def test_images_outside_images_root_are_never_read(tmp_path):
    from pipeline.config import InputConfig

    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "u").mkdir(parents=True)
    outside.mkdir()
    gradient_image(64, 64).save(images / "u" / "ok.jpg")
    gradient_image(64, 64).save(outside / "secret.jpg")
    (images / "u" / "link.jpg").symlink_to(outside / "secret.jpg")
    os.mkfifo(images / "u" / "fifo.jpg")
    samples = pd.DataFrame(
        {
            schema.OBJECT_ID: [0, 1, 2, 3],
            "username": ["u", "u", "u", "u"],
            "image_name": ["ok", "../../outside/secret", "link", "fifo"],
            "bbox": ["[0, 0, 32, 32]"] * 4,
        }
    )
    cfg = InputConfig(images_root=str(images), image_template="{username}/{image_name}.jpg")
    thumbs, stats = report.make_thumbnails(samples, cfg, 32, tmp_path / "thumbs", n_workers=1)
    assert set(thumbs) == {0}  # the FIFO did not block; nothing outside was opened
    assert stats.outside_root == 2 and stats.unreadable + stats.missing_images == 1


def test_cluster_pages_show_the_health_of_the_summary(report_run):
    # Each cluster page states its users, cosine spread and nearest cluster as the summary
    # has them (independently: the top user's share recomputed from the table), and each
    # flag the summary raises, with a working link to the other cluster.
    cfg, paths = report_run
    summary = sinks.read_parquet(paths.cluster_summary)
    labelled = sinks.read_parquet(paths.postprocessed, columns=["cluster", "username"])
    seen_flag = False
    for rec in summary[summary["size"] > 0].to_dict("records"):
        c = rec["cluster"]
        text = (Path(paths.report) / "clusters" / f"{c}.html").read_text(encoding="utf-8")
        health = text.split('<section id="health">')[1].split("</section>")[0]
        users = labelled.loc[labelled["cluster"] == c, "username"].value_counts()
        assert f"{len(users):,} users; top user {users.index[0]}" in health or (
            users.iloc[0] == users.iloc[1]  # a tie: the summary names the first by name
        )
        assert f"with {100 * users.iloc[0] / users.sum():.0f} % of the members" in health
        assert f'nearest cluster <a href="../clusters/{rec["nearest_cluster"]}.html">' in health
        # The cosine histogram of its members, with the threshold marked.
        assert 'class="chart"' in health and f"threshold {cfg.postprocess.min_similarity}" in health
        if rec["single_user"]:
            seen_flag = True
            assert "single user" in health
        else:
            assert "single user" not in health
    empty = summary[summary["size"] == 0]["cluster"].tolist()
    for c in empty[:3]:
        text = (Path(paths.report) / "clusters" / f"{c}.html").read_text(encoding="utf-8")
        assert 'id="health"' not in text
    assert seen_flag or not summary["single_user"].any()


# --------------------------------------------------------------------------- view-models


def test_picks_by_hand():
    # Cluster 0: five kept and two removed members; cluster 1: one removed member.
    labelled = pd.DataFrame(
        {
            schema.OBJECT_ID: [0, 1, 2, 3, 4, 5, 6, 7],
            "cluster": [0, 0, 0, 0, 0, 0, 0, 1],
            "sim": [0.9, 0.95, 0.8, 0.75, 0.72, 0.6, 0.5, 0.3],
            schema.STATUS: ["kept"] * 5 + ["removed:low_similarity"] * 2 + ["removed:x"],
        }
    )
    picks = views.cluster_picks(views.order_members(labelled), 3, 2, 2)
    assert picks[0].top == [1, 0, 2]
    assert picks[0].weakest_kept == [3, 4]  # least similar kept last: the group's edge
    assert picks[0].removed_tail == [6, 5]  # least similar first
    assert picks[1].top == [7] and picks[1].weakest_kept == [] and picks[1].removed_tail == [7]
    assert picks[0].strip(4) == [1, 0, 3, 4]


def test_user_mixes_equal_user_mix_of_each_cluster():
    rng = np.random.default_rng(3)
    clusters = rng.integers(0, 40, 3000)
    users = np.array([f"u{u}" for u in rng.integers(0, 25, 3000)], dtype=object)
    users[::97] = None  # missing users are not counted
    mixes = views.user_mixes(clusters, users)
    for c in np.unique(clusters):
        counts = pd.Series(users[clusters == c]).value_counts()
        assert mixes.get(int(c), []) == views.user_mix(counts), c


def test_rescue_settings_by_hand():
    # 6 members after dedupe, 2 above 0.7: size rule and similarity rule both removed it.
    sims = np.array([0.9, 0.8, 0.69, 0.65, 0.6, 0.3])
    assert views.rescue_settings(sims, 0.7, 5) == [
        "postprocess.min_cluster_size: 2 (2 members pass the similarity filter)",
        "postprocess.min_similarity: 0.59 (5 members would pass it)",
    ]
    # Too few members for the size rule whatever the threshold.
    assert views.rescue_settings(np.array([0.9, 0.8]), 0.7, 5) == [
        "postprocess.min_cluster_size: 2 (2 members pass the similarity filter)"
    ]


def test_nearest_clusters_and_map_by_hand():
    centres = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1], [0, 0.1, 0.9]])
    ids, cos = views.nearest_clusters(centres, k=1)
    assert ids[:, 0].tolist() == [1, 0, 3, 2]
    expected = (centres[0] @ centres[1]) / np.linalg.norm(centres[1])
    assert cos[0, 0] == pytest.approx(expected, rel=1e-6)
    xy = views.centre_map(centres)
    # The first axis of the map separates the two pairs of look-alikes.
    x = xy[:, 0]
    assert abs(x[0] - x[1]) + abs(x[2] - x[3]) < 0.5 * abs(x[0] - x[2])
    assert xy.min() == 0.0 and xy.max() == 1.0


def test_template_escapes_hostile_values():
    from pipeline.report import render

    site = render.Site(root="<script>alert(1)</script>", model="m", report_id="r")
    tile = {"cluster": 1, "state": "whole", "tag": "<img src=x onerror=alert(2)>", "size": 3,
            "size_final": 3, "mean_sim": "0.9", "members": [
                {"src": None, "tag": "<b>tag</b>", "alt": "<i>alt</i>"},
                {"src": '"><script>x()</script>', "w": 9, "h": 9, "alt": "<i>alt</i>",
                 "box": '1 2"><script>y()</script>'}]}  # fmt: skip
    html = render.render("gallery.html", title="<b>", prefix="", site=site, tiles=[tile],
                         n_crops=9, tags=[("<u>", 1)], state_counts=[])  # fmt: skip
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert "<title>&lt;b&gt;</title>" in html
    for hostile in ("<img src=x", "<b>tag</b>", "<i>alt</i>", "<u>", "<script>x", "<script>y"):
        assert hostile not in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html


# --------------------------------------------------------------------------- browser

runner = CliRunner()

#: The images of the page that did not load (``naturalWidth`` 0), after loading them all.
IMAGES_BROKEN = (
    "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
)


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium under Playwright (no browser download: the system binary)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is in the 'test' extra"
    )
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=binary, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield browser
        browser.close()


@pytest.fixture
def tab(chromium):
    """A fresh browser profile (its own localStorage) at 1,280 x 900; collects console
    errors, uncaught exceptions and failed loads."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
    yield page, errors
    context.close()


def load_all_images(page) -> list[str]:
    """Make every lazy image load, wait for them, and return the broken ones."""
    page.evaluate(
        "document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')"
    )
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
    return page.evaluate(IMAGES_BROKEN)


@pytest.fixture
def own_run(report_run, tmp_path):
    """A copy of the report run (and a config file for it) that a test may apply groups to."""
    cfg, paths = report_run
    copy = tmp_path / "out"
    shutil.copytree(paths.root, copy)
    data = cfg.model_dump(mode="json")
    data["output"]["dir"] = str(copy)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    return config, copy


def test_workbench_pick_exclude_download_apply_and_find_the_group(own_run, tab, tmp_path):
    page, errors = tab
    config, root = own_run
    folder = root / "report"
    summary = sinks.read_parquet(str(root / "cluster_summary.parquet"))
    kept = summary[summary["size_final"] > 0].sort_values("size_final", ascending=False)
    three = kept["cluster"].astype(int).tolist()[:3]
    page.goto(folder.joinpath("index.html").as_uri())
    assert load_all_images(page) == []
    page.screenshot(path=str(ARTIFACTS / "report-overview.png"))
    # Name a group, tick three clusters in the index.
    page.fill("#gb-name", "look-alikes")
    page.click("#gb-new")
    for c in three:
        page.check(f"#cluster-index input.pick[data-cluster='{c}']")
    assert "3 cluster(s)" in page.inner_text("#gb-summary")
    # On the first cluster's page (another page: the picks come along), exclude the
    # weakest kept member.
    page.goto(folder.joinpath("clusters", f"{three[0]}.html").as_uri())
    assert page.is_checked(f"h1 input.pick[data-cluster='{three[0]}']")
    box = page.locator("#samples-weakest input.exclude").last
    stray = int(box.get_attribute("data-object"))
    box.check()
    assert load_all_images(page) == []
    page.screenshot(path=str(ARTIFACTS / "report-cluster-large.png"), full_page=True)
    # Download the groups file: exactly the picks.
    with page.expect_download() as download:
        page.click("#gb-download")
    groups_file = tmp_path / "groups.yaml"
    download.value.save_as(groups_file)
    assert yaml.safe_load(groups_file.read_text())["groups"] == [
        {"name": "look-alikes", "clusters": sorted(three), "exclude_objects": [stray]}
    ]
    # Apply it as it is; the rebuilt report shows the group.
    result = runner.invoke(app, ["groups", "-c", str(config), "--file", str(groups_file), "-q"])
    assert result.exit_code == 0, result.output
    selected = sinks.read_parquet(str(root / "ins_posts_clusters.parquet"))
    expected = int((selected["cluster"].isin(three) & (selected[schema.OBJECT_ID] != stray)).sum())
    page.goto(folder.joinpath("index.html").as_uri())
    row = page.locator("#groups-table tr[data-group='look-alikes']")
    assert row.locator("[data-col=objects]").get_attribute("data-value") == str(expected)
    assert row.locator("[data-col=clusters]").get_attribute("data-value") == "3"
    # The picks survived the reload; the map rings them.
    assert page.locator("#centre-map .dot.picked").count() == 3
    page.locator("#map").screenshot(path=str(ARTIFACTS / "report-map.png"))
    assert errors == []


def test_filters_sorting_gallery_and_pages_in_the_browser(report_run, tab):
    page, errors = tab
    _, paths = report_run
    folder = Path(paths.report).resolve()
    summary = sinks.read_parquet(paths.cluster_summary)
    page.goto(folder.joinpath("index.html").as_uri())
    visible = "Array.from(document.querySelectorAll('#cluster-index tbody tr')).filter(r => !r.hidden).map(r => r.dataset.cluster)"
    page.fill("#f-id", "1")
    assert page.evaluate(visible) == ["1"]  # exact id, not every id holding a 1
    page.fill("#f-id", "")
    page.select_option("#f-state", "kept")
    n_kept = int((summary["size_final"] > 0).sum())
    assert len(page.evaluate(visible)) == n_kept
    page.select_option("#f-state", "")
    tag = page.locator("#f-tag option").nth(1).get_attribute("value")
    page.select_option("#f-tag", tag)
    tags = summary.set_index("cluster")["dominant_tags"].map(views.dominant_tag)
    assert sorted(map(int, page.evaluate(visible))) == sorted(tags[tags == tag].index.tolist())
    page.select_option("#f-tag", "")
    # Sorting by kept cosine: descending, then ascending, missing values last both ways.
    values = "Array.from(document.querySelectorAll('#cluster-index tbody tr')).map(r => r.querySelector('[data-col=mean_sim_final]').dataset.value)"
    for _ in range(2):
        page.click("th[data-col=mean_sim_final]")
        shown = page.evaluate(values)
        present = [float(v) for v in shown if v != ""]
        assert shown[: len(present)] == [v for v in shown if v != ""]  # blanks at the end
        assert present in (sorted(present), sorted(present, reverse=True))
    # Nothing is cut off at 1,280 px: no section scrolls sideways.
    wide = "Array.from(document.querySelectorAll('section')).filter(s => s.scrollWidth > s.clientWidth + 1).map(s => s.id)"
    assert page.evaluate(wide) == []
    # The gallery: one tile per non-empty cluster, 9 to 16 crops each (or all members).
    page.goto(folder.joinpath("gallery.html").as_uri())
    assert load_all_images(page) == []
    counts = page.evaluate(
        "Array.from(document.querySelectorAll('.tile')).map(t => t.querySelectorAll('img').length)"
    )
    assert len(counts) == int((summary["size"] > 0).sum())
    sizes = summary[summary["size"] > 0].sort_values(
        ["size_final", "size", "cluster"], ascending=[False, False, True]
    )["size"]
    assert counts == [min(int(n), report.GALLERY_CROPS) for n in sizes]
    page.screenshot(path=str(ARTIFACTS / "report-gallery.png"))
    # A removed cluster names the setting that would keep it; its member pages load.
    removed = summary[(summary["size"] > 0) & (summary["size_final"] == 0)]
    c = int(removed.iloc[0]["cluster"])
    page.goto(folder.joinpath("clusters", f"{c}.html").as_uri())
    assert "postprocess.min_" in page.inner_text("#rescue")
    assert load_all_images(page) == []
    page.screenshot(path=str(ARTIFACTS / "report-cluster-removed.png"), full_page=True)
    page.click("#member-pages a >> nth=0")  # its removed members, page 1 (by the script)
    n_members = int(removed.iloc[0]["size"])
    assert page.locator("#members-grid .card").count() == min(n_members, report.MEMBERS_PER_PAGE)
    assert f"of {n_members:,}" in page.inner_text("#member-page-title")
    assert load_all_images(page) == []
    # Members without a thumbnail show their source image, cropped to a visible box.
    crops = page.evaluate(
        "Array.from(document.querySelectorAll('.card img.src-crop')).map(i => [i.classList.contains("
        "'fitted'), i.parentNode.getBoundingClientRect().height, i.getBoundingClientRect().width])"
    )
    assert crops and all(fitted and h >= 64 and w > 0 for fitted, h, w in crops), crops[:3]
    assert errors == []


def test_every_page_loads_cleanly_in_the_browser(report_run, tab):
    page, errors = tab
    _, paths = report_run
    folder = Path(paths.report).resolve()
    for path in sorted(folder.glob("clusters/*.html")):
        page.goto(path.as_uri())
        assert load_all_images(page) == [], path.name
    assert errors == []


#: The overview's crops from source images: [fitted, frame width, frame height, visible
#: width of the image inside the frame].
OVERVIEW_CROPS = """Array.from(document.querySelectorAll('.crop-frame img.src-crop')).map(i => {
  const f = i.parentNode.getBoundingClientRect(), r = i.getBoundingClientRect();
  return [i.classList.contains('fitted'), f.width, f.height,
          Math.min(r.right, f.right) - Math.max(r.left, f.left)];
})"""


def test_overview_crops_from_sources_and_thumbnails_in_the_browser(thumbs_run, tab):
    # Index, gallery and a cluster page (nearest strips) with both kinds of crops: every
    # image loads, and each source crop fills its frame once fitted by the page's script.
    page, errors = tab
    _, paths, _ = thumbs_run
    folder = Path(paths.report).resolve()
    summary = sinks.read_parquet(paths.cluster_summary)
    largest = int(summary.sort_values("size", ascending=False).iloc[0]["cluster"])
    for path in [
        folder / "index.html",
        folder / "gallery.html",
        folder / "clusters" / f"{largest}.html",
    ]:
        page.goto(path.as_uri())
        assert load_all_images(page) == [], path.name
        assert page.locator("img[src*='thumbs/']").count() > 0, path.name
        crops = page.evaluate(OVERVIEW_CROPS)
        assert crops, path.name
        for fitted, w, h, seen in crops:
            assert fitted and w > 0 and h > 0 and seen > 0, (path.name, crops[:3])
    page.screenshot(path=str(ARTIFACTS / "report-cluster-mixed-crops.png"), full_page=True)
    assert errors == []

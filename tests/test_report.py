"""The review report: its numbers are the summary tables', its crops are the boxes' pixels,
and it works in a real headless browser (Debian's chromium, driven over DevTools)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import report, schema, sinks, summarize
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
        for col in ("size", "size_after_dedupe", "size_after_similarity", "size_final"):
            assert int(row[col]) == rec[col], (rec["cluster"], col)
        for col in ("mean_sim", "mean_sim_final", "mean_dist"):
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


def test_cluster_pages_show_sizes_and_the_samples_of_summarize(report_run):
    cfg, paths = report_run
    summary = sinks.read_parquet(paths.cluster_summary)
    labelled = sinks.read_parquet(paths.postprocessed)
    n = cfg.report.samples_per_cluster
    states = set()
    for rec in summary.to_dict("records"):
        c = rec["cluster"]
        text = (Path(paths.report) / "clusters" / f"{c}.html").read_text(encoding="utf-8")
        steps = Tables(text).tables["cluster-steps"]
        assert [int(r["rows"]) for r in steps] == [
            rec["size"], rec["size_after_dedupe"], rec["size_after_similarity"], rec["size_final"]
        ]  # fmt: skip
        assert sum(int(r["removed"]) for r in steps) == rec["size"] - rec["size_final"]
        state = report.cluster_state(rec).state
        states.add(state)
        assert f'class="badge {state}"' in text
        # The samples shown are summarize.cluster_samples', in its order.
        top, tail = summarize.cluster_samples(labelled, c, n)
        shown = [int(x) for x in pd.Series(text.split('data-object="')[1:]).str.split('"').str[0]]
        expected = top[schema.OBJECT_ID].tolist()
        if rec["size"] > n:
            expected += tail[schema.OBJECT_ID].tolist()
        assert shown == expected, c
        if state == "removed":
            assert "Removed:" in text and "removed:" in text
    assert {"removed", "shrunk"} <= states, "the fixture should cover removed and shrunk clusters"


def test_every_link_resolves_and_every_image_exists(report_run):
    _, paths = report_run
    folder = Path(paths.report)
    pages = [folder / "index.html", *sorted((folder / "clusters").glob("*.html"))]
    n_images = 0
    for path in pages:
        page = read_page(path)
        for link in page.links:
            target = link.split("#")[0]
            if target:
                assert (path.parent / target).is_file(), (path.name, link)
        for src in page.images:
            assert (path.parent / src).is_file(), (path.name, src)
            n_images += 1
    assert n_images > 0


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


def test_crop_files_are_the_bbox_region_of_the_source_image(report_run):
    cfg, paths = report_run
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
        assert error < 3.0, (path.name, error)
        errors.append(error)
        others.append(np.abs(thumb - other).mean())
    assert len(errors) >= 10
    assert np.mean(others) > 5 * np.mean(errors)


def test_thumbnails_only_for_samples_shown_and_reused_on_rerun(report_run):
    cfg, paths = report_run
    folder = Path(paths.report)
    shown = set()
    for page in (folder / "clusters").glob("*.html"):
        text = page.read_text(encoding="utf-8")
        shown.update(int(x.split('"')[0]) for x in text.split('data-object="')[1:])
    made = {int(p.name.split("-")[0]) for p in (folder / "thumbs").glob("*.jpg")}
    assert made == shown
    again = render_report(cfg, n_workers=2)
    assert again.thumbnails.made == 0 and again.thumbnails.reused == len(made)


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
    assert "<img" not in page and 'class="meta-card"' in page
    assert result.thumbnails.made == 0
    assert not list((copy / "report" / "thumbs").glob("*"))


# --------------------------------------------------------------------------- browser


class Chromium:
    """A headless Debian chromium driven over the DevTools protocol (one tab)."""

    def __init__(self, binary: str, profile: Path) -> None:
        import websocket

        self.proc = subprocess.Popen(
            [
                binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--no-default-browser-check", "--hide-scrollbars", "--window-size=1280,900",
                "--remote-debugging-port=0", "--remote-allow-origins=*",
                f"--user-data-dir={profile}", "about:blank",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}{path}", timeout=30, suppress_origin=True
        )
        self.next_id = 0
        self.events: list[dict] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=self.session)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.send(method, params, self.session)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def load(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")

    def follow(self, selector: str) -> None:
        """Click a link and wait for the page it opens."""
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        self.wait_for("Page.loadEventFired")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                thrown = details.get("exception", {}).get("description")
                out.append(str(thrown or details.get("text")))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value")) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(f"{params['entry']['text']} {params['entry'].get('url', '')}")
        return out

    def screenshot(self, path: Path, max_height: int = 5000) -> None:
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height),
                "scale": 1}  # fmt: skip
        data = self.call(
            "Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True}
        )["data"]
        import base64

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - best effort, the process is ended below
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


#: The images of the page that did not load (``naturalWidth`` 0).
IMAGES_OK = (
    "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
)


@pytest.fixture
def browser(tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    pytest.importorskip("websocket", reason="websocket-client is in the 'test' extra")
    chrome = Chromium(binary, tmp_path / "profile")
    yield chrome
    chrome.close()


def test_report_in_a_headless_browser(report_run, browser):
    _, paths = report_run
    folder = Path(paths.report).resolve()
    summary = sinks.read_parquet(paths.cluster_summary)
    by_size = summary.sort_values(["size", "cluster"], ascending=[False, True])
    largest = int(by_size.iloc[0]["cluster"])
    removed = summary[(summary["size"] > 0) & (summary["size_final"] == 0)]

    browser.load(folder.joinpath("index.html").as_uri())
    assert browser.evaluate("document.querySelectorAll('svg.chart').length") >= 3
    assert browser.evaluate("document.images.length") > 0
    assert browser.evaluate(IMAGES_OK) == []
    # Sorting by mean similarity puts the most similar cluster first (descending).
    browser.evaluate("document.querySelector('th[data-col=mean_sim]').click()")
    values = browser.evaluate(
        "Array.from(document.querySelectorAll('#cluster-index tbody tr'))"
        ".map(r => r.querySelector('[data-col=mean_sim]').dataset.value)"
    )
    numbers = [float(v) for v in values if v != ""]
    assert numbers == sorted(numbers, reverse=True) and len(numbers) > 1
    browser.evaluate("document.querySelector('th[data-col=size]').click()")
    browser.evaluate("document.querySelector('th[data-col=size]').click()")
    browser.screenshot(ARTIFACTS / "report-overview.png")

    # Overview -> the largest cluster's page -> back to the overview.
    browser.follow(f"#cluster-index a[href='clusters/{largest}.html']")
    assert browser.evaluate("location.href").endswith(f"/clusters/{largest}.html")
    title = browser.evaluate("document.querySelector('h1').textContent")
    assert title.startswith(f"Cluster {largest}")
    assert browser.evaluate("document.querySelectorAll('#samples-top img').length") > 0
    assert browser.evaluate(IMAGES_OK) == []
    browser.screenshot(ARTIFACTS / "report-cluster-largest.png")
    browser.follow("#back")
    assert browser.evaluate("location.href").endswith("/index.html")

    if len(removed):
        c = int(removed.iloc[0]["cluster"])
        browser.load(folder.joinpath("clusters", f"{c}.html").as_uri())
        assert browser.evaluate("document.querySelector('.badge').textContent") == "removed"
        assert browser.evaluate(IMAGES_OK) == []
        browser.screenshot(ARTIFACTS / "report-cluster-removed.png")
    assert browser.errors() == []
    assert (ARTIFACTS / "report-overview.png").stat().st_size > 10_000


def test_cluster_pages_load_cleanly_in_the_browser(report_run, browser):
    _, paths = report_run
    folder = Path(paths.report).resolve()
    for page in sorted((folder / "clusters").glob("*.html")):
        browser.load(page.as_uri())
        assert browser.evaluate(IMAGES_OK) == [], page.name
    assert browser.errors() == []


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

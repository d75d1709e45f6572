"""Reliability (issue 6): bad input, crashes and reruns, with every object accounted for.

Each bad-input case damages a copy of a small generated dataset and checks the outcome a
user sees: a one-line ``error:`` with the file, row or key and the bad value (no
traceback), or the object in ``rejects.parquet`` with its reason while every other object
comes through. Crashes are real ``SIGKILL``s of runs in child processes, followed by a
rerun whose outputs must equal an undisturbed run's.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline import schema, sinks, summarize
from pipeline.catalog import Catalog
from pipeline.cli import app
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.ingest import read_objects_csv, validate_rows
from pipeline.runner import run
from pipeline.schema import REJECT_REASONS
from pipeline.synthetic import DemoDataset, make_demo_dataset
from tests.conftest import config_for, ingest_only

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def base_dataset(tmp_path_factory) -> DemoDataset:
    """1,500 objects x 16 dims around 15 clusters: the dataset every case damages a copy of."""
    return make_demo_dataset(
        tmp_path_factory.mktemp("reliability"), n_objects=1500, dim=16, n_true_clusters=15, seed=5
    )


def copy_dataset(dataset: DemoDataset, dest: Path) -> DemoDataset:
    shutil.copytree(dataset.root, dest)
    return replace(
        dataset,
        root=dest,
        objects_csv=dest / dataset.objects_csv.name,
        embeddings_root=dest / dataset.embeddings_root.name,
        truth=dest / dataset.truth.name,
    )


@pytest.fixture
def dataset(base_dataset, tmp_path) -> DemoDataset:
    """A private copy of ``base_dataset`` that a test may damage."""
    return copy_dataset(base_dataset, tmp_path / "data")


def write_config(
    dataset: DemoDataset, out: Path, edit: Callable[[dict], None] | None = None
) -> str:
    """The test config for ``dataset`` as YAML; ``edit`` may change the raw mapping (even
    into something invalid, which is the point of some cases)."""
    data = config_for(dataset, out, train={"n_clusters": 15}).model_dump(mode="json")
    data["ingest"]["on_bad_bbox"] = "reject"  # these cases count a bad bbox as a reject
    if edit is not None:
        edit(data)
    path = out.parent / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def invoke(dataset: DemoDataset, out: Path, *args: str, edit=None):
    return runner.invoke(app, [args[0], "-c", write_config(dataset, out, edit), *args[1:]])


def assert_one_line_error(result, exit_code: int, *fragments: str) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == exit_code, result.output
    assert len(errors) == 1, result.output
    # A user error ends in SystemExit (the CLI's one line); a bug would surface as itself.
    assert type(result.exception) is SystemExit, result.exception
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------- damage


def read_csv_text(dataset: DemoDataset) -> pd.DataFrame:
    return pd.read_csv(dataset.objects_csv, dtype=str, keep_default_na=False)


def set_value(dataset: DemoDataset, row: int, column: str, value: str) -> None:
    frame = read_csv_text(dataset)
    frame.loc[row, column] = value
    frame.to_csv(dataset.objects_csv, index=False)


def embedding_file(dataset: DemoDataset, row: int) -> Path:
    obj = read_csv_text(dataset).iloc[row]
    return dataset.embeddings_root / obj["username"] / "embeddings" / f"{obj['image_name']}.npy"


def rows_where(dataset: DemoDataset, row: int, column: str) -> set[int]:
    frame = read_csv_text(dataset)
    return set(np.flatnonzero(frame[column] == frame.loc[row, column]).tolist())


def rewrite_vectors(dataset: DemoDataset, row: int, change: Callable) -> Path:
    """Rewrite the embedding file of ``row``; ``change`` edits the array or returns a new one."""
    path = embedding_file(dataset, row)
    vectors = np.load(path)
    changed = change(vectors)
    np.save(path, vectors if changed is None else changed)
    return path


def target_row(dataset: DemoDataset) -> int:
    """The second object of the first image with at least three: damage to its row alone
    must leave its image's other objects in, damage to its file must take them all out."""
    frame = read_csv_text(dataset)
    sizes = frame.groupby("image_name")["idx"].transform("size")
    return int(np.flatnonzero((sizes >= 3) & (frame["idx"] == "1"))[0])


# Each returns (rejected source rows, reason, text the reject detail must contain).
def bad_bbox(ds, row):
    set_value(ds, row, "bbox", "[10, 20, 5")
    return {row}, "bad_bbox", "Got '[10, 20, 5' instead"


def non_numeric_score(ds, row):
    set_value(ds, row, "score", "high")
    return {row}, "bad_score", "score must be a finite number. Got 'high' instead"


def duplicate_row(ds, row):
    frame = read_csv_text(ds)
    pd.concat([frame, frame.iloc[[row]]]).to_csv(ds.objects_csv, index=False)
    return {len(frame)}, "duplicate_object", f"repeats data row {row}"


def missing_embedding_file(ds, row):
    embedding_file(ds, row).unlink()
    return rows_where(ds, row, "image_name"), "missing_embedding_file", str(embedding_file(ds, row))


def missing_user_folder(ds, row):
    folder = embedding_file(ds, row).parent.parent
    shutil.rmtree(folder)
    return rows_where(ds, row, "username"), "missing_user_folder", str(folder)


def idx_beyond_file(ds, row):
    set_value(ds, row, "idx", "99")
    return {row}, "idx_out_of_range", "Got 99 instead"


def wrong_dimension(ds, row):
    path = rewrite_vectors(ds, row, lambda v: v[:, :8])
    image = rows_where(ds, row, "image_name")
    return (
        image,
        "wrong_dimension",
        f"{path} must be a 2-D array of shape (n, 16). Got ({len(image)}, 8)",
    )


def first_user_in_another_dimension(ds, row):
    """A model change for the CSV's first user: the dimension is still the majority's."""
    for path in embedding_file(ds, 0).parent.glob("*.npy"):
        np.save(path, np.load(path)[:, :8])
    return rows_where(ds, 0, "username"), "wrong_dimension", "must be a 2-D array of shape (n, 16)"


def wrong_dtype(ds, row):
    rewrite_vectors(ds, row, lambda v: (v * 100).astype(np.int32))
    return (
        rows_where(ds, row, "image_name"),
        "wrong_dtype",
        "must be an array of floats. Got 'int32'",
    )


def truncated_npy(ds, row):
    path = embedding_file(ds, row)
    path.write_bytes(path.read_bytes()[:-10])
    return rows_where(ds, row, "image_name"), "corrupt_embedding_file", f"{path} cannot be read"


def corrupt_npy(ds, row):
    path = embedding_file(ds, row)
    path.write_bytes(os.urandom(200))
    return rows_where(ds, row, "image_name"), "corrupt_embedding_file", f"{path} cannot be read"


def nan_value(ds, row):
    def put_nan(vectors):
        vectors[1, 3] = np.nan

    path = rewrite_vectors(ds, row, put_nan)
    return {row}, "non_finite_vector", f"Row 1 of {path} must be finite. Got 1 NaN or infinite"


def infinite_value(ds, row):
    def put_inf(vectors):
        vectors[1, :2] = np.inf

    rewrite_vectors(ds, row, put_inf)
    return {row}, "non_finite_vector", "Got 2 NaN or infinite value(s) instead"


def all_zero_vector(ds, row):
    def zero(vectors):
        vectors[1] = 0.0

    path = rewrite_vectors(ds, row, zero)
    return {row}, "zero_vector", f"Row 1 of {path} is all zeros, so its cosine similarity is"


PER_OBJECT_CASES = [
    bad_bbox, non_numeric_score, duplicate_row, missing_embedding_file, missing_user_folder,
    idx_beyond_file, wrong_dimension, first_user_in_another_dimension, wrong_dtype,
    truncated_npy, corrupt_npy, nan_value, infinite_value, all_zero_vector,
]  # fmt: skip


@pytest.mark.parametrize("damage", PER_OBJECT_CASES, ids=lambda f: f.__name__)
def test_bad_object_is_rejected_with_its_reason_and_the_others_come_through(
    dataset, tmp_path, damage
):
    row = target_row(dataset)
    rejected, reason, detail = damage(dataset, row)
    out = tmp_path / "out"
    result = invoke(dataset, out, "ingest")
    assert result.exit_code == 0, result.output
    paths = Catalog.from_config(config_for(dataset, out))
    rejects = sinks.read_parquet(paths.rejects)
    assert set(rejects[schema.SOURCE_ROW]) == rejected
    assert (rejects["reason"] == reason).all()
    assert rejects["detail"].str.contains(detail, regex=False).all(), rejects["detail"].iloc[0]
    n_csv_rows = len(read_csv_text(dataset))
    objects = sinks.read_parquet(paths.objects)
    assert sorted(objects[schema.SOURCE_ROW]) == sorted(set(range(n_csv_rows)) - rejected)

    # The same object is fatal when asked: one line naming the row, the reason and the value.
    failed = invoke(dataset, out, "ingest", "--set", "ingest.on_bad_object=fail")
    first = min(rejected)
    assert_one_line_error(
        failed, 1, str(dataset.objects_csv), f"data row {first} (line {first + 2}), {reason}:",
        detail, "set ingest.on_bad_object to 'reject'",
    )  # fmt: skip
    assert not (out / "_markers" / "ingest.json").exists()


def drop_column(ds):
    read_csv_text(ds).drop(columns=["score"]).to_csv(ds.objects_csv, index=False)


def add_cluster_column(ds):
    read_csv_text(ds).assign(cluster="7").to_csv(ds.objects_csv, index=False)


def keep_header_only(ds):
    ds.objects_csv.write_text(ds.objects_csv.read_text().splitlines()[0])


def append_short_line(ds):
    with open(ds.objects_csv, "a") as handle:
        handle.write("a,b,c\n")


def break_utf8_on_line_101(ds):
    lines = ds.objects_csv.read_bytes().splitlines(keepends=True)
    lines[100] = lines[100].replace(b"user_", b"us\xff\xfeer_")
    ds.objects_csv.write_bytes(b"".join(lines))


def set_key(section: str, key: str, value):
    return lambda data: data[section].update({key: value})


def more_clusters_than_objects(data):
    data["train"]["n_clusters"] = 5000
    data["train"]["batch_size"] = 8192
    data["ingest"]["chunk_rows"] = 8192


def output_in(*parts: str, key: str = "dir"):
    """Put ``output.<key>`` at the config file (a regular file) joined with ``parts``."""
    return lambda data: data["output"].update(
        {key: str(Path(data["output"]["dir"]).parent.joinpath("config.yaml", *parts))}
    )


@dataclass
class ErrorCase:
    """A damage (to the data or the config) that must stop the run with one line."""

    name: str
    exit_code: int
    fragments: tuple[str, ...]  # {csv} stands for the objects CSV's path
    damage: Callable[[DemoDataset], None] = lambda ds: None
    edit: Callable[[dict], None] | None = None


ERROR_CASES = [
    ErrorCase("missing objects CSV", 1, ("Objects CSV {csv} does not exist. Set input.objects",),
              damage=lambda ds: ds.objects_csv.unlink()),
    ErrorCase("empty objects CSV", 1, ("Objects CSV {csv} is empty.",),
              damage=lambda ds: ds.objects_csv.write_text("")),
    ErrorCase("header but no rows", 1, ("Objects CSV {csv} has a header but no rows.",),
              damage=keep_header_only),
    ErrorCase("required column missing", 1, ("{csv} is missing required column(s) ['score']",),
              damage=drop_column),
    ErrorCase("line with too few fields", 1,
              ("{csv} line 1502 must have 9 fields", "Got 3 ('a,b,c') instead"),
              damage=append_short_line),
    ErrorCase("a line that is not UTF-8", 1, ("{csv} line 101 must be UTF-8 text. Got b'",),
              damage=break_utf8_on_line_101),
    ErrorCase("a column the pipeline adds", 1, ("{csv} has column(s) ['cluster']", "Rename"),
              damage=add_cluster_column),
    ErrorCase("embeddings root missing", 1, ("Embeddings root", "Set input.embeddings_root"),
              damage=lambda ds: shutil.rmtree(ds.embeddings_root)),
    ErrorCase("every object rejected", 1, ("No object of {csv}", "'not_selected:tag'"),
              edit=set_key("select", "tags", ["unicorn"])),
    ErrorCase("n_clusters larger than the objects", 1,
              ("train.n_clusters must be <= the number of ingested objects (1,500). "
               "Got 5000 instead.",),
              edit=more_clusters_than_objects),
    ErrorCase("chunk smaller than n_clusters", 2,
              ("ingest.chunk_rows must be >= train.n_clusters (15)", "Got 10 instead."),
              edit=set_key("ingest", "chunk_rows", 10)),
    ErrorCase("unknown config key", 2, ("unknown key 'train.n_clusterz'. Remove it",),
              edit=set_key("train", "n_clusterz", 3)),
    ErrorCase("out-of-range config key", 2, ("key 'postprocess.min_similarity'", "Got 2."),
              edit=set_key("postprocess", "min_similarity", 2)),
    ErrorCase("output folder under a regular file", 1,
              ("output.dir must be a writable folder. Got", "config.yaml/out' instead",
               "Not a directory"),
              edit=output_in("out")),
    ErrorCase("output folder is a regular file", 1,
              ("output.dir must be a writable folder. Got", "config.yaml' instead"),
              edit=output_in()),
    ErrorCase("staging folder under a regular file", 1,
              ("output.staging_dir must be a writable folder",),
              edit=output_in("staging", key="staging_dir")),
]  # fmt: skip


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.name)
def test_bad_input_or_config_is_one_clear_line(dataset, tmp_path, case):
    case.damage(dataset)
    out = tmp_path / "out"
    result = invoke(dataset, out, "run", edit=case.edit)
    fragments = [f.replace("{csv}", str(dataset.objects_csv)) for f in case.fragments]
    assert_one_line_error(result, case.exit_code, *fragments)
    for stage in ("train", "predict", "postprocess", "report"):
        assert not (out / "_markers" / f"{stage}.json").exists()
    assert not (out / "ins_posts_clusters.csv").exists()
    if case.exit_code == 2:  # config errors are found before any work is done
        assert not (out / "embeddings.zarr").exists()


# --------------------------------------------------------------------------- accounting


def test_every_input_row_ends_in_exactly_one_place(dataset, tmp_path):
    row = target_row(dataset)
    injected = {}
    damages = [bad_bbox, non_numeric_score, idx_beyond_file, nan_value, all_zero_vector,
               missing_embedding_file, duplicate_row]  # fmt: skip
    for offset, damage in enumerate(damages):
        # Damage objects of different images, 40 rows apart.
        frame = read_csv_text(dataset)
        sizes = frame.groupby("image_name")["idx"].transform("size")
        candidates = np.flatnonzero((sizes >= 3) & (frame["idx"] == "1"))
        target = int(candidates[candidates >= row + 40 * offset][0])
        rejected, reason, _ = damage(dataset, target)
        injected.update(dict.fromkeys(rejected, reason))
    n_input = len(read_csv_text(dataset))

    out = tmp_path / "out"
    result = invoke(dataset, out, "run", "--quiet")
    assert result.exit_code == 0, result.output
    paths = Catalog.from_config(config_for(dataset, out))
    rejects = sinks.read_parquet(paths.rejects)
    assert set(rejects["reason"]) <= set(REJECT_REASONS)
    labelled = sinks.read_parquet(paths.postprocessed)
    kept = sinks.read_parquet(paths.clusters_parquet)
    removed = labelled[labelled[schema.STATUS] != schema.STATUS_KEPT]
    places = pd.concat(
        [
            pd.DataFrame(
                {"row": rejects[schema.SOURCE_ROW], "place": "rejected:" + rejects["reason"]}
            ),
            pd.DataFrame({"row": removed[schema.SOURCE_ROW], "place": removed[schema.STATUS]}),
            pd.DataFrame({"row": kept[schema.SOURCE_ROW], "place": "output"}),
        ]
    )
    assert places["row"].is_unique
    assert sorted(places["row"]) == list(range(n_input))
    assert dict(zip(rejects[schema.SOURCE_ROW], rejects["reason"], strict=True)) == injected
    assert set(
        labelled.loc[labelled[schema.STATUS] == schema.STATUS_KEPT, schema.SOURCE_ROW]
    ) == set(kept[schema.SOURCE_ROW])
    # The CSV holds exactly the kept objects.
    csv = pd.read_csv(paths.clusters_csv)
    assert sorted(zip(csv["image_name"], csv["idx"], strict=True)) == sorted(
        zip(kept["image_name"], kept["idx"], strict=True)
    )

    funnel = sinks.read_parquet(paths.funnel)
    assert funnel["rows"].iloc[0] == n_input
    assert funnel["rows"].iloc[-1] + funnel["removed"].sum() == n_input
    assert summarize.is_accounted(funnel)
    counts = places["place"].value_counts()
    # The README's documented row-level (CSV) reasons, written out: not the code's own list.
    row_reasons = ("missing_key", "bad_score", "bad_idx", "bad_bbox", "duplicate_object")
    csv_rejects = sum(counts.get(f"rejected:{r}", 0) for r in row_reasons)
    assert funnel["removed"].tolist() == [
        0, csv_rejects, 0, len(rejects) - csv_rejects,
        counts.get(schema.STATUS_DUPLICATE, 0), counts.get(schema.STATUS_LOW_SIMILARITY, 0),
        counts.get(schema.STATUS_SMALL_CLUSTER, 0),
    ]  # fmt: skip
    assert (
        "Every input row accounted for (output + removed = input): **yes**"
        in Path(paths.summary_markdown).read_text()
    )


# --------------------------------------------------------------------------- reruns


def output_digests(paths: Catalog) -> dict[str, str]:
    """Bytes of every output file, except the markers and the manifest (they hold run ids
    and timestamps) and the review report (rendered for people, with timings)."""
    root = Path(paths.root)
    digests = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not relative.startswith(("_markers/", "_manifest", "report")):
            digests[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def test_same_config_and_seed_give_byte_identical_outputs(dataset, tmp_path):
    out = tmp_path / "out"
    assert invoke(dataset, out, "run", "--quiet").exit_code == 0
    paths = Catalog.from_config(config_for(dataset, out))
    first = output_digests(paths)
    expected = {"ins_posts_clusters.csv", "ins_posts_clusters.parquet", "model/centers.npy",
                "rejects.parquet", "funnel.parquet", "embeddings.zarr/zarr.json"}  # fmt: skip
    assert expected <= set(first)
    before = json.loads((out / "model" / "model.json").read_text())
    again = invoke(dataset, out, "run", "--quiet", "--force")
    assert again.exit_code == 0, again.output
    # model.json also records the model the re-fit was numbered against (pipeline.ids):
    # the same centres, so every id is kept; all else is byte-identical.
    after = json.loads((out / "model" / "model.json").read_text())
    assert after["ids"]["previous_model"] == str(out / "model") and not after["ids"]["new"]
    assert {k: v for k, v in after.items() if k != "ids"} == {
        k: v for k, v in before.items() if k != "ids"
    }
    first.pop("model/model.json")
    second = output_digests(paths)
    second.pop("model/model.json")
    assert second == first


def test_rerun_redoes_what_changed_and_everything_after(dataset, tmp_path):
    row = target_row(dataset)
    path = embedding_file(dataset, row)
    good = path.read_bytes()
    nan_value(dataset, row)
    out = tmp_path / "out"
    cfg = config_for(dataset, out, train={"n_clusters": 15})
    run(cfg)
    assert set(sinks.read_parquet(f"{out}/rejects.parquet")[schema.SOURCE_ROW]) == {row}
    # An embedding file repaired in place (the CSV unchanged) is an input change.
    path.write_bytes(good)
    assert run(cfg).skipped == []
    assert len(sinks.read_parquet(f"{out}/rejects.parquet")) == 0
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})})
    assert run(longer).skipped == ["ingest"]
    wider = longer.model_copy(update={"report": longer.report.model_copy(update={"top_n": 5})})
    assert run(wider).skipped == ["ingest", "train", "predict", "postprocess"]
    assert run(wider, force=True).skipped == []


# --------------------------------------------------------------------------- crashes


def run_cli_pausing_in(args: list[str], stage: str, nth_write: int, flag: str) -> None:
    """Child process: run the CLI, and once ``stage`` has written the temporary copy of its
    ``nth_write``-th output (not yet moved into place) write ``flag`` and wait to be killed.

    Pausing there makes the kill land mid-stage deterministically, with temporaries on disk.
    """
    from pipeline import cli, sinks, store
    from pipeline import runner as run_module

    real_atomic_path, real_timed = store.atomic_path, run_module.timed
    state = {"stage": None, "writes": 0}
    lock = threading.Lock()

    @contextmanager
    def timed(name, timings=None):
        state["stage"] = name
        with real_timed(name, timings):
            yield

    @contextmanager
    def atomic_path(url):
        with real_atomic_path(url) as tmp:
            yield tmp
            with lock:
                state["writes"] += state["stage"] == stage
                paused = state["stage"] == stage and state["writes"] == nth_write
            if paused:
                Path(flag).write_text(url)
                threading.Event().wait()

    run_module.timed = timed
    store.atomic_path = sinks.atomic_path = atomic_path
    cli.app(args)


@pytest.fixture(scope="module")
def forkserver():
    """Child processes forked from a server that imported the package once (a fresh
    interpreter per run would cost seconds of imports each)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline.cli", run_cli_pausing_in.__module__])
    return context


def run_child(
    context, args: list[str], pause_in: str = "", nth_write: int = 1, flag: Path | None = None
):
    """Run the CLI in a child; with ``pause_in``, SIGKILL it once it pauses in that stage."""
    process = context.Process(
        target=run_cli_pausing_in, args=(args, pause_in, nth_write, str(flag))
    )
    process.start()
    deadline = time.monotonic() + 120
    while pause_in and not flag.exists():
        assert process.is_alive(), f"the run ended (exit {process.exitcode}) before {pause_in}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    if pause_in:
        os.kill(process.pid, signal.SIGKILL)
    process.join(120)
    assert process.exitcode == (-signal.SIGKILL if pause_in else 0)


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def clean_run(base_dataset, tmp_path_factory):
    """An undisturbed run of ``base_dataset``: what every killed-and-rerun run must equal."""
    out = tmp_path_factory.mktemp("clean") / "out"
    result = invoke(base_dataset, out, "run", "--quiet")
    assert result.exit_code == 0, result.output
    return Catalog.from_config(config_for(base_dataset, out))


def assert_same_final_outputs(paths: Catalog, clean: Catalog) -> None:
    assert Path(paths.clusters_csv).read_bytes() == Path(clean.clusters_csv).read_bytes()
    np.testing.assert_array_equal(
        np.load(f"{paths.model}/centers.npy"), np.load(f"{clean.model}/centers.npy")
    )
    # Parquet metadata holds the (different) output folder; the data must be identical.
    for name in ("clusters_parquet", "cluster_summary", "funnel", "rejects", "assignments"):
        a = pq.read_table(getattr(paths, name)).replace_schema_metadata()
        b = pq.read_table(getattr(clean, name)).replace_schema_metadata()
        assert a.equals(b), name


KILL_POINTS = [
    # stage, which of its atomic writes to die before moving, output that must be absent
    ("ingest", 1, "embeddings.zarr"),  # a part of the objects table, mid-mirror
    ("train", 1, "model"),
    ("predict", 1, "assignments.parquet"),
    ("postprocess", 2, "ins_posts_clusters.csv"),  # after postprocessed.parquet moved in
    ("report", 1, "summary.md"),
]


def test_kill_in_each_stage_then_rerun_equals_an_undisturbed_run(
    base_dataset, tmp_path, forkserver, clean_run
):
    out = tmp_path / "out"
    args = ["run", "-c", write_config(base_dataset, out), "--quiet"]
    done: list[str] = []
    for stage, nth_write, main_output in KILL_POINTS:
        run_child(forkserver, args, stage, nth_write, tmp_path / f"paused-{stage}")
        markers = sorted(p.stem for p in (out / "_markers").glob("*.json"))
        assert markers == sorted(done), f"killed in {stage}"
        assert not (out / main_output).exists(), f"killed in {stage}"
        assert temporaries(out), f"killed in {stage}"
        if stage == "ingest":
            (memmap,) = (out / "_staging").rglob("embeddings-*.f32")  # the killed run's
            with open(memmap, "r+b") as handle:  # as if killed while it was being filled
                handle.truncate(memmap.stat().st_size // 3)
        done.append(stage)
    run_child(forkserver, args)
    assert temporaries(out) == []
    assert not list((out / "_staging").rglob("*.f32"))  # the killed run's memmap is gone
    assert not list((out / "_staging").rglob("postprocess-*"))  # and its post-processing's
    assert_same_final_outputs(Catalog.from_config(config_for(base_dataset, out)), clean_run)

    # A rerun with a new threshold killed in postprocess: the old report no longer counts.
    stricter = [*args, "--set", "postprocess.min_similarity=0.8"]
    run_child(forkserver, stricter, "postprocess", 1, tmp_path / "paused-again")
    assert sorted(p.stem for p in (out / "_markers").glob("*.json")) == [
        "ingest",
        "predict",
        "train",
    ]


def test_sigkill_of_the_command_line_mid_train_then_rerun(base_dataset, tmp_path, clean_run):
    """The real entry point, killed from outside as soon as it logs that training started."""
    out = tmp_path / "out"
    config = write_config(base_dataset, out)
    with subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "-c", config],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        for line in process.stderr:
            if "train: started" in line:
                process.send_signal(signal.SIGKILL)
                break
    assert process.returncode == -signal.SIGKILL
    assert [p.stem for p in (out / "_markers").glob("*.json")] == ["ingest"]
    result = invoke(base_dataset, out, "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert temporaries(out) == []
    assert_same_final_outputs(Catalog.from_config(config_for(base_dataset, out)), clean_run)


# --------------------------------------------------------------------------- fuzz

HOSTILE_VALUES = [
    ("bbox", "[" * 100_000, "bad_bbox"),  # deeper than the JSON parser's recursion limit
    ("bbox", "[1" + "0" * 400 + ", 0, 1, 1]", "bad_bbox"),  # too large for a float
    ("bbox", "[NaN, 0, 1, 1]", "bad_bbox"),
    ("bbox", "[true, 0, 1, 1]", "bad_bbox"),
    ("bbox", "[5, 0, 1, 1]", "bad_bbox"),  # x2 < x1
    ("idx", "1e20", "bad_idx"),  # would wrap to a negative row as int64
    ("idx", "-1", "bad_idx"),
    ("idx", "1.5", "bad_idx"),
    ("score", "inf", "bad_score"),
    ("score", "", "bad_score"),
    ("username", "  ", "missing_key"),
]


def test_hostile_values_are_rejected_with_a_short_detail(base_dataset):
    raw = read_csv_text(base_dataset).head(len(HOSTILE_VALUES) + 1).copy()
    for row, (column, value, _) in enumerate(HOSTILE_VALUES):
        raw.loc[row, column] = value
    _, reasons, details = validate_rows(raw, Config().select)
    assert reasons.tolist() == [reason for _, _, reason in HOSTILE_VALUES] + [""]
    assert details.str.len().max() < 200
    assert "Got '1e20' instead" in details[5]


def test_csv_with_a_byte_order_mark_reads_like_without(base_dataset, tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + base_dataset.objects_csv.read_bytes())
    pd.testing.assert_frame_equal(
        read_objects_csv(str(path)), read_objects_csv(str(base_dataset.objects_csv))
    )


@pytest.fixture(scope="module")
def small_csv(base_dataset) -> bytes:
    """The header and first 30 rows of the dataset's CSV: the seed of the mutations."""
    return b"".join(base_dataset.objects_csv.read_bytes().splitlines(keepends=True)[:31])


def read_and_validate(path: Path) -> None:
    """The CSV half of ingest; only a :class:`PipelineError` may escape."""
    try:
        raw = read_objects_csv(str(path))
    except PipelineError:
        return
    validate_rows(raw, Config().select)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=600))
def test_random_bytes_as_csv_give_only_clean_errors(tmp_path, data):
    path = tmp_path / "objects.csv"
    path.write_bytes(data)
    read_and_validate(path)


SPECIAL = [
    b",",
    b'"',
    b"\n",
    b"\r",
    b"[",
    b"]",
    b"\x00",
    b"\xff",
    b"\xef\xbb\xbf",
    b"-1",
    b"nan",
    b"1e999",
    b"",
]
mutation = st.tuples(
    st.floats(0, 1), st.integers(0, 40), st.one_of(st.sampled_from(SPECIAL), st.binary(max_size=8))
)


def mutate(data: bytes, mutations: list[tuple[float, int, bytes]]) -> bytes:
    """Replace ``length`` bytes at relative position ``where`` with ``insert``, in turn."""
    for where, length, insert in mutations:
        at = int(where * len(data))
        data = data[:at] + insert + data[at + length :]
    return data


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_csv_gives_only_clean_errors(tmp_path, small_csv, mutations):
    path = tmp_path / "objects.csv"
    path.write_bytes(mutate(small_csv, mutations))
    read_and_validate(path)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_full_ingest_of_a_mutated_csv_gives_only_clean_errors(
    tmp_path, base_dataset, small_csv, mutations
):
    csv = tmp_path / "objects.csv"
    csv.write_bytes(mutate(small_csv, mutations))
    cfg = config_for(
        replace(base_dataset, objects_csv=csv), tmp_path / "out", train={"n_clusters": 2}
    )
    try:
        result, _ = ingest_only(cfg)
    except PipelineError:
        return
    assert result.n_rows + result.n_rejected == result.n_input_rows

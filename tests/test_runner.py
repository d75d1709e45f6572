"""The runner and the stage table: what is redone, what is refused, and why.

Each test changes one thing a stage depends on (a config key, an input file's contents,
a deleted output) on a finished copy of a small run and checks the runner's verdict and
its words, then that a real rerun does exactly that.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

import pytest

from pipeline.catalog import Catalog
from pipeline.config import Config
from pipeline.errors import MissingInputError, OutputError, StageOrderError
from pipeline.plan import plan_run
from pipeline.runner import check_upstream, describe_plan, run, stage_statuses
from pipeline.stages import STAGE_NAMES, STAGES
from tests.conftest import config_for


@pytest.fixture(scope="module")
def finished(small_dataset, tmp_path_factory):
    """One complete run, copied by each test that changes something."""
    out = tmp_path_factory.mktemp("runner") / "out"
    cfg = config_for(small_dataset, out, train={"epochs": 1, "refine_iterations": 0})
    run(cfg)
    return cfg


@pytest.fixture
def copy_of(finished, tmp_path):
    """A private copy of the finished run and its config (pointing at the copy)."""
    out = tmp_path / "out"
    shutil.copytree(finished.output.dir, out)
    return finished.model_copy(
        update={"output": finished.output.model_copy(update={"dir": str(out)})}
    )


def with_values(cfg: Config, **sections) -> Config:
    return cfg.model_copy(
        update={
            name: getattr(cfg, name).model_copy(update=values) for name, values in sections.items()
        }
    )


def verdicts(cfg: Config) -> dict[str, tuple[bool, tuple[str, ...]]]:
    statuses = stage_statuses(cfg, plan_run(cfg))
    return {name: (s.up_to_date, s.reasons) for name, s in statuses.items()}


# --------------------------------------------------------------------------- the table


def test_stage_table_is_consistent():
    names = [stage.name for stage in STAGES]
    assert len(set(names)) == len(names) == len(STAGE_NAMES)
    sections = set(Config.model_fields)
    catalog_fields = set(Catalog.__dataclass_fields__) | {"report_index"}
    for i, stage in enumerate(STAGES):
        assert stage.upstream == (names[i - 1] if i else None)
        assert set(stage.reads) <= sections
        for key in (*stage.depends_on, *stage.input_files):
            section, _, name = key.partition(".")
            assert section in sections
            assert not name or name in type(getattr(Config(), section)).model_fields
        assert set(stage.outputs) <= catalog_fields
        # The function accepts exactly its own sections as keywords.
        params = list(inspect.signature(stage.load()).parameters)
        assert params[0] == "context" and set(params[1:]) == set(stage.reads)


# --------------------------------------------------------------------------- verdicts


def test_a_finished_run_is_up_to_date(finished):
    assert all(up for up, _ in verdicts(finished).values())
    lines = describe_plan(finished, plan_run(finished)).splitlines()
    for name in STAGE_NAMES:
        line = next(x for x in lines if x.split()[:1] == [name] and "peak ~" in x)
        assert line.endswith("up to date") and "peak ~" in line and "disk ~" in line


def test_a_changed_key_redoes_its_stage_and_names_the_key(finished):
    changed = with_values(finished, postprocess={"min_similarity": 0.5})
    v = verdicts(changed)
    assert v["ingest"][0] and v["train"][0] and v["predict"][0]
    assert v["postprocess"] == (False, ("postprocess.min_similarity changed (0.7 -> 0.5)",))
    assert v["report"] == (False, ("its upstream 'postprocess' would run",))


def test_a_changed_seed_redoes_ingest_through_the_derived_shuffle_seed(finished):
    v = verdicts(with_values(finished, train={"seed": 7}))
    assert not v["ingest"][0] and "shuffle_seed (derived) changed (0 -> 7)" in v["ingest"][1]
    assert "train.seed changed (0 -> 7)" in v["train"][1]


def test_single_stage_refuses_a_stale_upstream_naming_the_change(copy_of):
    run(with_values(copy_of, postprocess={"min_similarity": 0.5}), ("postprocess",))
    with pytest.raises(StageOrderError) as err:
        run(copy_of, ("report",))
    message = str(err.value)
    assert "needs 'postprocess' up to date" in message
    assert "postprocess.min_similarity changed (0.5 -> 0.7)" in message
    assert "Run 'pipeline postprocess'" in message and "\n" not in message
    # 'pipeline run' redoes what changed instead.
    result = run(copy_of)
    assert list(result.timings) == ["postprocess", "report"]
    assert result.skipped == ["ingest", "train", "predict"]


def test_never_run_upstream_is_refused(small_dataset, tmp_path):
    cfg = config_for(small_dataset, tmp_path / "out")
    statuses = stage_statuses(cfg, plan_run(cfg))
    with pytest.raises(StageOrderError, match="needs 'ingest' up to date, but no completed run"):
        check_upstream(statuses, ("predict",))


def test_groups_file_contents_count_for_the_report(copy_of, tmp_path):
    groups = tmp_path / "groups.yaml"
    groups.write_text("groups:\n  - name: a\n    clusters: [0]\n")
    cfg = with_values(copy_of, report={"groups_file": str(groups)})
    run(cfg)
    assert verdicts(cfg)["report"][0]
    groups.write_text("groups:\n  - name: b\n    clusters: [0]\n")  # same path, new contents
    assert verdicts(cfg)["report"] == (False, ("the contents of report.groups_file changed",))
    assert list(run(cfg).timings) == ["report"]


def test_a_deleted_output_is_noticed(copy_of):
    catalog = Catalog.from_config(copy_of.output)
    Path(catalog.funnel).unlink()
    v = verdicts(copy_of)
    assert v["postprocess"] == (False, ("output(s) missing: funnel",))
    assert list(run(copy_of).timings) == ["postprocess", "report"]


def test_a_changed_output_file_is_noticed(copy_of):
    # A part removed from inside a folder output, and a file truncated to zero.
    catalog = Catalog.from_config(copy_of.output)
    parts = sorted(Path(catalog.postprocessed).glob("part-*.parquet"))
    parts[-1].unlink()
    Path(catalog.summary_markdown).write_text("")
    v = verdicts(copy_of)
    assert v["postprocess"] == (False, ("output(s) changed since it ran: postprocessed.parquet",))
    assert v["report"][0] is False
    assert list(run(copy_of).timings) == ["postprocess", "report"]
    assert all(up for up, _ in verdicts(copy_of).values())


@pytest.mark.parametrize("force", [False, True])
def test_a_foreign_entry_where_an_output_goes_is_refused_and_kept(small_dataset, tmp_path, force):
    out = tmp_path / "out"
    (out / "report").mkdir(parents=True)
    (out / "report" / "my-notes.txt").write_text("the user's")
    cfg = config_for(small_dataset, out)
    with pytest.raises(OutputError, match=r"report exists but was not written by this pipeline"):
        run(cfg, force=force)
    assert (out / "report" / "my-notes.txt").read_text() == "the user's"


@pytest.mark.parametrize("force", [False, True])
def test_a_foreign_file_inside_an_output_folder_is_refused_and_kept(copy_of, force):
    catalog = Catalog.from_config(copy_of.output)
    notes = Path(catalog.model) / "notes.txt"
    notes.write_text("the user's")
    changed = with_values(copy_of, train={"seed": 7})
    with pytest.raises(OutputError) as err:
        run(changed, force=force)
    assert str(err.value).startswith(f"{notes} was not written by this pipeline")
    assert "\n" not in str(err.value)
    assert notes.read_text() == "the user's"
    notes.unlink()  # moved out: the run goes on
    assert "train" in run(changed).timings


def test_a_folder_from_before_manifests_adopts_its_outputs(copy_of):
    catalog = Catalog.from_config(copy_of.output)
    Path(catalog.manifest).unlink()
    assert all(up for up, _ in verdicts(copy_of).values())
    result = run(with_values(copy_of, postprocess={"min_similarity": 0.6}))
    assert list(result.timings) == ["postprocess", "report"]


def test_changed_objects_csv_redoes_everything(copy_of, small_dataset, tmp_path):
    csv = tmp_path / "objects.csv"
    shutil.copy(small_dataset.objects_csv, csv)
    moved = with_values(copy_of, input={"objects_csv": str(csv)})
    assert "input.objects_csv changed" in verdicts(moved)["ingest"][1][0]
    run(moved)
    assert all(up for up, _ in verdicts(moved).values())
    with csv.open("a") as handle:  # same path, one more (bad) row
        handle.write("x,u,r,[0,0,1,1],t,0.5,0,img\n")
    assert verdicts(moved)["ingest"] == (False, ("the contents of input.objects_csv changed",))


def test_force_recomputes_every_stage(copy_of):
    catalog = Catalog.from_config(copy_of.output)
    before = {name: catalog.read_marker(name)["finished_at"] for name in STAGE_NAMES}
    result = run(copy_of, force=True)
    assert list(result.timings) == list(STAGE_NAMES) and not result.skipped
    after = {name: catalog.read_marker(name)["finished_at"] for name in STAGE_NAMES}
    assert all(after[name] > before[name] for name in STAGE_NAMES)


def test_nothing_is_created_before_the_inputs_check_out(small_dataset, tmp_path):
    out = tmp_path / "out"
    cfg = config_for(small_dataset, out, input={"objects_csv": str(tmp_path / "missing.csv")})
    with pytest.raises(MissingInputError, match=str(tmp_path / "missing.csv")):
        run(cfg)
    assert not out.exists()


def test_only_the_embedding_files_the_csv_names_count(copy_of, small_dataset, tmp_path):
    # A private copy of the embedding files, so they can be touched.
    root = tmp_path / "emb"
    shutil.copytree(small_dataset.embeddings_root, root)
    cfg = with_values(copy_of, input={"embeddings_root": str(root)})
    run(cfg)
    assert all(up for up, _ in verdicts(cfg).values())
    # An unrelated new file (or a dangling link) under the root changes nothing ...
    (root / "notes.txt").write_text("unrelated")
    (root / "dangling.npy").symlink_to(tmp_path / "nowhere.npy")
    assert all(up for up, _ in verdicts(cfg).values())
    # ... a named file rewritten does.
    named = sorted(root.glob("*/embeddings/*.npy"))[0]
    named.write_bytes(named.read_bytes())
    os.utime(named, ns=(0, 10**18))
    assert verdicts(cfg)["ingest"] == (False, ("the contents of input.embeddings_root changed",))


def test_content_fingerprint_sees_a_rewrite_with_the_same_size_and_mtime(
    copy_of, small_dataset, tmp_path
):
    root = tmp_path / "emb"
    shutil.copytree(small_dataset.embeddings_root, root)
    cfg = with_values(copy_of, input={"embeddings_root": str(root)},
                      ingest={"fingerprint": "content"})  # fmt: skip
    run(cfg)
    named = sorted(root.glob("*/embeddings/*.npy"))[0]
    st = named.stat()
    data = bytearray(named.read_bytes())
    data[-1] ^= 1  # same size, then the old mtime restored
    named.write_bytes(bytes(data))
    os.utime(named, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verdicts(cfg)["ingest"] == (False, ("the contents of input.embeddings_root changed",))
    stat_cfg = with_values(cfg, ingest={"fingerprint": "stat"})
    assert "ingest.fingerprint changed" in verdicts(stat_cfg)["ingest"][1][0]


@pytest.mark.parametrize("mode", ["stat", "content"])
def test_named_files_fingerprint_over_chunks_sees_each_file_and_the_order(
    tmp_path, monkeypatch, mode
):
    """The files are visited in chunks by a thread pool: the result must not depend on
    the chunking, and must change when any one file (in any chunk) changes, disappears,
    or when two files swap places in the list."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import runner

    files = []
    for i in range(10):
        f = tmp_path / f"e{i}.npy"
        f.write_bytes(bytes([i]) * (10 + i))
        os.utime(f, ns=(10**18, 10**18 + i))
        files.append(str(f))
    listing = tmp_path / "files.parquet"

    def fingerprint(paths, chunk):
        pq.write_table(pa.table({"path": paths}), listing)
        monkeypatch.setattr(runner, "_FINGERPRINT_CHUNK", chunk)
        return runner.named_files_fingerprint(str(listing), mode)

    whole = fingerprint(files, 4096)
    assert whole.startswith(f"{mode}:") and fingerprint(files, 3) == whole
    assert fingerprint(files[:7] + [files[8], files[7], files[9]], 3) != whole
    target = Path(files[7])  # the third chunk of 3
    if mode == "stat":
        os.utime(target, ns=(10**18, 10**18 + 100))
    else:  # same size and mtime, other bytes
        target.write_bytes(b"\xff" * 17)
        os.utime(target, ns=(10**18, 10**18 + 7))
    changed = fingerprint(files, 3)
    assert changed != whole and fingerprint(files, 4096) == changed
    target.unlink()
    assert fingerprint(files, 3) not in (whole, changed)


# --------------------------------------------------------------------------- mutation survivors
# Each test below killed a hand mutant that the tests above let through.


def test_a_stage_that_fails_leaves_itself_and_what_follows_unmarked(copy_of, monkeypatch):
    """A rerun clears the stage's own marker (and the later ones) before it starts, so a
    stage that fails half-way is not taken as done by the next run."""
    from pipeline import postprocess

    catalog = Catalog.from_config(copy_of.output)

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(postprocess, "render_block", broken)
    with pytest.raises(RuntimeError, match="render failed"):
        run(copy_of, ("postprocess",), force=True)
    assert catalog.read_marker("postprocess") is None and catalog.read_marker("report") is None
    assert all(catalog.read_marker(name) is not None for name in ("ingest", "train", "predict"))
    v = verdicts(copy_of)
    assert v["predict"][0] and not v["postprocess"][0] and not v["report"][0]
    monkeypatch.undo()
    assert list(run(copy_of).timings) == ["postprocess", "report"]


def test_an_input_changed_while_the_stage_reads_it_is_not_marked_as_read(
    small_dataset, tmp_path, monkeypatch
):
    """The objects CSV grows while the ingest runs (after the real ingest read it): the
    run stops with a one-line error and leaves no ingest marker."""
    import pipeline.ingest as ingest_module
    from pipeline.errors import InputError

    csv = tmp_path / "objects.csv"
    shutil.copy(small_dataset.objects_csv, csv)
    cfg = config_for(small_dataset, tmp_path / "out", input={"objects_csv": str(csv)})
    real = ingest_module.ingest_stage

    def ingest_then_edit(*args, **kwargs):
        out = real(*args, **kwargs)
        with csv.open("a") as handle:
            handle.write("x,u,r,[0,0,1,1],t,0.5,0,img\n")
        return out

    monkeypatch.setattr(ingest_module, "ingest_stage", ingest_then_edit)
    with pytest.raises(InputError, match="input.objects_csv changed while ingest was reading"):
        run(cfg, ("ingest",))
    assert Catalog.from_config(cfg.output).read_marker("ingest") is None


def test_file_fingerprint_by_contents_up_to_the_limit_then_by_size_and_mtime(tmp_path):
    import hashlib

    from pipeline import runner

    limit = runner._CONTENT_HASH_BYTES
    assert limit == 16 << 20  # the documented 16 MiB
    at_limit = tmp_path / "at-limit"
    data = bytes(range(256)) * (limit // 256)
    at_limit.write_bytes(data)
    assert runner.file_fingerprint(str(at_limit)) == hashlib.sha256(data).hexdigest()[:16]
    # A small file rewritten with the same size and mtime is seen by its contents.
    small = tmp_path / "small"
    small.write_bytes(b"a" * 100_000)
    before = runner.file_fingerprint(str(small))
    st = small.stat()
    small.write_bytes(b"b" * 100_000)
    os.utime(small, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert runner.file_fingerprint(str(small)) != before
    # Past the limit: size and modification time, so a touch is a change.
    large = tmp_path / "large"
    large.write_bytes(data + b"x")
    st = large.stat()
    assert runner.file_fingerprint(str(large)) == [limit + 1, st.st_mtime_ns]
    os.utime(large, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert runner.file_fingerprint(str(large)) == [limit + 1, st.st_mtime_ns + 10**9]
    assert runner.file_fingerprint(str(tmp_path / "missing")) is None


def test_record_changes_name_the_upstream_only_when_nothing_else_changed():
    from pipeline.runner import record_changes

    def record(seed, upstream):
        return {"config": {"train": {"seed": seed}}, "inputs": {}, "derived": {},
                "upstream": upstream}  # fmt: skip

    assert record_changes(record(0, "a"), record(1, "b"), "ingest") == [
        "train.seed changed (0 -> 1)"
    ]
    assert record_changes(record(0, "a"), record(0, "b"), "ingest") == [
        "its upstream 'ingest' was redone"
    ]
    assert record_changes(record(0, "a"), record(0, "a"), "ingest") == []


def test_the_refusal_suggests_the_old_values_only_for_a_changed_value():
    from pipeline.runner import StageStatus

    def statuses(reason):
        out = {name: StageStatus(name, "k", True, ()) for name in STAGE_NAMES}
        out["train"] = StageStatus("train", "k", False, (reason,))
        return out

    with pytest.raises(StageOrderError) as err:
        check_upstream(statuses("train.seed changed (0 -> 1)"), ("predict",))
    assert str(err.value).endswith(
        "Run 'pipeline train' (or 'pipeline run') first, or use the values it ran with."
    )
    with pytest.raises(StageOrderError) as err:
        check_upstream(statuses("no completed run in the output folder"), ("predict",))
    assert str(err.value).endswith("Run 'pipeline train' (or 'pipeline run') first.")


def test_a_single_stage_run_chains_its_key_to_the_upstream(copy_of):
    """``pipeline postprocess`` alone with a new setting: its marker chains in the
    upstream's key, so it is then up to date; the report (cleared) is to be redone."""
    changed = with_values(copy_of, postprocess={"min_similarity": 0.5})
    assert list(run(changed, ("postprocess",)).timings) == ["postprocess"]
    v = verdicts(changed)
    assert v["ingest"][0] and v["train"][0] and v["predict"][0] and v["postprocess"][0]
    assert v["report"] == (False, ("no completed run in the output folder",))
    assert list(run(changed).timings) == ["report"]


def test_a_stage_key_is_made_from_its_upstream_key_too(finished):
    from pipeline.runner import record_key, stage_record
    from pipeline.stages import BY_NAME

    plan = plan_run(finished)
    a = stage_record(finished, plan, BY_NAME["report"], "aaaa")
    b = stage_record(finished, plan, BY_NAME["report"], "bbbb")
    assert a["upstream"] == "aaaa" and {**a, "upstream": "bbbb"} == b
    assert record_key("report", a) != record_key("report", b)

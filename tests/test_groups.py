"""The reviewer's groups: hand-checked answers, the 'groups' command on a valid file and on
each kind of invalid file (exit code, one line naming the file and the key)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import schema, sinks
from pipeline.cli import app
from pipeline.errors import InputError
from pipeline.groups import GroupsSpec, assign_groups, check_groups
from pipeline.runner import run
from tests.conftest import config_for, render_report

runner = CliRunner()

SUMMARY = pd.DataFrame({"cluster": [0, 1, 2, 3], "size": [5, 4, 0, 3], "size_final": [5, 0, 0, 2]})
SELECTED = pd.DataFrame(
    {
        schema.OBJECT_ID: [10, 11, 12, 13, 14, 15, 16],
        "cluster": [0, 0, 0, 0, 0, 3, 3],
        "sim": [0.9, 0.95, 0.8, 0.95, 0.75, 0.85, 0.99],
    }
)


def spec(*groups: dict) -> GroupsSpec:
    return GroupsSpec.model_validate({"groups": list(groups)})


def test_assign_groups_by_hand():
    s = spec(
        {"name": "b", "clusters": [3]}, {"name": "a", "clusters": [0], "exclude_objects": [12]}
    )
    check_groups(s, SUMMARY)
    table = assign_groups(s, SELECTED)
    # File order of groups; inside a group by cluster, descending sim, then object id.
    assert table[schema.GROUP].tolist() == ["b", "b", "a", "a", "a", "a"]
    assert table[schema.OBJECT_ID].tolist() == [16, 15, 11, 13, 10, 14]


@pytest.mark.parametrize(
    "groups, match",
    [
        ([], r"key 'groups' must list at least one group"),
        ([{"name": "a", "clusters": []}],
         r"key 'groups.0.clusters' \(group 'a'\) must list at least one"),
        ([{"name": "a", "clusters": [1]}], r"Got 1 instead \(removed by post-processing; add "
         r"'include_removed: true' to the group to rescue it\)"),
        ([{"name": "a", "clusters": [2]}], r"Got 2 instead \(an empty cluster\)"),
        ([{"name": "a", "clusters": [99]}], r"Got 99 instead \(no such cluster in the run\)"),
        ([{"name": "a", "clusters": [0]}, {"name": "b", "clusters": [3, 0]}],
         r"key 'groups.1.clusters.1' \(group 'b'\) must not repeat a cluster. Got 0 instead, "
         r"already in group 'a' \(groups.0\)"),
        ([{"name": "a", "clusters": [0, 0]}], r"Got 0 instead, listed twice"),
        ([{"name": "a", "clusters": [0]}, {"name": "a", "clusters": [3]}],
         r"key 'groups.1.name' must be unique. Got 'a' instead"),
        ([{"name": " ", "clusters": [0]}], r"key 'groups.0.name' must be a non-empty name"),
    ],
)  # fmt: skip
def test_check_groups_rejects(groups, match):
    with pytest.raises(InputError, match=match) as info:
        check_groups(spec(*groups), SUMMARY, "g.yaml")
    assert str(info.value).startswith("g.yaml: ") and len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(
    "exclude, match",
    [([99], r"key 'groups.0.exclude_objects' \(group 'a'\) must name selected objects .* Got 99"),
     ([15, 16], r"must leave at least one object. Got all 2 objects excluded")],
)  # fmt: skip
def test_assign_groups_rejects_bad_exclusions(exclude, match):
    s = spec({"name": "a", "clusters": [3], "exclude_objects": exclude})
    check_groups(s, SUMMARY)
    with pytest.raises(InputError, match=match):
        assign_groups(s, SELECTED, "g.yaml")


def test_refit_skips_exclusions_that_left_with_one_warning_each(caplog):
    # After a re-fit an excluded object may no longer be a selected member of the group's
    # clusters (moved, or filtered out): nothing to exclude, one warning line per object;
    # the exclusions still present are applied, and emptying a group is still an error.
    import logging

    s = spec({"name": "a", "clusters": [0], "exclude_objects": [12, 15, 99]})
    with pytest.raises(InputError, match="Got 15, 99 instead"):
        assign_groups(s, SELECTED, "g.yaml")  # not a re-fit: a mistake in the file
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        table = assign_groups(s, SELECTED, "g.yaml", refit=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("g.yaml: object 15 excluded by group 'a' (groups.0) is not a")
    assert "object 99" in lines[1] and lines[1].endswith("; skipped.")
    assert table[schema.OBJECT_ID].tolist() == [11, 13, 10, 14]
    every = spec({"name": "a", "clusters": [3], "exclude_objects": [15, 16, 99]})
    with pytest.raises(InputError, match="must leave at least one object"):
        assign_groups(every, SELECTED, "g.yaml", refit=True)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def finished(small_dataset, tmp_path_factory):
    """A whole run of ``small_dataset`` (no images) and a config file pointing at it."""
    folder = tmp_path_factory.mktemp("groups")
    cfg = config_for(small_dataset, folder / "out", input={"images_root": None})
    result = run(cfg)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    summary = sinks.read_parquet(result.catalog.cluster_summary)
    return config, result.catalog, summary


def kept_clusters(summary: pd.DataFrame) -> list[int]:
    return summary.loc[summary["size_final"] > 0, "cluster"].astype(int).tolist()


def invoke(config: Path, groups_file: Path, *extra: str):
    args = ["groups", "-c", str(config), "--file", str(groups_file), "-q", *extra]
    return runner.invoke(app, args)


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_groups_command_writes_the_selected_objects_with_their_group(finished, tmp_path):
    config, paths, summary = finished
    kept = kept_clusters(summary)
    selected = sinks.read_parquet(paths.clusters_parquet)
    excluded = int(selected.loc[selected["cluster"] == kept[0], schema.OBJECT_ID].iloc[0])
    groups_file = tmp_path / "groups.yaml"
    groups_file.write_text(
        "groups:\n"
        f"  - name: shoes\n    clusters: [{kept[0]}, {kept[1]}]\n"
        f"    exclude_objects: [{excluded}]\n"
        f"  - name: bags\n    clusters: [{kept[2]}]\n"
    )
    result = invoke(config, groups_file)
    assert result.exit_code == 0, result.output
    root = Path(paths.root)
    csv = pd.read_csv(root / "ins_posts_groups.csv")
    assert list(csv.columns) == list(schema.GROUPS_CSV_FIELDS)
    parquet = sinks.read_parquet(str(root / "ins_posts_groups.parquet"))
    expected = selected[selected["cluster"].isin(kept[:3])]
    expected = expected[expected[schema.OBJECT_ID] != excluded]
    assert sorted(parquet[schema.OBJECT_ID]) == sorted(expected[schema.OBJECT_ID])
    assert len(csv) == len(parquet) == len(expected)
    groups_of = dict(zip(parquet[schema.OBJECT_ID], parquet[schema.GROUP], strict=True))
    for object_id, cluster in zip(expected[schema.OBJECT_ID], expected["cluster"], strict=True):
        assert groups_of[object_id] == ("bags" if cluster == kept[2] else "shoes")
    assert (csv["group"] == parquet[schema.GROUP]).all()
    assert sinks.read_run_metadata(str(root / "ins_posts_groups.parquet"))["groups_file"] == str(
        groups_file
    )
    # The report shows the groups: their sizes and, on each grouped cluster's page, the group.
    index = (root / "report" / "index.html").read_text(encoding="utf-8")
    n_shoes = int((parquet[schema.GROUP] == "shoes").sum())
    assert '<tr data-group="shoes">' in index
    assert f'data-col="objects" data-value="{n_shoes}"' in index
    # The outputs carry the model they were made against.
    made_for = sinks.read_run_metadata(str(root / "ins_posts_groups.parquet"))["model_fingerprint"]
    assert made_for == paths.model_fingerprint()
    page = (root / "report" / "clusters" / f"{kept[2]}.html").read_text(encoding="utf-8")
    assert "In group" in page and ">bags</a>" in page


@pytest.mark.parametrize(
    "text, key, n_lines",
    [
        ("groups: []\n", "'groups'", 1),
        ("groups:\n  - name: a\n    clusters: []\n", "'groups.0.clusters'", 1),
        ("groups:\n  - name: a\n    clusters: [100000]\n", "3:16: key 'groups.0.clusters.0'", 1),
        ("groups:\n  - name: a\n    clusters: [{k0}]\n  - name: b\n    clusters: [{k0}]\n",
         "5:16: key 'groups.1.clusters.0'", 1),
        ("groups:\n  - name: a\n    clusters: [{k0}]\n  - name: a\n    clusters: [{k1}]\n",
         "'groups.1.name'", 1),
        ("groups:\n  - name: a\n    clusters: [{k0}]\n    exclude_objects: [-5]\n",
         "'groups.0.exclude_objects'", 1),
        # A misspelt key is two problems: the unknown key and the missing one.
        ("groups:\n  - name: a\n    cluster: [{k0}]\n", "unknown key 'groups.0.cluster'", 2),
        ("groups:\n  - name: a\n    clusters: [one]\n", "'groups.0.clusters.0'", 1),
        ("groups: [unclosed\n", "not valid YAML", 1),
        ("- just a list\n", "the top level must be a mapping", 1),
    ],
)  # fmt: skip
def test_groups_command_rejects_each_invalid_file(finished, tmp_path, text, key, n_lines):
    config, paths, summary = finished
    kept = kept_clusters(summary)
    groups_file = tmp_path / "bad.yaml"
    groups_file.write_text(text.format(k0=kept[0], k1=kept[1]))
    before = sorted(p.name for p in Path(paths.root).iterdir())
    result = invoke(config, groups_file)
    assert result.exit_code == 1, result.output
    lines = error_lines(result)
    assert len(lines) == n_lines, result.output
    assert all(line.startswith(f"error: {groups_file}") for line in lines), lines
    assert any(key in line for line in lines), lines
    # A user error ends in SystemExit (the CLI's one line); a bug would surface as itself.
    assert type(result.exception) is SystemExit, result.exception
    # Nothing written on a bad file.
    assert sorted(p.name for p in Path(paths.root).iterdir()) == before


def test_groups_command_on_a_removed_cluster_says_so(finished, tmp_path):
    config, _, summary = finished
    removed = summary.loc[(summary["size"] > 0) & (summary["size_final"] == 0), "cluster"]
    if removed.empty:
        pytest.skip("this run removed no cluster")
    groups_file = tmp_path / "g.yaml"
    groups_file.write_text(f"groups:\n  - name: a\n    clusters: [{int(removed.iloc[0])}]\n")
    result = invoke(config, groups_file)
    assert result.exit_code == 1
    assert "(removed by post-processing" in error_lines(result)[0]


def test_groups_command_without_a_file(finished, tmp_path):
    config, _, _ = finished
    result = invoke(config, tmp_path / "missing.yaml")
    assert result.exit_code == 1
    assert error_lines(result) == [
        f"error: Groups file {tmp_path / 'missing.yaml'} does not exist. Write it (the format: "
        "'pipeline groups --help') or fix report.groups_file."
    ]
    result = runner.invoke(app, ["groups", "-c", str(config), "-q"])
    assert result.exit_code == 2
    assert "report.groups_file is not set" in error_lines(result)[0]


def test_report_shows_an_invalid_groups_file_without_failing(finished, tmp_path):
    config, paths, summary = finished
    from pipeline.config import load_config

    groups_file = tmp_path / "g.yaml"
    groups_file.write_text("groups:\n  - name: a\n    clusters: [100000]\n")
    cfg = load_config(config, [f"report.groups_file={groups_file}"])
    render_report(cfg, n_workers=1)
    index = (Path(paths.root) / "report" / "index.html").read_text(encoding="utf-8")
    assert "is not valid" in index and "no such cluster in the run" in index


def test_every_problem_at_once_with_its_yaml_line_and_column(finished, tmp_path):
    config, _, summary = finished
    kept = kept_clusters(summary)
    groups_file = tmp_path / "bad.yaml"
    groups_file.write_text(
        "groups:\n"
        f"  - name: a\n    clusters: [{kept[0]}, 100000]\n"  # line 3: unknown cluster
        f"  - name: a\n    clusters: [{kept[0]}]\n"  # line 4: name taken; line 5: repeated
        "  - name: c\n    clusters: []\n"  # line 7: empty
    )
    result = invoke(config, groups_file)
    assert result.exit_code == 1
    assert error_lines(result) == [
        f"error: {groups_file}:3:{18 + len(str(kept[0]))}: key 'groups.0.clusters.1' (group 'a') "
        "must name kept clusters of the run. Got 100000 instead (no such cluster in the run). "
        "Pick ids from the report's cluster index.",
        f"error: {groups_file}:4:5: key 'groups.1.name' must be unique. Got 'a' instead, "
        "already the name of groups.0.",
        f"error: {groups_file}:5:16: key 'groups.1.clusters.0' (group 'a') must not repeat a "
        f"cluster. Got {kept[0]} instead, already in group 'a' (groups.0).",
        f"error: {groups_file}:7:5: key 'groups.2.clusters' (group 'c') must list at least one "
        "cluster. Got [] instead.",
    ]


def test_include_removed_rescues_a_removed_cluster(finished, tmp_path):
    config, paths, summary = finished
    removed = summary[(summary["size_final"] == 0) & (summary["size_after_dedupe"] > 0)]
    if removed.empty:
        pytest.skip("this run removed no cluster")
    c = int(removed["cluster"].iloc[0])
    labelled = sinks.read_parquet(paths.postprocessed)
    members = labelled[
        (labelled["cluster"] == c) & (labelled[schema.STATUS] != schema.STATUS_DUPLICATE)
    ]
    stray = int(members[schema.OBJECT_ID].iloc[-1])
    groups_file = tmp_path / "g.yaml"
    groups_file.write_text(
        f"groups:\n  - name: rescued\n    clusters: [{c}]\n    exclude_objects: [{stray}]\n"
        "    include_removed: true\n"
    )
    result = invoke(config, groups_file)
    assert result.exit_code == 0, result.output
    parquet = sinks.read_parquet(str(Path(paths.root) / "ins_posts_groups.parquet"))
    want = sorted(set(members[schema.OBJECT_ID]) - {stray})
    assert sorted(parquet[schema.OBJECT_ID]) == want
    assert set(parquet[schema.GROUP]) == {"rescued"}


def test_groups_of_another_model_are_set_aside(finished, tmp_path, caplog):
    import logging
    import os
    import shutil

    from pipeline.catalog import Catalog
    from pipeline.groups import set_aside_stale

    config, paths, summary = finished
    copy = tmp_path / "out"
    shutil.copytree(paths.root, copy, ignore=shutil.ignore_patterns("report"))
    catalog = Catalog(**{**paths.__dict__, **{
        k: v.replace(paths.root, str(copy)) for k, v in paths.__dict__.items()
        if isinstance(v, str)}})  # fmt: skip
    groups_file = tmp_path / "g.yaml"
    groups_file.write_text(f"groups:\n  - name: a\n    clusters: [{kept_clusters(summary)[0]}]\n")
    cfg_file = tmp_path / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["output"]["dir"] = str(copy)
    cfg_file.write_text(yaml.safe_dump(cfg))
    applied = invoke(cfg_file, groups_file)
    assert applied.exit_code == 0, applied.output
    assert set_aside_stale(catalog) is None  # same model: left alone
    centres = Path(catalog.model) / "centers.npy"
    os.chmod(centres, 0o644)
    import numpy as np

    np.save(centres, np.load(centres) + 1)  # the clustering changed
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        folder = set_aside_stale(catalog)
    assert folder is not None and "not the current" in caplog.text
    assert not Path(catalog.groups_parquet).exists() and not Path(catalog.groups_csv).exists()
    assert sorted(os.listdir(folder)) == ["ins_posts_groups.csv", "ins_posts_groups.parquet"]

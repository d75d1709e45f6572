from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.config import Config, load_config, parse_override
from pipeline.errors import ConfigError, MissingInputError

ROOT = Path(__file__).resolve().parents[1]


def test_config_yaml_documents_the_defaults(monkeypatch):
    # config.yaml is the documentation of every key: it must equal the built-in defaults
    # (both resolve relative paths against the repository root here).
    monkeypatch.chdir(ROOT)
    assert load_config(ROOT / "config.yaml") == load_config(None)
    assert load_config(None).input.objects_csv == str(ROOT / Config().input.objects_csv)


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "c.yaml").write_text(
        "input:\n  objects_csv: data/objects.csv\n  embeddings_matrix: /abs/m.npy\n"
        "output:\n  dir: s3://bucket/run\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(folder / "c.yaml", ["report.groups_file=g.yaml"])
    assert cfg.input.objects_csv == str(folder / "data" / "objects.csv")
    assert cfg.input.embeddings_matrix == "/abs/m.npy"
    assert cfg.output.dir == "s3://bucket/run"
    # A default the file does not set is relative to the file too; an override, to the shell.
    assert cfg.input.embeddings_root == str(folder / Config().input.embeddings_root)
    assert cfg.report.groups_file == str(elsewhere / "g.yaml")


def test_defaults_follow_the_write_up():
    cfg = Config()
    assert cfg.train.n_clusters == 600
    assert cfg.postprocess.min_similarity == 0.7
    assert cfg.postprocess.min_cluster_size == 10
    assert cfg.postprocess.dedupe_key == "image_name"


def test_unknown_key_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  n_clusterz: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.n_clusterz'"):
        load_config(path)


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  n_clusters: 0\n", "train.n_clusters"),
        ("train:\n  n_clusters: lots\n", "train.n_clusters"),
        ("postprocess:\n  min_similarity: 1.5\n", "postprocess.min_similarity"),
        ("ingest:\n  compression: brotli\n", "ingest.compression"),
        ("executor:\n  scheduler: magic\n", "executor.scheduler"),
    ],
)
def test_bad_values_are_one_error_per_key(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"key '{key}'" in message
    assert len(message.splitlines()) == 1


def test_overrides_apply_on_top_of_file(tmp_path):
    cfg = load_config(ROOT / "config.yaml", ["train.n_clusters=auto", "select.tags=[shoe, bag]"])
    assert cfg.train.n_clusters == "auto"
    assert cfg.select.tags == ["shoe", "bag"]
    assert parse_override("postprocess.min_similarity=0.5") == (
        ["postprocess", "min_similarity"],
        0.5,
    )


def test_missing_config_file_is_a_missing_input(tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(ValidationError):
        cfg.train.seed = 3  # type: ignore[misc]


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_give_only_clean_errors(tmp_path_factory, payload):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(payload)
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc)


def test_yaml_aliases_are_refused_fast(tmp_path):
    # A "billion laughs" file: nine levels of nine aliases would expand to 9**9 items.
    lines = ['a0: &a0 ["x"]'] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)
    ]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases") as err:
        load_config(path)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)


def test_a_huge_bad_value_is_clipped_in_the_message(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  n_clusters: " + "x" * 100_000 + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(str(err.value)) < 600

"""The command line: exit codes and one-line messages for user mistakes."""

import pandas as pd
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def write_config(tmp_path, dataset, extra: str = "") -> str:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"""
input:
  objects_csv: {dataset.objects_csv}
  embeddings_root: {dataset.embeddings_root}
ingest:
  chunk_rows: 256
train:
  n_clusters: 20
  batch_size: 256
output:
  dir: {tmp_path / "out"}
executor:
  progress: false
{extra}"""
    )
    return str(path)


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_bad_config_is_one_line_and_exit_2(tmp_path, small_dataset):
    config = write_config(tmp_path, small_dataset, "postprocess:\n  min_cluster_size: -3\n")
    result = runner.invoke(app, ["run", "-c", config])
    assert result.exit_code == 2
    assert len(error_lines(result)) == 1
    assert "postprocess.min_cluster_size" in error_lines(result)[0]
    # A user error ends in SystemExit (the CLI's one line); a bug would surface as itself.
    assert type(result.exception) is SystemExit, result.exception


def test_override_with_unknown_key_is_exit_2(tmp_path, small_dataset):
    result = runner.invoke(
        app, ["validate", "-c", write_config(tmp_path, small_dataset), "--set", "train.k=3"]
    )
    assert result.exit_code == 2
    assert "unknown key 'train.k'" in result.output


def test_missing_csv_is_one_line_and_exit_1(tmp_path, small_dataset):
    config = write_config(tmp_path, small_dataset)
    result = runner.invoke(
        app, ["run", "-c", config, "--set", f"input.objects_csv={tmp_path}/none.csv"]
    )
    assert result.exit_code == 1
    assert error_lines(result) == [
        f"error: Objects CSV {tmp_path}/none.csv does not exist. Set input.objects_csv."
    ]


def test_stage_before_its_upstream_is_a_clear_error(tmp_path, small_dataset):
    result = runner.invoke(app, ["predict", "-c", write_config(tmp_path, small_dataset)])
    assert result.exit_code == 1
    assert "Stage 'predict' needs 'ingest' up to date" in result.output
    assert "Run 'pipeline ingest'" in result.output


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, small_dataset):
    result = runner.invoke(app, ["run", "-c", write_config(tmp_path, small_dataset), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "ingest -> train -> predict -> postprocess -> report" in result.output
    assert not (tmp_path / "out" / "embeddings.zarr").exists()


def test_dry_run_at_a_scale_needs_no_data(tmp_path):
    """``--rows/--dims/--k/--workers`` with ``--dry-run``: one line per stage with time,
    memory and disk, from a config whose inputs do not exist."""
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input:\n  objects_csv: {tmp_path / 'none.csv'}\noutput:\n  dir: {tmp_path / 'out'}\n"
    )
    args = ["run", "-c", str(config), "--dry-run", "--rows", "10000000", "--dims", "256",
            "--k", "600", "--workers", "4", "--threads", "8"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        "10,000,000 rows x 256 dims" in result.output and "4 worker(s) x 8 core(s)" in result.output
    )
    for stage in ("ingest", "train", "predict", "postprocess", "report", "whole run"):
        assert any(line.strip().startswith(stage) for line in result.output.splitlines()), stage
    assert "GEMM on 32 cores" in result.output
    assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["run", "-c", str(config), "--rows", "5"])
    assert result.exit_code == 2 and error_lines(result) == [
        "error: --rows (and --dims, --k, --workers, --threads) need --dry-run."
    ]


def test_stage_commands_run_in_order(tmp_path, small_dataset):
    config = write_config(tmp_path, small_dataset)
    for stage in ("ingest", "train", "predict", "postprocess", "report"):
        result = runner.invoke(app, [stage, "-c", config])
        assert result.exit_code == 0, result.output
    csv = pd.read_csv(tmp_path / "out" / "ins_posts_clusters.csv")
    assert len(csv) > 0
    # The training plan is known once the store exists.
    result = runner.invoke(app, ["train", "-c", config, "--dry-run"])
    assert "TrainPlan(" in result.output and "rows=2,000" in result.output


def test_unreachable_scheduler_is_one_line(tmp_path, small_dataset):
    config = write_config(tmp_path, small_dataset, "  connect_timeout_s: 1\n")
    result = runner.invoke(app, ["run", "-c", config, "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and "tcp://127.0.0.1:9" in lines[0]

"""The executor: each scheduler kind computes, with the plan's worker counts, and a
stage that fails is never logged as finished."""

from __future__ import annotations

import logging

import dask
import dask.array as da
import pytest

from pipeline.config import ExecutorConfig
from pipeline.executor import open_executor, timed
from pipeline.plan import WorkerPlan


@pytest.mark.parametrize("kind", ["threads", "processes", "synchronous"])
def test_local_kinds_compute_with_the_planned_workers(kind):
    with open_executor(ExecutorConfig(scheduler=kind), WorkerPlan(2, 1)) as ex:
        assert ex.kind == kind and ex.n_cores == 2 and not ex.progress
        assert dask.config.get("scheduler") == kind
        total, mean = ex.compute(da.arange(100, chunks=10).sum(), da.ones(7, chunks=3).mean())
    assert (int(total), float(mean)) == (4950, 1.0)


def test_local_cluster_records_which_workers_ran_tasks():
    cfg = ExecutorConfig(scheduler="local-cluster")
    with open_executor(cfg, WorkerPlan(2, 1)) as ex:
        assert ex.kind == "local-cluster" and ex.n_cores == 2
        assert int(ex.compute(da.arange(1000, chunks=10).sum())) == 499500
    assert len(ex.worker_transitions) == 2 and sum(ex.worker_transitions.values()) > 0


def test_timed_logs_finished_only_on_success(caplog):
    timings: dict[str, float] = {}
    with caplog.at_level(logging.INFO, logger="pipeline"):
        with timed("good", timings):
            pass
        with pytest.raises(KeyboardInterrupt), timed("bad", timings):
            raise KeyboardInterrupt
    assert "good: finished" in caplog.text and "bad: finished" not in caplog.text
    assert "bad: stopped after" in caplog.text and "KeyboardInterrupt" in caplog.text
    assert set(timings) == {"good"}

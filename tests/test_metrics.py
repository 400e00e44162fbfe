"""The manager's counters on the scheduler's Prometheus endpoint, read over HTTP as
Prometheus would
"""

from __future__ import annotations

import prometheus_client

from distributed.utils_test import (
    async_poll_for,
    captured_logger,
    fetch_metrics,
    fetch_metrics_body,
    gen_cluster,
    inc,
)

from amm import ActiveMemoryManager, metrics
from conftest import amm_config


async def amm_metrics(s) -> dict[str, float]:
    """{sample name: value} of the dask_amm_* samples, labels folded into the name"""
    families = await fetch_metrics(s.http_server.port, prefix="dask_amm")
    return {
        sample.name + "".join(f"[{v}]" for v in sample.labels.values()): sample.value
        for family in families.values()
        for sample in family.samples
    }


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=amm_config(interval="50ms"))
async def test_counters_follow_what_the_manager_did(c, s, a, b, w3):
    before = await amm_metrics(s)
    assert before["dask_amm_cycles_total"] == 0
    assert before["dask_amm_running"] == 0
    assert before["dask_amm_policies"] == 1

    # x is copied to b to compute y; one of the two copies is superfluous
    x = c.submit(inc, 1, key="x", workers=[a.address])
    y = c.submit(inc, x, key="y", workers=[b.address])
    await y
    assert len(s.tasks["x"].who_has) == 2
    await c.amm.run_once()
    await async_poll_for(lambda: len(s.tasks["x"].who_has) == 1, timeout=5)
    # a retirement, on the running manager, moves y off b
    await c.amm.start()
    await c.retire_workers([b.address])

    after = await amm_metrics(s)
    stats = s.extensions["amm"].stats
    assert after["dask_amm_cycles_total"] >= 2
    assert after["dask_amm_cycles_total"] <= stats.cycles  # read just before
    assert after["dask_amm_drops_requested_total"] >= 1
    assert after["dask_amm_replicas_requested_total"] >= 1
    assert after["dask_amm_suggestions_accepted_total[ReduceReplicas]"] >= 1
    # one label per policy class, not per retired worker
    assert after["dask_amm_suggestions_accepted_total[RetireWorker]"] >= 1
    assert not any(b.address in name for name in after)
    assert after["dask_amm_policy_errors_total"] == 0
    assert after["dask_amm_cycle_seconds_total"] > 0
    assert 0 < after["dask_amm_max_slice_seconds"] < 1
    assert after["dask_amm_running"] == 1
    assert await c.gather([x, y]) == [2, 3]


@gen_cluster(client=True, config=amm_config())
async def test_a_new_scheduler_is_reported_not_the_old_one(c, s, a, b):
    """The registry is per process: each test's scheduler replaces the last one"""
    metrics = await amm_metrics(s)
    assert metrics["dask_amm_cycles_total"] == 0
    await c.amm.run_once()
    await async_poll_for(lambda: s.extensions["amm"].stats.cycles == 1, timeout=5)
    assert (await amm_metrics(s))["dask_amm_cycles_total"] == 1


def test_nothing_reported_once_the_scheduler_closes():
    """A closed scheduler is neither reported nor kept alive by the registry"""

    @gen_cluster(client=True, config=amm_config())
    async def run(c, s, a, b):
        assert "dask_amm_cycles_total" in await fetch_metrics_body(s.http_server.port)

    run()
    assert b"dask_amm" not in prometheus_client.generate_latest()


def test_a_name_clash_is_logged_and_the_manager_works_on(synthetic, monkeypatch):
    """Names already reported by another collector (here: the one registered
    before, which a reset of the module forgets) are logged, not raised
    """
    s, _ = synthetic
    manager = s.extensions["amm"] = ActiveMemoryManager(s, start=False)
    metrics.register(s)  # if no test registered one before in this process
    monkeypatch.setattr(metrics, "_collector", None)
    with captured_logger("distributed.active_memory_manager") as log:
        metrics.register(s)
    assert "AMM metrics not registered with Prometheus" in log.getvalue()
    assert metrics._collector is None
    manager.run_once()
    assert manager.stats.cycles == 1

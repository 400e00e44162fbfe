"""The fast memory readers agree with WorkerState.memory, and are given up when
they cannot be checked to agree.
"""

from __future__ import annotations

import logging
from operator import attrgetter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distributed.utils_test import captured_logger, gen_cluster

from amm import measures
from amm.config import MEASURES
from amm.measures import FAST_READERS, memory_reader
from amm.testing import add_worker, new_scheduler

from .conftest import amm_config

sizes = st.integers(0, 2**40)


def test_every_measure_has_a_fast_reader():
    assert set(FAST_READERS) == set(MEASURES)


@settings(max_examples=300, deadline=None)
@given(process=sizes, nbytes=sizes, spilled_memory=sizes, spilled_disk=sizes, old=sizes)
def test_fast_readers_equal_worker_memory(
    process, nbytes, spilled_memory, spilled_disk, old
):
    s = new_scheduler()
    ws = add_worker(s, "tcp://127.0.0.1:1")
    ws.metrics = {
        "memory": process,
        "spilled_bytes": {"memory": spilled_memory, "disk": spilled_disk},
    }
    ws.nbytes = nbytes
    ws._memory_unmanaged_old = old
    state = ws.memory
    for measure, read in FAST_READERS.items():
        assert read(ws) == getattr(state, measure), measure


@gen_cluster(client=True, config=amm_config())
async def test_fast_readers_on_heartbeat_metrics(c, s, a, b):
    """Real workers: metrics from heartbeats, nbytes from tasks landing"""
    futures = await c.scatter(  # noqa: F841
        {f"x{i}": b"0" * 100_000 * (i + 1) for i in range(5)}, broadcast=True
    )
    await a.heartbeat()
    await b.heartbeat()
    assert memory_reader("optimistic") is FAST_READERS["optimistic"]
    for ws in s.workers.values():
        assert ws.nbytes > 0
        state = ws.memory
        for measure in MEASURES:
            assert memory_reader(measure)(ws) == getattr(state, measure), measure


@pytest.fixture
def unchecked_readers():
    """Forget whether the fast readers were checked, before and after the test"""
    measures._fast_readers_agree.cache_clear()
    yield
    measures._fast_readers_agree.cache_clear()


def test_readers_that_disagree_are_not_used(monkeypatch, unchecked_readers):
    """Should distributed change how it computes a measure, every measure is read
    through WorkerState.memory again
    """
    monkeypatch.setitem(FAST_READERS, "managed", lambda ws: ws.nbytes)
    with captured_logger("distributed.active_memory_manager", logging.INFO) as log:
        reader = memory_reader("optimistic")
    assert reader is not FAST_READERS["optimistic"]
    assert "fast reading of 'managed' differs" in log.getvalue()

    s = new_scheduler()
    ws = add_worker(s, "tcp://127.0.0.1:1")
    ws.metrics = {"memory": 1000, "spilled_bytes": {"memory": 0, "disk": 0}}
    ws.nbytes = 1500  # managed above process: the lambda above gets it wrong
    assert reader(ws) == attrgetter("memory.optimistic")(ws) == 1000


def test_readers_that_cannot_be_checked_are_not_used(monkeypatch, unchecked_readers):
    def broken(ws):
        raise KeyError("spilled_bytes")

    monkeypatch.setitem(FAST_READERS, "spilled", broken)
    with captured_logger("distributed.active_memory_manager", logging.INFO) as log:
        reader = memory_reader("spilled")
    assert reader is not broken
    assert "could not be checked (KeyError" in log.getvalue()

from __future__ import annotations

from typing import Any

import pytest

import amm  # noqa: F401  (loads the amm config defaults)
from distributed.utils_test import cleanup, loop, loop_in_thread  # noqa: F401


def amm_config(**settings: Any) -> dict[str, Any]:
    """dask config that installs this project's manager through the preload, with
    the given ``amm.*`` settings. Not started unless asked: tests run cycles by hand
    so that what they observe follows from what they did.
    """
    config: dict[str, Any] = {
        "distributed.scheduler.preload": ["amm"],
        "amm.start": False,
        # tests pause workers by hand by setting Worker.status
        "distributed.worker.memory.pause": False,
        # tests use scatter(broadcast=True) to make replicas for policies to drop;
        # tests of ReplicateN turn this back on
        "amm.replicate.serve-client-replicate": False,
    }
    config.update({f"amm.{k}": v for k, v in settings.items()})
    return config


@pytest.fixture
def synthetic():
    """An unstarted scheduler with a recorder of what the manager sends"""
    from amm.testing import Recorder, new_scheduler

    s = new_scheduler()
    return s, Recorder(s)

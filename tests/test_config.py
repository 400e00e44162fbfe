"""The amm config section: defaults, environment variables, precedence over
distributed's section, and an error naming key and value for every invalid value.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import dask
from distributed import Scheduler
from distributed.utils_test import gen_test

from amm import ActiveMemoryManager, AMMConfigError, ReduceReplicas
from amm import config as amm_config_module
from amm.testing import new_scheduler


@pytest.fixture(scope="module")
def scheduler():
    return new_scheduler()


def manager(scheduler, **kwargs) -> ActiveMemoryManager:
    return ActiveMemoryManager(scheduler, register=False, start=False, **kwargs)


def test_defaults(scheduler):
    # shipped null: "not set", see amm.config
    assert dask.config.get("amm.start") is None
    assert dask.config.get("amm.interval") is None
    assert amm_config_module.setting("start") == ("amm.start", True)
    m = manager(scheduler)
    assert m.interval == 2.0
    assert m.measure == "optimistic"
    assert [type(p) for p in m.policies] == [ReduceReplicas]


def test_environment_variables():
    """DASK_AMM__* variables reach the section like any dask setting"""
    code = (
        "import amm, dask; "
        "print(dask.config.get('amm.start'), dask.config.get('amm.interval'))"
    )
    env = {**os.environ, "DASK_AMM__START": "False", "DASK_AMM__INTERVAL": "250ms"}
    out = subprocess.check_output([sys.executable, "-c", code], env=env, text=True)
    assert out.split() == ["False", "250ms"]


def test_amm_section(scheduler):
    with dask.config.set(
        {"amm.interval": "250ms", "amm.measure": "managed", "amm.policies": []}
    ):
        m = manager(scheduler)
    assert m.interval == 0.25
    assert m.measure == "managed"
    assert not m.policies


def test_distributed_section_is_honoured(scheduler):
    """Deployments configured for distributed's manager keep working"""
    with dask.config.set(
        {
            "distributed.scheduler.active-memory-manager.interval": "300ms",
            "distributed.scheduler.active-memory-manager.measure": "process",
            "distributed.scheduler.active-memory-manager.policies": [],
        }
    ):
        m = manager(scheduler)
    assert m.interval == 0.3
    assert m.measure == "process"
    assert not m.policies


def test_amm_section_wins_over_distributed(scheduler):
    with dask.config.set(
        {
            "amm.interval": "100ms",
            "distributed.scheduler.active-memory-manager.interval": "300ms",
        }
    ):
        assert manager(scheduler).interval == 0.1


def test_amm_section_wins_even_with_its_default_value(scheduler):
    """Built-in AMM turned off in distributed's section, this one turned on in its
    own: the value written in the amm section wins, although it is the default
    """
    with dask.config.set(
        {
            "amm.start": True,
            "amm.interval": "2s",
            "distributed.scheduler.active-memory-manager.start": False,
            "distributed.scheduler.active-memory-manager.interval": "300ms",
        }
    ):
        assert amm_config_module.setting("start") == ("amm.start", True)
        assert manager(scheduler).interval == 2.0


def test_distributed_default_policies_map_to_ours(scheduler):
    """distributed's shipped default (its ReduceReplicas) means our default"""
    m = manager(scheduler)
    assert [type(p) for p in m.policies] == [ReduceReplicas]


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("amm.measure", "notexist", "amm.measure='notexist': measure must be one of"),
        ("amm.interval", 0, "amm.interval=0: must be greater than zero"),
        ("amm.interval", "-1s", "amm.interval='-1s'"),
        ("amm.interval", -1, "amm.interval=-1: must be greater than zero"),
        ("amm.interval", "soon", "amm.interval='soon': not a time interval"),
        ("amm.interval", [1], r"amm.interval=\[1\]: not a time interval"),
        ("amm.interval", {"s": 1}, r"amm.interval=\{'s': 1\}: not a time interval"),
        ("amm.interval", "1e400s", "amm.interval='1e400s': not a time interval"),
        ("amm.interval", float("inf"), "amm.interval=inf: not a time interval"),
        ("amm.start", "maybe", "amm.start='maybe': must be true or false"),
        ("amm.policies", "amm.ReduceReplicas", "amm.policies='amm.ReduceReplicas'"),
        ("amm.policies", [{"cls": "x"}], r"amm.policies\[0\]=.*'class' key"),
        (
            "amm.policies",
            [{"class": "amm.DoesNotExist"}],
            r"amm.policies\[0\].class='amm.DoesNotExist': cannot be imported",
        ),
        (
            "amm.policies",
            [{"class": "collections.OrderedDict"}],
            r"amm.policies\[0\].class='collections.OrderedDict': not a subclass",
        ),
        (
            "amm.policies",
            [{"class": "amm.ReduceReplicas", "bogus": 1}],
            r"amm.policies\[0\]: ReduceReplicas rejected its arguments \{'bogus': 1\}",
        ),
        (
            "distributed.scheduler.active-memory-manager.measure",
            "notexist",
            "distributed.scheduler.active-memory-manager.measure='notexist'",
        ),
        (
            "amm.reduce-replicas.unassigned-waiters",
            "some",
            "amm.reduce-replicas.unassigned-waiters='some': "
            "must be one of 'each', 'imminent', 'shared'",
        ),
    ],
)
def test_invalid_values_name_key_and_value(scheduler, key, value, match):
    with dask.config.set({key: value}):
        with pytest.raises(AMMConfigError, match=match):
            ActiveMemoryManager(scheduler, register=False)
    assert issubclass(AMMConfigError, ValueError)


def test_invalid_constructor_arguments(scheduler):
    with pytest.raises(AMMConfigError, match="measure='bad'"):
        manager(scheduler, measure="bad")
    with pytest.raises(AMMConfigError, match="interval=-2: must be greater than zero"):
        manager(scheduler, interval=-2)
    with pytest.raises(AMMConfigError, match="unassigned_waiters='all'"):
        ReduceReplicas(unassigned_waiters="all")
    assert repr(ReduceReplicas(unassigned_waiters="shared")) == (
        "ReduceReplicas(unassigned_waiters='shared')"
    )
    assert repr(ReduceReplicas(unassigned_waiters="each")) == (
        "ReduceReplicas(unassigned_waiters='each')"
    )
    assert repr(ReduceReplicas()) == "ReduceReplicas()"


@gen_test()
async def test_invalid_config_fails_scheduler_start():
    """With the preload, a bad value stops the scheduler from starting at all"""
    with dask.config.set(
        {"distributed.scheduler.preload": ["amm"], "amm.policies": [{"class": "nope.Nope"}]}
    ):
        with pytest.raises(Exception) as e:
            await Scheduler(host="127.0.0.1", dashboard=False)
    chain = []
    exc: BaseException | None = e.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(
        isinstance(exc, AMMConfigError)
        and "amm.policies[0].class='nope.Nope'" in str(exc)
        for exc in chain
    ), chain


def test_missing_section_falls_back_to_shipped_defaults():
    """A config built before amm was imported lacks the section entirely"""
    with dask.config.set({"amm": None}):
        assert amm_config_module.setting("interval") == ("amm.interval", "2s")

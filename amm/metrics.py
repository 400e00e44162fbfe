"""The manager's counters on the scheduler's Prometheus endpoint.

distributed serves ``/metrics`` on the scheduler's HTTP server, when
``prometheus_client`` is installed, from prometheus_client's process-wide
registry. Installing the manager adds one collector to that registry, so a cluster
watched by Prometheus sees what the manager does (``dask_amm_*``) next to the
scheduler's own metrics, without a client calling ``AMMClient.statistics()``.
Without ``prometheus_client`` nothing is registered, as distributed then serves no
metrics either.

The registry belongs to the process, and so does the collector: like distributed's
own collectors, it reports on the scheduler that installed a manager last (outside
of tests, a process runs one scheduler).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from distributed.http.prometheus import PrometheusCollector
from distributed.scheduler import Scheduler

from amm.logs import logger
from amm.manager import ActiveMemoryManager

#: (name, help, the key of ``ManagerStats.to_dict()`` it reports); counters are
#: exposed with a ``_total`` suffix
COUNTERS = (
    (
        "cycles",
        "AMM cycles run, eager passes, replication on demand and run_once() included",
        "cycles",
    ),
    (
        "cycles_sliced",
        "AMM cycles that exceeded amm.time-slice and resumed on a later event-loop turn",
        "cycles_sliced",
    ),
    ("cycle_seconds", "Time AMM cycles held the event loop", "total_cycle_seconds"),
    ("replicas_requested", "Replicas the AMM asked workers to make", "replicas_requested"),
    ("drops_requested", "Replicas the AMM asked workers to drop", "drops_requested"),
    (
        "replicate_rejected",
        "Replicate suggestions the AMM rejected (no eligible recipient)",
        "replicate_rejected",
    ),
    (
        "drop_rejected",
        "Drop suggestions the AMM rejected (last replica, dependents running there, ...)",
        "drop_rejected",
    ),
    (
        "policy_errors",
        "AMM policies that raised or yielded something invalid (logged at ERROR)",
        "policy_errors",
    ),
)

_collector: AMMMetricCollector | None = None


class AMMMetricCollector(PrometheusCollector):
    def __init__(self, server: Scheduler | None):
        super().__init__(server)
        self.subsystem = "amm"

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        server = self.server
        manager = server.extensions.get("amm") if server is not None else None
        if not isinstance(manager, ActiveMemoryManager):
            return  # uninstalled since; distributed's manager has no such counters
        values = manager.stats.to_dict()
        yield GaugeMetricFamily(
            self.build_name("running"),
            "Whether the AMM runs its cycle periodically (1) or not (0)",
            value=int(manager.running),
        )
        yield GaugeMetricFamily(
            self.build_name("policies"),
            "Policies the AMM runs at each cycle",
            value=len(manager.policies),
        )
        yield GaugeMetricFamily(
            self.build_name("max_slice_seconds"),
            "Longest time the AMM held the event loop in one go",
            value=values["max_slice_seconds"],
        )
        for name, help_, key in COUNTERS:
            yield CounterMetricFamily(self.build_name(name), help_, value=values[key])
        # By class, not by repr: a repr may name a worker (RetireWorker), which
        # would make a label value per retirement
        accepted = CounterMetricFamily(
            self.build_name("suggestions_accepted"),
            "Suggestions the AMM accepted, by policy class",
            labels=["policy"],
        )
        for cls, n in sorted(values["by_class"].items()):
            accepted.add_metric([cls], n)
        yield accepted


def register(scheduler: Scheduler) -> None:
    """Report the manager of ``scheduler`` on ``/metrics``, if prometheus_client is
    installed
    """
    global _collector
    try:
        import prometheus_client
    except ImportError:
        return
    if _collector is not None:
        _collector.server = scheduler
        return
    collector = AMMMetricCollector(scheduler)
    try:
        prometheus_client.REGISTRY.register(collector)
    except ValueError as e:
        # another collector already reports these names: the manager works the same,
        # only unobserved by Prometheus
        logger.warning("AMM metrics not registered with Prometheus: %s", e)
        return
    _collector = collector


def unregister(scheduler: Scheduler) -> None:
    """Stop reporting on ``scheduler``, which is closing"""
    if _collector is not None and _collector.server is scheduler:
        _collector.server = None

"""Installing the manager in a scheduler, in place of distributed's built-in one.

Every way in goes through :class:`ActiveMemoryManagerPlugin`:

- ``distributed.scheduler.preload: [amm]`` in dask config, ``dask scheduler
  --preload amm`` and ``LocalCluster(scheduler_kwargs={"preload": ["amm"]})`` run
  :func:`amm.dask_setup`, which adds the plugin; the scheduler starts it.
- ``client.register_plugin(ActiveMemoryManagerPlugin())`` starts it on a running
  scheduler.
"""

from __future__ import annotations

from typing import Any

from distributed.active_memory_manager import RetireWorker as _DistributedRetireWorker
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler

from dask.typing import Key

from amm import config, metrics, replication, retirement
from amm.eager import EagerReduction
from amm.logs import logger
from amm.manager import ActiveMemoryManager


class ActiveMemoryManagerPlugin(SchedulerPlugin):
    """Scheduler plugin that installs :class:`~amm.ActiveMemoryManager` as
    ``scheduler.extensions["amm"]`` and stops the built-in manager.

    Keyword arguments (``start``, ``interval``, ``measure``) override the config on
    the scheduler; anything left out is resolved as :func:`amm.config.setting` does
    (the ``amm`` section, then distributed's AMM section, then the defaults).
    """

    name = "amm"
    idempotent = True

    def __init__(self, **overrides: Any):
        unknown = set(overrides) - {"start", "interval", "measure"}
        if unknown:
            raise TypeError(
                f"ActiveMemoryManagerPlugin got unexpected arguments {sorted(unknown)}"
            )
        # Checked here too, so that a bad value fails on the client, before the
        # plugin is sent
        _parse_overrides(overrides)
        self.overrides = overrides
        self.manager: ActiveMemoryManager | None = None
        self.eager: EagerReduction | None = None

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        # validated before install(), so that a bad value changes nothing
        eager, delay = config.eager_reduction()
        self.manager = install(scheduler, **self.overrides)
        if eager:
            self.eager = EagerReduction(self.manager, delay)
        metrics.register(scheduler)

    def transition(
        self, key: Key, start: str, finish: str, *args: Any, **kwargs: Any
    ) -> None:
        # Called for every transition of every task: keep the common path short
        if finish == "memory" and start == "processing" and self.eager is not None:
            ts = self.scheduler.tasks.get(key)
            if ts is not None:
                self.eager.task_finished(ts)

    async def close(self) -> None:
        if self.eager is not None:
            self.eager.cancel()
        if self.manager is not None:
            self.manager.stop()
            metrics.unregister(self.scheduler)


def install(scheduler: Scheduler, **overrides: Any) -> ActiveMemoryManager:
    """Replace the scheduler's AMM extension with this project's manager.

    The new manager is fully built (and its config validated) before anything in the
    scheduler changes, so an invalid config raises and leaves the built-in manager
    running as it was. Installing twice keeps the first manager.
    """
    current = scheduler.extensions.get("amm")
    if isinstance(current, ActiveMemoryManager):
        return current

    overrides = _parse_overrides(overrides)
    start = overrides.pop("start", None)
    if start is None:
        start = config.parse_bool(*config.setting("start"))
    # Not serving client.amm.* until installed: a failure below must leave the
    # handlers on the manager that stays
    manager = ActiveMemoryManager(scheduler, start=False, register=False, **overrides)
    # retire_workers() and adaptive scale-down run this project's RetireWorker;
    # Client.replicate() and scatter(broadcast=True) keep their copies (ReplicateN).
    # Both validate their config before changing anything.
    retirement.install_retirement(scheduler, manager)
    try:
        replication.install_replication(scheduler, manager)
    except Exception:
        retirement.uninstall_retirement(scheduler)
        raise

    if current is not None:
        was_running = current.running
        current.stop()
        # Retirements in progress hold RetireWorker policies of the old manager and
        # wait on them, with no time limit: carry them over or they would wait
        # forever; and run them even if this manager is not started
        carried = [
            p for p in current.policies if isinstance(p, _DistributedRetireWorker)
        ]
        for policy in carried:
            current.policies.discard(policy)
        if carried and not start:
            _CarriedRetirements(scheduler, carried, manager.interval).start()
        else:
            for policy in carried:
                manager.add_policy(policy)
        logger.info(
            "Replaced the built-in Active Memory Manager (was %s)",
            "running" if was_running else "stopped",
        )
    scheduler.extensions["amm"] = manager
    manager.register_handlers()

    if start:
        manager.start()
    logger.info(
        "Active Memory Manager installed: %d policies, interval %ss, measure %s, %s",
        len(manager.policies),
        manager.interval,
        manager.measure,
        "started" if start else "not started",
    )
    return manager


class _CarriedRetirements(ActiveMemoryManager):
    """Runs the retirements carried over from the replaced manager when the new one
    is not started, and stops once they are all done
    """

    def __init__(self, scheduler: Scheduler, policies: list[Any], interval: float):
        super().__init__(
            scheduler, policies, register=False, start=False, interval=interval
        )

    def run_once(self) -> None:
        if self.policies:
            super().run_once()
        else:
            self.stop()


def _parse_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The plugin's keyword arguments, validated and parsed (None: from config)"""
    parsed = dict(overrides)
    if parsed.get("start") is not None:
        parsed["start"] = config.parse_bool("start", parsed["start"])
    if parsed.get("interval") is not None:
        parsed["interval"] = config.parse_duration("interval", parsed["interval"])
    if parsed.get("measure") is not None:
        parsed["measure"] = config.parse_measure("measure", parsed["measure"])
    return parsed

"""Client-side API for what distributed's ``client.amm`` has no verb for.

``client.amm.start()``, ``.stop()``, ``.running()`` and ``.run_once()`` keep working
unchanged once this manager is installed; :class:`AMMClient` adds statistics and
managing policies at runtime:

.. code-block:: python

    from amm import AMMClient

    amm = AMMClient(client)
    amm.policies()        # [{"class": "amm.policies.reduce_replicas.ReduceReplicas", ...}]
    amm.statistics()      # {"cycles": 12, "drops_requested": 340, ...}
    amm.add_policy("mypackage.MyPolicy", threshold=0.5)
    amm.remove_policy("MyPolicy")
    amm.replicate(futures, 3)    # keep 3 copies of each, non-blocking
    amm.tracked()                # what is kept replicated
    amm.unreplicate(futures)     # back to 1

Like ``client.amm``, every method is synchronous on a synchronous client and
returns an awaitable on an asynchronous one.
"""

from __future__ import annotations

from typing import Any

from amm.replication import ReplicationClient


class AMMClient(ReplicationClient):
    """Operate this project's manager from a client. Besides the methods below,
    :meth:`replicate`, :meth:`unreplicate` and :meth:`tracked` keep data replicated
    (see :class:`~amm.replication.ReplicationClient`).
    """

    def _call(self, handler: str, **kwargs: Any) -> Any:
        return self._client.sync(getattr(self._client.scheduler, handler), **kwargs)

    async def _policies(self) -> list[dict[str, Any]]:
        # the wire turns lists into tuples
        return list(await self._client.scheduler.amm_policies())

    # the verbs of distributed's client.amm, for a single entry point
    def start(self) -> Any:
        return self._call("amm_handler", method="start")

    def stop(self) -> Any:
        return self._call("amm_handler", method="stop")

    def running(self) -> Any:
        return self._call("amm_handler", method="running")

    def run_once(self) -> Any:
        return self._call("amm_handler", method="run_once")

    def statistics(self) -> Any:
        """Lifetime counters of the manager: cycles, cycle durations, replications
        and drops requested and rejected, policy errors, suggestions per policy.
        """
        return self._call("amm_statistics")

    def policies(self) -> Any:
        """The manager's policies, in the order they run"""
        return self._client.sync(self._policies)

    def add_policy(self, cls: str, **kwargs: Any) -> Any:
        """Add a policy by dotted class path, with keyword arguments for its
        constructor, exactly as an entry of the ``amm.policies`` config list. The
        class must be importable on the scheduler. Returns the new policy's repr;
        an invalid class or arguments raise ``AMMConfigError`` here.
        """
        return self._call("amm_add_policy", spec={"class": cls, **kwargs})

    def remove_policy(self, cls: str) -> Any:
        """Remove every policy of the given class (dotted path or class name).
        Returns how many were removed.
        """
        return self._call("amm_remove_policy", cls=cls)

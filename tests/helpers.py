"""Policies used by several tests"""

from __future__ import annotations

from typing import Any

from distributed.active_memory_manager import (
    ActiveMemoryManagerPolicy as DistributedPolicy,
)


class DemoPolicy(DistributedPolicy):
    """Suggest ``n`` times to replicate or drop ``key``, optionally among the workers
    at the given positions of ``scheduler.workers``. Written against distributed's
    base class and yielding plain tuples, as a user's distributed policy would.
    """

    def __init__(
        self,
        action: str,
        key: str,
        n: int = 10,
        candidates: list[int] | None = None,
    ):
        self.action = action
        self.key = key
        self.n = n
        self.candidates = candidates
        self.choices: list[Any] = []

    def __repr__(self) -> str:
        return f"DemoPolicy({self.action!r}, {self.key!r})"

    def run(self):
        candidates = self.candidates
        if candidates is not None:
            wss = list(self.manager.scheduler.workers.values())
            candidates = {wss[i] for i in candidates}
        ts = self.manager.scheduler.tasks.get(self.key)
        if ts is None:
            return
        for _ in range(self.n):
            choice = yield self.action, ts, candidates
            self.choices.append(choice)


def demo(action: str, key: str = "x", n: int = 10, candidates=None) -> dict:
    return {
        "class": "helpers.DemoPolicy",
        "action": action,
        "key": key,
        "n": n,
        "candidates": candidates,
    }

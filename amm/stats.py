"""Counters that make the manager observable: what each cycle decided and what it
cost, accumulated over the manager's lifetime and readable from the client.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CycleStats:
    """What one cycle, or the sum of many, decided"""

    replicas_requested: int = 0
    drops_requested: int = 0
    replicate_rejected: int = 0
    drop_rejected: int = 0
    policy_errors: int = 0
    #: accepted suggestions per policy, by repr
    by_policy: Counter[str] = field(default_factory=Counter)
    #: the same by policy class name: a bounded set of names, where reprs may name
    #: a worker (RetireWorker) or an object's address
    by_class: Counter[str] = field(default_factory=Counter)

    def count_policy(self, policy: object, accepted: int) -> None:
        # a policy run on another's behalf (a ReplicateN run on demand) is
        # counted as that one
        policy = getattr(policy, "counted_as", policy)
        if accepted:
            self.by_policy[repr(policy)] += accepted
            self.by_class[type(policy).__name__] += accepted

    def add(self, other: CycleStats) -> None:
        self.replicas_requested += other.replicas_requested
        self.drops_requested += other.drops_requested
        self.replicate_rejected += other.replicate_rejected
        self.drop_rejected += other.drop_rejected
        self.policy_errors += other.policy_errors
        self.by_policy.update(other.by_policy)
        self.by_class.update(other.by_class)


@dataclass
class ManagerStats:
    """Lifetime totals of a manager"""

    cycles: int = 0
    #: cycles that did not fit in one time slice and resumed later
    cycles_sliced: int = 0
    total: CycleStats = field(default_factory=CycleStats)
    #: time spent by the last cycle on the event loop, over all its slices
    last_cycle_seconds: float = 0.0
    #: time slices the last cycle was split in
    last_cycle_slices: int = 0
    max_cycle_seconds: float = 0.0
    total_cycle_seconds: float = 0.0
    #: longest time the manager held the event loop in one go
    max_slice_seconds: float = 0.0

    def record_slice(self, seconds: float) -> None:
        self.max_slice_seconds = max(self.max_slice_seconds, seconds)

    def record(self, cycle: CycleStats, seconds: float, slices: int) -> None:
        self.cycles += 1
        self.cycles_sliced += slices > 1
        self.total.add(cycle)
        self.last_cycle_seconds = seconds
        self.last_cycle_slices = slices
        self.max_cycle_seconds = max(self.max_cycle_seconds, seconds)
        self.total_cycle_seconds += seconds

    def to_dict(self) -> dict[str, Any]:
        """Plain data, safe to send over the wire"""
        out = asdict(self)
        out.update(out.pop("total"))
        out["by_policy"] = dict(self.total.by_policy)
        out["by_class"] = dict(self.total.by_class)
        return out

"""The built-in policies, installed as ``amm.policies``"""

from amm.policies.rebalance import Rebalance
from amm.policies.reduce_replicas import ReduceReplicas
from amm.policies.replicate_n import ReplicateN
from amm.policies.retire_worker import RetireWorker

__all__ = ["Rebalance", "ReduceReplicas", "ReplicateN", "RetireWorker"]

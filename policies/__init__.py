"""The built-in policies, installed as ``amm.policies``"""

from amm.policies.reduce_replicas import ReduceReplicas

__all__ = ["ReduceReplicas"]

"""The ``amm`` dask config section: its shipped defaults, and how each setting of
the manager is resolved and validated.

A setting is read from the ``amm`` section. Deployments written for distributed's
built-in manager configure ``distributed.scheduler.active-memory-manager`` instead;
so that they keep working unchanged, the four settings the two sections share
(``start``, ``interval``, ``measure``, ``policies``) ship null in ``amm``: a value
set in ``amm`` wins, else a value the user set in distributed's section (one that
differs from distributed's default), else :data:`MIRRORED_DEFAULTS`. (Shipping the
defaults themselves would make ``amm.start: true`` written by a user
indistinguishable from no setting at all, and lose to distributed's
``start: false``.)

Every invalid value raises :class:`AMMConfigError` (a ``ValueError``) naming the
config key and the offending value, so a bad deployment fails when the manager is
installed rather than misbehaving later.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml

import dask.config
from dask.utils import parse_timedelta
from distributed.config import defaults as _distributed_config_defaults
from distributed.scheduler import MemoryState
from distributed.utils import import_term

SECTION = "amm"
DISTRIBUTED_SECTION = "distributed.scheduler.active-memory-manager"

with open(os.path.join(os.path.dirname(__file__), "amm.yaml")) as _f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_f)
dask.config.update_defaults(DEFAULTS)

_DISTRIBUTED_DEFAULTS: dict[str, Any] = _distributed_config_defaults["distributed"][
    "scheduler"
]["active-memory-manager"]

#: The defaults of the settings shared with distributed's section, which amm.yaml
#: ships null (see the module docstring); the same as distributed's, with this
#: project's ReduceReplicas
MIRRORED_DEFAULTS: dict[str, Any] = {
    "start": True,
    "interval": "2s",
    "measure": "optimistic",
    "policies": [{"class": "amm.ReduceReplicas"}],
}

#: Names accepted by the ``measure`` setting
MEASURES: frozenset[str] = frozenset(
    name for name in dir(MemoryState) if not name.startswith("_") and name != "sum"
)


class AMMConfigError(ValueError):
    """An invalid setting of the Active Memory Manager"""


def option(section: str, name: str) -> tuple[str, Any]:
    """``(config key, value)`` of ``amm.<section>.<name>``, the option of a policy
    or feature. The shipped default stands in when the section is missing from the
    config (distributed's test harness builds configs before amm is imported).
    """
    key = f"{SECTION}.{section}.{name}"
    return key, dask.config.get(key, default=DEFAULTS[SECTION][section][name])


def setting(name: str) -> tuple[str, Any]:
    """Return ``(config key, value)`` of manager setting ``name``, following the
    precedence described in the module docstring. The key is returned so that error
    messages name the place where the user actually wrote the value.
    """
    ours_key = f"{SECTION}.{name}"
    # The section can be missing from a config built before amm was imported, as
    # distributed's test harness does with its copy of the config
    ours = dask.config.get(ours_key, default=None)
    if ours is not None:
        return ours_key, ours
    if name not in MIRRORED_DEFAULTS:
        return ours_key, DEFAULTS[SECTION][name]
    theirs_key = f"{DISTRIBUTED_SECTION}.{name}"
    theirs = dask.config.get(theirs_key, default=None)
    if theirs is not None and theirs != _DISTRIBUTED_DEFAULTS.get(name):
        return theirs_key, theirs
    return ours_key, MIRRORED_DEFAULTS[name]


def distributed_section_customized() -> bool:
    """Whether the user configured distributed's own AMM section: a deployment set
    up for distributed's manager, whose semantics it then expects where the two
    managers differ (see ``amm.replicate.serve-client-replicate``).
    """
    return any(
        dask.config.get(f"{DISTRIBUTED_SECTION}.{name}", default=default) != default
        for name, default in _DISTRIBUTED_DEFAULTS.items()
    )


def parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise AMMConfigError(f"{key}={value!r}: must be true or false")


def parse_duration(key: str, value: Any, *, allow_zero: bool = False) -> float:
    """Seconds, from anything dask accepts as a time delta ("2s", "500ms", 0.5)"""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        # dask's parse_timedelta fails on it with a confusing message
        raise AMMConfigError(
            f"{key}={value!r}: must be "
            + ("zero or more" if allow_zero else "greater than zero")
        )
    try:
        seconds = parse_timedelta(value, default="seconds")
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        # AttributeError: a list or a dict; OverflowError: "1e400s"
        raise AMMConfigError(
            f"{key}={value!r}: not a time interval (e.g. 2s, 500ms, 0.5): {e}"
        ) from None
    if seconds is None or seconds < 0 or (seconds == 0 and not allow_zero):
        raise AMMConfigError(
            f"{key}={value!r}: must be "
            + ("zero or more" if allow_zero else "greater than zero")
        )
    return float(seconds)


def parse_measure(key: str, value: Any) -> str:
    if not isinstance(value, str) or value not in MEASURES:
        raise AMMConfigError(
            f"{key}={value!r}: measure must be one of " + ", ".join(sorted(MEASURES))
        )
    return value


def build_policies(key: str, specs: Any) -> list[Any]:
    """Instantiate the policies described by a ``policies`` config list.

    Each entry is ``{"class": "dotted.path", **kwargs}``. The class must be a
    subclass of distributed's ``ActiveMemoryManagerPolicy`` (this project's base
    class is one), so policies written for distributed are accepted as they are.
    """
    from distributed.active_memory_manager import (
        ActiveMemoryManagerPolicy as BasePolicy,
    )

    if specs is None:
        return []
    if isinstance(specs, (str, bytes, Mapping)) or not hasattr(specs, "__iter__"):
        raise AMMConfigError(
            f"{key}={specs!r}: must be a list of {{class: dotted.path, ...}}"
        )
    policies = []
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        if not isinstance(spec, Mapping) or "class" not in spec:
            raise AMMConfigError(
                f"{where}={spec!r}: must be a mapping with a 'class' key"
            )
        kwargs = dict(spec)
        path = kwargs.pop("class")
        if isinstance(path, type):
            cls = path
        else:
            try:
                cls = import_term(path)
            except Exception as e:
                raise AMMConfigError(
                    f"{where}.class={path!r}: cannot be imported: {e!r}"
                ) from e
        if not isinstance(cls, type) or not issubclass(cls, BasePolicy):
            raise AMMConfigError(
                f"{where}.class={path!r}: not a subclass of ActiveMemoryManagerPolicy"
            )
        try:
            policies.append(cls(**kwargs))
        except Exception as e:
            raise AMMConfigError(
                f"{where}: {cls.__name__} rejected its arguments {kwargs!r}: {e}"
            ) from e
    return policies


#: Values of ``amm.reduce-replicas.unassigned-waiters``
UNASSIGNED_WAITERS = ("each", "imminent", "shared")


def parse_unassigned_waiters(key: str, value: Any) -> str:
    if value not in UNASSIGNED_WAITERS:
        choices = ", ".join(map(repr, UNASSIGNED_WAITERS))
        raise AMMConfigError(f"{key}={value!r}: must be one of {choices}")
    return value  # type: ignore[no-any-return]


def eager_reduction() -> tuple[bool, float]:
    """``amm.reduce-replicas.eager`` and ``.eager-delay``, validated"""
    return (
        parse_bool(*option("reduce-replicas", "eager")),
        parse_duration(*option("reduce-replicas", "eager-delay"), allow_zero=True),
    )

"""Loggers of the manager.

They carry the names of distributed's own AMM loggers, and the cycle logs the same
messages at the same levels, so that logging configuration, dashboards and log
parsing written for distributed's manager keep working when this one replaces it.

- ``logger``: terse. INFO for decisions a user should know of, DEBUG for one line
  per policy run and per worker message.
- ``task_logger``: one line per suggestion, at DEBUG only.
- ``scheduler_logger``: distributed's scheduler logger, where
  ``Scheduler.retire_workers`` reports what it retires and what it gives up on;
  :mod:`amm.retirement`, which replaces it, reports the same there.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("distributed.active_memory_manager")
task_logger = logging.getLogger("distributed.active_memory_manager.tasks")
scheduler_logger = logging.getLogger("distributed.scheduler")

"""One cycle of the manager: run the policies, accept or reject each suggestion
under the invariants, choose the worker, and send the accepted work to the workers.

The invariants live here and nowhere else, so a policy cannot break them however
it misbehaves:

- never drop the last replica of a key, counting the drops already accepted in this
  cycle, nor take a key below the replica count some policy desires for it;
- never drop a replica from a worker where a dependent task is processing;
- never replicate to a worker that is not running (paused, retiring, gone), that
  holds the key, or that is already due to receive it in this cycle;
- never touch actors, and only act on keys that are in memory.

A policy that raises, or yields something that is not a valid suggestion, has every
suggestion it made in this cycle withdrawn; the other policies are unaffected.
"""

from __future__ import annotations

import logging
import reprlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Set
from typing import Any

from dask.typing import Key
from distributed.active_memory_manager import Suggestion
from distributed.core import Status
from distributed.metrics import time
from distributed.scheduler import Scheduler, TaskState, WorkerState

from amm.logs import logger, task_logger
from amm.ordering import WorkerMemoryOrder
from amm.stats import CycleStats

#: (op, task, worker, bytes added to the worker's expected memory)
JournalEntry = tuple[str, TaskState, WorkerState, int]


class InvalidSuggestion(ValueError):
    """A policy yielded something the manager cannot act on"""


class Cycle:
    """The state of one cycle: a memory snapshot, the workers ordered by it, and
    the suggestions accepted so far.

    ``pending`` and ``memory`` are exposed to policies as ``manager.pending`` and
    ``manager.workers_memory``, with the same meaning as in distributed.
    """

    scheduler: Scheduler
    pending: dict[TaskState, tuple[set[WorkerState], set[WorkerState]]]
    memory: dict[WorkerState, int]
    order: WorkerMemoryOrder
    stats: CycleStats

    def __init__(
        self,
        scheduler: Scheduler,
        measure: str,
        desired_replicas: Callable[[TaskState], int],
    ):
        self.scheduler = scheduler
        self.desired_replicas = desired_replicas
        self.pending = {}
        self.memory = {
            ws: getattr(ws.memory, measure) for ws in scheduler.workers.values()
        }
        self.order = WorkerMemoryOrder(self.memory)
        self.running = scheduler.running
        self.not_running = {ws for ws in self.memory if ws not in self.running}
        self.stats = CycleStats()
        # Candidate sets already checked in this cycle, by id; the reference keeps
        # the id from being reused by another object while the cycle lasts.
        self._checked_candidates: dict[int, Set[WorkerState]] = {}

    # -- running policies --------------------------------------------------------

    def run_policy(self, policy: Any) -> None:
        """Run one policy to exhaustion, feeding it the chosen workers.

        Only the policy's own code is guarded: an error there withdraws the policy's
        suggestions for this cycle. An error in the manager itself propagates.
        """
        logger.debug("Running policy: %s", policy)
        journal: list[JournalEntry] = []
        try:
            suggestions = policy.run()
        except Exception:
            self._policy_failed(policy, journal, "raised")
            return
        if suggestions is None:
            return  # run() is a plain function that suggested nothing
        send = getattr(suggestions, "send", None)
        if send is None:
            try:
                suggestions = iter(suggestions)
            except TypeError:
                self._policy_failed(
                    policy, journal, f"returned {reprlib.repr(suggestions)}", exc=False
                )
                return
            send = lambda _: next(suggestions)  # noqa: E731

        choice: WorkerState | None = None
        while True:
            try:
                raw = send(choice)
            except StopIteration:
                break
            except Exception:
                self._policy_failed(policy, journal, "raised")
                return
            try:
                suggestion = self.validate(raw)
            except InvalidSuggestion as e:
                self._policy_failed(policy, journal, str(e), exc=False)
                _close(suggestions)
                return
            choice = self.accept(suggestion, journal)

        self.stats.count_policy(policy, journal)

    def _policy_failed(
        self,
        policy: Any,
        journal: list[JournalEntry],
        reason: str,
        exc: bool = True,
    ) -> None:
        withdrawn = len(journal)
        self.rollback(journal)
        self.stats.policy_errors += 1
        logger.error(
            "Policy %r %s; its %d suggestions of this cycle are withdrawn",
            policy,
            reason,
            withdrawn,
            exc_info=exc,
        )

    # -- validating and accepting suggestions ------------------------------------

    def validate(self, raw: Any) -> Suggestion:
        """Turn what a policy yielded into a Suggestion, or raise InvalidSuggestion
        naming what is wrong with it.
        """
        if not isinstance(raw, Suggestion):
            if not isinstance(raw, tuple) or not 2 <= len(raw) <= 3:
                raise InvalidSuggestion(
                    "yielded "
                    + reprlib.repr(raw)
                    + ", which is not a Suggestion(op, ts, candidates)"
                )
            raw = Suggestion(*raw)
        op, ts, candidates = raw
        if op not in ("replicate", "drop"):
            raise InvalidSuggestion(
                f"yielded op {reprlib.repr(op)}; expected 'replicate' or 'drop'"
            )
        if not isinstance(ts, TaskState):
            raise InvalidSuggestion(
                f"yielded {reprlib.repr(ts)} where a TaskState was expected"
            )
        if self.scheduler.tasks.get(ts.key) is not ts:
            raise InvalidSuggestion(f"yielded key {ts.key!r}, unknown to the scheduler")
        if candidates is not None:
            checked = self._check_candidates(candidates)
            if checked is not candidates:
                raw = Suggestion(op, ts, checked)
        return raw

    def _check_candidates(self, candidates: Any) -> Set[WorkerState]:
        if self._checked_candidates.get(id(candidates)) is candidates:
            return candidates
        if not isinstance(candidates, Set):
            if not isinstance(candidates, (list, tuple)):
                raise InvalidSuggestion(
                    f"yielded candidates {reprlib.repr(candidates)}; "
                    "expected a set of WorkerState or None"
                )
            candidates = set(candidates)
        workers = self.scheduler.workers
        for ws in candidates:
            if not isinstance(ws, WorkerState) or workers.get(ws.address) is not ws:
                raise InvalidSuggestion(
                    f"yielded candidate {reprlib.repr(ws)}, "
                    "which is not a worker of this scheduler"
                )
        self._checked_candidates[id(candidates)] = candidates
        return candidates

    def accept(
        self, suggestion: Suggestion, journal: list[JournalEntry]
    ) -> WorkerState | None:
        """Apply a valid suggestion if the invariants allow it; return the chosen
        worker or None.
        """
        op, ts, candidates = suggestion
        entry = self.pending.get(ts)
        pending_repl, pending_drop = entry if entry else (_EMPTY, _EMPTY)

        if op == "replicate":
            ws = self.find_recipient(ts, candidates, pending_repl)
            if ws is None:
                self.stats.replicate_rejected += 1
                return None
            delta = ts.get_nbytes()
        else:
            ws = self.find_dropper(ts, candidates, pending_drop)
            if ws is None:
                self.stats.drop_rejected += 1
                return None
            delta = -min(ts.get_nbytes(), self.memory[ws])

        if not entry:
            entry = self.pending[ts] = (set(), set())
        entry[0 if op == "replicate" else 1].add(ws)
        self.order.update(ws, self.memory[ws] + delta)
        journal.append((op, ts, ws, delta))
        return ws

    def rollback(self, journal: list[JournalEntry]) -> None:
        """Withdraw accepted suggestions, newest first"""
        for op, ts, ws, delta in reversed(journal):
            pending_repl, pending_drop = self.pending[ts]
            (pending_repl if op == "replicate" else pending_drop).discard(ws)
            if not pending_repl and not pending_drop:
                del self.pending[ts]
            self.order.update(ws, self.memory[ws] - delta)
        journal.clear()

    def find_recipient(
        self,
        ts: TaskState,
        candidates: Set[WorkerState] | None,
        pending_repl: Set[WorkerState],
    ) -> WorkerState | None:
        """The least loaded running worker among ``candidates`` (any worker if None)
        that neither holds ``ts`` nor is already due to receive it.
        """
        if ts.state != "memory":
            _reject("replicate", ts, candidates, f"ts.state = {ts.state}")
            return None
        if ts.actor:
            _reject("replicate", ts, candidates, "task is an actor")
            return None
        who_has = ts.who_has or _EMPTY
        running = self.running

        def eligible(ws: WorkerState) -> bool:
            return ws in running and ws not in who_has and ws not in pending_repl

        choice = self.order.lowest(candidates, eligible)
        if choice is None:
            if task_logger.isEnabledFor(logging.DEBUG):
                _reject(
                    "replicate",
                    ts,
                    candidates,
                    _why_no_recipient(candidates, running, who_has, pending_repl),
                )
            return None
        task_logger.debug(
            "(replicate, %s, %s): replicating to %s", ts, candidates, choice
        )
        return choice

    def find_dropper(
        self,
        ts: TaskState,
        candidates: Set[WorkerState] | None,
        pending_drop: Set[WorkerState],
    ) -> WorkerState | None:
        """The worker among ``candidates`` (any holder if None) that should lose its
        replica of ``ts``: paused and retiring workers first, then the most loaded.
        """
        who_has = ts.who_has
        if who_has is None:
            return None
        remaining = len(who_has) - len(pending_drop)
        if remaining < 2:
            _reject("drop", ts, candidates, "less than 2 replicas exist")
            return None
        desired = self.desired_replicas(ts)
        if remaining <= desired:
            _reject(
                "drop",
                ts,
                candidates,
                f"{remaining} replicas exist and {desired} are desired",
            )
            return None
        if ts.actor:
            _reject("drop", ts, candidates, "task is an actor")
            return None

        if candidates is None:
            holders: Set[WorkerState] = who_has
        else:
            holders = candidates & who_has
            if not holders:
                _reject(
                    "drop",
                    ts,
                    candidates,
                    "no candidates suggested by the policy own a replica",
                )
                return None

        # Workers where a dependent is processing need their replica
        busy = (
            {w.processing_on for w in ts.waiters} & holders if ts.waiters else _EMPTY
        )

        def eligible(ws: WorkerState) -> bool:
            return ws not in pending_drop and ws not in busy

        running = self.running
        choice = self._highest_not_running(holders, eligible)
        if choice is None:
            choice = self.order.highest(
                holders, lambda ws: ws in running and eligible(ws)
            )
        if choice is None:
            if task_logger.isEnabledFor(logging.DEBUG):
                reason = (
                    "already pending drop on all candidates"
                    if holders <= pending_drop
                    else "all candidates have dependent tasks queued or running on them"
                )
                _reject("drop", ts, candidates, reason)
            return None

        # If the choice is the only running holder left that could drop, and the
        # other holders were excluded only because dependents are processing on them
        # while they are paused or retiring, keep the extra replica for now.
        # Otherwise RetireWorker would move the key to a running worker, the next
        # cycle would drop it from there (the retiring worker still has dependents),
        # and so on for as long as the dependents run.
        if (
            busy
            and choice.status == Status.running
            and all(ws.status != Status.running for ws in busy)
            and not any(
                ws is not choice and eligible(ws) for ws in holders
            )
        ):
            _reject(
                "drop",
                ts,
                candidates,
                "there is only one replica on workers that aren't paused or retiring",
            )
            return None

        task_logger.debug("(drop, %s, %s): dropping from %s", ts, candidates, choice)
        return choice

    def _highest_not_running(
        self, holders: Set[WorkerState], eligible: Callable[[WorkerState], bool]
    ) -> WorkerState | None:
        """Paused and retiring holders drop first, so their memory is freed before
        that of workers that can still compute. There are usually few of them, so
        iterate whichever of the two sets is smaller.
        """
        not_running = self.not_running
        if not not_running:
            return None
        if len(holders) < len(not_running):
            pool = [ws for ws in holders if ws in not_running]
        else:
            pool = [ws for ws in not_running if ws in holders]
        return max(
            (ws for ws in pool if eligible(ws)), key=self.order.key, default=None
        )

    # -- enacting ----------------------------------------------------------------

    def enact(self) -> None:
        """Send the accepted suggestions to the workers, one message per worker and
        kind. Fire and forget: a worker that cannot comply (e.g. it now needs the
        key) says so, and the scheduler restores its replica.
        """
        if not self.pending:
            return
        logger.debug("Enacting suggestions for %d tasks:", len(self.pending))
        validate = self.scheduler.validate
        repl_by_worker: defaultdict[WorkerState, list[Key]] = defaultdict(list)
        drop_by_worker: defaultdict[WorkerState, list[Key]] = defaultdict(list)
        for ts, (pending_repl, pending_drop) in self.pending.items():
            if not ts.who_has:
                continue
            if validate:
                assert ts.who_has - pending_drop, ts
                assert not pending_repl & ts.who_has, ts
            for ws in pending_repl:
                repl_by_worker[ws].append(ts.key)
            for ws in pending_drop:
                drop_by_worker[ws].append(ts.key)

        stimulus_id = f"active_memory_manager-{time()}"
        for ws, keys in repl_by_worker.items():
            logger.debug("- %s to acquire %d replicas", ws, len(keys))
            self._send(
                self.scheduler.request_acquire_replicas, ws, keys, stimulus_id
            )
            self.stats.replicas_requested += len(keys)
        for ws, keys in drop_by_worker.items():
            logger.debug("- %s to drop %d replicas", ws, len(keys))
            self._send(self.scheduler.request_remove_replicas, ws, keys, stimulus_id)
            self.stats.drops_requested += len(keys)

    def _send(
        self,
        request: Callable[..., None],
        ws: WorkerState,
        keys: list[Key],
        stimulus_id: str,
    ) -> None:
        # A worker whose stream is already gone is about to be removed; the others
        # must still get their messages.
        try:
            request(ws.address, keys, stimulus_id=stimulus_id)
        except (KeyError, AttributeError) as e:
            logger.warning("Could not reach %s (%r); will retry next cycle", ws, e)


_EMPTY: frozenset[Any] = frozenset()


def _reject(
    op: str, ts: TaskState, candidates: Set[WorkerState] | None, reason: str
) -> None:
    task_logger.debug("(%s, %s, %s) rejected: %s", op, ts, candidates, reason)


def _why_no_recipient(
    candidates: Set[WorkerState] | None,
    running: Set[WorkerState],
    who_has: Set[WorkerState],
    pending_repl: Set[WorkerState],
) -> str:
    """Reconstruct why no recipient was found. Only for DEBUG logging: it costs a
    scan of the candidates, which the choice itself avoids.
    """
    pool = set(running) if candidates is None else set(candidates) & running
    if not pool:
        return "no running candidates"
    pool -= who_has
    if not pool:
        return "all candidates already own a replica"
    return "already pending replication on all candidates"


def _close(generator: Iterator[Any]) -> None:
    close = getattr(generator, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            logger.exception("Error while closing a policy's generator")

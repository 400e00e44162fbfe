"""One cycle of the manager: run the policies, accept or reject each suggestion
under the invariants, choose the worker, and send the accepted work to the workers.

The invariants live here and nowhere else, so a policy cannot break them however
it misbehaves:

- never drop the last replica of a key, counting the drops already accepted in this
  cycle, nor take a key below the replica count some policy desires for it; and
  never drop one whose other replicas are all on workers the scheduler can no
  longer reach (checked when sending);
- never drop a replica from a worker where a dependent task is processing;
- never replicate to a worker that is not running (paused, retiring, gone), that
  holds the key, or that is already due to receive it in this cycle;
- never touch actors, and only act on keys that are in memory.

A policy that raises, or yields something that is not a valid suggestion, has every
suggestion it made in this cycle withdrawn (those not sent yet, if the cycle was
split in time slices); the other policies are unaffected. One whose
``desired_replicas`` raises is left out of the desired counts for the rest of the
cycle.
"""

from __future__ import annotations

import logging
import reprlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Set
from numbers import Integral
from time import perf_counter
from typing import Any

from dask.typing import Key
from distributed.active_memory_manager import Suggestion
from distributed.comm import CommClosedError
from distributed.core import Status
from distributed.metrics import time
from distributed.scheduler import Scheduler, TaskState, WorkerState

from amm.logs import logger, task_logger
from amm.measures import memory_reader
from amm.ordering import WorkerMemoryOrder
from amm.policy import CHECKPOINT, STAYING
from amm.stats import CycleStats

#: (op, task, worker, bytes added to the worker's expected memory)
JournalEntry = tuple[str, TaskState, WorkerState, int]


class PolicyRun:
    """A policy being driven through a cycle"""

    __slots__ = ("policy", "suggestions", "choice", "start", "accepted")

    def __init__(self, policy: Any, start: int):
        self.policy = policy
        self.suggestions: Any = None
        #: what to send into the generator next
        self.choice: WorkerState | None = None
        #: where this policy's entries begin in the cycle's unsent journal: policies
        #: run one after the other, so what it accepted and was not sent yet is
        #: exactly the journal from there on, to withdraw if the policy fails
        self.start = start
        self.accepted = 0


class InvalidSuggestion(ValueError):
    """A policy yielded something the manager cannot act on"""


class Cycle:
    """The state of one cycle: the workers ordered by memory (read from the
    scheduler as the cycle first needs each one), and the suggestions accepted so
    far.

    ``pending`` and ``memory`` are exposed to policies as ``manager.pending`` and
    ``manager.workers_memory``, with the same meaning as in distributed; the
    manager completes ``memory`` with every worker before handing it out.
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
        protectors: list[Any],
        policies: Iterable[Any],
        restrictors: Iterable[Any] = (),
    ):
        self.scheduler = scheduler
        self._tasks = scheduler.tasks
        #: read afresh at every step, see :meth:`run`
        self.policies = policies
        #: time slices run so far, their total duration, and whether the cycle is
        #: waiting for the next one
        self.slices = 0
        self.seconds = 0.0
        self.suspended = False
        self.stats = CycleStats()
        self.desired_replicas = desired_replicas_of(protectors, self._protector_failed)
        self.restricted_to = restricted_to_of(restrictors, self._protector_failed)
        self.pending = {}
        # The workers of the cycle are those of the scheduler when it starts. Until
        # the cycle first lets the event loop run (suspend) none can join or
        # leave, so the order uses the scheduler's own mapping until then.
        # Searches walk running workers only: the others never receive, and drop
        # first through a scan of the few of them (find_dropper).
        self.order = WorkerMemoryOrder(
            scheduler.workers, memory_reader(measure), scheduler.running
        )
        self.memory = self.order.memory
        self.running = scheduler.running
        # scheduler.running is a subset of the workers: same size, same set
        self.not_running: set[WorkerState] = (
            set() if len(self.running) == len(scheduler.workers) else self._not_running()
        )
        #: per-suggestion logging is on; checked once, not per suggestion
        self.log_tasks = task_logger.isEnabledFor(logging.DEBUG)
        # Candidate sets already checked in this cycle, by id; the reference keeps
        # the id from being reused by another object while the cycle lasts.
        self._checked_candidates: dict[int, Set[WorkerState]] = {}
        # Policies started in this cycle, and the one being driven if the cycle is
        # suspended in the middle of it
        self._started: set[Any] = set()
        self._current: PolicyRun | None = None
        # Accepted and not yet sent to the workers
        self._unsent: list[JournalEntry] = []
        #: a replication was accepted in this cycle (and may still be pending)
        self._replicated = False
        #: seconds to send one accepted suggestion, measured by enact()
        self.send_cost = 5e-6

    def suspend(self) -> None:
        """Called before the cycle lets the event loop run until its next slice:
        workers may join or leave meanwhile, and are no longer the cycle's own
        """
        self.suspended = True
        self.order.freeze()
        self.order.forget_views()

    def refresh(self) -> None:
        """Called when a suspended cycle resumes: workers may have paused or left"""
        self.not_running = self._not_running()
        self.log_tasks = task_logger.isEnabledFor(logging.DEBUG)

    def _not_running(self) -> set[WorkerState]:
        running = self.running
        return {ws for ws in self.order.workers.values() if ws not in running}

    # -- running policies --------------------------------------------------------

    def run(self, deadline: float) -> bool:
        """Run the policies until all are exhausted (return True) or ``deadline``
        (a ``perf_counter`` time) passes at a point where the cycle may stop and
        resume later (return False): between two policies, or, in a policy that
        declares ``resumable = True``, between two suggestions or at a
        :data:`~amm.policy.CHECKPOINT`.

        ``self.policies`` is read afresh at every step, so a policy added while the
        cycle is suspended runs in it, and one removed does not, nor goes on if it
        was suspended in the middle (a retirement that timed out, say).
        """
        policies = self.policies
        if self._current is not None and self._current.policy not in policies:
            self.end_current()
        while True:
            if self._current is None:
                policy = next((p for p in policies if p not in self._started), None)
                if policy is None:
                    return True
                self._started.add(policy)
                self._current = self._start(policy)
                if self._current is None:
                    continue
            if not self._drive(self._current, deadline):
                return False
            self._current = None
            if self._past(deadline) and any(p not in self._started for p in policies):
                return False

    def end_current(self) -> None:
        """Stop driving the policy the cycle is suspended in. What it decided was
        sent when the cycle suspended; it decides nothing more.

        It is first told the worker chosen for its last suggestion, if one was:
        that suggestion was sent, and a policy that keeps track of what it asked
        for (ReplicateN's transfers in flight, RetireWorker's recipients) would
        otherwise ask for it again at the next cycle. What it yields then is
        discarded.
        """
        run = self._current
        if run is None:
            return
        self._current = None
        self.stats.count_policy(run.policy, run.accepted)
        suggestions = run.suggestions
        send = getattr(suggestions, "send", None)
        if run.choice is not None and send is not None:
            try:
                send(run.choice)
            except StopIteration:
                pass
            except Exception:
                logger.exception("Policy %r raised as it was stopped", run.policy)
        _close(suggestions)

    def _past(self, deadline: float) -> bool:
        """Whether deciding more would end the slice after ``deadline``, counting
        the time to send what was decided so far
        """
        return perf_counter() + len(self._unsent) * self.send_cost > deadline

    def _start(self, policy: Any) -> PolicyRun | None:
        logger.debug("Running policy: %s", policy)
        run = PolicyRun(policy, len(self._unsent))
        try:
            suggestions = policy.run()
        except Exception:
            self._policy_failed(run, "raised")
            return None
        if suggestions is None:
            return None  # run() is a plain function that suggested nothing
        if not hasattr(suggestions, "send"):
            try:
                suggestions = iter(suggestions)
            except TypeError:
                reason = f"returned {reprlib.repr(suggestions)}"
                self._policy_failed(run, reason, exc=False)
                return None
        run.suggestions = suggestions
        return run

    def _drive(self, run: PolicyRun, deadline: float) -> bool:
        """Feed the policy its choices until it is exhausted (True) or, if it is
        resumable, the deadline passes (False).

        Only the policy's own code is guarded: an error there withdraws what the
        policy suggested since the cycle last sent messages. An error in the manager
        itself propagates.
        """
        suggestions = run.suggestions
        send = getattr(suggestions, "send", None)
        if send is None:
            send = lambda _: next(suggestions)  # noqa: E731  (a plain iterator)
        resumable = getattr(run.policy, "resumable", False) is True
        validate, accept = self.validate, self.accept
        choice = run.choice
        n = 0
        try:
            while True:
                if resumable and n & 63 == 63 and self._past(deadline):
                    return False
                n += 1
                try:
                    raw = send(choice)
                except StopIteration:
                    self.stats.count_policy(run.policy, run.accepted)
                    return True
                except Exception:
                    self._policy_failed(run, "raised")
                    return True
                if raw is CHECKPOINT:
                    choice = None
                    if resumable and self._past(deadline):
                        return False
                    continue
                try:
                    op, ts, candidates = validate(raw)
                except InvalidSuggestion as e:
                    self._policy_failed(run, str(e), exc=False)
                    _close(suggestions)
                    return True
                choice = accept(op, ts, candidates)
                if choice is not None:
                    run.accepted += 1
        finally:
            run.choice = choice

    def _policy_failed(self, run: PolicyRun, reason: str, exc: bool = True) -> None:
        withdrawn = len(self._unsent) - run.start
        self.rollback(run.start)
        self.stats.policy_errors += 1
        logger.error(
            "Policy %r %s; its %d suggestions of this cycle are withdrawn",
            run.policy,
            reason,
            withdrawn,
            exc_info=exc,
        )

    def _protector_failed(
        self, policy: Any, ts: TaskState, hook: str = "desired_replicas"
    ) -> None:
        self.stats.policy_errors += 1
        _log_protector_failed(policy, ts, hook)

    # -- validating and accepting suggestions ------------------------------------

    def validate(self, raw: Any) -> Suggestion:
        """Turn what a policy yielded into a Suggestion, or raise InvalidSuggestion
        naming what is wrong with it.
        """
        # The common case, checked with the fewest operations: a Suggestion or
        # plain tuple about a task of this scheduler, without candidates or with a
        # set checked already
        if type(raw) is Suggestion or type(raw) is tuple and len(raw) == 3:
            op, ts, candidates = raw
            if (
                op in _OPS
                and type(ts) is TaskState
                and self._tasks.get(ts.key) is ts
                and (
                    candidates is None
                    or self._checked_candidates.get(id(candidates)) is candidates
                )
            ):
                return raw  # type: ignore[no-any-return]
        if type(raw) is not Suggestion:
            if not isinstance(raw, tuple) or not 2 <= len(raw) <= 3:
                raise InvalidSuggestion(
                    "yielded "
                    + reprlib.repr(raw)
                    + ", which is not a Suggestion(op, ts, candidates)"
                )
            raw = Suggestion(*raw)
        op, ts, candidates = raw
        if op not in _OPS:
            raise InvalidSuggestion(
                f"yielded op {reprlib.repr(op)}; expected 'replicate' or 'drop'"
            )
        if not isinstance(ts, TaskState):
            raise InvalidSuggestion(
                f"yielded {reprlib.repr(ts)} where a TaskState was expected"
            )
        if self._tasks.get(ts.key) is not ts and ts.state != "forgotten":
            # A forgotten key is a race the policy could not see coming (the key was
            # released while the policy was suspended); find_* reject it quietly.
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
                raise _invalid_candidates(candidates)
            try:
                candidates = set(candidates)
            except TypeError:  # unhashable items
                raise _invalid_candidates(candidates) from None
        workers = self.scheduler.workers
        for ws in candidates:
            if not isinstance(ws, WorkerState) or (
                workers.get(ws.address) is not ws and ws.status != Status.closed
            ):
                # A closed worker left the cluster: harmless, as it can never be
                # chosen. Anything else is a policy bug.
                raise InvalidSuggestion(
                    f"yielded candidate {reprlib.repr(ws)}, "
                    "which is not a worker of this scheduler"
                )
        self._checked_candidates[id(candidates)] = candidates
        return candidates

    def accept(
        self, op: str, ts: TaskState, candidates: Set[WorkerState] | None
    ) -> WorkerState | None:
        """Apply a valid suggestion if the invariants allow it; return the chosen
        worker or None.
        """
        entry = self.pending.get(ts)
        if op == "replicate":
            ws = self.find_recipient(ts, candidates, entry[0] if entry else _EMPTY)
            if ws is None:
                self.stats.replicate_rejected += 1
                return None
            delta = self.order.update(ws, ts.get_nbytes())
            self._replicated = True
            if entry:
                entry[0].add(ws)
            else:
                self.pending[ts] = ({ws}, set())
        else:
            ws = self.find_dropper(ts, candidates, entry[1] if entry else _EMPTY)
            if ws is None:
                self.stats.drop_rejected += 1
                return None
            delta = self.order.update(ws, -ts.get_nbytes())
            if entry:
                entry[1].add(ws)
            else:
                self.pending[ts] = (set(), {ws})
        self._unsent.append((op, ts, ws, delta))
        return ws

    def rollback(self, start: int = 0) -> None:
        """Withdraw the accepted suggestions not sent yet from position ``start`` of
        the journal on, newest first
        """
        withdrawn = self._unsent[start:]
        del self._unsent[start:]
        for entry in reversed(withdrawn):
            self._withdraw(*entry)

    def _withdraw(self, op: str, ts: TaskState, ws: WorkerState, delta: int) -> None:
        """Undo an accepted suggestion that was not sent"""
        self._unpend(op, ts, ws)
        self.order.update(ws, -delta)

    def _unpend(self, op: str, ts: TaskState, ws: WorkerState) -> None:
        """Remove ``ws`` from the pending replications or drops of ``ts``"""
        pending_repl, pending_drop = self.pending[ts]
        (pending_repl if op == "replicate" else pending_drop).discard(ws)
        if not pending_repl and not pending_drop:
            del self.pending[ts]

    def _reject(
        self, op: str, ts: TaskState, candidates: Any, reason: str, *args: Any
    ) -> None:
        if self.log_tasks:
            task_logger.debug(
                "(%s, %s, %s) rejected: " + reason, op, ts, candidates, *args
            )

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
            self._reject("replicate", ts, candidates, "ts.state = %s", ts.state)
            return None
        if ts.actor:
            self._reject("replicate", ts, candidates, "task is an actor")
            return None
        who_has = ts.who_has or _EMPTY
        running = self.running
        exclude = (who_has, pending_repl) if pending_repl else (who_has,)
        choice = self.order.lowest(candidates, running, exclude)
        if choice is None:
            if self.log_tasks:
                self._reject(
                    "replicate",
                    ts,
                    candidates,
                    _why_no_recipient(candidates, running, who_has, pending_repl),
                )
            return None
        if self.log_tasks:
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
            self._reject("drop", ts, candidates, "less than 2 replicas exist")
            return None
        if self.desired_replicas is not None:
            desired = self.desired_replicas(ts)
            if remaining <= desired:
                self._reject(
                    "drop",
                    ts,
                    candidates,
                    "%d replicas exist and %d are desired",
                    remaining,
                    desired,
                )
                return None
        if ts.actor:
            self._reject("drop", ts, candidates, "task is an actor")
            return None

        if candidates is None:
            holders: Set[WorkerState] = who_has
        else:
            holders = candidates & who_has
            if not holders:
                self._reject(
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

        exclude: tuple[Set[WorkerState], ...]
        if pending_drop:
            exclude = (pending_drop, busy) if busy else (pending_drop,)
        else:
            exclude = (busy,) if busy else ()
        choice = None
        if self.not_running:
            # paused and retiring holders drop first, so their memory is freed
            # before that of workers that can still compute; iterate the smaller
            # of the two sets and look up the other
            small, large = sorted((holders, self.not_running), key=len)
            choice = self.order.scan_highest(small, large, exclude)
            if choice is None:
                choice = self.order.highest(holders, self.running, exclude)
        else:
            # every worker of the snapshot is running; workers that joined since
            # are not in the order and are skipped by it
            choice = self.order.highest(holders, None, exclude)
        if choice is None:
            if self.log_tasks:
                reason = (
                    "already pending drop on all candidates"
                    if holders <= pending_drop
                    else "all candidates have dependent tasks queued or running on them"
                )
                self._reject("drop", ts, candidates, reason)
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
                ws is not choice and ws not in pending_drop and ws not in busy
                for ws in holders
            )
        ):
            self._reject(
                "drop",
                ts,
                candidates,
                "there is only one replica on workers that aren't paused or retiring",
            )
            return None

        # Never drop the last replica on a worker that is staying while the others
        # are on workers that are leaving: being retired, or closing (a worker in
        # Worker.close() shows as such until it unregisters, with its replicas).
        # The key would be lost, or only have to move back; and a retirement that
        # runs before this drop is sent sees the copy here, counts its own as held
        # elsewhere, and lets its worker close with the last one. (Rebalance,
        # ending a move to a worker that had just started retiring, lost every key
        # it had moved there that way.) From a worker that is leaving itself, a
        # replica may go if another one is on a worker being retired, whose
        # retirement moves it (distributed retires all but one of two workers
        # holding the only copies of a key and retired together); not if the
        # others are only on workers that close without moving anything.
        if self.not_running:
            keepers = STAYING if choice.status in STAYING else _KEEPERS
            if not any(
                ws is not choice and ws not in pending_drop and ws.status in keepers
                for ws in who_has
            ):
                self._reject(
                    "drop",
                    ts,
                    candidates,
                    "the other replicas are on workers that are leaving",
                )
                return None

        if self.log_tasks:
            task_logger.debug(
                "(drop, %s, %s): dropping from %s", ts, candidates, choice
            )
        return choice

    # -- enacting ----------------------------------------------------------------

    def enact(self, final: bool = False) -> None:
        """Send what was accepted since the last call to the workers, one message
        per worker and kind. Fire and forget: a worker that cannot comply (e.g. it
        now needs the key) says so, and the scheduler restores its replica.

        Sent drops leave ``pending``, since the scheduler forgets the replica as it
        sends the message and ``who_has`` already shows it; sent replications stay
        until the cycle ends, since the copy only shows in ``who_has`` once made.
        Taking a drop out of ``pending`` costs four hash lookups, a sixth of the
        cost of sending it, so it is only done one by one when it must be: when the
        cycle goes on after this call and replications, which stay, are pending
        too. Otherwise ``pending`` holds nothing that is still needed (the cycle
        ends with this call, ``final``, or all it holds are the drops sent now),
        and is cleared at once.
        """
        unsent, self._unsent = self._unsent, []
        if self._current is not None:
            self._current.start = 0  # what was sent can't be withdrawn
        if not unsent:
            return
        start = perf_counter()
        validate = self.scheduler.validate
        pending = self.pending
        unreachable = unreachable_addresses(self.scheduler)
        if unreachable:
            unsent = self._keep_reachable_replicas(unsent, unreachable)
            if not unsent:
                return
        unpend = not final and self._replicated
        # Grouped by address: a str hashes in C, a WorkerState in Python
        repl_by_worker: defaultdict[str, list[Key]] = defaultdict(list)
        drop_by_worker: defaultdict[str, list[Key]] = defaultdict(list)
        for op, ts, ws, _ in unsent:
            if op == "replicate":
                if validate:
                    assert ws not in (ts.who_has or ()), (ts, ws)
                repl_by_worker[ws.address].append(ts.key)
            else:
                if validate:
                    assert ws in (ts.who_has or ()), (ts, ws)
                    assert ts.who_has - pending[ts][1], ts  # type: ignore[operator]
                drop_by_worker[ws.address].append(ts.key)
                if unpend:
                    # the scheduler forgets the replica as the message goes out
                    self._unpend(op, ts, ws)
        if not unpend:
            pending.clear()  # the same dict: policies hold on to it
        # distributed's wording, which its tests and users' log filters match: the
        # lines per worker name its WorkerState, not just the address
        workers = None
        if logger.isEnabledFor(logging.DEBUG):
            ntasks = len({ts for _, ts, _, _ in unsent})
            logger.debug("Enacting suggestions for %d tasks:", ntasks)
            workers = {ws.address: ws for _, _, ws, _ in unsent}

        stimulus_id = f"active_memory_manager-{time()}"
        for address, keys in repl_by_worker.items():
            if workers:
                logger.debug("- %s to acquire %d replicas", workers[address], len(keys))
            self._send(
                self.scheduler.request_acquire_replicas, address, keys, stimulus_id
            )
            self.stats.replicas_requested += len(keys)
        for address, keys in drop_by_worker.items():
            if workers:
                logger.debug("- %s to drop %d replicas", workers[address], len(keys))
            self._send(
                self.scheduler.request_remove_replicas, address, keys, stimulus_id
            )
            self.stats.drops_requested += len(keys)

        # the highest seen in this cycle: it varies by a third from one send to
        # the next, and underestimating it is what makes a slice overrun
        self.send_cost = max(self.send_cost, (perf_counter() - start) / len(unsent))

    def _keep_reachable_replicas(
        self, unsent: list[JournalEntry], unreachable: set[str]
    ) -> list[JournalEntry]:
        """Withdraw the drops that would leave a key only on workers the scheduler
        can no longer reach.

        A worker whose stream has closed is still in the cluster until the
        scheduler notices, a turn or so of the event loop later; then its replicas
        are gone. A drop accepted meanwhile from a healthy holder, because the
        unreachable one still counted as a replica, would lose the key.
        """
        pending = self.pending
        kept: list[JournalEntry] = []
        withdrawn = []
        for entry in unsent:
            op, ts, ws, delta = entry
            if op == "drop" and not any(
                h.address not in unreachable
                for h in ts.who_has or ()
                if h not in pending[ts][1]
            ):
                self._withdraw(op, ts, ws, delta)  # later drops of ts count ws
                self.stats.drop_rejected += 1
                withdrawn.append(ts.key)
            else:
                kept.append(entry)
        if withdrawn:
            logger.warning(
                "Kept %d replicas whose other copies are only on workers that can no "
                "longer be reached (%s): %s",
                len(withdrawn),
                ", ".join(sorted(unreachable)),
                reprlib.repr(withdrawn),
            )
        return kept

    def _send(
        self,
        request: Callable[..., None],
        address: str,
        keys: list[Key],
        stimulus_id: str,
    ) -> None:
        # A worker whose stream is already gone (KeyError), or closed a turn of the
        # event loop before the scheduler removes the worker (CommClosedError), is
        # about to leave; the others must still get their messages.
        try:
            request(address, keys, stimulus_id=stimulus_id)
        except (KeyError, AttributeError, CommClosedError) as e:
            logger.warning(
                "Could not reach worker %s (%r); will retry next cycle", address, e
            )


_EMPTY: frozenset[Any] = frozenset()
#: Where the last replicas of a key are safe from a drop off a worker that is
#: leaving: on workers that stay, or that are being retired (their retirement
#: moves what only they hold)
_KEEPERS = STAYING | {Status.closing_gracefully}
#: A tuple, not a set: membership by equality, so an op a policy got wrong, even
#: an unhashable one, is simply not among them
_OPS = ("replicate", "drop")


def _invalid_candidates(candidates: Any) -> InvalidSuggestion:
    return InvalidSuggestion(
        f"yielded candidates {reprlib.repr(candidates)}; "
        "expected a set of WorkerState or None"
    )


def desired_replicas_of(
    protectors: list[Any],
    on_error: Callable[[Any, TaskState], None] | None = None,
) -> Callable[[TaskState], int] | None:
    """The desired-replicas function of a cycle, or None if no policy protects keys
    (the common case: every key desires 1, and the cycle skips the question). The
    policies that protect keys are found once per cycle.

    A protector that raises, or returns something other than an integer (a
    forgotten ``return`` gives None), is left out from then on, and reported through
    ``on_error``: like a policy that fails, it must not stop the others, and the
    replicas it would have kept are never the last ones (that rule does not depend
    on it).
    """
    if not protectors:
        return None
    protectors = list(protectors)

    def desired_replicas(ts: TaskState) -> int:
        desired = 1
        for policy in protectors:
            try:
                n = policy.desired_replicas(ts)
                if type(n) is not int and not isinstance(n, Integral):
                    raise TypeError(
                        f"desired_replicas({ts.key!r}) returned {n!r}; "
                        "expected an int"
                    )
            except Exception:
                protectors.remove(policy)
                (on_error or _log_protector_failed)(policy, ts)
                return desired_replicas(ts)
            if n > desired:
                desired = n
        return desired

    return desired_replicas


def restricted_to_of(
    restrictors: Iterable[Any],
    on_error: Callable[..., None] | None = None,
) -> Callable[[TaskState], Set[WorkerState] | None]:
    """The restricted-to function of a cycle: the workers every restricting
    policy allows for a key, or None if none restricts it. A restrictor that
    raises, or answers something other than a set, is left out from then on and
    reported through ``on_error``, as a failing protector.
    """
    restrictors = list(restrictors)

    def restricted_to(ts: TaskState) -> Set[WorkerState] | None:
        allowed: Set[WorkerState] | None = None
        for policy in restrictors:
            try:
                workers = policy.restricted_to(ts)
                if workers is not None and not isinstance(workers, Set):
                    raise TypeError(
                        f"restricted_to({ts.key!r}) returned {reprlib.repr(workers)}; "
                        "expected a set of WorkerState or None"
                    )
            except Exception:
                restrictors.remove(policy)
                (on_error or _log_protector_failed)(policy, ts, "restricted_to")
                return restricted_to(ts)
            if workers is not None:
                allowed = workers if allowed is None else allowed & workers
        return allowed

    return restricted_to


def _log_protector_failed(
    policy: Any, ts: TaskState, hook: str = "desired_replicas"
) -> None:
    logger.error(
        "Policy %r raised in %s(%r); it is left out of that question for the rest "
        "of this cycle",
        policy,
        hook,
        ts.key,
        exc_info=True,
    )


def unreachable_addresses(scheduler: Scheduler) -> set[str]:
    """Addresses of the workers whose stream from the scheduler has closed, and
    that the scheduler has not removed yet: their replicas are about to vanish.
    66 us at W=1000, so callers check it once per send or per decision, not per key.
    """
    return {
        address for address, bs in scheduler.stream_comms.items() if bs.closed()
    }


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

"""Rebalance: continuously move data from the workers that hold more than their
share of the cluster's memory to those that hold less, while computations run, and
relieve workers that are about to spill to disk.

distributed's ``Scheduler.rebalance()`` is a one-off, stop-the-world call that is not
safe while computations run (dask/distributed#4906), and it compares workers by bytes,
so a 10 GiB worker is asked to hold as much as a 100 GiB one (dask/distributed#5733).
This policy runs at every cycle of the manager, compares workers by the fraction of
their own memory limit they use, and moves data the only way the manager allows:
replicate now, drop the original in a later cycle once the copy exists. Until then
both copies exist, so no data is ever lost in between, and the drop goes through the
manager's invariants like any other.

The thresholds keep the meaning of distributed's
``distributed.worker.memory.rebalance.*`` settings, and default to their values.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dask.config
from dask.utils import parse_bytes
from distributed.core import Status
from distributed.metrics import time
from distributed.scheduler import TaskState, WorkerState

from amm import config
from amm.config import AMMConfigError
from amm.logs import logger
from amm.policy import (
    CHECKPOINT,
    STAYING,
    ActiveMemoryManagerPolicy,
    Suggestion,
    SuggestionGenerator,
)

#: Where a ``null`` threshold in the ``amm.rebalance`` section is read from
DISTRIBUTED_THRESHOLDS = {
    "sender-min": "distributed.worker.memory.rebalance.sender-min",
    "recipient-max": "distributed.worker.memory.rebalance.recipient-max",
    "sender-recipient-gap": "distributed.worker.memory.rebalance.sender-recipient-gap",
}

#: Choosing what to move from a sender looks at the keys it holds, oldest first
#: (the order of ``WorkerState.has_what``, as distributed's rebalance), until it has
#: found movable keys worth this many times what the sender should shed, and at
#: least ``MIN_CANDIDATES`` of them, so that the largest can be moved first; and
#: never more than ``MAX_KEYS_SCANNED`` keys per sender and cycle, so that a worker
#: full of keys that can't move (replicated, needed, recently moved) costs a bounded
#: scan rather than one of all its keys at every cycle.
CANDIDATE_BYTES_FACTOR = 2
MIN_CANDIDATES = 16
MAX_KEYS_SCANNED = 10_000
#: Cycles after which what a recipient received counts as shown by the measure,
#: even if no heartbeat came (a synthetic state, a worker that stopped reporting)
MAX_SETTLING_CYCLES = 10
#: Keys tried without a suggestion between two CHECKPOINTs
CHECKPOINT_EVERY = 256

#: A key with more waiting dependents than this is not moved: telling whether one of
#: them runs on the sender would cost a scan of all of them.
MAX_WAITERS_INSPECTED = 20


@dataclass(eq=False, slots=True)
class _Move:
    """A key being moved: replicated to ``recipient`` in cycle ``started``; its copy
    on ``sender`` is dropped once the replica exists.
    """

    ts: TaskState
    sender: WorkerState
    recipient: WorkerState
    nbytes: int
    started: int


@dataclass(eq=False)
class _Settling:
    """What a worker that received in cycle ``cycle`` was expected to hold after it;
    ``landed_since``: when all it was sent was first seen landed
    """

    memory: int
    cycle: int
    landed_since: float | None = None


@dataclass(eq=False)
class _Load:
    """A worker taking part in one cycle, in bytes: its expected memory (counting the
    moves still in flight), memory limit, and how much more it may send or receive
    in this cycle.
    """

    ws: WorkerState
    memory: int
    limit: int
    budget: int
    #: Floor (senders) or ceiling (recipients) of the current pass, in bytes
    bound: int = 0
    #: A sender stops being one in this pass once its memory is below this
    stop: int = 0
    #: It sent or received in this cycle; a worker never does both
    sent: bool = False
    received: bool = False
    #: What it may send, largest first; built on first use, consumed across passes
    candidates: Iterator[TaskState] | None = None
    #: Bytes it may want to send in this cycle, to size the candidate list
    excess: int = 0
    #: A ``{ws}`` reused for every suggestion naming this worker
    singleton: frozenset[WorkerState] = field(default_factory=frozenset)

    @property
    def fraction(self) -> float:
        return self.memory / self.limit


class Rebalance(ActiveMemoryManagerPolicy):
    """Even out memory across workers while computations run, and move data off
    workers about to spill to disk.

    All thresholds are fractions of each worker's own memory limit, so that workers
    of different sizes are compared by how full they are: the cluster's mean is the
    total memory over the total memory limit, and a worker's share is the mean times
    its own limit. Memory is the manager's ``measure``, as expected at this point of
    the cycle (``manager.workers_memory``), corrected for the moves of earlier cycles
    still in flight. Workers without a memory limit are ignored: there is nothing to
    compare them to. Retiring workers are left to RetireWorker.

    **Balancing** (the rule of distributed's ``rebalance()``, made continuous). A
    worker starts sending when it is more than half of ``sender_recipient_gap`` above
    the mean and at least at ``sender_min``; a running worker starts receiving when it
    is more than half the gap below the mean and under ``recipient_max``. Both then
    keep their role, cycle after cycle, until they reach the mean: the band decides
    who starts, the mean where they stop (hysteresis). No move takes a sender below
    the mean or a recipient above it (nor above ``recipient_max``, nor into the
    relief band below the spill threshold), so no worker ever
    switches between sending and receiving because of this policy, and at rest no
    worker is more than half the gap above the mean while another is more than half
    the gap below it.

    **Relief before spilling.** A worker is *near* its spill threshold when its memory
    is above ``distributed.worker.memory.target`` (else ``.spill``) minus
    ``spill_margin``. It sheds data until it is half a margin below that line, even
    if the balancing rule alone would not move anything, so that data crosses the
    network instead of going to disk. It only sends to running workers that stay at
    least one more margin below their own line, so a recipient never becomes near
    because of it. Relief runs before balancing in each cycle.

    **What moves.** Only keys held by the sender alone: a key with more replicas is
    either surplus, and ReduceReplicas drops it (from the most loaded holder, which is
    the sender), or deliberately replicated. Never actors, keys another policy acts on
    in this cycle, keys with a dependent processing on the sender, or keys a policy
    restricts to workers other than the recipient (``manager.restricted_to``: a
    key replicated with ``workers=``). Among the
    others, keys no task waits for come first (moving them can't delay a task), then
    those some task waits for; within each group, the largest first, so that fewer
    keys move for the same bytes. "Largest" is among the sender's oldest movable keys
    worth twice what it should shed (at least 16 keys): sorting all of a worker's
    keys at every cycle would cost what the policy must not. A key is only moved if
    it fits: the sender must not go below its floor nor the recipient above its
    ceiling. Senders are served most loaded (by fraction) first;
    each key goes to the recipient with the most room, which is the single candidate
    of the suggestion, so the choice is by fraction and not by bytes.

    **Moving.** A move is a replication now and a drop of the sender's copy in a
    later cycle, once the copy exists; until then the manager is asked to keep both
    copies (:meth:`desired_replicas`), so ReduceReplicas cannot drop the new one. A
    move that has not completed after ``move_timeout`` cycles (the transfer failed,
    a dependent keeps running on the sender) is abandoned; the extra replica, if any,
    is left to ReduceReplicas.

    **No ping-pong, bounded work.** A key that was moved is not moved again for
    ``key_cooldown`` cycles; a worker that received data does not balance-send for
    the next ``recipient_cooldown`` cycles (relief is exempt: it only sends to workers
    far below the line, so it cannot bounce, and delaying it means spilling). Each
    worker sends and receives at most ``max_bytes_per_cycle`` per cycle, counting its
    transfers still in flight; the move that crosses the limit is the last.

    **Cost.** O(W log W) per cycle for W workers, plus, per key moved, O(log W) and a
    share of a bounded scan of the sender's keys; moves in flight cost O(1) each.

    Parameters are read from the ``amm.rebalance`` config section when None.
    """

    #: The manager may suspend this policy between two suggestions: it iterates over
    #: snapshots and re-checks keys and workers before each suggestion.
    resumable = True

    sender_min: float
    recipient_max: float
    sender_recipient_gap: float
    spill_margin: float | None
    spill_threshold: float | None
    max_bytes_per_cycle: int
    key_cooldown: int
    recipient_cooldown: int
    move_timeout: int

    #: Cycles run so far
    cycle: int
    #: Lifetime counters
    moves_started: int
    moves_completed: int
    moves_abandoned: int
    bytes_started: int

    def __init__(
        self,
        *,
        sender_min: float | None = None,
        recipient_max: float | None = None,
        sender_recipient_gap: float | None = None,
        spill_margin: float | bool | None = None,
        max_bytes_per_cycle: int | str | None = None,
        key_cooldown: int | None = None,
        recipient_cooldown: int | None = None,
        move_timeout: int | None = None,
    ):
        self.sender_min = _fraction(*_setting("sender-min", sender_min))
        self.recipient_max = _fraction(*_setting("recipient-max", recipient_max))
        self.sender_recipient_gap = _fraction(
            *_setting("sender-recipient-gap", sender_recipient_gap)
        )
        key, margin = _setting("spill-margin", spill_margin)
        # false turns relief off (also as a string, from an environment variable)
        off = margin is False or isinstance(margin, str) and margin.lower() == "false"
        self.spill_margin = None if off else _fraction(key, margin)
        self.spill_threshold = _spill_threshold()
        if (
            self.spill_margin is not None
            and self.spill_threshold is not None
            and 2 * self.spill_margin >= self.spill_threshold
        ):
            # Recipients must be two margins below the threshold: none could ever
            # be, and the balancing ceiling (one margin below) would stop balancing
            # too, without a word
            logger.warning(
                "Rebalance: %s=%s is not below half the spill threshold (%s); "
                "relief before spilling is off",
                key,
                margin,
                self.spill_threshold,
            )
            self.spill_margin = None
        self.max_bytes_per_cycle = _nbytes(
            *_setting("max-bytes-per-cycle", max_bytes_per_cycle)
        )
        self.key_cooldown = _count(*_setting("key-cooldown", key_cooldown))
        self.recipient_cooldown = _count(
            *_setting("recipient-cooldown", recipient_cooldown)
        )
        self.move_timeout = _count(*_setting("move-timeout", move_timeout), minimum=1)

        self.cycle = 0
        self.moves_started = self.moves_completed = self.moves_abandoned = 0
        self.bytes_started = 0
        self._moves: dict[TaskState, _Move] = {}
        # Keys recently moved: expiry cycle by task, and the same in expiry order
        self._cooldown: dict[TaskState, int] = {}
        self._cooldown_queue: deque[tuple[int, TaskState]] = deque()
        # Last cycle in which each worker received data
        self._received: dict[WorkerState, int] = {}
        # Recipients, until their memory shows what they received: see _settle
        self._settling: dict[WorkerState, _Settling] = {}
        # Balancing roles that carry over between cycles: True = sender
        self._roles: dict[WorkerState, bool] = {}
        # Workers being relieved, to log when one starts
        self._relieving: set[WorkerState] = set()
        # The task whose drop this policy is suggesting right now; see desired_replicas
        self._dropping: TaskState | None = None

    @property
    def in_flight(self) -> int:
        """Moves started and not yet completed or given up"""
        return len(self._moves)

    @property
    def transfers_in_flight(self) -> int:
        """Moves whose new copy does not exist yet"""
        return sum(
            m.recipient not in (m.ts.who_has or ()) for m in self._moves.values()
        )

    def __repr__(self) -> str:
        return (
            f"Rebalance(sender_min={self.sender_min}, "
            f"recipient_max={self.recipient_max}, "
            f"sender_recipient_gap={self.sender_recipient_gap})"
        )

    # -- protecting moves in flight ----------------------------------------------

    def desired_replicas(self, ts: TaskState) -> int:
        """Keep both copies of a key being moved, once the new one exists, until this
        policy drops the old one: otherwise ReduceReplicas, which chooses by bytes,
        could drop the new copy from a large, less full recipient and undo the move.
        """
        move = self._moves.get(ts)
        if move is None or ts is self._dropping:
            return 1
        who_has = ts.who_has or ()
        return 2 if move.recipient in who_has and move.sender in who_has else 1

    # -- the cycle -----------------------------------------------------------------

    def run(self) -> SuggestionGenerator:
        self.cycle += 1
        self._expire_cooldowns()
        yield from self._finish_moves()

        loads = self._loads()
        if len(loads) < 2:
            return
        started = self.moves_started
        yield from self._relieve(loads)
        yield from self._balance(loads)
        for load in loads.values():
            if load.received:
                self._settling[load.ws] = _Settling(load.memory, self.cycle)
        if self.moves_started > started:
            logger.debug(
                "Rebalance: moving %d keys; %d moves in flight",
                self.moves_started - started,
                len(self._moves),
            )

    def _expire_cooldowns(self) -> None:
        # A key whose move ended in cycle c (expiry c + K) stays put in cycles
        # c + 1 to c + K, and may move again from c + K + 1 on
        queue = self._cooldown_queue
        while queue and queue[0][0] < self.cycle:
            expiry, ts = queue.popleft()
            if self._cooldown.get(ts) == expiry:
                del self._cooldown[ts]

    def _end_move(self, move: _Move, completed: bool) -> None:
        del self._moves[move.ts]
        if completed:
            self.moves_completed += 1
        else:
            self.moves_abandoned += 1
            entry = self._settling.get(move.recipient)
            if entry is not None and move.recipient not in (move.ts.who_has or ()):
                # what it was expected to hold assumed the key would land there
                entry.memory -= move.nbytes
        if self.key_cooldown:
            expiry = self.cycle + self.key_cooldown
            self._cooldown[move.ts] = expiry
            self._cooldown_queue.append((expiry, move.ts))

    def _finish_moves(self) -> SuggestionGenerator:
        """Drop the sender's copy of every key whose new copy exists"""
        pending = self.manager.pending
        moves = self._moves
        # A snapshot of the keys, not of the moves: a move is freed as it ends
        # rather than all together with the snapshot, which at a few hundred
        # thousand moves would hold the event loop for 100 ms in one go
        for ts in list(moves):
            move = moves.get(ts)
            if move is None:
                continue
            sender, recipient = move.sender, move.recipient
            who_has = ts.who_has or ()
            if ts.state != "memory" or sender not in who_has:
                # Released, lost, or the sender's copy is already gone (dropped by
                # another policy, or the sender left): nothing left to do.
                self._end_move(move, completed=recipient in who_has)
                continue
            if recipient.status not in STAYING:
                # The recipient is leaving (retired, closing, gone): its copy goes
                # with it, and the sender's must stay (the manager would refuse to
                # drop it anyway)
                self._end_move(move, completed=False)
                continue
            if recipient in who_has:
                entry = pending.get(ts)
                if entry and sender in entry[1]:
                    self._end_move(move, completed=True)  # another policy drops it
                    continue
                self._dropping = ts
                try:
                    choice = yield Suggestion("drop", ts, {sender})
                finally:
                    self._dropping = None
                if choice is not None:
                    self._end_move(move, completed=True)
                    continue
                # Rejected, e.g. a dependent is processing on the sender: retry later
            if self.cycle - move.started >= self.move_timeout:
                self._end_move(move, completed=False)

    def _loads(self) -> dict[WorkerState, _Load]:
        """The workers taking part in this cycle, with their expected memory"""
        memory = self.manager.workers_memory
        loads: dict[WorkerState, _Load] = {}
        for ws, nbytes in memory.items():
            if ws.status not in STAYING or not ws.memory_limit:
                continue
            loads[ws] = _Load(
                ws,
                nbytes,
                ws.memory_limit,
                self.max_bytes_per_cycle,
                singleton=frozenset((ws,)),
            )
        # Forget recipients whose cooldown is over (and workers that left)
        received = self._received
        expired = [
            ws for ws, c in received.items() if self.cycle - c > self.recipient_cooldown
        ]
        for ws in expired:
            del received[ws]
        # Moves in flight: the recipient will hold the key, the sender won't; both
        # are busy with the transfer, which counts against this cycle's budget.
        receiving: set[WorkerState] = set()
        for move in self._moves.values():
            landed = move.recipient in (move.ts.who_has or ())
            snd = loads.get(move.sender)
            if snd is not None:
                snd.memory -= move.nbytes
                if not landed:
                    snd.budget -= move.nbytes
            if not landed:
                receiving.add(move.recipient)
            rec = loads.get(move.recipient)
            if rec is not None and not landed:
                rec.memory += move.nbytes
                rec.budget -= move.nbytes
        self._settle(loads, receiving)
        return loads

    def _settle(
        self, loads: dict[WorkerState, _Load], receiving: set[WorkerState]
    ) -> None:
        """Count the moves that landed but that the measure may not show yet.

        The measures cap managed memory at the process memory of the worker's last
        heartbeat (``MemoryState``), so a key that lands on a worker may show only
        at its next heartbeat: on a large cluster, an AMM interval or more later.
        Meanwhile the recipient looked as empty as before it received, was sent
        more, past the mean, and sent the excess back once the keys' cooldown
        ended. So until a heartbeat comes after all it was sent has landed, a
        recipient counts at least what this policy expected it to hold. (Where the
        measure shows the keys, the two agree; if the worker freed memory
        meanwhile, it receives less for a heartbeat.) A sender needs nothing of the
        kind: a drop lowers its managed memory at once, under the cap.
        """
        settling = self._settling
        now = time()
        for ws, entry in list(settling.items()):
            load = loads.get(ws)
            if load is None or self.cycle - entry.cycle > MAX_SETTLING_CYCLES:
                del settling[ws]
                continue
            if ws in receiving:
                entry.landed_since = None
            elif entry.landed_since is None:
                entry.landed_since = now
            elif ws.last_seen > entry.landed_since:
                del settling[ws]  # heard from since: the measure shows it
                continue
            load.memory = max(load.memory, entry.memory)

    # -- relief ----------------------------------------------------------------

    def _relieve(self, loads: dict[WorkerState, _Load]) -> SuggestionGenerator:
        """Move data off workers near their spill threshold, to workers far below
        theirs.
        """
        if self.spill_margin is None or self.spill_threshold is None:
            return
        near = self.spill_threshold - self.spill_margin
        ceiling = min(near - self.spill_margin, self.recipient_max)
        senders = []
        recipients = []
        relieving = set()
        for load in loads.values():
            if load.fraction > near:
                relieving.add(load.ws)
                load.bound = int((near - self.spill_margin) * load.limit)
                load.stop = int((near - self.spill_margin / 2) * load.limit)
                load.excess = max(load.excess, load.memory - load.bound)
                senders.append(load)
            elif load.fraction < ceiling and load.ws.status == Status.running:
                load.bound = int(ceiling * load.limit)
                recipients.append(load)
        for ws in relieving - self._relieving:
            logger.info(
                "Rebalance: %s is near its spill threshold (%.0f%% of its memory "
                "limit); moving data to other workers",
                ws.address,
                self.spill_threshold * 100,
            )
        self._relieving = relieving
        if senders and recipients:
            yield from self._pair(senders, recipients)

    # -- balancing -------------------------------------------------------------

    def _balance(self, loads: dict[WorkerState, _Load]) -> SuggestionGenerator:
        """Move data from workers above the mean to workers below it"""
        total_limit = sum(load.limit for load in loads.values())
        mean = sum(load.memory for load in loads.values()) / total_limit
        half_gap = self.sender_recipient_gap / 2
        ceiling = min(mean, self.recipient_max)
        if self.spill_margin is not None and self.spill_threshold is not None:
            # Never push a recipient into relief territory
            ceiling = min(ceiling, self.spill_threshold - self.spill_margin)
        roles = self._roles
        senders = []
        recipients = []
        for ws in list(roles):
            if ws not in loads:
                del roles[ws]  # gone, retiring, or lost its memory limit
        for ws, load in loads.items():
            fraction = load.fraction
            role = roles.get(ws)
            if (
                fraction > mean
                and (
                    role
                    or fraction >= mean + half_gap
                    and fraction >= self.sender_min
                )
                and ws not in self._received  # cooling down after receiving
                and not load.received
            ):
                roles[ws] = True
                load.bound = load.stop = int(mean * load.limit)
                if load.memory - load.bound > load.excess:
                    # It relieved itself down to less than balancing wants: list
                    # its keys again, for more bytes (moved keys are excluded)
                    load.excess = load.memory - load.bound
                    load.candidates = None
                senders.append(load)
            elif (
                fraction < ceiling
                and (
                    role is False
                    or fraction < mean - half_gap
                    and fraction < self.recipient_max
                )
                and ws.status == Status.running
                and not load.sent
            ):
                roles[ws] = False
                load.bound = int(ceiling * load.limit)
                recipients.append(load)
            else:
                roles.pop(ws, None)
        if senders and recipients:
            yield from self._pair(senders, recipients)

    # -- pairing senders and recipients ------------------------------------------

    def _pair(
        self, senders: list[_Load], recipients: list[_Load]
    ) -> SuggestionGenerator:
        """Move keys from the most loaded sender (by fraction above where it stops)
        to the recipient with the most room (in bytes), one key at a time, until
        either side runs out. Like distributed's ``_rebalance_find_msgs``, with heaps
        so that each move costs O(log W).
        """
        tiebreak = itertools.count()
        snd_heap = [
            (-(load.memory - load.stop) / load.limit, next(tiebreak), load)
            for load in senders
            if load.memory > load.stop and load.budget > 0
        ]
        rec_heap = [
            (-(load.bound - load.memory), next(tiebreak), load)
            for load in recipients
            if load.bound > load.memory and load.budget > 0
        ]
        heapq.heapify(snd_heap)
        heapq.heapify(rec_heap)
        pending = self.manager.pending
        skipped = 0

        while snd_heap and rec_heap:
            snd = snd_heap[0][2]
            if snd.candidates is None:
                # Listing its keys takes a while (up to tens of ms for a worker
                # with thousands of them): start it in a fresh slice if this one
                # is nearly over, and let the slice end after it
                yield CHECKPOINT
            if snd.ws.status not in STAYING:
                heapq.heappop(snd_heap)  # left or started retiring while suspended
                continue
            if snd.candidates is None:
                snd.candidates = iter(self._candidates(snd))
                yield CHECKPOINT
            for ts in snd.candidates:
                skipped += 1
                if skipped % CHECKPOINT_EVERY == 0:
                    # many keys in a row that fit no recipient: suggest nothing for
                    # long. Everything below is re-checked after a suspension.
                    yield CHECKPOINT
                nbytes = ts.get_nbytes()
                if snd.memory - nbytes < snd.bound:
                    # would take the sender below its floor; a smaller key may fit
                    continue
                # Re-check what may have changed since the candidates were listed
                who_has = ts.who_has or ()
                if (
                    ts.state != "memory"
                    or len(who_has) != 1
                    or snd.ws not in who_has
                    or ts in pending
                    or ts in self._moves
                    or ts.waiters
                    and any(w.processing_on is snd.ws for w in ts.waiters)
                ):
                    continue
                # The recipient with the most room: if the key doesn't fit there, it
                # fits nowhere. Skip recipients that can no longer receive.
                while rec_heap and rec_heap[0][2].ws.status != Status.running:
                    heapq.heappop(rec_heap)
                if not rec_heap:
                    return
                rec = rec_heap[0][2]
                if rec.memory + nbytes > rec.bound:
                    continue
                allowed = self.manager.restricted_to(ts)
                if allowed is not None and rec.ws not in allowed:
                    continue  # another policy keeps it on other workers
                choice = yield Suggestion("replicate", ts, rec.singleton)
                if choice is None:
                    # The manager refused the recipient; don't insist this cycle
                    heapq.heappop(rec_heap)
                    continue
                self._start_move(ts, snd, rec, nbytes)
                if rec.memory < rec.bound and rec.budget > 0:
                    heapq.heapreplace(
                        rec_heap, (-(rec.bound - rec.memory), next(tiebreak), rec)
                    )
                else:
                    heapq.heappop(rec_heap)
                # The sender may not be at the top anymore
                heapq.heappop(snd_heap)
                if snd.memory > snd.stop and snd.budget > 0:
                    heapq.heappush(
                        snd_heap,
                        (-(snd.memory - snd.stop) / snd.limit, next(tiebreak), snd),
                    )
                break
            else:
                # Nothing more this sender can move in this cycle. It keeps its role:
                # what blocked its keys (dependents running, recipients full) may
                # be gone by the next cycle.
                heapq.heappop(snd_heap)

    def _candidates(self, snd: _Load) -> list[TaskState]:
        """The keys ``snd`` may send in this cycle, in the order to try them: those
        no task waits for, then the others, each group largest first. See the class
        docstring for what is excluded and why. The scan is synchronous (no yield), so
        it may iterate the live ``has_what``.
        """
        ws = snd.ws
        wanted = CANDIDATE_BYTES_FACTOR * min(snd.excess, max(snd.budget, 0))
        pending = self.manager.pending
        cooldown = self._cooldown
        moves = self._moves
        free: list[tuple[int, int, TaskState]] = []
        needed: list[tuple[int, int, TaskState]] = []
        found = 0
        for i, ts in enumerate(ws.has_what):
            if i >= MAX_KEYS_SCANNED or (
                found >= wanted and len(free) + len(needed) >= MIN_CANDIDATES
            ):
                break
            nbytes = ts.get_nbytes()
            if (
                nbytes <= 0
                or ts.actor
                or len(ts.who_has or ()) != 1
                or ts in cooldown
                or ts in moves
                or ts in pending
            ):
                continue
            waiters = ts.waiters
            if waiters:
                if len(waiters) > MAX_WAITERS_INSPECTED or any(
                    w.processing_on is ws for w in waiters
                ):
                    continue
                needed.append((-nbytes, i, ts))
            else:
                free.append((-nbytes, i, ts))
            found += nbytes
        free.sort()
        needed.sort()
        return [ts for _, _, ts in free] + [ts for _, _, ts in needed]

    def _start_move(self, ts: TaskState, snd: _Load, rec: _Load, nbytes: int) -> None:
        self._moves[ts] = _Move(ts, snd.ws, rec.ws, nbytes, self.cycle)
        snd.memory -= nbytes
        snd.budget -= nbytes
        snd.sent = True
        rec.memory += nbytes
        rec.budget -= nbytes
        rec.received = True
        self._received[rec.ws] = self.cycle
        self.moves_started += 1
        self.bytes_started += nbytes


# -- configuration -------------------------------------------------------------------


def _setting(name: str, value: Any) -> tuple[str, Any]:
    """``(where, value)`` of option ``name``: the keyword argument if given, else
    ``amm.rebalance.<name>``, else (for the thresholds, when that is null)
    distributed's ``distributed.worker.memory.rebalance.<name>``.
    """
    if value is not None:
        return f"Rebalance({name.replace('-', '_')})", value
    key, value = config.option("rebalance", name)
    if value is None and name in DISTRIBUTED_THRESHOLDS:
        key = DISTRIBUTED_THRESHOLDS[name]
        value = dask.config.get(key)
    return key, value


def _fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AMMConfigError(f"{key}={value!r}: must be a number between 0 and 1")
    if not 0 <= value <= 1:
        raise AMMConfigError(f"{key}={value!r}: must be between 0 and 1")
    return float(value)


def _count(key: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AMMConfigError(f"{key}={value!r}: must be an integer >= {minimum}")
    return value


def _nbytes(key: str, value: Any) -> int:
    try:
        nbytes = parse_bytes(value) if isinstance(value, str) else value
    except (ValueError, TypeError) as e:
        raise AMMConfigError(
            f"{key}={value!r}: not a size (e.g. 256MiB): {e}"
        ) from None
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise AMMConfigError(f"{key}={value!r}: must be a size greater than zero")
    return nbytes


def _spill_threshold() -> float | None:
    """The fraction of its memory limit at which a worker starts spilling to disk:
    ``distributed.worker.memory.target`` (managed memory), or ``.spill`` (process
    memory) if target is disabled; None if both are. Workers are assumed to share the
    scheduler's configuration, which the scheduler cannot see.
    """
    for key in ("distributed.worker.memory.target", "distributed.worker.memory.spill"):
        value = dask.config.get(key, default=False)
        if value is not False and value is not None:
            return _fraction(key, value)
    return None


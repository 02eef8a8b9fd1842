"""Admission by queueing delay: at most `limit` requests work at once, and a request that cannot start within its
budget is shed (503 overloaded) instead of waiting for nothing.

Per process, in its event loop (one thread runs it: no locks). A request arriving while every slot is busy is
refused at once when the queue ahead of it would keep it past its budget (predicted from the recent time a
request holds a slot); one admitted to wait is still shed if its budget runs out. A finished request hands its
slot straight to a waiter whose budget is not spent.

Waiters are served in arrival order, except under overload: while at least OVERLOAD_SHARE of the recent arrivals
were refused. Then the queue is kept short (a request waits only if it can start within OVERLOAD_BUDGET_SHARE of
the budget; the oldest waiters past that are shed) and served newest first. With more arrivals than slots, a
short queue keeps the slots as busy as a long one; it only decides how long the answered requests waited, and in
a full queue in arrival order every one of them would wait the whole budget. A few refusals are not overload: a
queue near its budget, like a closed loop of clients a few times the slots, refuses one now and then, and newest
first would starve its oldest waiters. docs/overload.md has the measurements behind these choices.
"""

from __future__ import annotations

import asyncio
import collections
import time


class _Turn:
    """A waiting request: its deadline, and the future that gets the time its slot was granted (None: shed)."""

    __slots__ = ("deadline", "future")

    def __init__(self, deadline: float, future: asyncio.Future):
        self.deadline, self.future = deadline, future


class Admission:
    """Who works, who waits and who is shed, in one process. A waiting request is a suspended coroutine: it holds
    no thread, only its body, and the waiters' bodies together stay within `max_waiting_bytes` (0: no limit);
    past that, a request that would wait is shed. `gauge` (optional) counts the waiters."""

    # About what a queue fed at its capacity refuses, and far less than real overload refuses (half and more).
    OVERLOAD_SHARE = 0.1
    # Under overload, a short queue keeps the slots as busy as a long one, and its requests wait far less.
    OVERLOAD_BUDGET_SHARE = 0.1

    def __init__(self, limit: int, budget: float, max_waiting_bytes: int = 0, gauge=None):
        self.limit, self.budget, self.max_waiting_bytes, self.gauge = limit, budget, max_waiting_bytes, gauge
        self._working = 0
        self._waiting: collections.deque[_Turn] = collections.deque()
        self._waiting_bytes = 0
        self._slot_seconds: float | None = None  # moving average of the time a request holds a slot
        # Arrivals and refusals on arrival in this window of one budget and the one before it: [start, arrived,
        # refused, arrived before, refused before].
        self._counts = [time.perf_counter(), 0, 0, 0, 0]

    def predicted_wait(self) -> float:
        """Seconds a request arriving now would wait for a slot (0 while a slot is free)."""
        if self._working < self.limit:
            return 0.0
        return (len(self._waiting) + 1) * (self._slot_seconds or 0.0) / self.limit

    def waiting(self) -> int:
        return len(self._waiting)

    def full(self, arrived: float, size: int = 0) -> bool:
        """Whether a request that arrived at `arrived` (its body `size` bytes) would be refused now, without a
        place in the queue: every slot is busy, and the queue ahead of it would keep it past its budget or its body
        would not fit."""
        if self._working < self.limit:
            return False
        if time.perf_counter() + self.predicted_wait() > arrived + self.wait_budget():
            return True
        return bool(self.max_waiting_bytes) and self._waiting_bytes + size > self.max_waiting_bytes

    def refused(self) -> None:
        """A request was refused on arrival (full() was true)."""
        self._count(refused=True)

    def wait_budget(self) -> float:
        """The longest a request arriving now may wait for a slot: the budget, or its short share under overload."""
        return self.budget * (self.OVERLOAD_BUDGET_SHARE if self.overloaded() else 1.0)

    def overloaded(self) -> bool:
        """Whether at least OVERLOAD_SHARE of the requests that arrived in the last one to two budgets were refused
        on arrival: then the queue is short and served newest first."""
        counts = self._roll(time.perf_counter())
        refused, arrived = counts[2] + counts[4], counts[1] + counts[3]
        return refused > 0 and refused >= self.OVERLOAD_SHARE * arrived

    def _count(self, refused: bool) -> None:
        counts = self._roll(time.perf_counter())
        counts[1] += 1
        counts[2] += refused

    def _roll(self, now: float) -> list:
        counts = self._counts
        if now - counts[0] >= self.budget:
            last = counts[1:3] if now - counts[0] < 2 * self.budget else [0, 0]
            counts[:] = [now, 0, 0, *last]
        return counts

    async def enter(self, arrived: float, size: int = 0) -> float | None:
        """Wait until this request (arrived at perf_counter() time `arrived`, its body `size` bytes) may work. The
        perf_counter() time its slot was granted, or None: shed it. A slot is never granted past the budget."""
        now = time.perf_counter()
        if self._working < self.limit:
            self._working += 1
            self._count(refused=False)
            return now
        if self.full(arrived, size):
            self.refused()
            return None
        self._count(refused=False)
        loop = asyncio.get_running_loop()
        turn = _Turn(arrived + self.budget, loop.create_future())
        self._waiting.append(turn)
        self._waiting_bytes += size
        if self.gauge is not None:
            self.gauge.inc()
        expiry = loop.call_later(max(0.0, turn.deadline - now), self._expire, turn)
        try:
            return await turn.future
        except asyncio.CancelledError:  # the request was dropped while it waited: a slot it got goes on
            if turn in self._waiting:
                self._waiting.remove(turn)
            elif turn.future.done() and not turn.future.cancelled() and turn.future.result() is not None:
                self.leave()
            raise
        finally:
            expiry.cancel()
            self._waiting_bytes -= size
            if self.gauge is not None:
                self.gauge.dec()

    def _expire(self, turn: _Turn) -> None:
        if turn in self._waiting:
            self._waiting.remove(turn)
            turn.future.set_result(None)

    def leave(self, held: float | None = None) -> None:
        """The request that held a slot (for `held` seconds) is done: the slot goes to a waiter whose budget is not
        spent yet (the oldest, or under overload the newest, after the oldest past the short queue are shed), or back
        to the pool."""
        if held is not None:
            previous = self._slot_seconds
            self._slot_seconds = held if previous is None else 0.8 * previous + 0.2 * held
        now = time.perf_counter()
        overloaded = self.overloaded()
        if overloaded and self._slot_seconds:  # keep the waiters that can start within the short budget
            keep = max(1, int(self.wait_budget() * self.limit / self._slot_seconds))
            while len(self._waiting) > keep:
                turn = self._waiting.popleft()
                if not turn.future.done():
                    turn.future.set_result(None)
        while self._waiting:
            turn = self._waiting.pop() if overloaded else self._waiting.popleft()
            if turn.future.done():  # cancelled with its request
                continue
            if now > turn.deadline:  # its expiry is due but has not run yet: shed
                turn.future.set_result(None)
                continue
            turn.future.set_result(now)
            return
        self._working -= 1

"""Fleet limits, written once for every backend (a part of the engine: ``engine.TaskEngine`` is a ``FleetLimits``):
spending budgets shared by every window and machine, and a cap that backs off on rate limits.

Budgets (the store's, ``budget``; a group's, ``budget.<hex of group>``) are small values kept with the backend and
changed by compare-and-set. Claiming a task under a budget reserves its ``max_budget_usd`` (else
CC_TASKS_TASK_RESERVE_USD), capped by what remains of every budget that applies; claude runs with
``--max-budget-usd`` set to that reservation, so a budget is overrun by at most one turn per running task (claude
stops after the turn that reaches it). A task's end charges its real cost and returns the rest; a reservation whose
task is no longer running (its worker was lost) is settled by the next claim. The limiter (``limiter``): a 429 or 529
that claude retries halves how many tasks may start (at least 1) and pauses starts for the retry delay; after
LIMITER_QUIET seconds without one it climbs back by one, up to the cap."""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta

from .errors import InvalidOptionsError
from .models import Budget, BudgetInfo, Limiter, TaskRecord, check_group, utcnow
from .states import TaskStatus

log = logging.getLogger("cc_tasks")
#: What a task without max_budget_usd reserves under a budget (CC_TASKS_TASK_RESERVE_USD).
DEFAULT_RESERVE_USD = 2.0
#: A budget with less than this left reserves nothing more.
MIN_RESERVE_USD = 0.01
#: Seconds without a 429/529 after which the limiter lets one more task start at once.
LIMITER_QUIET = 30.0
#: Reports of one burst of 429s within this many seconds halve the cap once.
LIMITER_BURST = 5.0


def reserve_default() -> float:
    raw = os.environ.get("CC_TASKS_TASK_RESERVE_USD")
    try:
        return max(MIN_RESERVE_USD, float(raw)) if raw else DEFAULT_RESERVE_USD
    except ValueError:
        return DEFAULT_RESERVE_USD


def budget_key(group: str | None) -> str:
    return "budget" if group is None else f"budget.{group.encode().hex()}"


def scope(group: str | None) -> str:
    return "the store's budget" if group is None else f"group {group!r}'s budget"


class FleetLimits:
    """The limits part of the engine (it uses the engine's repo, records and config)."""

    # -- budgets -------------------------------------------------------------------------
    def _budget(self, group: str | None) -> tuple[object | None, Budget | None]:
        got = self.repo.get_meta(budget_key(group))
        if got is None:
            return None, None
        try:
            return got[0], Budget.model_validate_json(got[1])
        except ValueError:
            log.warning("%s: %s is unreadable; treated as none", self.address, scope(group))
            return got[0], None

    def _change_budget(self, group: str | None, fn) -> Budget | None:
        """Read, change (``fn`` returns the new budget, or None to remove it) and compare-and-set a budget."""
        while True:
            rev, cur = self._budget(group)
            new = fn(cur)
            if new is cur:
                return cur
            data = new.model_dump_json().encode() if new is not None else None
            if self.repo.cas_meta(budget_key(group), data, rev):
                return new

    def set_budget(self, budget_usd: float | None, group: str | None = None) -> BudgetInfo:
        """Set (None: remove) the store's or a group's budget; tasks it held are looked at again at once."""
        if group is not None:
            try:
                check_group(group)
            except ValueError as e:
                raise InvalidOptionsError(str(e)) from None
        if budget_usd is not None and not 0 <= budget_usd <= 1_000_000:
            raise InvalidOptionsError(f"budget_usd {budget_usd!r} is outside 0 … 1,000,000 (null removes the budget)")

        def fn(cur: Budget | None) -> Budget | None:
            if budget_usd is None:
                return None
            return (cur or Budget(budget_usd=budget_usd)).model_copy(update={"budget_usd": budget_usd})

        self._change_budget(group, fn)
        self._note_scope(group, budget_usd is not None)
        for _, r in self.repo.unfinished()[1].values():  # (blocked tasks are looked at again by the next claim)
            if r.blocked_by and (group is None or r.group == group):
                self._unblock(r.task_id)
        self.repo.signal("nudge")
        return self.get_budget(group)

    def get_budget(self, group: str | None = None) -> BudgetInfo:
        """The budget as it is now: a task that ended is charged before this is read (its worker charges it just
        after its final record; whoever comes first does it, once)."""
        self.settle_reservations({})
        _, b = self._budget(group)
        blocked = sum(1 for _, r in self.repo.unfinished()[1].values()
                      if r.blocked_by and (group is None or r.group == group))  # fmt: skip
        if b is None:
            return BudgetInfo(group=group, blocked=blocked)
        reserved = sum(b.reservations.values())
        return BudgetInfo(group=group, budget_usd=b.budget_usd, spent_usd=round(b.spent_usd, 6),
                          reserved_usd=round(reserved, 6), remaining_usd=round(b.budget_usd - b.spent_usd - reserved, 6),
                          running=len(b.reservations), finished=b.finished, blocked=blocked)  # fmt: skip

    def budget_scopes(self) -> set[str | None]:
        """The scopes that have a budget (None: the store's), from one small index (a claim pass reads it once)."""
        got = self.repo.get_meta("budgets")
        try:
            names = json.loads(got[1]) if got else []
        except ValueError:
            names = []
        return {n or None for n in names if isinstance(n, str)}

    def _note_scope(self, group: str | None, present: bool) -> None:
        while True:
            got = self.repo.get_meta("budgets")
            try:
                names = set(json.loads(got[1])) if got else set()
            except ValueError:
                names = set()
            names = (names | {group or ""}) if present else (names - {group or ""})
            if self.repo.cas_meta("budgets", json.dumps(sorted(names)).encode(), got[0] if got else None):
                return

    def reserve(
        self, r: TaskRecord, wanted: float | None, scopes: set[str | None] | None = None
    ) -> tuple[float | None, str | None]:
        """Reserve for a task about to be claimed: (the reservation, None), (None, None) where no budget applies,
        or (None, why) when a budget that applies has too little left (the task stays queued)."""
        scopes = self.budget_scopes() if scopes is None else scopes
        groups = [g for g in (None, r.group) if g in scopes and (g is None or r.group)]
        groups = [g for g in groups if self._budget(g)[1] is not None]
        if not groups:
            return None, None
        amount = wanted or reserve_default()
        for g in groups:
            _, b = self._budget(g)
            left = b.budget_usd - b.spent_usd - sum(v for t, v in b.reservations.items() if t != r.task_id)
            if left < MIN_RESERVE_USD:
                how = "set_budget(budget_usd=…" + (f", group={g!r})" if g else ")")
                held = sum(v for t, v in b.reservations.items() if t != r.task_id)
                cmd = f"`cc-tasks budget{' --group ' + g if g else ''} set USD`"
                return None, (f"{scope(g)} is exhausted: ${b.spent_usd:.2f} spent and ${held:.2f} reserved of "
                              f"${b.budget_usd:.2f}; raise it with {how} or {cmd}")  # fmt: skip
            amount = min(amount, left)
        for g in groups:
            self._change_budget(
                g, lambda b: b.model_copy(update={"reservations": {**b.reservations, r.task_id: amount}})
            )
        return round(amount, 6), None

    def release(self, r: TaskRecord, cost: float | None) -> None:
        """A task's run ended (or its claim did not land): charge ``cost`` (None: nothing, it did not run) to every
        budget holding a reservation for it, and return the rest. Idempotent: a budget charges a task once."""
        for g in [None] + ([r.group] if r.group else []):

            def fn(b: Budget | None, t=r.task_id) -> Budget | None:
                if b is None or t not in b.reservations:
                    return b
                rest = {k: v for k, v in b.reservations.items() if k != t}
                spent = b.spent_usd + (cost or 0.0)
                return b.model_copy(update={"reservations": rest, "spent_usd": spent,
                                            "finished": b.finished + (cost is not None)})  # fmt: skip

            self._change_budget(g, fn)

    def settle_reservations(self, records: dict[str, TaskRecord]) -> None:
        """Reservations of tasks no longer running (a lost worker's, a crash between the claim and its end): a
        finished task is charged its cost, a requeued one's is returned (a claim pass does it)."""
        for g in self.budget_scopes():
            _, b = self._budget(g)
            for t in list(b.reservations) if b else []:
                r = records.get(t) or self._peek(t)
                if r is None or r.status != TaskStatus.RUNNING:
                    self.release(r or TaskRecord(task_id=t, cwd="/", timeout_seconds=1, group=g),
                                 (r.total_cost_usd or r.progress.cost_usd) if r is not None and r.status.terminal else None)  # fmt: skip

    def _block(self, r: TaskRecord, why: str) -> None:
        if r.blocked_reason == why:
            return

        def fn(cur: TaskRecord) -> TaskRecord | None:
            if cur.status != TaskStatus.QUEUED or cur.blocked_reason == why:
                return None
            return cur.model_copy(update={"blocked_by": "budget", "blocked_reason": why})

        self.update(r.task_id, fn)
        self.append_event(r.task_id, "budget_exhausted", reason=why)
        self.repo.signal("nudge")  # (waiters look now)

    def _unblock(self, task_id: str) -> None:
        def fn(cur: TaskRecord) -> TaskRecord | None:
            return cur.model_copy(update={"blocked_by": None, "blocked_reason": None}) if cur.blocked_by else None

        self.update(task_id, fn)

    # -- the rate-limit-aware cap ------------------------------------------------------------
    def limiter(self) -> Limiter:
        got = self.repo.get_meta("limiter")
        try:
            return Limiter.model_validate_json(got[1]) if got else Limiter()
        except ValueError:
            return Limiter()

    def _change_limiter(self, fn) -> Limiter:
        while True:
            got = self.repo.get_meta("limiter")
            try:
                cur = Limiter.model_validate_json(got[1]) if got else Limiter()
            except ValueError:
                cur = Limiter()
            new = fn(cur)
            if new is cur or self.repo.cas_meta("limiter", new.model_dump_json().encode(), got[0] if got else None):
                return new

    def rate_limited(self, status: int | None, retry_delay_ms: float) -> Limiter:
        """claude retries a 429/529: halve the starts (once a burst), pause them for the delay."""
        now, cap = utcnow(), self.max_concurrent
        running = sum(
            r.status == TaskStatus.RUNNING and r.runner == "claude" for _, r in self.repo.unfinished()[1].values()
        )

        def fn(cur: Limiter) -> Limiter:
            effective = cur.effective_cap or cap
            burst = cur.changed_at is not None and (now - cur.changed_at).total_seconds() < LIMITER_BURST
            until = now + timedelta(milliseconds=max(0.0, retry_delay_ms))
            update = {"last_status": status, "last_at": now,
                      "paused_until": max(cur.paused_until or until, until)}  # fmt: skip
            if not burst:
                update.update(effective_cap=max(1, min(effective, max(1, running)) // 2), changed_at=now)
            return cur.model_copy(update=update)

        new = self._change_limiter(fn)
        log.warning("%s: API %s: starts paused until %s, effective cap %s", self.address, status,
                    new.paused_until, new.effective_cap)  # fmt: skip
        return new

    def starts_allowed(self, running: int) -> int:
        """How many more tasks may start now under the limiter (climbing back by one a quiet period)."""
        cap, now = self.max_concurrent, utcnow()
        lim = self.limiter()
        if lim.effective_cap is None:
            return cap - running
        if lim.paused_until is not None and now < lim.paused_until:
            return 0
        quiet = max(x for x in (lim.last_at, lim.changed_at) if x is not None)
        if (now - quiet).total_seconds() >= LIMITER_QUIET:

            def climb(cur: Limiter) -> Limiter:
                if cur.effective_cap is None or cur.changed_at != lim.changed_at:
                    return cur
                up = cur.effective_cap + 1
                return cur.model_copy(update={"effective_cap": None if up >= cap else up, "changed_at": now})

            lim = self._change_limiter(climb)
        return min(cap, lim.effective_cap or cap) - running

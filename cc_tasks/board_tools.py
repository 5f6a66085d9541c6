"""The agent task board's tools: post_task, claim_task (``claim``, ``aclaim``), renew_task, complete_task,
fail_task, release_task, and a group's notes (add_note, get_notes). The board's rules are board.py's."""

from __future__ import annotations

import asyncio
import functools
import random
import re
import time

import anyio
from pydantic import ValidationError

from .engine import dependency_preamble
from .errors import InvalidOptionsError
from .ids import validate_task_id
from .models import (
    RESULT_PREVIEW_CHARS,
    Claimed,
    LeaseRenewed,
    Note,
    NoteAdded,
    NotePage,
    PostOptions,
    TaskOptions,
    TaskRecord,
)
from .replies import EVENT_PAGE_CHARS, json_len
from .submitting import SubmitMixin

#: An agent's lease: 10 s to 24 h.
LEASE_MIN, LEASE_MAX = 10.0, 86_400.0
CLAIM_WAIT_MAX = 3_600.0
CLAIM_LOOK_EVERY = 2.0
#: What a claim reply carries of the prompt and of the dependencies' results (the rest: get_task_output).
CLAIM_PROMPT_CHARS = 12_000
CLAIM_DEP_CHARS = 16_000
#: An agent's result: stored whole (paged by get_task_output), up to this many characters.
AGENT_RESULT_MAX = 1_000_000
NOTE_MAX = 10_000
NOTE_JSON_MAX = 15_000  # (so that any note fits a get_notes reply whole)
ERROR_MAX = 4_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_claimer(worker: str) -> str:
    name = (worker or "").strip()
    if not name:
        raise InvalidOptionsError("worker is empty: name the claimer (e.g. 'window-2' or 'alice@laptop')")
    if len(name) > 100 or _CONTROL.search(name):
        raise InvalidOptionsError("worker must be at most 100 printable characters")
    return name


def _check_lease_token(lease: str) -> str:
    if not isinstance(lease, str) or not 8 <= len(lease) <= 200:
        raise InvalidOptionsError("lease is not a lease token: pass the `lease` that claim_task returned")
    return lease


class BoardMixin(SubmitMixin):
    """What outside agents call: their arguments checked here, the leases and their fencing in the backend."""

    def post(self, opts: PostOptions) -> TaskRecord:
        """A task for an outside agent to claim; no worker ever starts claude for it."""
        return self.submit([opts.as_batch_item()], nudge=False)[0]

    def claim(self, worker: str, labels: list[str] | None = None, group: str | None = None,
              lease_seconds: float = 300) -> Claimed:  # fmt: skip
        """Lease the highest-priority, oldest ready agent task ``worker`` may take; ``claimed`` false if none."""
        worker = _check_claimer(worker)
        if not LEASE_MIN <= lease_seconds <= LEASE_MAX:
            raise InvalidOptionsError(
                f"lease_seconds {lease_seconds:g} is outside {LEASE_MIN:g} … {LEASE_MAX:g} (10 s to 24 h); renew_task "
                "extends a lease by as much again"
            )
        try:  # (validated as task labels and groups are)
            labels = TaskOptions(prompt="x", labels=labels, group=group).labels or []
        except ValidationError as e:
            raise InvalidOptionsError("; ".join(err["msg"] for err in e.errors())) from None
        got = self.store.claim_agent(worker, labels, group, lease_seconds)
        if got is None:
            return Claimed(claimed=False)
        r, token = got
        request = self.store.request(r.task_id)
        prompt = request.options.prompt
        deps = None
        if request.options.include_dependency_results and r.depends_on:
            deps = dependency_preamble(self.store, r.depends_on, total=CLAIM_DEP_CHARS)
        return Claimed(
            claimed=True, task_id=r.task_id, name=r.name, group=r.group, prompt=prompt[:CLAIM_PROMPT_CHARS],
            prompt_truncated=len(prompt) > CLAIM_PROMPT_CHARS, dependency_results=deps, lease=token,
            lease_expires_at=r.lease.expires_at, attempt=len(r.attempts) + 1, metadata=r.metadata,
        )  # fmt: skip

    async def aclaim(self, worker: str, labels: list[str] | None = None, group: str | None = None,
                     lease_seconds: float = 300, wait_seconds: float = 0) -> Claimed:  # fmt: skip
        """``claim``, waiting up to ``wait_seconds`` for a task to become ready."""
        if not 0 <= wait_seconds <= CLAIM_WAIT_MAX:
            raise InvalidOptionsError(f"wait_seconds must be 0 … {CLAIM_WAIT_MAX:g}")
        deadline = time.monotonic() + wait_seconds
        claim = functools.partial(self.claim, worker, labels, group, lease_seconds)
        got = await anyio.to_thread.run_sync(claim)
        while not got.claimed and time.monotonic() < deadline:
            # A new task, a release or a requeue changes the stamp (a stat every 50 ms); an expiry shows at the
            # latest look every 2 s (jittered: many claimers do not look at once). Only when a cheap look
            # without the queue lock finds something is a claim made.
            stamp = self._active_stamp()
            until = min(deadline, time.monotonic() + CLAIM_LOOK_EVERY * random.uniform(0.75, 1.25))
            while time.monotonic() < until and self._active_stamp() == stamp:
                await asyncio.sleep(0.05)
            if await anyio.to_thread.run_sync(self.store.has_ready_agent_task, labels or [], group):
                got = await anyio.to_thread.run_sync(claim)
        return got

    def renew(self, task_id: str, lease: str, note: str | None = None) -> LeaseRenewed:
        if note is not None and len(note) > NOTE_MAX:
            raise InvalidOptionsError(f"note is {len(note)} characters; at most {NOTE_MAX}")
        r = self.store.renew_agent(validate_task_id(task_id), _check_lease_token(lease), note)
        return LeaseRenewed(task_id=task_id, lease_expires_at=r.lease.expires_at)

    def complete(self, task_id: str, lease: str, result: str) -> TaskRecord:
        if len(result) > AGENT_RESULT_MAX:
            raise InvalidOptionsError(
                f"result is {len(result):,} characters; at most {AGENT_RESULT_MAX:,} (put more in a file and give its path)"
            )
        return self.store.complete_agent(
            validate_task_id(task_id), _check_lease_token(lease), result, RESULT_PREVIEW_CHARS
        )

    def fail(self, task_id: str, lease: str, error: str, retry: bool = False) -> TaskRecord:
        if not error.strip():
            raise InvalidOptionsError("error is empty: say what went wrong")
        return self.store.fail_agent(validate_task_id(task_id), _check_lease_token(lease), error[:ERROR_MAX], retry)

    def release(self, task_id: str, lease: str) -> TaskRecord:
        return self.store.release_agent(validate_task_id(task_id), _check_lease_token(lease))

    def add_note(self, group: str, text: str, key: str | None = None, by: str | None = None) -> NoteAdded:
        if not text.strip():
            raise InvalidOptionsError("text is empty: a note says something")
        if len(text) > NOTE_MAX or json_len(text) > NOTE_JSON_MAX:
            raise InvalidOptionsError(
                f"text is {len(text):,} characters ({json_len(text):,} as JSON); a note holds at most {NOTE_MAX:,} "
                f"({NOTE_JSON_MAX:,} as JSON: control and non-ASCII characters are escaped, up to six each)"
            )
        if key is not None and not 1 <= len(key) <= 100:
            raise InvalidOptionsError("key must be 1 to 100 characters")
        seq = self.store.add_note(group, text, key, by)
        return NoteAdded(group=group, seq=seq, key=key)

    def notes(self, group: str, since: int = 0, limit: int = 100) -> NotePage:
        if since < 0:
            raise InvalidOptionsError("since must be 0 or more (use next from the previous page)")
        limit = max(1, min(int(limit), 1000))
        out: list[Note] = []
        size, nxt, more = 0, since, False
        for n in self.store.iter_notes(group, since):
            note = Note(**{k: n.get(k) for k in ("seq", "ts", "key", "by", "text")})
            cost = json_len(note.model_dump(mode="json")) + 2
            if len(out) >= limit or (out and size + cost > EVENT_PAGE_CHARS):
                more = True
                break
            out.append(note)
            size += cost
            nxt = note.seq + 1
        return NotePage(group=group, notes=out, next=nxt, more=more)

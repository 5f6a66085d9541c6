"""Parse claude's ``--output-format stream-json`` output: pure functions over its events.

``split_lines`` turns a growing byte buffer into complete JSON events; ``apply_event`` folds an
event into the live Progress and says what is worth logging; ``outcome`` turns the final
``result`` event and the exit code into the task's final status and fields.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from .models import PROGRESS_TEXT_CHARS, Progress, RateLimited, TaskStatus

#: Dollars per million tokens (input, output) by model family, for the live estimate of a running task's cost
#: (its final figure is claude's own ``total_cost_usd``). Cache writes cost 1.25 x input, cache reads 0.1 x.
PRICES = {"opus": (15.0, 75.0), "sonnet": (3.0, 15.0), "haiku": (1.0, 5.0)}


def turn_cost(model: str | None, usage: dict[str, Any]) -> float:
    """An estimate of one turn's cost from its ``usage`` (unknown models are priced as sonnet)."""
    name = (model or "").lower()
    inp, out = next((p for family, p in PRICES.items() if family in name), PRICES["sonnet"])

    def n(key: str) -> float:
        v = usage.get(key)
        return float(v) if isinstance(v, (int, float)) else 0.0

    tokens_in = n("input_tokens") + 1.25 * n("cache_creation_input_tokens") + 0.1 * n("cache_read_input_tokens")
    return (tokens_in * inp + n("output_tokens") * out) / 1_000_000


def split_lines(buf: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """Complete events in ``buf`` and the unfinished rest. Lines that are not JSON objects are skipped."""
    *lines, rest = buf.split(b"\n")
    events = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events, rest


def apply_event(progress: Progress, ev: dict[str, Any]) -> list[dict[str, Any]]:
    """Fold ``ev`` into ``progress`` (in place); return notable events for the task's event log."""
    notable: list[dict[str, Any]] = []
    kind = ev.get("type")
    if kind in ("assistant", "result"):
        progress.rate_limited = None  # (the API answered)
    if kind == "assistant":
        msg = ev.get("message") or {}
        if ev.get("parent_tool_use_id") is None:
            progress.turns += 1
        if isinstance(msg.get("usage"), dict):
            progress.cost_usd = (progress.cost_usd or 0.0) + turn_cost(msg.get("model"), msg["usage"])
        for block in msg.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                progress.tool_calls += 1
                progress.last_tool = str(block.get("name"))
                notable.append({"kind": "tool_use", "tool": progress.last_tool})
            elif block.get("type") == "text" and block.get("text"):
                text = str(block["text"])
                progress.last_text = text[-PROGRESS_TEXT_CHARS:]
                notable.append({"kind": "assistant_text", "text": text[:200]})
    elif kind == "result":
        if isinstance(ev.get("total_cost_usd"), (int, float)):
            progress.cost_usd = float(ev["total_cost_usd"])
        notable.append({"kind": "result", "is_error": ev.get("is_error"), "subtype": ev.get("subtype")})
    elif kind == "system" and ev.get("subtype") == "api_retry":
        delay = ev.get("retry_delay_ms")
        delay = float(delay) / 1000 if isinstance(delay, (int, float)) else 0.0
        status = ev.get("error_status") if isinstance(ev.get("error_status"), int) else None
        attempt = ev.get("attempt") if isinstance(ev.get("attempt"), int) else 0
        progress.rate_limited = RateLimited(status=status, retry_in_seconds=delay, attempt=attempt)
        notable.append({"kind": "api_retry", "status": status, "retry_in_seconds": delay, "attempt": attempt,
                        "error": ev.get("error")})  # fmt: skip
    elif kind == "system" and ev.get("subtype") == "init":
        notable.append({"kind": "session", "session_id": ev.get("session_id"), "model": ev.get("model")})
    return notable


class Outcome(BaseModel):
    status: TaskStatus
    error: str | None = None
    is_error: bool | None = None
    result: str | None = None
    session_id: str | None = None
    total_cost_usd: float | None = None
    num_turns: int | None = None
    duration_ms: int | None = None
    usage: dict[str, Any] | None = None
    api_error_status: int | None = None


def outcome(
    result_event: dict[str, Any] | None, exit_code: int | None, stderr_tail: str = "", session_id: str | None = None
) -> Outcome:
    """The final status of a claude run that ended by itself. ``completed`` = exit 0 and not ``is_error``."""
    tail = stderr_tail.strip()[-500:]
    if result_event is None:
        why = f"claude exited with code {exit_code} without a result event"
        return Outcome(status=TaskStatus.FAILED, error=f"{why}: {tail}" if tail else why, session_id=session_id)
    ev = result_event
    is_error = bool(ev.get("is_error"))
    result = ev.get("result")
    fields = dict(
        is_error=is_error,
        result=result if isinstance(result, str) else (json.dumps(result) if result is not None else None),
        session_id=ev.get("session_id") or session_id,
        total_cost_usd=ev.get("total_cost_usd"),
        num_turns=ev.get("num_turns"),
        duration_ms=ev.get("duration_ms"),
        usage=ev.get("usage") if isinstance(ev.get("usage"), dict) else None,
        api_error_status=ev.get("api_error_status") if isinstance(ev.get("api_error_status"), int) else None,
    )
    if exit_code == 0 and not is_error:
        return Outcome(status=TaskStatus.COMPLETED, **fields)
    reason = (fields["result"] or "").strip()[:1000] or f"subtype {ev.get('subtype')}"
    api = f"an API error ({fields['api_error_status']})" if fields["api_error_status"] else "an error"
    error = f"claude reported {api} (exit code {exit_code}): {reason}"
    return Outcome(status=TaskStatus.FAILED, error=error, **fields)


#: API statuses worth another attempt: timeouts, conflicts, rate limits, server errors, overload.
TRANSIENT_API_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


def is_transient(out: Outcome, turns: int) -> bool:
    """Whether a failed run is worth retrying: an overloaded or rate-limited API, a server error, or a crash
    before the first turn. A task that ran and answered with an error is not."""
    if out.status != TaskStatus.FAILED:
        return False
    if out.api_error_status is not None:
        return out.api_error_status in TRANSIENT_API_STATUSES
    text = (out.result or out.error or "").lower()
    if out.is_error and any(w in text for w in ("overloaded", "rate limit", "rate_limit")):
        return True
    return out.is_error is None and turns == 0  # no result event and not a single turn: a crash at start

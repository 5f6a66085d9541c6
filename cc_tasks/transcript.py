"""A readable transcript from claude's stream-json output: pure functions, shared by the CLI and the dashboard."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

TEXT_LIMIT = 4_000
INPUT_LIMIT = 500


class Entry(BaseModel):
    kind: str  # session | assistant | tool | tool_result | result | stderr
    text: str


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n] + f" … [{len(s) - n} more characters]"


def entries_of(ev: dict[str, Any]) -> list[Entry]:
    kind = ev.get("type")
    out: list[Entry] = []
    if kind == "system" and ev.get("subtype") == "init":
        out.append(
            Entry(
                kind="session", text=f"session {ev.get('session_id')} · model {ev.get('model')} · cwd {ev.get('cwd')}"
            )
        )
    elif kind == "assistant":
        for b in (ev.get("message") or {}).get("content") or []:
            if not isinstance(b, dict):
                continue
            if b.get("type") == "text" and b.get("text"):
                out.append(Entry(kind="assistant", text=_clip(str(b["text"]), TEXT_LIMIT)))
            elif b.get("type") == "tool_use":
                args = json.dumps(b.get("input"), ensure_ascii=False)
                out.append(Entry(kind="tool", text=f"{b.get('name')} {_clip(args, INPUT_LIMIT)}"))
    elif kind == "user":
        for b in (ev.get("message") or {}).get("content") or []:
            if isinstance(b, dict) and b.get("type") == "tool_result":
                c = b.get("content")
                if isinstance(c, list):
                    c = "".join(x.get("text", "") for x in c if isinstance(x, dict))
                prefix = "error: " if b.get("is_error") else ""
                out.append(Entry(kind="tool_result", text=prefix + _clip(str(c or ""), TEXT_LIMIT)))
    elif kind == "result":
        cost = ev.get("total_cost_usd")
        verdict = "error" if ev.get("is_error") else "done"
        out.append(
            Entry(
                kind="result",
                text=f"{verdict} · {ev.get('num_turns')} turns · "
                f"${cost if cost is not None else '?'} · {ev.get('duration_ms')} ms",
            )
        )
    return out


def parse_entries(data: bytes, offset: int = 0, max_bytes: int = 1 << 20) -> tuple[list[Entry], int]:
    """Entries from the complete lines of ``data``, the transcript's bytes from ``offset`` (at most
    ``max_bytes`` of them); and the offset after the last complete line (pass it back to follow the task)."""
    end = data.rfind(b"\n")
    if end < 0:
        if len(data) >= max_bytes:  # one huge line: skip it whole
            return [Entry(kind="tool_result", text="[a line too long to show]")], offset + len(data)
        return [], offset
    out: list[Entry] = []
    for line in data[:end].split(b"\n"):
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            out.extend(entries_of(ev))
    return out, offset + end + 1

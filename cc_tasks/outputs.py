"""A task's outputs, page by page: get_task_output (``output``), get_task_events (``events``), the transcript."""

from __future__ import annotations

from typing import Literal

from .errors import InvalidOptionsError
from .ids import validate_task_id
from .models import OUTPUT_PAGE_BYTES, OUTPUT_PAGE_DEFAULT, EventPage, OutputPage
from .records import RecordsMixin
from .replies import EVENT_PAGE_CHARS, OUTPUT_PAGE_CHARS, fit_page, json_len, squeeze
from .transcript import Entry, parse_entries


class OutputsMixin(RecordsMixin):
    """Pages of a task's result, transcript, stderr and prompt, of its event log, and its transcript's entries."""

    def events(self, task_id: str, since: int = 0, limit: int = 200) -> EventPage:
        """The task's event log from position ``since`` (a cursor: pass ``next`` of the previous page)."""
        record = self.get(task_id)
        if since < 0:
            raise InvalidOptionsError("since must be 0 or more (use next from the previous page)")
        limit = max(1, min(int(limit), 1000))
        events: list[dict] = []
        size = 0
        n = since
        more = False
        for i, ev in self.store.iter_events(task_id, since):
            if len(events) >= limit:
                more = True
                break
            ev["seq"] = i
            cost = json_len(ev) + 2  # (as the reply's JSON has it)
            if events and size + cost > EVENT_PAGE_CHARS:
                more = True
                break
            if cost > EVENT_PAGE_CHARS:  # one huge event: its strings cut, so that the page moves on
                ev = squeeze(ev, 500)
                cost = json_len(ev) + 2
            events.append(ev)
            size += cost
            n = i + 1
        return EventPage(task_id=task_id, events=events, next=n, more=more, status=record.status)

    def output(
        self,
        task_id: str,
        offset: int = 0,
        limit: int = OUTPUT_PAGE_DEFAULT,
        source: Literal["result", "transcript", "stderr", "prompt"] = "result",
    ) -> OutputPage:
        """At most ``limit`` bytes from byte ``offset``, never splitting a UTF-8 character, and fewer when the
        page's text would not fit in a reply twice (JSON-escaped and as plain text)."""
        record = self.get(task_id)
        if offset < 0:
            raise InvalidOptionsError(
                "offset must be 0 or more (a byte offset; use next_offset from the previous page)"
            )
        limit = max(1, min(int(limit), OUTPUT_PAGE_BYTES))
        data, total = self.store.read_output(task_id, source, offset, limit)
        start = min(offset, total)
        fit = fit_page(data, OUTPUT_PAGE_CHARS)
        # cut at a UTF-8 character boundary so that no page splits a character
        if start + fit < total:
            cut = fit
            while cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
                cut -= 1
            if cut > 0 and data[cut - 1] >= 0xC0:
                cut -= 1
            data = data[:cut] or data[:fit]
        end = start + len(data)
        return OutputPage(
            task_id=task_id,
            source=source,
            offset=start,
            next_offset=end,
            total_bytes=total,
            eof=end >= total,
            text=data.decode("utf-8", "replace"),
            status=record.status,
        )

    def transcript(self, task_id: str, offset: int = 0, max_bytes: int = 1 << 20) -> tuple[list[Entry], int]:
        """Readable entries of the task's transcript from byte ``offset``, and the offset to follow on from."""
        data, _ = self.store.read_output(validate_task_id(task_id), "transcript", max(0, offset), max_bytes)
        return parse_entries(data, offset, max_bytes)

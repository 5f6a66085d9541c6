"""What the approval tools do: answer_approval (any server process or machine answers a sub-agent's permission
request) and list_approvals (every pending request of the store or of a group, oldest first, paged)."""

from __future__ import annotations

from typing import Any

from .errors import InvalidOptionsError
from .ids import validate_task_id
from .models import APPROVAL_INPUT_CHARS, ApprovalAnswered, ApprovalEntry, ApprovalList
from .records import RecordsMixin

#: Most requests one list_approvals reply lists (then ``more`` and a cursor).
APPROVALS_PAGE = 50


class ApprovalMixin(RecordsMixin):
    def answer_approval(
        self,
        task_id: str,
        request_id: str,
        decision: str,
        message: str | None = None,
        updated_input: dict[str, Any] | None = None,
        remember: bool = False,
        by: str | None = None,
    ) -> ApprovalAnswered:
        return self.store.answer_approval(
            validate_task_id(task_id), str(request_id), decision, message, updated_input, remember, by
        )

    def list_approvals(
        self, group: str | None = None, cursor: str | None = None, limit: int = APPROVALS_PAGE
    ) -> ApprovalList:
        pending = self.store.approvals(group)
        if cursor:  # (the requests after that one, whether it is still pending or not)
            when, _, rid = cursor.partition("_")
            try:
                at = float(when)
            except ValueError:
                raise InvalidOptionsError(f"cursor {cursor[:80]!r} is not a next_cursor list_approvals gave") from None
            pending = [(r, a) for r, a in pending if (round(a.asked_at.timestamp(), 6), a.request_id) > (at, rid)]
        page = pending[: max(1, min(limit, APPROVALS_PAGE))]
        entries = []
        for r, a in page:
            e = ApprovalEntry.of(r, a, APPROVAL_INPUT_CHARS)
            cut = a.input_truncated or len(e.input_preview) < len(str(a.input))
            entries.append(e.model_copy(update={"name": r.name, "group": r.group, "input_truncated": cut}))
        more = len(pending) > len(page)
        return ApprovalList(approvals=entries, more=more, next_cursor=entries[-1].cursor if more and entries else None)

"""Sub-agents that ask: permission requests as facts in the store, answered once by the lead, a person or a rule
(a part of the engine: ``engine.TaskEngine`` is an ``ApprovalRules``), on every backend.

A request is added to the running task's record under its worker's lease (``ask_approval``); any process
answers it by compare-and-set (``answer_approval``: exactly one answer wins, an unknown or expired request is
refused); the worker takes the answer, or the timeout's denial, off the record (``take_answer``) and hands it to
claude. Rules (task option ``approval_rules``, and answers remembered for the rest of the task) use the patterns
of allowed_tools."""

from __future__ import annotations

import fnmatch
import json
import os
import secrets
from collections.abc import Iterable
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

from .errors import ApprovalError, InvalidOptionsError, TaskNotFoundError
from .ids import HOST, validate_task_id
from .models import (
    APPROVAL_INPUT_CHARS,
    ApprovalAnswer,
    ApprovalAnswered,
    ApprovalRule,
    Lease,
    PendingApproval,
    TaskRecord,
    utcnow,
)
from .states import TaskStatus

FILE_TOOLS = {"Read": "file_path", "Write": "file_path", "Edit": "file_path", "MultiEdit": "file_path",
              "NotebookEdit": "notebook_path"}  # fmt: skip


def rule_matches(pattern: str, tool_name: str, tool_input: dict[str, Any]) -> bool:
    """Whether a rule's ``tool`` pattern covers a call, as allowed_tools reads it: ``Name`` any call of that tool;
    ``Bash(prefix:*)`` commands that start with the prefix, ``Bash(cmd)`` that command (``*`` globs);
    ``Edit(glob)`` (any file tool) paths matching the glob (also below any folder); ``WebFetch(domain:host)``."""
    name, _, spec = pattern.partition("(")
    if name != tool_name:
        return False
    if not spec:
        return True
    spec = spec[:-1] if spec.endswith(")") else spec
    if tool_name == "Bash":
        command = str(tool_input.get("command", "")).strip()
        if spec.endswith(":*"):
            prefix = spec[:-2].strip()
            return command == prefix or command.startswith(prefix + " ")
        return fnmatch.fnmatchcase(command, spec)
    if tool_name in FILE_TOOLS:
        path = str(tool_input.get(FILE_TOOLS[tool_name], ""))
        bare = spec.removeprefix("./")
        return fnmatch.fnmatchcase(path, spec) or fnmatch.fnmatchcase(path, f"*/{bare}")
    if tool_name == "WebFetch" and spec.startswith("domain:"):
        host = urlparse(str(tool_input.get("url", ""))).hostname or ""
        want = spec.removeprefix("domain:")
        return host == want or host.endswith("." + want)
    return any(isinstance(v, str) and fnmatch.fnmatchcase(v, spec) for v in tool_input.values())


def first_rule(rules: Iterable[ApprovalRule], tool_name: str, tool_input: dict[str, Any]) -> ApprovalRule | None:
    return next((r for r in rules if rule_matches(r.tool, tool_name, tool_input)), None)


def rule_for(tool_name: str, tool_input: dict[str, Any], decision: str) -> ApprovalRule:
    """The rule an answer given with ``remember`` becomes: that exact command or file, else the tool."""
    if tool_name == "Bash" and tool_input.get("command"):
        return ApprovalRule(tool=f"Bash({str(tool_input['command']).strip()[:1900]})", decision=decision)
    if tool_name in FILE_TOOLS and tool_input.get(FILE_TOOLS[tool_name]):
        return ApprovalRule(tool=f"{tool_name}({str(tool_input[FILE_TOOLS[tool_name]])[:1900]})", decision=decision)
    return ApprovalRule(tool=tool_name, decision=decision)


def bounded_input(tool_input: Any) -> tuple[Any, bool]:
    """The input as stored in a request: itself if its JSON fits APPROVAL_INPUT_CHARS, else that JSON, cut."""
    text = json.dumps(tool_input, ensure_ascii=False, default=str)
    return (tool_input, False) if len(text) <= APPROVAL_INPUT_CHARS else (text[:APPROVAL_INPUT_CHARS], True)


def answerer() -> str:
    return f"{HOST} pid {os.getpid()}"


class ApprovalRules:
    """The approvals part of the engine (its methods use the engine's records and fenced writes)."""

    def ask_approval(self, lease: Lease, tool_name: str, tool_input: Any, timeout: float) -> PendingApproval:
        """Record a request of the sub-agent running under ``lease`` (fenced); event ``approval_requested``."""
        shown, cut = bounded_input(tool_input)
        now = utcnow()
        req = PendingApproval(request_id=f"a-{secrets.token_hex(4)}", tool_name=str(tool_name)[:200], input=shown,
                              input_truncated=cut, asked_at=now, expires_at=now + timedelta(seconds=timeout))  # fmt: skip
        self._fenced(lease, lambda r: {"pending_approvals": [*r.pending_approvals, req]})
        self.append_event(lease.task_id, "approval_requested", request_id=req.request_id, tool=req.tool_name,
                          expires_at=req.expires_at, epoch=lease.epoch)  # fmt: skip
        self.repo.signal("nudge")  # (waiters look now)
        return req

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
        """Answer a pending request, from any process or machine: exactly one answer wins (a second is refused,
        naming the first); an unknown or expired request is refused."""
        if decision not in ("allow", "deny"):
            raise InvalidOptionsError(f"decision {str(decision)[:40]!r} is neither 'allow' nor 'deny'")
        if updated_input is not None and (decision != "allow" or not isinstance(updated_input, dict)):
            raise InvalidOptionsError("updated_input goes with decision 'allow', as an object (the tool's new input)")
        who = by or answerer()
        added: list[ApprovalRule] = []

        def fn(r: TaskRecord) -> TaskRecord:
            added.clear()
            req = next((a for a in r.pending_approvals if a.request_id == request_id), None)
            if req is None or r.status != TaskStatus.RUNNING:
                raise ApprovalError(
                    f"task {task_id} has no pending request {request_id!r} (it is {r.status.value}; answered requests "
                    "leave once the sub-agent has its answer): list_approvals shows the pending ones"
                )
            if req.answer is not None:
                a = req.answer
                raise ApprovalError(
                    f"request {request_id} of task {task_id} was already answered: {a.decision} by {a.by} at "
                    f"{a.at:%Y-%m-%d %H:%M:%S} UTC"
                )
            if utcnow() >= req.expires_at:
                raise ApprovalError(
                    f"request {request_id} of task {task_id} expired at {req.expires_at:%Y-%m-%d %H:%M:%S} UTC and "
                    "was denied for want of an answer"
                )
            answer = ApprovalAnswer(decision=decision, message=message, updated_input=updated_input, by=who,
                                    remember=remember)  # fmt: skip
            rules = r.approval_rules
            if remember:
                if req.input_truncated or not isinstance(req.input, dict):
                    raise ApprovalError(
                        f"request {request_id} of task {task_id}: its input was too long to keep whole, so it cannot "
                        "be remembered as a rule (that would cover every call of the tool): answer without remember"
                    )
                try:
                    added.append(rule_for(req.tool_name, req.input, decision))
                except ValueError:
                    raise ApprovalError(
                        f"request {request_id} of task {task_id}: {req.tool_name!r} with that input cannot be written "
                        "as an approval rule: answer without remember"
                    ) from None
                rules = [*added, *rules][:100]
            pending = [a.model_copy(update={"answer": answer}) if a is req else a for a in r.pending_approvals]
            return r.model_copy(update={"pending_approvals": pending, "approval_rules": rules})

        try:
            self.update(validate_task_id(task_id), fn)
        except TaskNotFoundError:
            raise
        self.append_event(task_id, "approval_answered", request_id=request_id, decision=decision, by=who,
                          remember=remember or None)  # fmt: skip
        return ApprovalAnswered(task_id=task_id, request_id=request_id, decision=decision, by=who,
                                remembered=added[0] if added else None)  # fmt: skip

    def take_answer(self, lease: Lease, request_id: str) -> ApprovalAnswer | None:
        """The answer to a request of the sub-agent under ``lease``, taken off the record (fenced); a request whose
        time ran out is denied here (once: an answer that lands first wins). None: still waiting."""
        got: list[ApprovalAnswer] = []

        def changes(r: TaskRecord) -> dict:
            got.clear()
            req = next((a for a in r.pending_approvals if a.request_id == request_id), None)
            if req is None:
                got.append(ApprovalAnswer(decision="deny", message="the request is gone", by="cc-tasks"))
                return {}
            answer = req.answer
            if answer is None:
                seconds = (req.expires_at - req.asked_at).total_seconds()
                answer = ApprovalAnswer(decision="deny", by="timeout", message=(
                    f"no one answered this permission request within {seconds:.0f} seconds, so it was denied; "
                    "go on without it"))  # fmt: skip
            got.append(answer)
            return {"pending_approvals": [a for a in r.pending_approvals if a is not req]}

        r = self.read(lease.task_id, cached=True)
        req = next((a for a in r.pending_approvals if a.request_id == request_id), None)
        if req is not None and req.answer is None and utcnow() < req.expires_at:
            return None  # (a plain read: no write while it waits)
        self._fenced(lease, changes)
        if got and got[0].by == "timeout":
            self.append_event(lease.task_id, "approval_answered", request_id=request_id, decision="deny", by="timeout")
        return got[0] if got else None

    def rule_answer(
        self, record: TaskRecord, rules: list[ApprovalRule], tool_name: str, tool_input: Any
    ) -> ApprovalRule | None:
        """The rule that answers a request without asking: the task's own rules, then the answers remembered."""
        call = tool_input if isinstance(tool_input, dict) else {}
        return first_rule([*rules, *record.approval_rules], str(tool_name), call)

    def approvals(self, group: str | None = None) -> list[tuple[TaskRecord, PendingApproval]]:
        """Every request of the store (or of ``group``) still waiting for an answer, oldest first."""
        out = []
        for _, r in self.repo.unfinished()[1].values():
            if group is None or r.group == group:
                out.extend((r, a) for a in r.awaiting)
        return sorted(out, key=lambda x: (x[1].asked_at, x[1].request_id))

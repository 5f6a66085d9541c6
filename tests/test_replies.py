"""Every reply of every tool stays within REPLY_CHARS (the JSON of its structured content plus its text), whatever
the arguments and however big the tasks: 200 tasks with long names, errors and results of the characters JSON
escapes most, 16 KB of metadata each, and thousands of events."""

from __future__ import annotations

import json

import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError

from cc_tasks import worktrees
from cc_tasks.models import MAX_BATCH, REPLY_CHARS, Listing, TaskRecord, TaskStatus, Waited
from cc_tasks.replies import cut_json, fit_page, json_len, list_reply, wait_reply
from cc_tasks.server import create_server

from .test_coordination import cap
from .test_manager import fake
from .test_worktrees import make_repo

#: Characters JSON escapes the most: a control character (6 characters), a quote and a backslash (2), and one
#: outside the BMP (12, as json.dumps writes it).
WORST = '\x01"\\\U0001f600'
METADATA = {"m": "\x01" * 2_700}  # 16,209 characters of JSON: just under the 16 KB the options allow


def worst(n: int) -> str:
    return (WORST * n)[:n]


def size(res) -> int:
    return len(json.dumps(res.structured_content)) + sum(len(c.text) for c in res.content)


class Calls:
    """Calls tools, checks each reply's size, and keeps the largest per tool."""

    def __init__(self, client: Client):
        self.client = client
        self.largest: dict[str, int] = {}

    async def __call__(self, tool: str, args: dict):
        res = await self.client.call_tool(tool, args)
        n = size(res)
        assert n <= REPLY_CHARS, (tool, n)
        self.largest[tool] = max(n, self.largest.get(tool, 0))
        return res


def big_task(i: int, workdir) -> dict:
    """A task of the worst kind: long escaped name, key, prompt and result; every other one fails with a long
    error (its result, which the error quotes)."""
    cfg = {"repeat": ["\x01", 20_000]} | ({"is_error": True, "exit": 1} if i % 2 else {})
    return {
        "key": f"{i:03d}" + worst(97),
        "name": worst(200),
        "prompt": fake(cfg, text=worst(200)),
        "cwd": str(workdir),
        "metadata": METADATA,
    }


async def page_events(call, task_id: str) -> list[int]:
    seqs: list[int] = []
    since = 0
    while True:
        page = (await call("get_task_events", {"task_id": task_id, "since": since, "limit": 1000})).structured_content
        seqs += [ev["seq"] for ev in page["events"]]
        since = page["next"]
        if not page["more"]:
            return seqs


async def page_output(call, task_id: str, source: str) -> tuple[str, int]:
    text, offset, pages = "", 0, 0
    while True:
        args = {"task_id": task_id, "offset": offset, "limit": 20_000, "source": source}
        page = (await call("get_task_output", args)).structured_content
        text += page["text"]
        offset, pages = page["next_offset"], pages + 1
        if page["eof"]:
            return text, pages


async def page_list(call, include_finished: bool) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        args = {"include_finished": include_finished, "limit": 500} | ({"cursor": cursor} if cursor else {})
        page = (await call("list_active_tasks", args)).structured_content
        assert page["count"] == len(page["tasks"]) > 0
        seen += [t["task_id"] for t in page["tasks"]]
        if not page["more"]:
            assert page["next_cursor"] is None
            return seen
        cursor = page["next_cursor"]


async def test_every_reply_stays_bounded_with_200_big_tasks(fake_manager, workdir, monkeypatch, caplog):
    cap(fake_manager, monkeypatch, 8)
    store = fake_manager.store
    async with Client(create_server(fake_manager)) as client:
        call = Calls(client)
        res = await call("start_cc_tasks_batch", {"tasks": [big_task(i, workdir) for i in range(MAX_BATCH)]})
        ids = [t["task_id"] for t in res.structured_content["tasks"]]
        assert len(set(ids)) == MAX_BATCH and all(t in res.content[0].text for t in ids)
        assert (await fake_manager.wait(ids, timeout=100)).done

        # the records: the whole record, its result preview cut to fit
        for t in ids:
            rec = (await call("check_task_status", {"task_id": t})).structured_content
            assert rec["metadata"] == METADATA and rec["name"] == worst(200) and rec["result_truncated"]
            assert rec["result"] and rec["result_chars"] == 20_000
        failed = (await call("check_task_status", {"task_id": ids[1]})).structured_content
        assert failed["status"] == "failed" and "\x01" * 1000 in failed["error"]

        # waiting for all 200: every id in finished, the entries that fit (in the order given), then `more`
        waited = (await call("wait_for_tasks", {"task_ids": ids, "timeout_seconds": 5})).structured_content
        assert waited["done"] and waited["finished"] == ids and waited["pending"] == [] and waited["more"]
        assert [t["task_id"] for t in waited["tasks"]] == ids[: len(waited["tasks"])] and waited["tasks"]
        assert all(t["status"] in ("completed", "failed") for t in waited["tasks"])
        one = (await call("wait_for_tasks", {"task_ids": ids[:1], "timeout_seconds": 5})).structured_content
        assert not one["more"] and one["tasks"][0]["result"].startswith("\x01" * 100)

        # listing: the cursor reaches every task exactly once
        args = {"prompt": fake({"sleep": 60}), "cwd": str(workdir), "name": worst(200)}
        running = (await call("start_cc_task_async", args)).data
        everything = await page_list(call, include_finished=True)
        assert sorted(everything) == sorted(store.all_ids()) and len(everything) == len(set(everything)) == 201
        assert everything == sorted(everything, reverse=True)  # newest first
        assert await page_list(call, include_finished=False) == [running.task_id]

        # events: thousands, some huge; paged through, each exactly once
        for n in range(1_500):
            store.append_event(ids[0], "note", text=worst(100 if n % 3 else 2))
        store.append_event(ids[0], "note", text=worst(100_000))  # one event bigger than any reply
        total = sum(1 for _ in open(store.path(ids[0], "events.jsonl"), "rb"))
        assert await page_events(call, ids[0]) == list(range(total))

        # output: pages of the most-escaped text, then of its transcript, put back together exactly
        pages = {}
        epoch = store.read(ids[0]).epoch  # (a result is stored under the claim that made it)
        for source, name in (
            ("result", f"result.{epoch}.txt"),
            ("transcript", "stdout.jsonl"),
            ("stderr", "stderr.log"),
        ):
            text, pages[source] = await page_output(call, ids[0], source)
            assert text == store.path(ids[0], name).read_bytes().decode()
        assert pages["result"] > 1 and pages["transcript"] > 1

        # the rest of the tools, with their longest arguments
        cont = await call("continue_task", {"task_id": ids[0], "prompt": fake({"repeat": ["\x01", 20_000]})})
        await call("continue_task", {"task_id": ids[0], "prompt": fake(), "name": worst(200)})
        task = big_task(1, workdir)
        del task["key"]
        rec = (await call("execute_cc_task", task)).structured_content
        assert rec["status"] == "failed" and rec["result"] and rec["metadata"] == METADATA
        assert "strings cut" not in caplog.text  # so far every reply fitted by its shape, no string cut
        # a field far beyond its usual size (the model name): the record's long strings are cut, the result kept
        rec = (await call("execute_cc_task", task | {"model": "\x01" * 30_000})).structured_content
        assert rec["status"] == "failed" and rec["result"] and len(rec["model"]) <= 2_000
        await call("get_server_info", {})
        assert (await call("cancel_task", {"task_id": running.task_id})).data.status == TaskStatus.CANCELLED
        await call("cancel_task", {"task_id": ids[1]})
        await call("cleanup_task", {"task_id": cont.data.task_id})

        # the task board, with its biggest arguments: a long prompt, dependency results, long notes
        deps = [t for t in ids if fake_manager.get(t).status == TaskStatus.COMPLETED][:100]
        post = {"prompt": worst(50_000), "name": worst(200), "metadata": METADATA, "group": "big",
                "depends_on": deps, "include_dependency_results": True}  # fmt: skip
        posted = (await call("post_task", post)).structured_content["task_id"]
        claimed = (await call("claim_task", {"worker": "w" * 100, "lease_seconds": 60})).structured_content
        assert claimed["task_id"] == posted and claimed["prompt_truncated"] and claimed["dependency_results"]
        await call("renew_task", {"task_id": posted, "lease": claimed["lease"], "note": worst(10_000)})
        done = await call("complete_task", {"task_id": posted, "lease": claimed["lease"], "result": worst(1_000_000)})
        assert done.structured_content["result_truncated"] and done.structured_content["result_chars"] == 1_000_000
        again = (await call("post_task", {"prompt": "x", "group": "big"})).structured_content["task_id"]
        lease = (await call("claim_task", {"worker": "w"})).structured_content["lease"]
        await call("release_task", {"task_id": again, "lease": lease})
        lease = (await call("claim_task", {"worker": "w"})).structured_content["lease"]
        await call("fail_task", {"task_id": again, "lease": lease, "error": worst(100_000)})
        for n in range(30):  # (a note holds 10,000 characters, 15,000 as JSON: the most of both kinds)
            text = "y" * 10_000 if n % 3 else worst(2_000)[:2_400]
            await call("add_note", {"group": "big", "text": text, "key": "k" * 100 if n % 2 else None})
        with pytest.raises(ToolError, match="a note holds at most"):
            await client.call_tool("add_note", {"group": "big", "text": worst(10_000)})
        await call("get_notes", {"group": "big", "limit": 1000})
        await call("cancel_task", {"group": "big"})
        # a worktree task whose diff is of the most-escaped text, with the longest name and metadata: its record,
        # its entry, its diff pages (put back together exactly), its merge and its cleanup
        repo = make_repo(workdir.parent / "repo")
        args = {"prompt": fake({"files": {"big.txt": worst(60_000)}}), "cwd": str(repo), "worktree": True}
        wt_task = (await call("start_cc_task_async", args | {"name": worst(200), "metadata": METADATA})).data.task_id
        one = (await call("wait_for_tasks", {"task_ids": [wt_task], "timeout_seconds": 60})).structured_content
        assert one["done"] and one["tasks"][0]["changes"] == "1 file changed, +1 -0, 1 uncommitted"
        rec = (await call("check_task_status", {"task_id": wt_task})).structured_content
        assert rec["changes"]["files_changed"] == 1 and rec["worktree"]["branch"] == f"worktree-{wt_task}"
        text, offset, pages = "", 0, 0
        while True:
            args = {"task_id": wt_task, "offset": offset, "limit": 20_000}
            page = (await call("get_task_diff", args)).structured_content
            text, offset, pages = text + page["text"], page["next_offset"], pages + 1
            if page["eof"]:
                break
        _, whole, total = worktrees.diff(fake_manager.get(wt_task).worktree, 0, 1 << 20)
        assert text == whole.decode() and offset == total and pages > 5
        merged = await call("merge_task", {"task_id": wt_task, "strategy": "squash", "message": "m" * 10_000})
        assert merged.structured_content["leftovers_committed"]
        await call("cleanup_task", {"task_id": wt_task, "keep_branch": True})
        # sub-agents that ask: 60 pending requests of an agent's task, with inputs of the most-escaped text (each
        # cut to its bound) and the longest tool names, listed page by page, then answered with the longest message
        asker = (await call("post_task", {"prompt": "ask", "group": "asks", "name": worst(200)})).structured_content
        await call("claim_task", {"worker": "asker", "group": "asks", "lease_seconds": 600})
        lease = store.read(asker["task_id"]).lease
        asked = [store.ask_approval(lease, worst(300) if n % 7 == 3 else "Bash",
                                    {"command": "x" * 1_500 if n == 0 else worst(30_000), "n": n}, 600).request_id
                 for n in range(60)]  # fmt: skip
        seen, cursor, pages = [], None, 0
        while True:
            args = {"group": "asks"} | ({"cursor": cursor} if cursor else {})
            page = (await call("list_approvals", args)).structured_content
            assert page["approvals"] and all(a["task_id"] == asker["task_id"] for a in page["approvals"])
            seen, pages = seen + [a["request_id"] for a in page["approvals"]], pages + 1
            if not page["more"]:
                assert page["next_cursor"] is None
                break
            cursor = page["next_cursor"]
        assert seen == asked and pages > 2  # every request exactly once, oldest first
        assert (await call("list_approvals", {})).structured_content["more"]
        assert (await call("list_approvals", {"group": "nobody"})).structured_content["approvals"] == []
        args = {"task_id": asker["task_id"], "request_id": asked[0], "decision": "allow", "remember": True}
        got = (await call("answer_approval", args)).structured_content
        assert got["remembered"]["tool"].startswith("Bash(") and len(got["remembered"]["tool"]) > 1_000
        deny = {"task_id": asker["task_id"], "request_id": asked[1], "decision": "deny", "message": worst(2_000)}
        cut = await client.call_tool("answer_approval", deny | {"remember": True}, raise_on_error=False)
        assert cut.is_error and "cannot be remembered" in cut.content[0].text  # (its input was cut: not a rule)
        await call("answer_approval", deny)
        res = await client.call_tool("answer_approval", deny, raise_on_error=False)  # a second answer: refused
        assert res.is_error and "already answered" in res.content[0].text and size(res) <= REPLY_CHARS
        await call("cancel_task", {"group": "asks"})

        # budgets: a group's, set, shown and removed
        await call("set_budget", {"budget_usd": 1_000_000, "group": "big"})
        await call("get_budget", {"group": "big"})
        await call("set_budget", {"budget_usd": None, "group": "big"})
        tools = {t.name for t in await client.list_tools()}
    assert set(call.largest) == tools
    print("largest reply per tool (characters):", json.dumps(call.largest, indent=1, sort_keys=True))


async def test_a_batch_over_the_limit_is_refused_naming_it(fake_manager, workdir):
    tasks = [{"prompt": fake(), "cwd": str(workdir)}] * (MAX_BATCH + 1)
    async with Client(create_server(fake_manager)) as client:
        with pytest.raises(ToolError, match=f"at most {MAX_BATCH}"):
            await client.call_tool("start_cc_tasks_batch", {"tasks": tasks})
        with pytest.raises(ToolError, match="cursor"):
            await client.call_tool("list_active_tasks", {"cursor": "../etc"})
    assert list(fake_manager.store.all_ids()) == []


@pytest.mark.parametrize(
    "tool, args, says",
    [
        ("start_cc_task_async", {"prompt": "x", "cwd": "/no" + WORST * 30_000}, "give an existing directory"),
        ("start_cc_task_async", {"prompt": "x", "env": {WORST * 30_000: "x"}}, "not a valid variable name"),
        ("start_cc_task_async", {"prompt": "x", "bogus" + WORST * 30_000: 1}, "Unexpected keyword argument"),
        ("list_active_tasks", {"cursor": WORST * 30_000}, "pass its next_cursor"),
        ("wait_for_tasks", {"task_ids": [WORST * 30_000]}, "invalid task id"),
    ],
)
async def test_errors_stay_bounded_and_say_what_to_do(fake_manager, tool, args, says):
    async with Client(create_server(fake_manager)) as client:
        res = await client.call_tool(tool, args, raise_on_error=False)
    assert res.is_error and says in res.content[0].text and size(res) <= REPLY_CHARS


def record(n: int, result: str, **fields) -> TaskRecord:
    return TaskRecord(
        task_id=f"20260101-000000-{n // 1000:03d}-{n % 1000:08x}",
        cwd="/",
        timeout_seconds=1,
        status=TaskStatus.COMPLETED,
        result=result,
        result_chars=len(result),
        **fields,
    )


def test_wait_shortens_previews_before_leaving_tasks_out():
    few = wait_reply(Waited(done=True, timed_out=False, finished=["a"], pending=[], tasks=[record(1, "r" * 9_000)]))
    assert len(few.data["tasks"][0]["result"]) == 4_000 and not few.data["more"]
    tasks = [record(n, "r" * 9_000) for n in range(40)]
    ids = [t.task_id for t in tasks]
    forty = wait_reply(Waited(done=True, timed_out=False, finished=ids, pending=[], tasks=tasks))
    assert len(forty.data["tasks"]) == 40 and 100 <= len(forty.data["tasks"][0]["result"]) < 600
    assert forty.size <= REPLY_CHARS


def test_list_stops_at_the_budget_with_a_cursor():
    tasks = [record(n, worst(5_000), name=worst(200), error=worst(2_000)) for n in range(500, 0, -1)]
    reply = list_reply(Listing(tasks=tasks, more=False))
    shown = reply.data["tasks"]
    assert reply.size <= REPLY_CHARS and 0 < len(shown) < 500 and reply.data["more"]
    assert reply.data["next_cursor"] == shown[-1]["task_id"] and reply.text.endswith(
        f'cursor="{shown[-1]["task_id"]}" for the next tasks'
    )
    assert list_reply(Listing(tasks=tasks[:1], more=False)).data["next_cursor"] is None


def test_cuts_count_the_encoded_length():
    text = worst(10_000)
    for chars in (0, 1, 7, 1_000, 33_333):
        cut = cut_json(text, chars)
        assert json_len(cut) <= max(chars, 2) and text.startswith(cut)
        assert cut == text or json_len(text[: len(cut) + 1]) > chars
    data = ("é\x01" * 10_000).encode()

    def cost(n: int) -> int:
        page = data[:n].decode("utf-8", "replace")
        return json_len(page) + len(page)

    n = fit_page(data, 20_000)
    assert cost(n) <= 20_000 < cost(n + 1)


def test_list_approvals_pages_past_an_input_of_characters_outside_the_bmp():
    from datetime import timedelta

    from cc_tasks.models import ApprovalEntry, ApprovalList, utcnow
    from cc_tasks.replies import approvals_reply

    now = utcnow()
    entries = [ApprovalEntry(task_id=record(1, "").task_id, request_id=f"a-{n:08x}", tool_name="Write",
                             input_preview="\U0001f600" * 4_000, input_truncated=True, asked_at=now,
                             expires_at=now + timedelta(minutes=10)) for n in range(3)]  # fmt: skip
    reply = approvals_reply(ApprovalList(approvals=entries))
    assert reply.size <= REPLY_CHARS and (reply.data["approvals"] or reply.data["next_cursor"])

"""Sub-agents in git worktrees of their own (option ``worktree``): real git, and the real claude CLI (its
``--worktree``) against the mock API for the parallel-edit workflow; the fake claude, which emulates
``--worktree`` as the pinned CLI does it, for merge strategies and cleanup cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError

from cc_tasks import worktrees
from cc_tasks.errors import InvalidOptionsError, MergeRefusedError
from cc_tasks.models import PostOptions, TaskOptions, TaskStatus, WorktreeInfo
from cc_tasks.server import create_server

from .conftest import ROOT, mock_prompt
from .test_coordination import cap
from .test_manager import fake, run, wait_until


def git(repo: Path | str, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def make_repo(path: Path) -> Path:
    """A repository with one commit: shared.txt of three lines (and an identity of its own)."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "Test")
    git(path, "config", "user.email", "test@localhost")
    (path / "shared.txt").write_text("line1\nline2\nline3\n")
    (path / "sub").mkdir()
    (path / "sub" / "keep.txt").write_text("keep\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def checkout_state(repo: Path) -> tuple[str, str, bool]:
    """HEAD, the whole status (untracked and ignored files included), and whether a merge is under way."""
    status = git(repo, "status", "--porcelain=v1", "--untracked-files=all", "--ignored=no")
    return git(repo, "rev-parse", "HEAD"), status, (repo / ".git" / "MERGE_HEAD").exists()


def worktree_paths(repo: Path) -> list[str]:
    return [
        line.split(" ", 1)[1]
        for line in git(repo, "worktree", "list", "--porcelain").splitlines()
        if line.startswith("worktree ")
    ]


def branches(repo: Path) -> set[str]:
    return set(git(repo, "branch", "--format=%(refname:short)").split())


@pytest.fixture
def repo(tmp_path) -> Path:
    return make_repo(tmp_path / "repo")


def data(result) -> dict:
    return result.structured_content


def edit(who: str, barrier: Path, commit: bool) -> str:
    """A Bash step: say it started, wait (bounded) for the other task to start too, then edit line 2 of
    shared.txt; commit it or leave it uncommitted."""
    other = "B" if who == "A" else "A"
    git_commit = f" && git commit -qam '{who}: edit line 2'" if commit else ""
    return (
        f"touch {barrier}/{who}; for i in $(seq 200); do [ -e {barrier}/{other} ] && break; sleep 0.05; done; "
        f"[ -e {barrier}/{other} ] && echo saw-{other}; "
        f"sed -i 's/^line2$/line2 from {who}/' shared.txt{git_commit} && echo {who}-done"
    )


@pytest.mark.timeout(110)
async def test_parallel_edits_in_worktrees_merge_then_conflict_then_cleanup(manager, repo, tmp_path, monkeypatch):
    cap(manager, monkeypatch, 4)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    before = checkout_state(repo)
    base = before[0]
    async with Client(create_server(manager)) as client:
        tasks = [
            {
                "key": who,
                "name": f"edit {who}",
                "prompt": mock_prompt([{"bash": edit(who, barrier, commit=who == "A")}, {"text": "{last_result}"}]),
                "cwd": str(repo),
                "allowed_tools": ["Bash"],
                "worktree": True,
            }
            for who in ("A", "B")
        ]
        started = data(await client.call_tool("start_cc_tasks_batch", {"tasks": tasks}))["tasks"]
        a, b = (t["task_id"] for t in started)
        waited = data(await client.call_tool("wait_for_tasks", {"task_ids": [a, b], "timeout_seconds": 90}))
        assert waited["done"] and [t["status"] for t in waited["tasks"]] == ["completed", "completed"], waited
        # both ran at once (each saw the other start), each in its own worktree
        ra, rb = [data(await client.call_tool("check_task_status", {"task_id": t})) for t in (a, b)]
        assert "saw-B" in ra["result"] and "A-done" in ra["result"], ra["result"]
        assert "saw-A" in rb["result"] and "B-done" in rb["result"], rb["result"]
        for r in (ra, rb):
            wt = r["worktree"]
            assert wt["path"] == str(repo / ".claude" / "worktrees" / r["task_id"])
            assert wt["branch"] == f"worktree-{r['task_id']}" and wt["base_commit"] == base
            assert wt["repo"] == str(repo) and wt["name"] == r["task_id"] and r["cwd"] == str(repo)
        # the stat at a glance: in the record, and one line in the wait's entries
        assert ra["changes"] | {"computed_at": None, "head_commit": None} == {
            "files_changed": 1,
            "insertions": 1,
            "deletions": 1,
            "committed": True,
            "commits": 1,
            "uncommitted_files": 0,
            "head_commit": None,
            "files": [{"path": "shared.txt", "insertions": 1, "deletions": 1}],
            "files_truncated": False,
            "computed_at": None,
        }
        assert rb["changes"]["committed"] is False and rb["changes"]["uncommitted_files"] == 1
        assert (rb["changes"]["files_changed"], rb["changes"]["insertions"], rb["changes"]["deletions"]) == (1, 1, 1)
        assert [t["changes"] for t in waited["tasks"]] == [
            "1 file changed, +1 -1, 1 commit",
            "1 file changed, +1 -1, 1 uncommitted",
        ]
        # the pinned CLI leaves its worktrees locked; the user's checkout did not change at all
        listed = git(repo, "worktree", "list", "--porcelain")
        assert listed.count("locked claude session") == 2, listed
        assert checkout_state(repo) == before and before[1] == ""
        assert (repo / "shared.txt").read_text() == "line1\nline2\nline3\n"
        assert "/.claude/worktrees/" in (repo / ".git" / "info" / "exclude").read_text().splitlines()
        assert git(repo, "status", "--porcelain", "--ignored").splitlines() == ["!! .claude/"]

        # the diff: stat first, then the patch; pages put together are the whole of it
        whole = data(await client.call_tool("get_task_diff", {"task_id": a}))
        assert whole["eof"] and whole["offset"] == 0 and whole["next_offset"] == whole["total_bytes"]
        assert " shared.txt | 2 +-" in whole["text"] and "-line2\n+line2 from A\n" in whole["text"]
        assert whole["base_commit"] == base and whole["head_commit"] == ra["changes"]["head_commit"]
        text, offset = "", 0
        while True:
            page = data(await client.call_tool("get_task_diff", {"task_id": a, "offset": offset, "limit": 40}))
            text, offset = text + page["text"], page["next_offset"]
            if page["eof"]:
                break
        assert text == whole["text"]
        assert "+line2 from B" in data(await client.call_tool("get_task_diff", {"task_id": b}))["text"]  # uncommitted

        # merging the first brings it in ...
        merged = data(await client.call_tool("merge_task", {"task_id": a}))
        assert merged["target_branch"] == "main" and merged["before"] == base and merged["files_changed"] == 1
        head_after_a = git(repo, "rev-parse", "HEAD")
        assert merged["head"] == head_after_a != base
        assert git(repo, "rev-list", "--parents", "-n", "1", "HEAD").count(" ") == 2  # a merge commit
        assert (repo / "shared.txt").read_text() == "line1\nline2 from A\nline3\n"
        after_a = checkout_state(repo)
        assert after_a[1] == "" and not after_a[2]
        # ... the second conflicts: refused, naming the file, and the repository is exactly as it was
        b_tip = git(repo, "rev-parse", f"worktree-{b}")
        with pytest.raises(ToolError, match="conflict") as conflict:
            await client.call_tool("merge_task", {"task_id": b})
        assert "shared.txt" in str(conflict.value) and "exactly as it was" in str(conflict.value)
        assert checkout_state(repo) == after_a
        assert (repo / "shared.txt").read_text() == "line1\nline2 from A\nline3\n"
        # and so is the task's worktree: its change still uncommitted, its branch where it was
        assert git(rb["worktree"]["path"], "status", "--porcelain") == "M shared.txt"
        assert git(repo, "rev-parse", f"worktree-{b}") == b_tip
        record_a = data(await client.call_tool("check_task_status", {"task_id": a}))
        assert record_a["worktree"]["merged"]["target_branch"] == "main"
        assert record_a["worktree"]["merged"]["strategy"] == "merge"

        # cleanup: worktrees removed (unlocked first); the unmerged branch deleted, the merged one kept
        gone_b = data(await client.call_tool("cleanup_task", {"task_id": b}))
        assert gone_b["worktree_removed"] and gone_b["branch_deleted"], gone_b
        gone_a = data(await client.call_tool("cleanup_task", {"task_id": a}))
        assert gone_a["worktree_removed"] and not gone_a["branch_deleted"] and "merged" in gone_a["worktree_note"]
    assert worktree_paths(repo) == [str(repo)]
    assert branches(repo) == {"main", f"worktree-{a}"}
    assert checkout_state(repo) == after_a
    assert not any((repo / ".claude" / "worktrees").iterdir())


async def test_cwd_outside_a_repository_is_refused(manager, workdir, tmp_path):
    with pytest.raises(InvalidOptionsError, match="not inside a git work tree"):
        manager.start(TaskOptions(prompt="x", cwd=str(workdir), worktree=True))
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(InvalidOptionsError, match="no commit yet"):
        manager.start(TaskOptions(prompt="x", cwd=str(empty), worktree=True))
    async with Client(create_server(manager)) as client:
        tasks = [{"prompt": "fine", "cwd": str(tmp_path)}, {"prompt": "x", "cwd": str(workdir), "worktree": True}]
        with pytest.raises(ToolError, match="worktree: .* is not inside a git work tree"):
            await client.call_tool("start_cc_tasks_batch", {"tasks": tasks})
    assert list(manager.store.all_ids()) == []  # nothing written
    assert not (empty / ".git" / "info" / "exclude").read_text().count("/.claude/worktrees/")


@pytest.mark.timeout(90)
async def test_a_dirty_checkout_refuses_the_merge(manager, repo):
    steps = [{"bash": "echo new-line >> shared.txt && echo made > made.txt"}, {"text": "edited"}]
    r = await run(manager, TaskOptions(prompt=mock_prompt(steps), cwd=str(repo), allowed_tools=["Bash"], worktree=True))
    assert r.status == TaskStatus.COMPLETED and r.changes.files_changed == 2 and r.changes.uncommitted_files == 2
    (repo / "sub" / "keep.txt").write_text("the user's own edit\n")
    (repo / "untracked.txt").write_text("the user's\n")
    before = checkout_state(repo)
    with pytest.raises(MergeRefusedError, match=r"uncommitted changes \(1 file\(s\): sub/keep.txt\)"):
        manager.merge(r.task_id)
    assert checkout_state(repo) == before and (repo / "sub" / "keep.txt").read_text() == "the user's own edit\n"
    assert manager.get(r.task_id).worktree.merged is None
    git(repo, "checkout", "--", "sub/keep.txt")  # once clean (an untracked file is no obstacle) it merges
    res = manager.merge(r.task_id, strategy="squash", message="Squashed: the sub-agent's edit")
    assert res.leftovers_committed and res.files_changed == 2
    assert git(repo, "log", "-1", "--format=%s") == "Squashed: the sub-agent's edit"
    assert (repo / "made.txt").read_text() == "made\n" and (repo / "untracked.txt").exists()


@pytest.mark.timeout(100)
async def test_continue_task_resumes_in_the_same_worktree(manager, repo):
    first = [{"bash": "echo one > one.txt && pwd"}, {"text": "first in {last_result}"}]
    parent = await run(
        manager, TaskOptions(prompt=mock_prompt(first), cwd=str(repo), allowed_tools=["Bash"], worktree=True)
    )
    assert parent.status == TaskStatus.COMPLETED and parent.result == f"first in {parent.worktree.path}"
    second = [{"bash": "echo two > two.txt && pwd && git status --porcelain"}, {"text": "{history}: {last_result}"}]
    child = manager.continue_task(parent.task_id, mock_prompt(second))
    res = await manager.wait([child.task_id], timeout=60)
    done = res.tasks[0]
    assert done.status == TaskStatus.COMPLETED, done.error
    # the same session (its earlier turns are there) in the same worktree, on the same branch
    history, _, where = done.result.splitlines()[0].partition(": ")
    assert int(history) >= 1 and where == parent.worktree.path
    assert done.result.splitlines()[1:] == ["?? one.txt", "?? two.txt"]
    assert done.worktree.name == parent.task_id and done.worktree.path == parent.worktree.path
    assert done.worktree.base_commit == parent.worktree.base_commit
    assert (done.changes.files_changed, done.changes.uncommitted_files) == (2, 2)
    assert checkout_state(repo)[1] == ""
    with pytest.raises(InvalidOptionsError, match="resumes there"):
        manager.continue_task(parent.task_id, "again", worktree=False)


# -- with the fake claude (it emulates --worktree as the pinned CLI does) -----------------------------------


def fake_task(repo: Path, **cfg) -> TaskOptions:
    return TaskOptions(prompt=fake(cfg), cwd=str(repo), worktree=True)


async def test_merge_strategies_squash_and_rebase_and_a_rebase_conflict(fake_manager, repo):
    m = fake_manager
    one = await run(m, fake_task(repo, files={"one.txt": "1\n"}, commit="one", dirty={"one-more.txt": "x\n"}))
    two = await run(m, fake_task(repo, files={"two.txt": "2\n"}, commit="two: a\n\nbody"))
    clash = await run(m, fake_task(repo, files={"shared.txt": "theirs\n"}, commit="clash"))
    assert one.changes.commits == 1 and one.changes.uncommitted_files == 1 and one.changes.files_changed == 2
    base = git(repo, "rev-parse", "HEAD")
    # squash: one commit on main with both the committed and the uncommitted file
    res = m.merge(one.task_id, strategy="squash")
    assert res.leftovers_committed and git(repo, "rev-list", "--count", f"{base}..HEAD") == "1"
    assert sorted(git(repo, "show", "--name-only", "--format=", "HEAD").split()) == ["one-more.txt", "one.txt"]
    # the task's branch took the leftovers' commit, and its worktree is clean
    wt_one = m.get(one.task_id).worktree
    assert git(wt_one.path, "status", "--porcelain") == ""
    assert git(repo, "log", "-1", "--format=%s", wt_one.branch).startswith("Changes task")
    # merging it again: nothing to do, refused
    with pytest.raises(MergeRefusedError, match="already merged into main"):
        m.merge(one.task_id)
    # rebase: its commit replayed on top of main, then a fast-forward: a straight history
    main_before = git(repo, "rev-parse", "HEAD")
    res = m.merge(two.task_id, strategy="rebase")
    assert git(repo, "rev-list", "--parents", "-n", "1", "HEAD").split()[1:] == [main_before]
    assert git(repo, "log", "-1", "--format=%s") == "two: a" and res.head == git(repo, "rev-parse", "HEAD")
    assert git(repo, "rev-parse", f"worktree-{two.task_id}") == res.head
    assert m.get(two.task_id).worktree.base_commit == main_before
    # a rebase that conflicts: undone, nothing changed anywhere
    (repo / "shared.txt").write_text("ours\n")
    git(repo, "commit", "-qam", "ours")
    before, clash_tip = checkout_state(repo), git(repo, "rev-parse", f"worktree-{clash.task_id}")
    with pytest.raises(MergeRefusedError, match="conflict in 1 file\\(s\\).*shared.txt"):
        m.merge(clash.task_id, strategy="rebase")
    assert checkout_state(repo) == before and git(repo, "rev-parse", f"worktree-{clash.task_id}") == clash_tip
    assert sorted(worktree_paths(repo)) == sorted(
        [str(repo)] + [str(repo / ".claude" / "worktrees" / t.task_id) for t in (one, two, clash)]
    )
    # squash conflicts too: undone
    with pytest.raises(MergeRefusedError, match="shared.txt"):
        m.merge(clash.task_id, strategy="squash")
    assert checkout_state(repo) == before


async def test_merge_refused_unless_completed_and_never_half_done(fake_manager, repo):
    failed = await run(fake_manager, fake_task(repo, files={"x.txt": "x\n"}, is_error=True, exit=1))
    assert failed.status == TaskStatus.FAILED and failed.changes.files_changed == 1
    before = checkout_state(repo)
    with pytest.raises(MergeRefusedError, match="is failed: only a task that ended completed is merged"):
        fake_manager.merge(failed.task_id)
    plain = await run(fake_manager, TaskOptions(prompt=fake(), cwd=str(repo)))
    with pytest.raises(InvalidOptionsError, match="did not run in a worktree"):
        fake_manager.merge(plain.task_id)
    with pytest.raises(InvalidOptionsError, match="did not run in a worktree"):
        fake_manager.diff(plain.task_id)
    nothing = await run(fake_manager, fake_task(repo))
    assert nothing.changes.files_changed == 0 and nothing.changes.committed is False
    with pytest.raises(MergeRefusedError, match="changed nothing"):
        fake_manager.merge(nothing.task_id)
    git(repo, "checkout", "-q", "--detach")
    done = await run(fake_manager, fake_task(repo, files={"y.txt": "y\n"}))
    with pytest.raises(MergeRefusedError, match="detached HEAD"):
        fake_manager.merge(done.task_id)
    git(repo, "checkout", "-q", "main")
    assert checkout_state(repo) == before


async def test_merges_into_one_repository_are_serialised(fake_manager, repo, monkeypatch):
    cap(fake_manager, monkeypatch, 4)
    tasks = [fake_manager.start(fake_task(repo, files={f"f{i}.txt": f"{i}\n"}, commit=f"f{i}")) for i in range(4)]
    res = await fake_manager.wait([t.task_id for t in tasks], timeout=60)
    assert res.done and all(t.status == TaskStatus.COMPLETED for t in res.tasks)
    base = git(repo, "rev-parse", "HEAD")
    errors, results = [], []

    def merge(t):
        try:
            results.append(fake_manager.merge(t.task_id))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=merge, args=(t,)) for t in tasks]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors and len(results) == 4
    assert git(repo, "rev-list", "--merges", "--count", f"{base}..HEAD") == "4"
    assert sorted(p.name for p in repo.glob("f*.txt")) == ["f0.txt", "f1.txt", "f2.txt", "f3.txt"]
    assert checkout_state(repo)[1] == ""


async def test_cleanup_never_touches_a_worktree_a_running_task_works_in(fake_manager, repo, tmp_path):
    parent = await run(fake_manager, fake_task(repo, files={"p.txt": "p\n"}))
    go = tmp_path / "go"
    child = fake_manager.continue_task(parent.task_id, fake({"wait_file": str(go), "files": {"c.txt": "c\n"}}))
    wait_until(lambda: fake_manager.get(child.task_id).status == TaskStatus.RUNNING)
    res = fake_manager.cleanup(parent.task_id)
    assert res.deleted and res.worktree_removed is False and child.task_id in res.worktree_note
    assert os.path.isdir(parent.worktree.path)
    go.touch()
    done = (await fake_manager.wait([child.task_id], timeout=30)).tasks[0]
    assert done.status == TaskStatus.COMPLETED and done.changes.files_changed == 2
    res = fake_manager.cleanup(child.task_id, keep_branch=True)
    assert res.worktree_removed and not res.branch_deleted and "keep_branch" in res.worktree_note
    assert worktree_paths(repo) == [str(repo)] and f"worktree-{parent.task_id}" in branches(repo)


async def test_a_removed_worktree_is_not_resumed_and_its_branch_is_safe(fake_manager, repo):
    t = await run(fake_manager, fake_task(repo, files={"a.txt": "a\n"}, commit="a"))
    tip = git(repo, "rev-parse", t.worktree.branch)
    git(repo, "worktree", "unlock", t.worktree.path)
    git(repo, "worktree", "remove", "--force", t.worktree.path)
    assert worktrees.orphan_branch(t.worktree)  # claude --worktree would reset it to HEAD
    with pytest.raises(InvalidOptionsError, match="is gone"):
        fake_manager.continue_task(t.task_id, "more")
    # its diff still reads the branch; the commits are there
    page = fake_manager.diff(t.task_id)
    assert "+a" in page.text and page.head_commit == tip and page.eof


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cc_tasks", *args], capture_output=True, text=True, timeout=timeout, cwd=str(ROOT)
    )


async def test_cli_show_diff_merge_and_cleanup_older_than(fake_manager, repo):
    t = await run(fake_manager, fake_task(repo, files={"a.txt": "alpha\n", "shared.txt": "new\n"}))
    shown = cli("show", t.task_id)
    assert shown.returncode == 0, shown.stderr
    assert "2 files changed, +2 -3, 2 uncommitted" in shown.stdout and f"worktree-{t.task_id}" in shown.stdout
    assert "a.txt" in shown.stdout and "+1 -0" in shown.stdout
    assert json.loads(cli("show", t.task_id, "--json").stdout)["changes"]["files_changed"] == 2
    whole = cli("diff", t.task_id)
    assert whole.returncode == 0 and whole.stdout == fake_manager.diff(t.task_id).text
    assert " 2 files changed, 2 insertions(+), 3 deletions(-)" in whole.stdout and "+alpha" in whole.stdout
    part = cli("diff", t.task_id, "--limit", "10")
    assert part.stdout == whole.stdout[:10] and "--offset 10" in part.stderr
    assert cli("diff", t.task_id, "--offset", "10").stdout == whole.stdout[10:]
    merged = cli("merge", t.task_id, "--strategy", "squash", "-m", "from the cli")
    assert merged.returncode == 0 and "merged" in merged.stdout, merged.stderr
    assert (repo / "a.txt").read_text() == "alpha\n" and git(repo, "log", "-1", "--format=%s") == "from the cli"
    ran = cli("run", fake({"files": {"b.txt": "b\n"}}), "--cwd", str(repo / "sub"), "--worktree", "--wait", "--json")
    assert ran.returncode == 0, ran.stderr
    other = fake_manager.get(json.loads(ran.stdout)["task_id"])
    assert other.worktree.repo == str(repo) and other.changes.files_changed == 1
    gone = cli("cleanup", "--older-than", "0s")
    assert gone.returncode == 0 and "deleted 2 finished task(s)" in gone.stdout, gone.stdout + gone.stderr
    assert "worktree removed, branch deleted" in gone.stdout
    assert worktree_paths(repo) == [str(repo)]
    assert branches(repo) == {"main", f"worktree-{t.task_id}"}  # the merged one's branch is kept
    assert other.worktree.branch not in branches(repo)
    assert cli("diff", t.task_id).returncode == 2


async def test_changes_missing_from_a_record_are_computed_when_read(fake_manager, repo):
    t = await run(fake_manager, fake_task(repo, files={"a.txt": "a\n"}))
    fake_manager.store.annotate(t.task_id, changes=None)  # as when a worker was lost, or git failed, at its end
    assert fake_manager.get_quick(t.task_id) is None  # (check_task_status then reads it off the event loop)
    assert fake_manager.get(t.task_id).changes.files_changed == 1
    assert fake_manager.store.read(t.task_id).changes.files_changed == 1  # and kept
    assert fake_manager.get_quick(t.task_id).changes.uncommitted_files == 1


def test_the_base_commit_is_where_the_branch_was_made(repo):
    """HEAD may move between the supervisor reading it and claude making the branch: the branch's reflog says
    where it was made, and the task that made it takes that."""
    first = git(repo, "rev-parse", "HEAD")
    git(repo, "commit", "-q", "--allow-empty", "-m", "moved on")
    second = git(repo, "rev-parse", "HEAD")
    info = worktrees.for_task(str(repo / "sub"), "20260101-000000-000-1a2b3c4d")
    assert info.repo == str(repo) and info.path == str(repo / ".claude" / "worktrees" / info.name)
    git(repo, "worktree", "add", "-q", "-b", info.branch, info.path, "HEAD")
    git(info.path, "commit", "-q", "--allow-empty", "-m", "the agent's")
    recorded = info.model_copy(update={"base_commit": first, "path": "/elsewhere"})
    assert worktrees.locate(recorded, made_here=True).base_commit == second
    assert worktrees.locate(recorded, made_here=True).path == info.path
    assert worktrees.locate(recorded, made_here=False).base_commit == first  # a continuation keeps its parent's
    linked = repo.parent / "linked"
    git(repo, "worktree", "add", "-q", "-b", "side", str(linked))
    (linked / "sub").mkdir(exist_ok=True)
    other = worktrees.for_task(str(linked / "sub"), "20260101-000000-000-00000002")
    # from a linked worktree: it merges into that checkout, but claude makes the worktree in the main one
    assert other.repo == str(linked) and other.path.startswith(str(repo / ".claude" / "worktrees"))


async def test_a_worktree_task_that_never_ran(fake_manager, repo):
    queued = fake_manager.start(TaskOptions(prompt=fake(), cwd=str(repo), worktree=True, labels=["nobody-has-it"]))
    assert queued.status == TaskStatus.QUEUED and queued.worktree.base_commit is None
    with pytest.raises(InvalidOptionsError, match="has not started in its worktree: nothing to show"):
        fake_manager.diff(queued.task_id)
    res = fake_manager.cleanup(queued.task_id)
    assert res.worktree_removed is False and res.branch_deleted is False and "never ran" in res.worktree_note
    assert worktree_paths(repo) == [str(repo)] and branches(repo) == {"main"}


async def test_cleaning_one_task_of_a_chain_keeps_the_worktree_the_others_share(fake_manager, repo):
    parent = await run(fake_manager, fake_task(repo, files={"p.txt": "p\n"}))
    child = fake_manager.continue_task(parent.task_id, fake({"files": {"c.txt": "c\n"}}))
    done = (await fake_manager.wait([child.task_id], timeout=30)).tasks[0]
    assert done.status == TaskStatus.COMPLETED  # both finished: cleaning the parent must not lose the child's work
    res = fake_manager.cleanup(parent.task_id)
    assert res.worktree_removed is False and child.task_id in res.worktree_note
    assert fake_manager.diff(child.task_id).changes.files_changed == 2
    res = fake_manager.cleanup(child.task_id)
    assert res.worktree_removed and worktree_paths(repo) == [str(repo)]


async def test_a_user_commit_during_a_merge_is_never_undone(fake_manager, repo, monkeypatch):
    t = await run(fake_manager, fake_task(repo, files={"t.txt": "t\n"}, commit="t"))
    real = worktrees.run

    def user_commits_meanwhile(cwd, *args, **kw):
        if args[:2] == ("merge", "--ff-only"):  # just before the result comes in: the user commits and edits
            (repo / "user.txt").write_text("mine\n")
            git(repo, "add", "user.txt")
            git(repo, "commit", "-q", "-m", "the user's own commit")
            (repo / "shared.txt").write_text("being edited\n")
        return real(cwd, *args, **kw)

    monkeypatch.setattr(worktrees, "run", user_commits_meanwhile)
    with pytest.raises(MergeRefusedError, match="changed nothing"):
        fake_manager.merge(t.task_id, "merge")
    assert git(repo, "log", "-1", "--format=%s").strip() == "the user's own commit"  # kept
    assert (repo / "shared.txt").read_text() == "being edited\n" and (repo / "user.txt").exists()


async def test_a_sub_agent_that_switched_branches_keeps_its_work_visible(fake_manager, repo):
    t = await run(fake_manager, fake_task(repo, files={"f.txt": "f\n"}, commit="on its branch"))
    git(t.worktree.path, "checkout", "-q", "-b", "feature")
    (Path(t.worktree.path) / "g.txt").write_text("g\n")
    git(t.worktree.path, "add", "g.txt")
    git(t.worktree.path, "commit", "-q", "-m", "on another branch")
    page = fake_manager.diff(t.task_id)
    assert "+g" in page.text and "+f" in page.text and "2 files changed" in page.text  # (the diff is live)
    assert not worktrees.orphan_branch(t.worktree)  # its worktree is there: a continuation may enter it
    merged = fake_manager.merge(t.task_id, "merge")
    assert merged.files_changed == 2 and (repo / "g.txt").exists()


def test_a_worktree_on_another_machine_is_neither_read_merged_nor_removed_here(fake_manager, tmp_path):
    """On a remote backend a worker elsewhere may have run the task: its worktree is there, not here (a
    same-named one here is never touched)."""
    r = fake_manager.post(PostOptions(prompt="p"))
    wt = WorktreeInfo(name=r.task_id, path=str(tmp_path / "wt"), branch=f"worktree-{r.task_id}", base_commit="0" * 40,
                      repo=str(tmp_path), host="another-machine")  # fmt: skip
    fake_manager.store.update(r.task_id, lambda cur: cur.model_copy(update={"worktree": wt}))
    with pytest.raises(InvalidOptionsError, match="is on another-machine"):
        fake_manager.diff(r.task_id)
    res = fake_manager.cleanup(r.task_id)
    assert res.deleted and res.worktree_removed is False and "on another-machine" in res.worktree_note

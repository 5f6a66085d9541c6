"""Git worktrees of sub-agents: reading what a task changed, merging it, removing it.

``claude --worktree=<name>`` makes the worktree (``.claude/worktrees/<name>`` in the repository's main
checkout, on a new branch ``worktree-<name>`` from the HEAD of the checkout it starts in) and runs the
session inside it; this module does the rest. Every git call is an argv list (no shell) with ``git -C``,
a timeout, and bounded output; the parsing is git.py's.

A task's changes are taken against its base commit with everything in the worktree: commits, uncommitted
edits and new files. They are read through a private copy of the worktree's index (``GIT_INDEX_FILE``):
``git add -A`` into the copy and ``git write-tree`` make a tree of the worktree as it is, without touching
its own index, files or branch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from filelock import FileLock, Timeout

from . import git, procs
from .errors import GitError, MergeRefusedError
from .models import (
    CHANGES_FILES,
    CHANGES_PATH_CHARS,
    Changes,
    FileChange,
    MergeResult,
    WorktreeInfo,
    clip,
)

log = logging.getLogger("cc_tasks")
#: Seconds a git command may take.
GIT_TIMEOUT = 60.0
#: Bytes of a git command's standard output kept (the rest is counted, not kept).
OUTPUT_CAP = 1 << 20
#: How long merge_task waits for another merge into the same repository.
MERGE_LOCK_WAIT = 120.0
#: The identity of commits cc-tasks makes when git has none configured.
IDENTITY = ("-c", "user.name=cc-tasks", "-c", "user.email=cc-tasks@localhost")
#: Variables that would point git at another repository, index or object store than the one asked for.
_GIT_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
)
Strategy = Literal["merge", "squash", "rebase"]


@dataclass(frozen=True)
class Output:
    rc: int
    out: bytes  # the kept part of standard output
    total: int  # bytes of standard output in all
    err: str  # the start of standard error

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "surrogateescape").strip()


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_ENV}
    env.update(
        LC_ALL="C",
        LANGUAGE="C",
        GIT_TERMINAL_PROMPT="0",
        GIT_EDITOR="true",
        GIT_MERGE_AUTOEDIT="no",
        GIT_PAGER="cat",
        GIT_OPTIONAL_LOCKS="0",
    )
    env.update(extra or {})
    return env


def run(
    cwd: str,
    *args: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = GIT_TIMEOUT,
    skip: int = 0,
    keep: int = OUTPUT_CAP,
) -> Output:
    """``git -C cwd ARGS``: the bytes ``[skip, skip + keep)`` of its standard output (the rest counted, not
    kept), the start of its standard error. Raises GitError if it cannot run, times out, or (``check``)
    exits non-zero."""
    argv = ["git", "-C", cwd, *args]
    with tempfile.TemporaryFile() as err:
        try:
            p = procs.spawn(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=_env(env), close_fds=True
            )
        except OSError as e:
            raise GitError(f"could not run git: {e}") from None
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            p.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        kept, total = bytearray(), 0
        try:
            assert p.stdout is not None
            while chunk := p.stdout.read(1 << 16):
                lo, hi = max(0, skip - total), min(len(chunk), skip + keep - total)
                if lo < hi:
                    kept += chunk[lo:hi]
                total += len(chunk)
            rc = p.wait()
        finally:
            timer.cancel()
            if p.stdout is not None:
                p.stdout.close()
            if p.poll() is None:
                p.kill()
                p.wait()
            procs.disown(p.pid)
        err.seek(0)
        message = err.read(4000).decode("utf-8", "replace").strip()
    what = " ".join(a for a in args if not a.startswith("-c") and "=" not in a)[:200]
    if timed_out.is_set():
        raise GitError(f"git {what} (in {cwd}) took longer than {timeout:g}s and was stopped")
    if check and rc != 0:
        raise GitError(f"git {what} (in {cwd}) failed (exit {rc}): {message or 'no message'}")
    return Output(rc, bytes(kept), total, message)


# -- the repository ------------------------------------------------------------------------------------


def toplevel(cwd: str) -> str:
    """The top level of the work tree ``cwd`` is in. Raises GitError if it is in none."""
    r = run(cwd, "rev-parse", "--show-toplevel", check=False)
    if r.rc != 0 or not r.text:
        raise GitError(f"{cwd} is not inside a git work tree ({r.err or 'git rev-parse found none'})")
    return r.text


def head(cwd: str) -> str:
    """The commit HEAD of ``cwd``'s checkout is at. Raises GitError if there is none (no commit yet)."""
    r = run(cwd, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
    if r.rc != 0 or not r.text:
        raise GitError(f"the repository at {cwd} has no commit yet (HEAD names none): commit something first")
    return r.text


def worktree_list(repo: str) -> list[git.WorktreeEntry]:
    return git.parse_worktrees(run(repo, "worktree", "list", "--porcelain", "-z").out)


def common_dir(repo: str) -> str:
    return run(repo, "rev-parse", "--path-format=absolute", "--git-common-dir").text


def git_path(repo: str, name: str) -> str:
    return run(repo, "rev-parse", "--path-format=absolute", "--git-path", name).text


def for_task(cwd: str, name: str) -> WorktreeInfo:
    """The worktree ``claude --worktree=<name>`` will make for a task started in ``cwd``: in the repository's
    main checkout (also when ``cwd`` is in a linked worktree), from the HEAD of ``cwd``'s checkout. Raises
    GitError when ``cwd`` is not in a git work tree or its HEAD has no commit."""
    top = toplevel(cwd)
    head(top)
    entries = worktree_list(top)
    main = entries[0].path if entries and not entries[0].bare else os.path.dirname(common_dir(top))
    return WorktreeInfo(
        name=name,
        path=os.path.join(main, ".claude", "worktrees", name),
        branch=f"worktree-{name}",
        repo=top,
    )


def exclude_worktrees(repo: str) -> None:
    """Keep ``.claude/worktrees/`` out of the user's ``git status``: a line in the repository's
    ``info/exclude`` (shared by all its worktrees), never a tracked file."""
    path = git_path(repo, "info/exclude")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            current = f.read()
    except FileNotFoundError:
        current = ""
    add = git.exclude_addition(current)
    if add is None:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(add)


def branch_tip(repo: str, branch: str) -> str | None:
    r = run(repo, "rev-parse", "--verify", "-q", f"refs/heads/{branch}^{{commit}}", check=False)
    return r.text if r.rc == 0 and r.text else None


def registered(info: WorktreeInfo) -> git.WorktreeEntry | None:
    """The task's worktree as git knows it: found by its branch, else by its path (a sub-agent may have
    switched branches in it: its work is then on the branch checked out there); or None."""
    if not os.path.isdir(info.repo):
        return None
    entries = worktree_list(info.repo)
    found = git.worktree_of_branch(entries, info.branch)
    if found is None and info.path:
        where = os.path.realpath(info.path)
        found = next((e for e in entries if os.path.realpath(e.path) == where), None)
    return found


def orphan_branch(info: WorktreeInfo) -> bool:
    """True when the task's branch exists without its worktree: ``claude --worktree`` would then reset the
    branch to HEAD, and the commits on it would be lost."""
    return branch_tip(info.repo, info.branch) is not None and registered(info) is None


def locate(info: WorktreeInfo, made_here: bool) -> WorktreeInfo:
    """``info`` corrected from git once claude has run: the worktree's path, and (``made_here``: the task that
    made the worktree) the commit its branch was created from, which is the base commit even when HEAD
    moved between the supervisor reading it and claude making the branch."""
    update: dict = {}
    entry = registered(info)
    if entry is not None and entry.path != info.path:
        update["path"] = entry.path
    if made_here:
        reflog = run(info.repo, "reflog", "show", "--format=%H%x00%gs", f"refs/heads/{info.branch}", check=False)
        base = git.branch_base(reflog.out) if reflog.rc == 0 else None
        if base and base != info.base_commit:
            update["base_commit"] = base
    return info.model_copy(update=update) if update else info


def is_ancestor(repo: str, commit: str, of: str) -> bool:
    return run(repo, "merge-base", "--is-ancestor", commit, of, check=False).rc == 0


def is_merged(info: WorktreeInfo) -> bool:
    """Merged by merge_task, or by hand (the branch has commits, all of them in the checkout's HEAD)."""
    if info.merged is not None:
        return True
    tip = branch_tip(info.repo, info.branch)
    if tip is None or tip == info.base_commit:
        return False
    return is_ancestor(info.repo, tip, "HEAD")


def _identity(repo: str) -> tuple[str, ...]:
    """IDENTITY when git has no identity of its own for ``repo`` (a commit would be refused), else nothing."""
    return () if run(repo, "var", "GIT_COMMITTER_IDENT", check=False).rc == 0 else IDENTITY


# -- what a task changed ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _scratch_index(worktree: str) -> Iterator[dict[str, str]]:
    """The environment of a private copy of the worktree's index (its stat data spares ``add -A`` from reading
    every file again); removed afterwards."""
    fd, tmp = tempfile.mkstemp(prefix="cc-tasks-index-")
    os.close(fd)
    try:
        try:
            shutil.copyfile(git_path(worktree, "index"), tmp)
        except FileNotFoundError:
            os.unlink(tmp)
        env = {"GIT_INDEX_FILE": tmp}
        if not os.path.exists(tmp):
            run(worktree, "read-tree", "HEAD", env=env)
        yield env
    finally:
        for p in (tmp, tmp + ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def snapshot(worktree: str) -> tuple[str, str]:
    """The worktree's HEAD commit and a tree of its files as they are (new files included, ignored ones not)."""
    tip = head(worktree)
    with _scratch_index(worktree) as env:
        run(worktree, "add", "-A", env=env, timeout=GIT_TIMEOUT * 2)
        tree = run(worktree, "write-tree", env=env).text
    return tip, tree


@dataclass(frozen=True)
class State:
    """A task's changes as trees: its branch's tip, the tree of everything (tip plus what is uncommitted),
    and the worktree's path when it still exists."""

    tip: str
    tree: str
    worktree: str | None


def state(info: WorktreeInfo) -> State | None:
    """Where the task's changes are: its worktree if git still has it, else its branch; None if neither."""
    if not os.path.isdir(info.repo):
        return None
    entry = registered(info)
    if entry is not None and os.path.isdir(entry.path):
        tip, tree = snapshot(entry.path)
        return State(tip, tree, entry.path)
    tip = branch_tip(info.repo, info.branch)
    if tip is None:
        return None
    return State(tip, run(info.repo, "rev-parse", f"{tip}^{{tree}}").text, None)


def changes(info: WorktreeInfo) -> Changes | None:
    """What the task changed against its base commit; None when its worktree and branch are both gone (or it
    never started)."""
    if info.base_commit is None:
        return None
    st = state(info)
    if st is None:
        return None
    repo, base = info.repo, info.base_commit
    short = git.parse_shortstat(run(repo, "diff", "--shortstat", "--no-ext-diff", base, st.tree).out)
    numstat = git.parse_numstat(run(repo, "diff", "--numstat", "-z", base, st.tree, keep=64 * 1024).out)
    commits = int(run(repo, "rev-list", "--count", f"{base}..{st.tip}").text or 0)
    uncommitted = 0
    if st.worktree is not None:
        status = run(st.worktree, "status", "--porcelain=v1", "-z", "--untracked-files=all")
        uncommitted = len(git.parse_status(status.out))
    files = [
        FileChange(path=clip(f.path, CHANGES_PATH_CHARS) or "", insertions=f.insertions, deletions=f.deletions)
        for f in numstat[:CHANGES_FILES]
    ]
    return Changes(
        files_changed=short.files,
        insertions=short.insertions,
        deletions=short.deletions,
        committed=commits > 0,
        commits=commits,
        uncommitted_files=uncommitted,
        head_commit=st.tip,
        files=files,
        files_truncated=short.files > len(files),
    )


def diff(info: WorktreeInfo, skip: int, keep: int) -> tuple[str, bytes, int]:
    """The task's changes against its base commit as a unified diff (stat first), from byte ``skip``, at most
    ``keep`` bytes: (the branch's tip, the bytes, the diff's whole size)."""
    st = state(info) if info.base_commit else None
    if st is None:
        raise GitError(
            f"the worktree and the branch {info.branch} of this task are gone (removed by cleanup, or never "
            "made: the task did not start): there is no diff to show"
        )
    r = run(
        info.repo,
        "diff",
        "--patch-with-stat",
        "--no-color",
        "--no-ext-diff",
        info.base_commit,
        st.tree,
        skip=skip,
        keep=keep,
        timeout=GIT_TIMEOUT * 2,
    )
    return st.tip, r.out, r.total


# -- merge ------------------------------------------------------------------------------------------------


def _status(repo: str, untracked: str = "normal") -> bytes:
    return run(repo, "status", "--porcelain=v1", "-z", f"--untracked-files={untracked}").out


def merge(info: WorktreeInfo, *, task_id: str, strategy: Strategy, message: str, leftovers_message: str) -> MergeResult:
    """Bring the task's changes (committed, and uncommitted ones committed on its branch first) into the
    branch checked out in its original checkout. Merges into one repository are serialised (a lock in its
    common git dir). Refused (MergeRefusedError) when that checkout has uncommitted changes, has no branch
    checked out, or is in the middle of a merge or rebase; on a conflict or any other failure it is put back
    exactly as it was (same HEAD, same status) and the error names the conflicting files."""
    repo = info.repo
    if not os.path.isdir(repo):
        raise MergeRefusedError(f"the checkout {repo} the task was started in is gone: nothing to merge into")
    lock = FileLock(os.path.join(common_dir(repo), "cc-tasks-merge.lock"))
    try:
        with lock.acquire(timeout=MERGE_LOCK_WAIT, poll_interval=0.05):
            return _merge(info, task_id, strategy, message, leftovers_message)
    except Timeout:
        raise MergeRefusedError(
            f"another merge into {repo} held its lock for {MERGE_LOCK_WAIT:g}s; nothing was done: try again"
        ) from None


def _merge(info: WorktreeInfo, task_id: str, strategy: Strategy, message: str, leftovers_message: str) -> MergeResult:
    repo = info.repo
    target = run(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    if target.rc != 0 or not target.text:
        raise MergeRefusedError(f"{repo} has no branch checked out (detached HEAD): check out the branch to merge into")
    branch = target.text
    for marker in ("MERGE_HEAD", "rebase-merge", "rebase-apply", "CHERRY_PICK_HEAD", "REVERT_HEAD"):
        if os.path.exists(git_path(repo, marker)):
            raise MergeRefusedError(
                f"{repo} is in the middle of a merge, rebase, cherry-pick or revert: finish it first"
            )
    dirty = git.parse_status(_status(repo, "no"))
    if dirty:
        names = ", ".join(e.path for e in dirty[:10]) + (", …" if len(dirty) > 10 else "")
        raise MergeRefusedError(
            f"{repo} has uncommitted changes ({len(dirty)} file(s): {names}): commit or stash them, then merge "
            "again; nothing was done"
        )
    saved_head, saved_status = head(repo), _status(repo)
    st = state(info)
    if st is None:
        raise MergeRefusedError(f"the task's branch {info.branch} and its worktree are gone: nothing to merge")
    ident = _identity(repo)
    commit, leftovers = st.tip, st.tree != run(repo, "rev-parse", f"{st.tip}^{{tree}}").text
    if leftovers:  # a commit of them on top of the branch, made without touching the worktree
        commit = run(repo, *ident, "commit-tree", st.tree, "-p", st.tip, "-m", leftovers_message).text
    if is_ancestor(repo, commit, saved_head):
        nothing = info.base_commit is not None and commit == info.base_commit
        raise MergeRefusedError(
            f"task {task_id} changed nothing: nothing to merge"
            if nothing
            else f"the changes of task {task_id} are already in {branch}: nothing to merge"
        )

    def undo(why: str, conflicts: list[str]) -> MergeRefusedError:
        # (the merge is made outside the checkout and comes in by a fast-forward, which changes nothing
        # when it fails: there is nothing to undo, only to check)
        exact = head(repo) == saved_head and _status(repo) == saved_status
        where = f"merging task {task_id} (branch {info.branch}) into {branch} of {repo}"
        if conflicts:
            shown = ", ".join(conflicts[:20]) + (f" and {len(conflicts) - 20} more" if len(conflicts) > 20 else "")
            head_line = f"merge refused: conflict in {len(conflicts)} file(s) {where}: {shown}."
        else:
            head_line = f"merge refused: {where} failed: {why}."
        state_line = (
            f" Nothing was changed: {repo} is exactly as it was (HEAD {saved_head[:12]}, same status)."
            if exact
            else f" cc-tasks changed nothing in {repo}, but it changed meanwhile (it was at {saved_head}): check it."
        )
        todo = (
            f" To go on: continue_task the task to bring {branch} into its branch and resolve the conflict there, "
            "then merge_task again; or merge it by hand."
            if conflicts
            else ""
        )
        return MergeRefusedError(head_line + state_line + todo)

    try:
        # The result is made away from the user's checkout (merge-tree, commit-tree; a rebase in a scratch
        # worktree), then brought in with a fast-forward: git refuses that, touching nothing, if HEAD moved
        # meanwhile or if it would overwrite local changes. So a failure never needs a reset of the checkout.
        if strategy in ("merge", "squash"):
            r = run(repo, "merge-tree", "--write-tree", "--name-only", "--no-messages", saved_head, commit, check=False)
            lines = r.out.decode("utf-8", "surrogateescape").splitlines()
            if r.rc == 1:
                raise undo("conflict", [line for line in lines[1:] if line])
            if r.rc != 0 or not lines:
                raise undo(r.err or "git merge-tree failed", [])
            parents = ["-p", saved_head, *(["-p", commit] if strategy == "merge" else [])]
            result = run(repo, *ident, "commit-tree", lines[0], *parents, "-m", message).text
        else:
            result = commit = _rebased(repo, ident, commit, saved_head, undo)
        r = run(repo, "merge", "--ff-only", result, check=False)
        if r.rc != 0:
            raise undo(r.err, [])
    except MergeRefusedError:
        raise
    except BaseException as e:
        raise undo(str(e), []) from None
    new_head = head(repo)
    short = git.parse_shortstat(run(repo, "diff", "--shortstat", saved_head, new_head).out)
    _advance_branch(info, st, commit, strategy)
    return MergeResult(
        task_id=task_id,
        strategy=strategy,
        repo=repo,
        target_branch=branch,
        branch=info.branch,
        before=saved_head,
        head=new_head,
        leftovers_committed=leftovers,
        files_changed=short.files,
        insertions=short.insertions,
        deletions=short.deletions,
    )


def _rebased(repo: str, ident: tuple[str, ...], commit: str, onto: str, undo) -> str:
    """``commit``'s changes replayed onto ``onto`` in a scratch worktree (nothing else is touched); its tip."""
    scratch = tempfile.mkdtemp(prefix="cc-tasks-rebase-")
    path = os.path.join(scratch, "wt")
    try:
        run(repo, "worktree", "add", "--quiet", "--detach", path, commit)
        r = run(path, *ident, "rebase", "--quiet", onto, check=False)
        if r.rc != 0:
            conflicts = git.unmerged_paths(git.parse_status(_status(path)))
            run(path, "rebase", "--abort", check=False)
            raise undo(r.err, conflicts)
        return head(path)
    finally:
        run(repo, "worktree", "remove", "--force", path, check=False)
        shutil.rmtree(scratch, ignore_errors=True)
        run(repo, "worktree", "prune", check=False)


def _advance_branch(info: WorktreeInfo, st: State, commit: str, strategy: Strategy) -> None:
    """After a merge: the task's branch takes what was merged (its uncommitted changes' commit, or its rebased
    commits), and its worktree follows (files unchanged for merge and squash: they are that commit)."""
    if commit == st.tip:
        return
    try:
        run(
            info.repo,
            "update-ref",
            "-m",
            f"cc-tasks: merge_task ({strategy})",
            f"refs/heads/{info.branch}",
            commit,
            st.tip,
        )
        if st.worktree is not None:
            if strategy == "rebase":
                run(st.worktree, "reset", "--quiet", "--hard")
            else:
                run(st.worktree, "reset", "--quiet")
    except GitError as e:  # the merge is done; the task's branch is merely behind it
        log.warning("after merging %s: could not move its branch: %s", info.branch, e)


# -- cleanup ------------------------------------------------------------------------------------------------


def remove(info: WorktreeInfo, keep_branch_because: str | None = None) -> tuple[bool, bool, str | None]:
    """Remove the task's worktree (unlocking it: claude leaves it locked) and its branch, unless there is a
    reason to keep the branch. (worktree removed, branch deleted, a note on what was left and why)."""
    if not os.path.isdir(info.repo):
        return False, False, f"the repository {info.repo} is gone; nothing to remove"
    notes: list[str] = []
    removed = False
    entry = registered(info)
    if entry is not None:
        run(info.repo, "worktree", "unlock", entry.path, check=False)
        r = run(info.repo, "worktree", "remove", "--force", entry.path, check=False)
        removed = r.rc == 0
        if not removed:
            notes.append(f"git worktree remove {entry.path} failed: {r.err}")
    elif os.path.isdir(info.path):
        notes.append(f"{info.path} is not a worktree git knows; left alone")
    run(info.repo, "worktree", "prune", check=False)
    deleted = False
    if branch_tip(info.repo, info.branch) is None:
        if entry is None and not notes:
            notes.append("no worktree or branch of it was found (it never ran, or they were removed already)")
    elif keep_branch_because is None:
        r = run(info.repo, "branch", "-D", info.branch, check=False)
        deleted = r.rc == 0
        if not deleted:
            notes.append(f"git branch -D {info.branch} failed: {r.err}")
    else:
        notes.append(f"branch {info.branch} kept: {keep_branch_because}")
    return removed, deleted, "; ".join(notes) or None

"""What git prints, parsed: pure functions over the bytes of ``git`` commands (worktrees.py runs them).

Every parser takes the machine-readable form (``-z`` where git has it: NUL-separated, paths never quoted)
and tolerates output cut short at a byte cap: an incomplete last entry is left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: The line cc-tasks adds to a repository's ``info/exclude``: the folder ``claude --worktree`` makes its
#: worktrees in, so that the user's own ``git status`` does not show it (tracked files are never touched).
EXCLUDE_LINE = "/.claude/worktrees/"
#: Status codes (``git status --porcelain``) of an unmerged path: both sides changed it.
UNMERGED = frozenset({"DD", "AU", "UD", "UA", "DU", "AA", "UU"})
#: Reflog subjects of a branch pointed at a commit from outside (creation, ``worktree add -B``).
_BASE_SUBJECT = re.compile(r"^branch: (?:Created from|Reset to) ")
_SHORTSTAT = re.compile(r"(\d+) (file|insertion|deletion)")


@dataclass(frozen=True)
class StatusEntry:
    """One path of ``git status --porcelain=v1 -z``: its two-letter code, path, and former path (renames)."""

    code: str
    path: str
    orig: str | None = None

    @property
    def unmerged(self) -> bool:
        return self.code in UNMERGED


@dataclass(frozen=True)
class NumstatEntry:
    """One file of ``git diff --numstat -z``; insertions and deletions are None for a binary file."""

    path: str
    insertions: int | None
    deletions: int | None
    orig: str | None = None


@dataclass(frozen=True)
class ShortStat:
    files: int = 0
    insertions: int = 0
    deletions: int = 0


@dataclass
class WorktreeEntry:
    """One worktree of ``git worktree list --porcelain -z``."""

    path: str
    head: str | None = None
    branch: str | None = None  # a full ref: refs/heads/...
    detached: bool = False
    bare: bool = False
    locked: str | None = None  # the lock's reason ("" when locked without one)
    prunable: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def parse_status(data: bytes) -> list[StatusEntry]:
    """``git status --porcelain=v1 -z``: ``XY PATH\\0``, and for a rename or copy ``XY NEW\\0OLD\\0``."""
    fields = data.split(b"\0")
    fields.pop()  # what follows the last NUL: empty, or an entry cut short
    out: list[StatusEntry] = []
    i = 0
    while i < len(fields):
        f = fields[i]
        i += 1
        if len(f) < 4 or f[2:3] != b" ":
            continue
        code, path = _text(f[:2]), _text(f[3:])
        orig = None
        if code[0] in "RC" or code[1] in "RC":
            if i >= len(fields):
                break
            orig = _text(fields[i])
            i += 1
        out.append(StatusEntry(code, path, orig))
    return out


def unmerged_paths(entries: list[StatusEntry]) -> list[str]:
    """The paths a merge, squash or rebase left in conflict."""
    return [e.path for e in entries if e.unmerged]


def parse_numstat(data: bytes) -> list[NumstatEntry]:
    """``git diff --numstat -z``: ``INS\\tDEL\\tPATH\\0``, for a rename ``INS\\tDEL\\t\\0OLD\\0NEW\\0``; binary
    files have ``-`` for both counts."""
    fields = data.split(b"\0")
    fields.pop()
    out: list[NumstatEntry] = []
    i = 0
    while i < len(fields):
        parts = fields[i].split(b"\t", 2)
        i += 1
        if len(parts) != 3:
            continue
        ins, dels, path = parts
        orig = None
        if not path:  # a rename: the old and the new path follow
            if i + 1 >= len(fields):
                break
            orig, path = _text(fields[i]), fields[i + 1]
            i += 2
        out.append(NumstatEntry(_text(path), _count(ins), _count(dels), orig))
    return out


def _count(raw: bytes) -> int | None:
    return int(raw) if raw.isdigit() else None


def parse_shortstat(data: bytes) -> ShortStat:
    """`` 3 files changed, 10 insertions(+), 2 deletions(-)`` (each part only when not zero; empty: no change)."""
    found = {kind: int(n) for n, kind in _SHORTSTAT.findall(_text(data))}
    return ShortStat(found.get("file", 0), found.get("insertion", 0), found.get("deletion", 0))


def parse_worktrees(data: bytes) -> list[WorktreeEntry]:
    """``git worktree list --porcelain -z``: attribute lines ending in NUL, an empty one after each worktree."""
    out: list[WorktreeEntry] = []
    cur: WorktreeEntry | None = None
    for raw in data.split(b"\0"):
        line = _text(raw)
        if not line:
            cur = None
            continue
        key, _, value = line.partition(" ")
        if key == "worktree":
            cur = WorktreeEntry(path=value)
            out.append(cur)
        elif cur is None:
            continue
        elif key == "HEAD":
            cur.head = value
        elif key == "branch":
            cur.branch = value
        elif key == "detached":
            cur.detached = True
        elif key == "bare":
            cur.bare = True
        elif key == "locked":
            cur.locked = value
        elif key == "prunable":
            cur.prunable = True
        else:
            cur.extra[key] = value
    return out


def worktree_of_branch(entries: list[WorktreeEntry], branch: str) -> WorktreeEntry | None:
    """The worktree that has ``branch`` (a short name) checked out."""
    ref = "refs/heads/" + branch
    return next((e for e in entries if e.branch == ref), None)


def branch_base(reflog: bytes) -> str | None:
    """The commit a branch was last created (or reset) at, from ``git reflog show --format=%H%x00%gs``
    (newest first): where ``claude --worktree`` based the task's branch."""
    for line in _text(reflog).splitlines():
        sha, _, subject = line.partition("\0")
        if _BASE_SUBJECT.match(subject):
            return sha.strip() or None
    return None


def exclude_addition(current: str) -> str | None:
    """What to append to an ``info/exclude`` file so that it has EXCLUDE_LINE; None if it already has it."""
    if any(line.strip() == EXCLUDE_LINE for line in current.splitlines()):
        return None
    head = "" if not current or current.endswith("\n") else "\n"
    return f"{head}# cc-tasks: the worktrees of claude --worktree sub-agents\n{EXCLUDE_LINE}\n"

"""What git prints, parsed (cc_tasks/git.py): pure functions, on git's own -z output."""

from cc_tasks import git


def test_status_entries_renames_and_conflicts():
    data = b" M a.txt\0?? new file.txt\0R  new.txt\0old.txt\0UU both.txt\0AA added.txt\0DU gone.txt\0A  x\0"
    entries = git.parse_status(data)
    assert [(e.code, e.path, e.orig) for e in entries] == [
        (" M", "a.txt", None),
        ("??", "new file.txt", None),
        ("R ", "new.txt", "old.txt"),
        ("UU", "both.txt", None),
        ("AA", "added.txt", None),
        ("DU", "gone.txt", None),
        ("A ", "x", None),
    ]
    assert git.unmerged_paths(entries) == ["both.txt", "added.txt", "gone.txt"]


def test_status_cut_short_leaves_out_the_last_entry():
    assert [e.path for e in git.parse_status(b" M a\0?? b")] == ["a"]
    assert [e.path for e in git.parse_status(b" M a\0R  new\0")] == ["a"]  # its former path was cut
    assert git.parse_status(b"") == []


def test_numstat_counts_binary_and_renames():
    data = b"1\t2\ta.txt\0-\t-\tpic.png\0" + b"3\t0\t\0old name.txt\0new name.txt\0" + b"7\t1\tpartial"
    entries = git.parse_numstat(data)
    assert [(e.path, e.insertions, e.deletions, e.orig) for e in entries] == [
        ("a.txt", 1, 2, None),
        ("pic.png", None, None, None),
        ("new name.txt", 3, 0, "old name.txt"),
    ]
    assert git.parse_numstat(b"1\t0\tnew.txt\0") == [git.NumstatEntry("new.txt", 1, 0)]


def test_shortstat_forms():
    assert git.parse_shortstat(b" 3 files changed, 10 insertions(+), 2 deletions(-)\n") == git.ShortStat(3, 10, 2)
    assert git.parse_shortstat(b" 1 file changed, 1 insertion(+)\n") == git.ShortStat(1, 1, 0)
    assert git.parse_shortstat(b" 1 file changed, 4 deletions(-)\n") == git.ShortStat(1, 0, 4)
    assert git.parse_shortstat(b"") == git.ShortStat(0, 0, 0)


def test_worktree_list_and_the_branch_lookup():
    data = (
        b"worktree /r\0HEAD fe1555bd\0branch refs/heads/main\0\0"
        b"worktree /r-lw\0HEAD dc0cad74\0detached\0\0"
        b"worktree /r/.claude/worktrees/T1\0HEAD fe1555bd\0branch refs/heads/worktree-T1\0"
        b"locked claude session T1 (pid 11153 start 337988)\0\0"
        b"worktree /gone\0HEAD 00000000\0branch refs/heads/old\0prunable gitdir file points to non-existent location\0\0"
    )
    entries = git.parse_worktrees(data)
    assert [e.path for e in entries] == ["/r", "/r-lw", "/r/.claude/worktrees/T1", "/gone"]
    assert entries[1].detached and entries[1].branch is None
    assert entries[2].locked == "claude session T1 (pid 11153 start 337988)" and entries[0].locked is None
    assert entries[3].prunable
    assert git.worktree_of_branch(entries, "worktree-T1") is entries[2]
    assert git.worktree_of_branch(entries, "worktree-T2") is None
    assert git.worktree_of_branch(entries, "main").path == "/r"


def test_branch_base_is_the_last_creation_or_reset():
    created = b"aaa\0branch: Created from aaa^{commit}\n"
    assert git.branch_base(b"ccc\0commit: agent commit\nbbb\0commit: more\n" + created) == "aaa"
    reset = b"ddd\0branch: Reset to ddd^{commit}\n"
    assert git.branch_base(b"eee\0commit: x\n" + reset + created) == "ddd"
    assert git.branch_base(b"eee\0commit: x\n") is None
    assert git.branch_base(b"") is None


def test_exclude_line_is_added_once():
    add = git.exclude_addition("# exclude patterns\n*.o")
    assert add is not None and add.startswith("\n") and add.endswith(git.EXCLUDE_LINE + "\n")
    text = "# exclude patterns\n*.o" + add
    assert git.exclude_addition(text) is None
    assert (
        git.exclude_addition("") == f"# cc-tasks: the worktrees of claude --worktree sub-agents\n{git.EXCLUDE_LINE}\n"
    )

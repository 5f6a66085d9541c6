"""Processes: identity that survives pid reuse and clock steps."""

import os


def test_process_identity_uses_boot_relative_start_ticks():
    from cc_tasks import procs

    me = procs.ref_of(os.getpid())
    assert me.start_ticks is not None and procs.alive(me)
    # a stepped wall clock moves create_time but not the start ticks
    assert procs.alive(me.model_copy(update={"create_time": me.create_time + 5}))
    assert not procs.alive(me.model_copy(update={"start_ticks": me.start_ticks + 1}))

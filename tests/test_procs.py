"""Processes: identity that survives pid reuse and clock steps."""

import os


def test_process_identity_uses_boot_relative_start_ticks():
    from cc_tasks import procs

    me = procs.ref_of(os.getpid())
    assert me.start_ticks is not None and procs.alive(me)
    # a stepped wall clock moves create_time but not the start ticks
    assert procs.alive(me.model_copy(update={"create_time": me.create_time + 5}))
    assert not procs.alive(me.model_copy(update={"start_ticks": me.start_ticks + 1}))


def test_stop_tree_does_not_wait_out_the_sigint_grace_for_a_detached_child():
    """SIGINT goes to the root only; once the root has exited, what it started in a session of its own gets
    GRACE_AFTER_ROOT, not the rest of GRACE_INT, before SIGTERM (a cancel took over 3 s before)."""
    import subprocess
    import sys
    import time

    import psutil

    from cc_tasks import procs

    from .conftest import pid_alive

    code = (  # (SIGINT handled whatever this test process left it at: an ignored one would be inherited)
        "import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); "
        "print(p.pid, flush=True); time.sleep(300)"
    )
    root = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(root.stdout.readline())
    try:
        t0 = time.monotonic()
        stopped = procs.stop_tree(psutil.Process(root.pid), reap=root.poll)
        took = time.monotonic() - t0
        assert set(stopped) >= {root.pid, child}
        assert took < procs.GRACE_INT - 1, took
        root.wait(5)
        assert not pid_alive(child)
    finally:
        for pid in (root.pid, child):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        root.wait(5)

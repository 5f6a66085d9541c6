"""A tiny stand-in for the claude CLI, for fast tests and cases the real CLI cannot produce.

It reads the prompt from stdin like ``claude -p`` and prints stream-json. A line ``FAKE {json}`` in the
prompt changes what it does: ``sleep`` (seconds before answering), ``exit`` (exit code), ``no_result``
(exit without a result event), ``is_error``, ``result`` (text), ``big`` (result of N chars), ``repeat``
(``[text, n]``: a result of ``text`` n times),
``ignore_signals`` (ignore SIGINT and SIGTERM), ``grandchild`` (start ``sleep 300`` in a new session
and write its pid to grandchild.pid), ``argv`` (write argv and selected env to argv.json), ``track`` (a
directory: count how many copies run at once there, and log this run's task id and that count),
``log`` (a file: append "start NAME" and "end NAME" lines), ``wait_file`` (wait until that file exists),
``no_tools`` (no tool_use event: a run that used no tool), ``files`` (``{path: text}``: write these files),
``commit`` (a message: commit everything with it), ``dirty`` (``{path: text}``: write these after the commit).

``--worktree=NAME`` is emulated as the pinned claude does it: make ``.claude/worktrees/NAME`` in the main
checkout on branch ``worktree-NAME`` from HEAD (``-B``: a branch left without its worktree is reset), locked,
or enter it when it exists; the run then happens inside it.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid


def enter_worktree(name):
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()

    common = git("rev-parse", "--path-format=absolute", "--git-common-dir")
    path = os.path.join(os.path.dirname(common), ".claude", "worktrees", name)
    if not os.path.isdir(path):
        git("worktree", "add", "-q", "-B", f"worktree-{name}", path, "HEAD")
        git("worktree", "lock", "--reason", f"fake claude session {name} (pid {os.getpid()})", path)
    os.chdir(path)


for arg in sys.argv:
    if arg.startswith("--worktree="):
        enter_worktree(arg.split("=", 1)[1])
prompt = sys.stdin.read()
cfg = {}
for line in prompt.splitlines():
    if line.startswith("FAKE "):
        cfg = json.loads(line[5:])
sid = str(uuid.uuid4())


def emit(ev):
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


if cfg.get("argv"):
    with open("argv.json", "w") as f:
        json.dump(
            {"argv": sys.argv, "prompt": prompt, "env": {k: os.environ.get(k) for k in cfg.get("env_keys", [])}}, f
        )
for rel, content in (cfg.get("files") or {}).items():
    os.makedirs(os.path.dirname(os.path.abspath(rel)), exist_ok=True)
    with open(rel, "w") as f:
        f.write(content)
if cfg.get("commit"):
    subprocess.run(["git", "add", "-A"], check=True)
    ident = ["-c", "user.name=fake", "-c", "user.email=fake@localhost"]
    subprocess.run(["git", *ident, "commit", "-q", "-m", cfg["commit"]], check=True)
for rel, content in (cfg.get("dirty") or {}).items():
    with open(rel, "w") as f:
        f.write(content)
if cfg.get("ignore_signals"):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if cfg.get("grandchild"):
    p = subprocess.Popen(["sleep", "300"], start_new_session=True)
    with open("grandchild.pid", "w") as f:
        f.write(str(p.pid))
track = cfg.get("track")


def tracked(delta):
    with open(os.path.join(track, "lock"), "a") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        path = os.path.join(track, "count")
        n = int(open(path).read() or 0) if os.path.exists(path) else 0
        n += delta
        with open(path, "w") as f:
            f.write(str(n))
        if delta > 0:
            with open(os.path.join(track, "runs.log"), "a") as f:
                f.write(f"{os.environ.get('CC_TASKS_TASK_ID')} {n}\n")


def log(what):
    if cfg.get("log"):
        with open(cfg["log"], "a") as f:
            f.write(f"{what} {cfg.get('name', '')}\n")


if track:
    tracked(+1)
log("start")
if cfg.get("wait_file"):
    deadline = time.time() + 60
    while not os.path.exists(cfg["wait_file"]) and time.time() < deadline:
        time.sleep(0.02)
emit({"type": "system", "subtype": "init", "session_id": sid, "model": "fake", "cwd": os.getcwd()})
if not cfg.get("no_tools"):
    emit(
        {
            "type": "assistant",
            "session_id": sid,
            "parent_tool_use_id": None,
            "message": {"content": [{"type": "tool_use", "name": "Bash", "id": "t1", "input": {}}]},
        }
    )
if cfg.get("sleep"):
    time.sleep(float(cfg["sleep"]))
text = cfg.get("result", "fake result: " + prompt[:100])
if cfg.get("big"):
    text = ("x" * 99 + "\n") * (int(cfg["big"]) // 100)
if cfg.get("repeat"):
    text = cfg["repeat"][0] * int(cfg["repeat"][1])
emit(
    {
        "type": "assistant",
        "session_id": sid,
        "parent_tool_use_id": None,
        "message": {"content": [{"type": "text", "text": text[:1000]}]},
    }
)
log("end")
if track:
    tracked(-1)
if not cfg.get("no_result"):
    emit(
        {
            "type": "result",
            "subtype": "success",
            "is_error": bool(cfg.get("is_error")),
            "result": text,
            "session_id": sid,
            "total_cost_usd": 0.001,
            "num_turns": 2,
            "duration_ms": 5,
            "usage": {"input_tokens": 1, "output_tokens": 2},
        }
    )
sys.exit(int(cfg.get("exit", 0)))

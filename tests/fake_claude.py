"""A tiny stand-in for the claude CLI, for fast tests and cases the real CLI cannot produce.

It reads the prompt from stdin like ``claude -p`` and prints stream-json. A line ``FAKE {json}`` in the
prompt changes what it does: ``sleep`` (seconds before answering), ``exit`` (exit code), ``no_result``
(exit without a result event), ``is_error``, ``result`` (text), ``big`` (result of N chars),
``ignore_signals`` (ignore SIGINT and SIGTERM), ``grandchild`` (start ``sleep 300`` in a new session
and write its pid to grandchild.pid), ``argv`` (write argv and selected env to argv.json).
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

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
        json.dump({"argv": sys.argv, "prompt": prompt,
                   "env": {k: os.environ.get(k) for k in cfg.get("env_keys", [])}}, f)
if cfg.get("ignore_signals"):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if cfg.get("grandchild"):
    p = subprocess.Popen(["sleep", "300"], start_new_session=True)
    with open("grandchild.pid", "w") as f:
        f.write(str(p.pid))
emit({"type": "system", "subtype": "init", "session_id": sid, "model": "fake", "cwd": os.getcwd()})
emit({"type": "assistant", "session_id": sid, "parent_tool_use_id": None,
      "message": {"content": [{"type": "tool_use", "name": "Bash", "id": "t1", "input": {}}]}})
if cfg.get("sleep"):
    time.sleep(float(cfg["sleep"]))
text = cfg.get("result", "fake result: " + prompt[:100])
if cfg.get("big"):
    text = ("x" * 99 + "\n") * (int(cfg["big"]) // 100)
emit({"type": "assistant", "session_id": sid, "parent_tool_use_id": None,
      "message": {"content": [{"type": "text", "text": text[:1000]}]}})
if not cfg.get("no_result"):
    emit({"type": "result", "subtype": "success", "is_error": bool(cfg.get("is_error")), "result": text,
          "session_id": sid, "total_cost_usd": 0.001, "num_turns": 2, "duration_ms": 5,
          "usage": {"input_tokens": 1, "output_tokens": 2}})
sys.exit(int(cfg.get("exit", 0)))

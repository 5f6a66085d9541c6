"""The ``cc-tasks`` command. For now it serves; more subcommands come with the CLI issue."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cc-tasks", description="Run Claude Code sub-agents in parallel (MCP server).")
    ap.add_argument("--version", action="version", version=f"cc-tasks {__version__}")
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("serve", help="run the MCP server over stdio (the default)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from .errors import CCTasksError
    from .server import run_stdio
    try:
        run_stdio()
    except CCTasksError as e:
        print(f"cc-tasks: {e}", file=sys.stderr)
        return 2
    return 0

"""``python -m cc_tasks`` and the ``cc-tasks`` command.

A bare stdio serve (no arguments, or just ``serve``) goes to ``front`` (answers the MCP handshake before it
imports the server); everything else to the click CLI.
"""

import sys

STDIO_SERVE = ([], ["serve"], ["serve", "--transport", "stdio"], ["serve", "--transport=stdio"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in STDIO_SERVE:
        from .front import main as front_main  # (only what this path uses: the CLI imports click and rich)

        return front_main()
    from .cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())

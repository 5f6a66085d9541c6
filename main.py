#!/usr/bin/env python3
"""Start the cc-tasks MCP server over stdio: ``python main.py`` (other arguments: the ``cc-tasks`` CLI)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cc_tasks.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

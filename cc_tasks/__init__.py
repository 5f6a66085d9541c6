"""cc-tasks: run Claude Code sub-agents in parallel from an MCP server."""

__version__ = "0.5.0"

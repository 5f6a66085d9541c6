"""The backend every layer above uses is ``engine.TaskEngine`` (the rules) over a ``repo.Repo`` (storage). This
module keeps the names earlier versions exported."""

from __future__ import annotations

from .board import agent_completed, agent_failed, agent_renewed, check_agent_lease
from .engine import DEP_RESULT_CHARS, DEP_RESULTS_TOTAL, cancel_update, dependency_preamble
from .engine import TaskEngine as Backend
from .leases import lost_update

__all__ = [
    "DEP_RESULTS_TOTAL",
    "DEP_RESULT_CHARS",
    "Backend",
    "agent_completed",
    "agent_failed",
    "agent_renewed",
    "cancel_update",
    "check_agent_lease",
    "dependency_preamble",
    "lost_update",
]

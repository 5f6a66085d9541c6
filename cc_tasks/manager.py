"""The task manager: everything the tools do, callable directly from tests and the CLI.

``TaskManager`` is composed of one mixin per concern, each in its own module (see each module's docstring for
the tools it serves): ``manager_base`` (settings, backend, the store's worker, get_server_info), ``records``
(check_task_status, list_active_tasks), ``outputs`` (get_task_output, get_task_events, the transcript),
``submitting`` (start_cc_task_async, start_cc_tasks_batch, continue_task), ``board_tools`` (post_task,
claim_task and the agents' other calls, notes), ``stopping`` (cancel_task, cleanup_task), ``worktree_tools``
(get_task_diff, merge_task), ``approval_tools`` (answer_approval, list_approvals), ``budget_tools`` (set_budget,
get_budget) and ``waiting``
(wait_for_tasks, execute_cc_task)."""

from __future__ import annotations

from .approval_tools import ApprovalMixin
from .board_tools import BoardMixin
from .budget_tools import BudgetMixin
from .manager_base import ManagerBase
from .outputs import OutputsMixin
from .records import RecordsMixin
from .stopping import StopMixin
from .submitting import SubmitMixin
from .waiting import WaitMixin
from .worktree_tools import WorktreeMixin


class TaskManager(
    WaitMixin,
    BoardMixin,
    ApprovalMixin,
    BudgetMixin,
    SubmitMixin,
    StopMixin,
    WorktreeMixin,
    OutputsMixin,
    RecordsMixin,
    ManagerBase,
):
    """What the tools do. It submits, reads, cancels and nudges; workers (worker.py) pull and run the tasks.
    ``TaskManager(settings, env)``: ``settings`` default to the environment's; ``env``, the environment local
    tasks run with (default: this process's)."""

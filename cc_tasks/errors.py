"""One small tree of named errors. Tools turn them into MCP tool errors at the edge (server.py)."""

from __future__ import annotations


class CCTasksError(Exception):
    """Base of every error this package raises on purpose; the message is meant for the user."""


class ConfigError(CCTasksError):
    """A configuration value (environment variable or flag) is unusable."""


class UnsafeStoreError(CCTasksError):
    """The task store directory is not safe to use (owner, permissions, symlink)."""


class InvalidTaskIdError(CCTasksError):
    """A task id is not of the form this server generates."""


class TaskNotFoundError(CCTasksError):
    """No task with this id exists in the store."""


class InvalidOptionsError(CCTasksError):
    """Task options that cannot run (missing cwd, empty prompt, ...)."""


class ClaudeNotFoundError(CCTasksError):
    """The claude CLI binary could not be found or is not executable."""


class DepthLimitError(CCTasksError):
    """Starting a task here would nest sub-agents deeper than CC_TASKS_MAX_DEPTH."""


class InvalidTransitionError(CCTasksError):
    """A status change that the task lifecycle does not allow."""


class CorruptRecordError(CCTasksError):
    """A task's record file cannot be read (cut short, hand-edited); only that task is affected."""


class LeaseLostError(CCTasksError):
    """A worker's lease on a task expired or was taken over: it may not change the task any more."""


class WorkerUnavailableError(CCTasksError):
    """No worker could be started or reached for the store."""


class ReplyTooLargeError(CCTasksError):
    """A tool reply that cannot be made to fit the reply bound (replies.py)."""


class GitError(CCTasksError):
    """A git command failed or timed out (worktrees.py); the message quotes what git said."""


class MergeRefusedError(GitError):
    """merge_task refused, or undid, a merge: the repository was left as it was; the message says why."""


class NatsConfigError(ConfigError):
    """A NATS backend URL, credentials file or TLS file that cannot be used (nats_conn.py)."""


class BackendUnreachableError(CCTasksError):
    """The NATS servers of a backend URL could not be reached or refused the credentials in time."""


class ApprovalError(CCTasksError):
    """An answer to a sub-agent's permission request was refused: unknown, already answered, or expired."""

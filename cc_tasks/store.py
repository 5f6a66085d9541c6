"""The local store: the task engine over one machine's files (files_repo.FileRepo), with its worker started on
demand (launcher.WorkerLauncher). ``TaskStore(root)`` is what ``connect.open_backend`` returns for a folder."""

from __future__ import annotations

from pathlib import Path

from .config import default_lease_seconds
from .engine import TaskEngine
from .files_repo import FileRepo
from .ids import HOST, TASK_ID_RE, atomic_write, new_task_id, validate_task_id

__all__ = ["HOST", "TASK_ID_RE", "TaskStore", "atomic_write", "new_task_id", "validate_task_id"]


class TaskStore(TaskEngine):
    def __init__(self, root: Path | str, *, max_concurrent: int | None = None, lease_seconds: float | None = None):
        self.files = FileRepo(root, lease_seconds=lease_seconds or default_lease_seconds())
        super().__init__(self.files, max_concurrent=max_concurrent)
        self.root = self.files.root
        self.tasks_dir, self.workers_dir = self.files.tasks_dir, self.files.workers_dir
        self.socket_path = self.launcher.socket_path

    def task_dir(self, task_id: str) -> Path:
        return self.files.task_dir(task_id)

    def path(self, task_id: str, name: str) -> Path:
        return self.files.path(task_id, name)

    def active_ids(self) -> list[str]:
        return self.files.ids("active")

    def all_ids(self) -> list[str]:
        return self.files.ids("all")

    def exists(self, task_id: str) -> bool:
        return self.path(task_id, "record.json").is_file()

    def worker_known(self) -> bool:
        return self.launcher.worker_known()

    def worker_hello(self) -> dict | None:
        return self.launcher.worker_hello()

    def stop_worker(self) -> bool:
        """Ask the store's worker to take no more work and exit once its tasks have ended. True if one ran."""
        return self.launcher.stop_worker()

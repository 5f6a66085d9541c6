"""What the budget tools do: set_budget and get_budget (a spending limit shared by every window and machine of
the backend: the whole store's, or a group's; see limits.py for how claims reserve from it)."""

from __future__ import annotations

from .models import BudgetInfo
from .records import RecordsMixin


class BudgetMixin(RecordsMixin):
    def set_budget(self, budget_usd: float | None, group: str | None = None) -> BudgetInfo:
        return self.store.set_budget(budget_usd, group)

    def get_budget(self, group: str | None = None) -> BudgetInfo:
        return self.store.get_budget(group)

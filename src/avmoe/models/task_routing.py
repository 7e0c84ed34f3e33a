"""Task-conditioned routing: one router per task over the shared experts of every MoE adapter.

Routing is where mixture-of-experts and multitask learning meet: with :func:`install_task_routers` each
:class:`~avmoe.models.moe.MoEAdapter` keeps its experts (shared by all tasks) but chooses them with the router of
the task being run, selected by :func:`set_active_task`. The per-task routers start as copies of the adapter's
router, so a freshly built multitask model routes exactly as the single-task one does.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

from torch import Tensor, nn

from .moe import MoEAdapter, Router


class TaskRouters(nn.Module):
    """Drop-in for a :class:`Router`: ``forward`` runs the router of the active task.

    Args:
        router: the adapter's router, copied once per task.
        tasks: task names, in order.
    """

    def __init__(self, router: Router, tasks: Sequence[str]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("TaskRouters needs at least one task")
        self.routers = nn.ModuleDict({name: copy.deepcopy(router) for name in tasks})
        self.active: Optional[str] = None

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # (M, N, C), (M, N, C) -> (M, E)
        return self.route(x.mean(1), y.mean(1))

    def route(self, x_mean: Tensor, y_mean: Tensor) -> Tensor:  # (M, C), (M, C) token means -> (M, E)
        if self.active is None:
            raise RuntimeError(f"task routing: no active task (call set_active_task with one of "
                               f"{list(self.routers)})")
        return self.routers[self.active].route(x_mean, y_mean)


def moe_adapters(module: nn.Module) -> list[MoEAdapter]:
    """Every MoE adapter inside ``module``, in registration order."""
    return [m for m in module.modules() if isinstance(m, MoEAdapter)]


def install_task_routers(backbone: nn.Module, tasks: Sequence[str]) -> int:
    """Give every MoE adapter of ``backbone`` one router per task; returns the number of adapters changed."""
    adapters = moe_adapters(backbone)
    for adapter in adapters:
        if not isinstance(adapter.router, TaskRouters):
            adapter.router = TaskRouters(adapter.router, tasks)
    return len(adapters)


def set_active_task(backbone: nn.Module, task: str) -> None:
    """Route every adapter of ``backbone`` with ``task``'s routers (no-op without task routers)."""
    for m in backbone.modules():
        if isinstance(m, TaskRouters):
            if task not in m.routers:
                raise KeyError(f"task routing: unknown task {task!r}; routers exist for {list(m.routers)}")
            m.active = task

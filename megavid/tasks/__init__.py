"""Tasks: each builds data + model + loss for one job and plugs into the one engine loop.

- :mod:`megavid.tasks.registry`: task name -> task class (``TASKS``, ``get_task``), and the
  config a job runs its task with.
- :mod:`megavid.tasks.base`: what every task shares (the task protocol, model building with
  weight import, loaders) and the one training runner.
- :mod:`megavid.tasks.evaluation`: what every evaluation job shares (the weights, the
  set-up task and model, encoding a split, encoding texts).
- One module per job beside them; no task module imports another's private names.
"""

from __future__ import annotations

from megavid.tasks.registry import TASKS, get_task

__all__ = ["TASKS", "get_task"]

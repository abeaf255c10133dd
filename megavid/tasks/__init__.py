"""Tasks: each builds data + model + loss for one job and plugs into the one engine loop.

Registry: a dict filled by the ``register_task`` decorator; a duplicate name
raises, an unknown name raises with the list of valid names.
"""

from __future__ import annotations

from typing import Callable

from megavid.errors import ConfigError

TASKS: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in TASKS:
            raise ValueError(f"task '{name}' is registered twice ({TASKS[name]} and {cls})")
        TASKS[name] = cls
        cls.task_name = name
        return cls

    return deco


def get_task(name: str) -> type:
    # import the task modules so that their decorators run
    from megavid.tasks import classification, pretrain, qa, retrieval  # noqa: F401

    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}' (task.name); valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]

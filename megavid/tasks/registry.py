"""Which task a job runs.

:data:`TASKS` maps each task name (``task.name``) to the class that implements it, named as
``"module:Class"`` and imported on first use: the registry imports no task module, so the
task modules, and the job runners in them that look a task up, can all import it. A task
class says its own name in ``task_name``.

``megavid pretrain`` and ``eval-zeroshot`` run the task ``task.name`` names; the finetune jobs
run their own task, which :func:`job_config` records in the job's config (the default
``task.name`` stands for it; another name contradicts the job and is refused).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping

from megavid.config import Config, TaskConfig
from megavid.errors import ConfigError

TASK_CLASSES: dict[str, str] = {
    "pretrain": "megavid.tasks.pretrain:PretrainTask",
    "retrieval": "megavid.tasks.retrieval:RetrievalTask",
    "classification": "megavid.tasks.classification:ClassificationTask",
    "qa": "megavid.tasks.qa:QATask",
}
"""Task name -> ``"module:Class"`` of its class."""

DEFAULT_TASK = TaskConfig().name
"""``task.name`` when no config sets it: the finetune jobs replace it with their own task."""


class TaskRegistry(Mapping[str, type]):
    """A read-only name -> task class mapping whose classes are imported when first asked for.

    Args:
        targets: task name -> ``"module:Class"``.
    """

    def __init__(self, targets: Mapping[str, str]) -> None:
        self._targets = dict(targets)
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        if name not in self._classes:
            module, attr = self._targets[name].split(":")
            cls = getattr(importlib.import_module(module), attr)
            if cls.task_name != name:
                raise ValueError(f"{self._targets[name]} is registered as task {name!r} but "
                                 f"names itself {cls.task_name!r}")
            self._classes[name] = cls
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)


TASKS = TaskRegistry(TASK_CLASSES)
"""Task name -> task class (imported on first use)."""


def get_task(name: str) -> type:
    """The task class of ``task.name``; an unknown name is a ConfigError listing the valid ones."""
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}' (task.name); valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def job_config(cfg: Config, job: str, task: str) -> Config:
    """The config ``megavid <job>`` runs ``task`` with: ``task.name`` records the task that ran
    (the run's config.yaml and checkpoints keep it, and a resumed run must not change it).

    The default ``task.name`` stands for the job's task; any other name contradicts the job.
    ``cfg`` itself is left as it is (a new config when the name changes).

    Args:
        cfg: the resolved config.
        job: the subcommand, for the error message.
        task: the task the job runs (a key of :data:`TASKS`).

    Raises:
        ConfigError: ``task.name`` names another task.
    """
    if cfg.task.name == task:
        return cfg
    if cfg.task.name != DEFAULT_TASK:
        raise ConfigError(f"megavid {job} runs task.name={task}, not {cfg.task.name!r}; "
                          "drop the task override")
    return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name=task))

"""Which task a job runs, decided once: the registry names each task's class without importing
it, a job runs its own task (the config records it, the caller's config is left alone) and a
``task.name`` that contradicts the job is refused in one line; the training loader's
quarantine file is computed, not written into the config.

Oracles: the task classes themselves (their ``task_name``), the configs before and after, and
the CLI's exit code and stderr.
"""

from __future__ import annotations

import sys

import pytest

from megavid import cli
from megavid.config import compose
from megavid.errors import ConfigError
from megavid.tasks.registry import TASK_CLASSES, TASKS, TaskRegistry, get_task, job_config
from tests.helpers.multiprocess import run_job

# a tiny model and random-tensor data: nothing is decoded
TINY = ["model=timesformer_tiny", "model.video.img_size=32", "model.video.depth=1",
        "data.name=synthetic", "data.batch_size=2"]


def test_the_registry_imports_no_task_module_until_asked() -> None:
    code = ("import sys; from megavid.tasks.registry import TASKS; "
            "print(sorted(m for m in sys.modules if m.startswith('megavid.tasks.')))")
    out = run_job([sys.executable, "-c", code], timeout=120).check()
    assert out.stdout.strip() == "['megavid.tasks.registry']"
    for name in TASK_CLASSES:
        assert TASKS[name].task_name == name


def test_unknown_task_and_a_misnamed_entry_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown task 'nope' .*valid: classification, pretrain, qa, retrieval"):
        get_task("nope")
    with pytest.raises(ValueError, match="names itself 'pretrain'"):
        TaskRegistry({"qa": "megavid.tasks.pretrain:PretrainTask"})["qa"]


def test_a_job_runs_its_own_task_without_changing_the_callers_config() -> None:
    cfg = compose(TINY)
    assert cfg.task.name == "pretrain"  # the default stands for the job's task
    run = job_config(cfg, "finetune-cls", "classification")
    assert run.task.name == "classification" and cfg.task.name == "pretrain"
    assert run.task.cls is cfg.task.cls and run.model == cfg.model
    own = compose(TINY + ["task=cls_synthetic_colour"])
    assert job_config(own, "finetune-cls", "classification") is own
    with pytest.raises(ConfigError) as e:
        job_config(compose(TINY + ["task=qa"]), "finetune-cls", "classification")
    assert str(e.value) == ("megavid finetune-cls runs task.name=classification, not 'qa'; "
                            "drop the task override")


@pytest.mark.parametrize("job, other", [("finetune-cls", "qa"), ("finetune-retrieval", "classification"),
                                        ("finetune-qa", "retrieval")])
def test_a_contradicting_task_name_is_one_line_exit_2(job: str, other: str, tmp_path, capsys) -> None:
    rc = cli.main([job, *TINY, f"task.name={other}", f"run.output_dir={tmp_path}", "model.num_answers=4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"not '{other}'" in err, err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_the_train_loader_gets_the_run_quarantine_without_writing_the_config(tmp_path) -> None:
    from megavid.tasks.base import VideoTextTask, get_quarantine

    cfg = compose(TINY + [f"run.output_dir={tmp_path}", "run.name=q"])
    assert get_quarantine(cfg) == str(tmp_path / "q" / "quarantine.json")
    assert get_quarantine(compose(TINY + ["data.quarantine=/x/q.json"])) == "/x/q.json"
    assert get_quarantine(compose(TINY + ["run.debug=true"])) == ""
    VideoTextTask(cfg).build_train_loader(0, 1)
    assert cfg.data.quarantine == ""

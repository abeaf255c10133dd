"""What ``megavid --help``, every job's ``--help`` and every tool's ``--help`` say.

Oracles: the config dataclasses, walked here (every key a help names exists, with the default
shown); the ``configs/`` folder, listed here; the config keys each job needs, written here from
the runners' code; and the printed help itself (every job listed under its section, every
paragraph ending in a full stop, every option explained).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from megavid.cli import CONFIG_JOBS, TOOL_JOBS, Parser, build_parser, main
from megavid.config import GROUPS, Config, compose, to_dict
from megavid.jobs import SECTIONS

REPO = Path(__file__).resolve().parents[2]

# keys a user must be told about, per job (read off each runner: what it refuses without them,
# or what picks its data and weights)
NEEDED_KEYS = {
    "make-synthetic": {"data.root", "data.synthetic.num_train", "data.synthetic.codec"},
    "pretrain": {"data.root", "data.train", "data.val", "model.vtm_weight", "model.mlm_weight",
                 "train.max_steps", "train.wandb"},
    "finetune-retrieval": {"model.weights", "data.train", "eval.k_test"},
    "finetune-qa": {"model.num_answers", "data.root", "data.train", "data.val", "eval.split"},
    "finetune-cls": {"task.cls.label_field", "task.cls.classes", "task.cls.label_file",
                     "task.cls.multilabel", "eval.split"},
    "eval-zeroshot": {"model.weights", "eval.checkpoint", "eval.split", "eval.captions", "eval.k_test"},
    "eval-zeroshot-cls": {"task.cls.label_field", "task.cls.templates", "eval.checkpoint", "eval.split"},
    "linear-probe": {"task.cls.probe_weight_decays", "data.train", "data.val", "eval.split"},
    "extract-features": {"eval.split", "eval.checkpoint", "task.cls.features_format"},
    "eval-egocentric": {"task.ego.relevancy", "task.ego.relevancy_texts", "task.ego.egomcq", "eval.split"},
    "export-checkpoint": {"run.name"},
}


def leaf_keys(cls: type = Config, prefix: str = "") -> set[str]:
    """Every dotted leaf key of the config dataclasses."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


def help_of(capsys, *argv: str) -> str:
    """What ``megavid ARGV --help`` prints (it exits 0)."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def flat(text: str) -> str:
    return " ".join(text.split())


def unfinished_paragraphs(help_text: str) -> list[str]:
    """The paragraphs of a ``--help`` text that stop mid-sentence. The usage, and a heading line
    ending in ':' over indented lines (an options list, an example), are not prose; every other
    paragraph must end with '.'."""
    bad = []
    for para in help_text.strip().split("\n\n"):
        lines = para.splitlines()
        if lines[0].startswith("usage:"):
            continue
        if lines[0].endswith(":") and len(lines) > 1 and all(ln.startswith("  ") for ln in lines[1:]):
            continue
        if not para.endswith("."):
            bad.append(para)
    return bad


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    """prog -> parser of every command: ``megavid``, each config job, each tool (its module's
    ``build_parser``) and every sub-command below them."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(p: argparse.ArgumentParser) -> None:
        found[p.prog] = p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    if p.prog != "megavid" or name not in TOOL_JOBS:  # tools: their own parser
                        walk(child)

    walk(build_parser())
    for job in TOOL_JOBS.values():
        module, fn = job.target.split(":")
        assert callable(getattr(importlib.import_module(module), fn)), job.target
        walk(importlib.import_module(module).build_parser())
    return found


def test_the_paragraph_check_sees_a_cut_sentence():
    """The old `megavid info --help` description, cut at its docstring's first line."""
    cut = ("usage: megavid info [-h]\n\nmegavid info: versions, devices, which decode backends work "
           "here, and the decode plan\n\noptions:\n  -h, --help  show this help message and exit\n")
    assert unfinished_paragraphs(cut) == ["megavid info: versions, devices, which decode backends "
                                          "work here, and the decode plan"]
    assert unfinished_paragraphs(cut.replace("decode plan\n", "decode plan.\n")) == []
    assert unfinished_paragraphs("reads:\nthe shards") == ["reads:\nthe shards"]


def test_top_level_help_lists_every_job_under_its_section(capsys):
    out = help_of(capsys)
    jobs = {**CONFIG_JOBS, **TOOL_JOBS}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(jobs)
    assert "one subcommand per job" not in out and "parse-and-call" not in out
    assert out.split("\n\n")[1].startswith("megavid trains and evaluates video-language models")
    starts = [out.index(f"\n{section}:\n") for section in SECTIONS]
    assert starts == sorted(starts)
    bounds = dict(zip(SECTIONS, zip(starts, starts[1:] + [out.index("\npositional arguments:")])))
    wanted = {"data": {"make-synthetic", "make-shards", "verify-shards", "shard-stats"},
              "train": {"pretrain", "finetune-retrieval", "finetune-qa", "finetune-cls"},
              "evaluate": {"eval-zeroshot", "eval-zeroshot-cls", "eval-egocentric", "linear-probe",
                           "extract-features"},
              "tools": {"export-checkpoint", "info", "bench-loader", "launch"}}
    for section, names in wanted.items():
        lo, hi = bounds[section]
        for name in names:
            assert f"{name} {jobs[name].summary}" in flat(out[lo:hi]), (section, name)
    assert set().union(*wanted.values()) == set(jobs)
    epilog = flat(out.split("\noptions:")[1])
    for pointer in ("megavid JOB --help", "docs/configuration.md", "docs/monitoring.md",
                    "train.wandb=true", "MEGAVID_PROGRESS=1", "Weights & Biases", "TensorBoard"):
        assert pointer in epilog, pointer


def test_every_key_a_help_names_exists_in_the_config():
    keys = leaf_keys()
    assert {"model.num_answers", "task.cls.label_field", "data.synthetic.codec"} <= keys
    assert "task.cls" not in keys  # a section is not a key
    for name, job in CONFIG_JOBS.items():
        assert job.keys and set(job.keys) <= keys, (name, set(job.keys) - keys)
        assert NEEDED_KEYS[name] <= set(job.keys), (name, NEEDED_KEYS[name] - set(job.keys))
    assert set(NEEDED_KEYS) == set(CONFIG_JOBS)


def test_job_help_names_keys_defaults_files_and_an_example(capsys, monkeypatch):
    defaults = to_dict(Config())
    for name, job in CONFIG_JOBS.items():
        out = help_of(capsys, name)
        assert out.startswith(f"usage: megavid {name} ")
        text = flat(out)
        for key in job.keys:
            value: typing.Any = defaults
            for part in key.split("."):
                value = value[part]
            shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            assert f"{key}={shown} " in text, (name, key, shown)
        for heading in ("reads:", "writes:", "config keys it needs", "example:"):
            assert heading in out, (name, heading)
        for pattern in job.configs:
            folder = pattern.split("/")[0]
            files = sorted((REPO / "configs").glob(f"{pattern}.yaml"))
            assert files, (name, pattern)
            for f in files:
                token = f"{folder}={f.stem}" if folder in GROUPS else f"configs/{folder}/{f.name}"
                assert token in text, (name, token)
        assert f"example: {job.example} " in text
        assert ("docs/monitoring.md" in text and "MEGAVID_PROGRESS=1" in text
                and "train.wandb=true" in text) == (job.section == "train"), name
    qa = flat(help_of(capsys, "finetune-qa"))
    assert "model.num_answers=0 size of the answer vocabulary" in qa and "eval.split=test " in qa


def test_examples_run_through_the_parser_and_compose(monkeypatch):
    """Each job's example is a command line its parser takes and whose config composes (the
    config files it names exist, its keys are valid)."""
    monkeypatch.chdir(REPO)
    for name, job in CONFIG_JOBS.items():
        argv = shlex.split(job.example)
        assert argv[:2] == ["megavid", name]
        ns, extra = build_parser().parse_known_args(argv[1:])
        assert ns.command == name and not [t for t in extra if t.startswith("-")]
        tokens = [*ns.config, *extra] + ([f"run.name={ns.name}"] if getattr(ns, "name", None) else [])
        cfg = compose(tokens)
        if "--name" in argv:
            assert cfg.run.name == argv[argv.index("--name") + 1]


def test_every_help_is_complete_and_every_parser_errors_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    parsers = all_parsers()
    assert {"megavid", "megavid pretrain", "megavid make-shards", "megavid info", "megavid launch",
            "megavid launch deepspeed", "megavid launch make-sbatch"} <= set(parsers)
    for prog, p in parsers.items():
        assert isinstance(p, Parser), prog
        text = p.format_help()
        assert unfinished_paragraphs(text) == [], prog
        unexplained = [a.option_strings or a.dest for a in p._actions
                       if a.help != argparse.SUPPRESS and not (a.help or "").strip()]
        assert unexplained == [], (prog, unexplained)
        with pytest.raises(SystemExit) as e:
            p.error("argument --x: invalid choice: 'y'\n(choose from 'a', 'b')")
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err == (f"{prog}: error: argument --x: invalid choice: 'y' (choose from 'a', 'b'); "
                       f"see {prog} --help\n")


def test_info_help_is_its_whole_first_paragraph(capsys):
    text = flat(help_of(capsys, "info"))
    assert ("Versions, devices, which decode backends work here, and the decode plan "
            "data.backend=auto makes for a shard folder") in text
    assert "the plan a run logs at start-up)." in text
    assert "Config tokens (experiment=demo, data.train=...) name the shards and workers." in text


def test_launch_calls_itself_megavid_launch(capsys):
    out = help_of(capsys, "launch")
    assert out.startswith("usage: megavid launch ") and "python -m" not in out
    for mode in ("check-hostfile", "deepspeed", "torchrun", "slurm", "make-sbatch"):
        assert help_of(capsys, "launch", mode).startswith(f"usage: megavid launch {mode} ")
    with pytest.raises(SystemExit) as e:
        main(["launch", "torchrun", "--nnodes", "two", "--rdzv-endpoint", "h:1", "--", "pretrain"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("megavid launch torchrun: error: argument --nnodes: invalid int "
                                       "value: 'two'; see megavid launch torchrun --help\n")


@pytest.mark.parametrize("switch", [["--resume", "runs/x/checkpoints/step_1"], ["--name", "x"]])
def test_make_synthetic_refuses_switches_it_would_ignore(capsys, tmp_path, switch):
    root = tmp_path / "syn"
    with pytest.raises(SystemExit) as e:
        main(["make-synthetic", f"data.root={root}", *switch])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"megavid make-synthetic: error: unrecognized arguments: "
                                                   f"{switch[0]}")
    assert err.endswith("; see megavid make-synthetic --help\n") and not root.exists()

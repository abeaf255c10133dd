"""The CLI surface is frozen: features add config fields, not flags. A config job offers only
the switches its runner takes (oracle: the runner's signature)."""

import inspect

from megavid.cli import CONFIG_JOBS, TOOL_JOBS, _resolve, build_parser, main

EXPECTED_COMMANDS = {
    "make-synthetic", "pretrain", "finetune-retrieval", "finetune-qa", "eval-zeroshot",
    "export-checkpoint", "make-shards", "verify-shards", "shard-stats", "info", "bench-loader",
}
EVERY_JOB_FLAGS = {"-h", "--help", "--print-config",
                   "--local_rank", "--local-rank"}  # the last two: DeepSpeed launcher compatibility
EXPECTED_FLAGS = EVERY_JOB_FLAGS | {"--name", "--overwrite", "--resume"}


def test_subcommands_are_pinned():
    assert set(CONFIG_JOBS) | set(TOOL_JOBS) >= EXPECTED_COMMANDS


def test_config_job_flags_are_pinned():
    """Each config job: the shared flags, --name where it has a run directory (run.name), and
    exactly the keyword arguments of its runner; never a flag outside the frozen set."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, job in CONFIG_JOBS.items():
        params = set(inspect.signature(_resolve(job.target)).parameters) - {"cfg"}
        assert set(job.switches) == params, (name, params)
        flags = {s for a in sub.choices[name]._actions for s in a.option_strings}
        expected = EVERY_JOB_FLAGS | {f"--{p}" for p in params} | ({"--name"} if "run.name" in job.keys else set())
        assert flags == expected and flags <= EXPECTED_FLAGS, (name, flags)
    # the runners that take no --resume / --name are not offered them
    make_synthetic = {s for a in sub.choices["make-synthetic"]._actions for s in a.option_strings}
    assert "--resume" not in make_synthetic and "--name" not in make_synthetic
    assert {"--name", "--overwrite", "--resume"} <= {
        s for a in sub.choices["export-checkpoint"]._actions for s in a.option_strings}


def test_bench_loader_flags_are_pinned():
    """A tool with its own parser: `megavid bench-loader SHARDS` and these switches only."""
    from megavid.data.bench import build_parser as build_bench_parser

    assert TOOL_JOBS["bench-loader"].target == "megavid.data.bench:main"
    parser = build_bench_parser()
    assert {s for a in parser._actions for s in a.option_strings} == {
        "-h", "--help", "--backend", "--device", "--seconds", "--batch", "--json"}
    assert [a.dest for a in parser._actions if not a.option_strings] == ["shards"]


def test_print_config_applies_name_and_overrides(capsys):
    assert main(["pretrain", "experiment=demo", "--name", "x1", "train.max_steps=9", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "name: x1" in out and "max_steps: 9" in out


def _run_cli(*args: str):
    from tests.helpers.multiprocess import python_module, run_job

    return run_job(python_module("megavid.cli", *args), timeout=300)


def test_missing_data_path_is_one_line(tmp_path):
    r = _run_cli("pretrain", "experiment=demo", f"data.root={tmp_path / 'nope'}", f"run.output_dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "does not exist" in r.stderr and "make-synthetic" in r.stderr


def test_empty_shard_dir_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _run_cli("eval-zeroshot", "experiment=demo", f"data.test={tmp_path / 'empty'}", f"run.output_dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "holds no .tar shards" in r.stderr, r.stderr


def test_usage_errors_are_one_line(tmp_path):
    """A wrong choice of a tool's flag and an unknown flag of a config job: exit 2 and one
    stderr line naming the problem and the help to read, no usage block."""
    r = _run_cli("make-shards", "--format", "nope", "--videos", str(tmp_path), "--annotations",
                 str(tmp_path / "a.csv"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("megavid make-shards: error: argument --format: invalid choice: 'nope' "
                               "(choose from 'auto', "), r.stderr
    assert r.stderr.rstrip().endswith("; see megavid make-shards --help") and "usage:" not in r.stderr
    assert not (tmp_path / "out").exists()

    r = _run_cli("pretrain", "experiment=demo", "--bogus", f"run.output_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == "megavid pretrain: error: unrecognized arguments: --bogus; see megavid pretrain --help\n"
    assert not list(tmp_path.iterdir())

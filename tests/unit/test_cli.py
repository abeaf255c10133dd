"""The CLI surface is frozen: features add config fields, not flags."""

from megavid.cli import CONFIG_JOBS, TOOL_JOBS, build_parser, main

EXPECTED_COMMANDS = {
    "make-synthetic", "pretrain", "finetune-retrieval", "finetune-qa", "eval-zeroshot",
    "export-checkpoint", "make-shards", "verify-shards", "shard-stats", "info", "bench-loader",
}
EXPECTED_FLAGS = {"-h", "--help", "--print-config", "--name", "--overwrite", "--resume",
                  "--local_rank", "--local-rank"}  # the last two: DeepSpeed launcher compatibility


def test_subcommands_are_pinned():
    assert set(CONFIG_JOBS) | set(TOOL_JOBS) >= EXPECTED_COMMANDS


def test_config_job_flags_are_pinned():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in CONFIG_JOBS:
        flags = {s for a in sub.choices[name]._actions for s in a.option_strings}
        assert flags == EXPECTED_FLAGS, (name, flags)


def test_bench_loader_flags_are_pinned():
    """A tool with its own parser: `megavid bench-loader SHARDS` and these switches only."""
    from megavid.data.bench import build_parser as build_bench_parser

    assert TOOL_JOBS["bench-loader"][0] == "megavid.data.bench:main"
    parser = build_bench_parser()
    assert {s for a in parser._actions for s in a.option_strings} == {
        "-h", "--help", "--backend", "--device", "--seconds", "--batch", "--json"}
    assert [a.dest for a in parser._actions if not a.option_strings] == ["shards"]


def test_print_config_applies_name_and_overrides(capsys):
    assert main(["pretrain", "experiment=demo", "--name", "x1", "train.max_steps=9", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "name: x1" in out and "max_steps: 9" in out


def _run_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "megavid.cli", *args], capture_output=True, text=True)


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

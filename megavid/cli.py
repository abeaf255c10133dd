"""`megavid` entry point: one subcommand per job, each a thin parse-and-call.

Config-driven jobs take config tokens (``experiment=demo model=timesformer_tiny
train.max_steps=10 extra.yaml``) and a few run-level switches; features add config fields,
not flags (tests/unit/test_cli.py pins the flag set).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import multiprocessing
import os
import sys
import traceback
from typing import Callable

from megavid.errors import MegavidError, Preempted, describe_exception

log = logging.getLogger("megavid.cli")

# subcommand -> ("module:function", help). Config jobs are called as fn(cfg, **run_switches);
# tool jobs as fn(args) with their own parser in `_TOOL_PARSERS`.
CONFIG_JOBS: dict[str, tuple[str, str]] = {
    "make-synthetic": ("megavid.shards.synthetic:run_make_synthetic", "generate the moving-shapes dataset and its shards"),
    "pretrain": ("megavid.tasks.pretrain:run_pretrain", "pretrain (VTC + VTM + MLM)"),
    "finetune-retrieval": ("megavid.tasks.retrieval:run_finetune_retrieval", "finetune for text-video retrieval"),
    "finetune-qa": ("megavid.tasks.qa:run_finetune_qa", "finetune for video QA"),
    "eval-zeroshot": ("megavid.tasks.zeroshot:run_eval_zeroshot", "zero-shot retrieval and multiple-choice QA"),
    "export-checkpoint": ("megavid.engine.checkpoint:run_export_checkpoint", "write a consolidated fp32 state dict"),
    "finetune-cls": ("megavid.tasks.classification:run_finetune_cls", "finetune video classification (top-k or mAP)"),
    "eval-zeroshot-cls": ("megavid.tasks.classification:run_eval_zeroshot_cls", "zero-shot classification from class-name prompts"),
    "linear-probe": ("megavid.tasks.linear_probe:run_linear_probe", "linear probe of frozen video features (L2 sweep)"),
    "extract-features": ("megavid.tasks.features:run_extract_features", "write a split's video and text features to files"),
    "eval-egocentric": ("megavid.tasks.egocentric:run_eval_egocentric", "EK-100 multi-instance retrieval and EgoMCQ"),
}
TOOL_JOBS: dict[str, tuple[str, str]] = {
    "make-shards": ("megavid.shards.ingest.make_shards:main", "make validated webdataset shards from videos + annotations"),
    "verify-shards": ("megavid.shards.verify:verify_main", "check every shard, index and stats file"),
    "shard-stats": ("megavid.shards.stats:main", "totals, duration histogram, codec/resolution counts, failures (--json)"),
    "info": ("megavid.info:main", "versions, devices and working decode backends"),
    "bench-loader": ("megavid.data.bench:main", "clips/s of each decode path on your shards here, and what auto picks"),
    "launch": ("megavid.launch:main", "multi-node launch: check-hostfile, deepspeed, torchrun, slurm, make-sbatch"),
}


def _resolve(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megavid", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_) in CONFIG_JOBS.items():
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", nargs="*", help="group=name, key.sub=value or file.yaml")
        s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        s.add_argument("--name", help="run name (run.name)")
        s.add_argument("--overwrite", action="store_true", help="start afresh in an existing run directory")
        s.add_argument("--resume", metavar="PATH", help="resume from this checkpoint instead of the latest")
        # the DeepSpeed launcher appends --local_rank=N; rank info is read from the environment
        s.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    for name, (_, help_) in TOOL_JOBS.items():
        s = sub.add_parser(name, help=help_, add_help=False)
        s.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # config tokens may come after switches: collect the leftovers that are not flags
    ns, extra = parser.parse_known_args(argv)
    if extra and ns.command in TOOL_JOBS:
        # REMAINDER misses a tool's leading options (`info --shards D`): the tool parses all
        ns.args = argv[argv.index(ns.command) + 1:]
    elif extra:
        if any(t.startswith("-") for t in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        ns.config = list(ns.config) + extra
    try:
        if ns.command in TOOL_JOBS:
            rc = _resolve(TOOL_JOBS[ns.command][0])(ns.args)
            return int(rc or 0)
        from megavid.config import compose, to_yaml

        tokens = list(ns.config)
        if ns.name:
            tokens.append(f"run.name={ns.name}")
        cfg = compose(tokens)
        if ns.print_config:
            print(to_yaml(cfg), end="")
            return 0
        fn = _resolve(CONFIG_JOBS[ns.command][0])
        fn(cfg, overwrite=ns.overwrite, resume=ns.resume)
        return 0
    except Preempted as e:
        print(f"megavid {ns.command}: {e}", file=sys.stderr)
        return e.exit_code
    except MegavidError as e:
        print(f"megavid {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megavid {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends the job with one line
        _report_unexpected(ns.command, e)
        return 1
    finally:
        stop_child_processes()


def _report_unexpected(command: str, exc: BaseException) -> None:
    """One line on stderr; the full traceback in this rank's log file (logs/rank<R>.log),
    or on stderr before that line when the job failed before it had a log file."""
    files = [h for h in logging.getLogger("megavid").handlers if isinstance(h, logging.FileHandler)]
    where = ""
    if files:
        log.error("%s failed", command, exc_info=exc, extra={"file_only": True})
        for h in files:
            h.flush()
        where = f" (traceback in {files[0].baseFilename})"
    else:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"megavid {command}: error: {describe_exception(exc)}{where}", file=sys.stderr, flush=True)


def run(argv: list[str] | None = None) -> None:
    """The ``megavid`` program: :func:`main`, then the process ends with its code at once.

    Logs and standard streams are flushed, then ``os._exit``: interpreter teardown after a
    distributed job ran C++ destructors of gloo's threads unjoined, and a rank of a good
    two-node run died with "terminate called without an active exception" (-6) after its
    work was done and written (destroying the process group first did not prevent it).
    Everything a job writes is closed by the job itself; loader workers are stopped in
    :func:`main`. Tests call :func:`main` in their own process instead.
    """
    rc = main(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def stop_child_processes(timeout: float = 5.0) -> int:
    """Stop the worker processes a job leaves behind; returns how many were killed.

    Loader workers ignore SIGTERM (a preempted job must write its checkpoint before they go),
    and SIGTERM is what Python's exit handler sends its daemonic worker processes before
    waiting for them: a job whose loop died on an exception then waited for its DataLoader
    workers forever. Collecting the dead loop's frames lets each loader shut its workers down
    itself; the daemonic children still alive after that, which Python would stop at exit
    anyway, are killed.
    """
    if not any(p.daemon for p in multiprocessing.active_children()):
        return 0
    gc.collect()
    left = [p for p in multiprocessing.active_children() if p.daemon]
    for p in left:
        p.kill()
    for p in left:
        p.join(timeout=timeout)
    return len(left)


if __name__ == "__main__":
    run()

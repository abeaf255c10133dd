"""The ``megavid`` program: one subcommand per job (:mod:`megavid.jobs` lists them and writes
their help), each a parse-and-call.

Config jobs take config tokens (``experiment=demo model=timesformer_tiny train.max_steps=10
extra.yaml``) and the run switches their runner accepts; features add config fields, not
flags. Tool jobs parse their own ``--flags``. Every parser is a :class:`Parser`, whose errors
are one line.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import multiprocessing
import os
import re
import sys
import textwrap
import traceback
from typing import Any, Callable, NoReturn

from megavid.config import compose, to_yaml
from megavid.errors import MegavidError, Preempted, describe_exception
from megavid.parser import Parser, doc_summary  # noqa: F401  (re-exported: tools and tests use them)
from megavid.jobs import CONFIG_JOBS, TOOL_JOBS, describe_job, describe_jobs, job_epilog, jobs_epilog

log = logging.getLogger("megavid.cli")


_SWITCH_ARGS: dict[str, dict[str, Any]] = {
    "overwrite": {"action": "store_true"},
    "resume": {"metavar": "PATH"},
}
"""argparse options of each run switch a runner may take."""


def _resolve(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def build_parser() -> Parser:
    """The ``megavid`` parser: a subparser per config job with the switches its runner takes;
    a tool job's subparser hands everything after its name to the tool's own parser."""
    raw = argparse.RawDescriptionHelpFormatter
    p = Parser(prog="megavid", description=describe_jobs(), epilog=jobs_epilog(), formatter_class=raw)
    sub = p.add_subparsers(dest="command", metavar="JOB", required=True,
                           help="the job to run: one of those listed above")
    for name, job in CONFIG_JOBS.items():
        s = sub.add_parser(name, description=describe_job(job), epilog=job_epilog(job), formatter_class=raw)
        s.add_argument("config", nargs="*", metavar="CONFIG",
                       help="config tokens: group=name, key.sub=value or file.yaml")
        s.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit without running")
        if "run.name" in job.keys:
            s.add_argument("--name", help="run name: short for run.name=NAME")
        for switch, help_ in job.switches.items():
            s.add_argument(f"--{switch}", help=help_, **_SWITCH_ARGS[switch])
        # the DeepSpeed launcher appends --local_rank=N; rank info is read from the environment
        s.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
        s.set_defaults(job_parser=s)
    for name in TOOL_JOBS:
        s = sub.add_parser(name, add_help=False)
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
        flags = [t for t in extra if t.startswith("-")]
        if flags:
            ns.job_parser.error(f"unrecognized arguments: {' '.join(flags)}")
        ns.config = list(ns.config) + extra
    try:
        if ns.command in TOOL_JOBS:
            rc = _resolve(TOOL_JOBS[ns.command].target)(ns.args)
            return int(rc or 0)
        job = CONFIG_JOBS[ns.command]
        tokens = list(ns.config)
        if getattr(ns, "name", None):
            tokens.append(f"run.name={ns.name}")
        cfg = compose(tokens)
        if ns.print_config:
            print(to_yaml(cfg), end="")
            return 0
        _resolve(job.target)(cfg, **{switch: getattr(ns, switch) for switch in job.switches})
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

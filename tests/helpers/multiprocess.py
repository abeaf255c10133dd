"""The one way tests start processes.

- :func:`run_ranks`: a picklable function on N gloo ranks (fresh interpreters, a fresh file
  store), each rank's return value back in rank order; a rank's exception is re-raised in the
  test with that rank's traceback; ranks still running at the timeout are killed and fail the
  test (never a hanging suite).
- :func:`start_job` / :func:`run_job`: a command (a ``megavid`` job, a worker module, a launcher
  script) alone or as N ranks under ``python -m torch.distributed.run``, in its own session
  (a timeout kills every process it started), with :func:`process_env`; output is captured in
  files (no pipe to fill up) and comes back in a :class:`JobResult`.
- :func:`worker_main`: how every worker or driver program ends (see its docstring).

The rank processes run this module: ``python -m tests.helpers.multiprocess FOLDER RANK``.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

ROOT = Path(__file__).resolve().parents[2]
# what a launcher sets: a test process must never inherit them from whatever started pytest
# (a stray RANK/WORLD_SIZE makes a lone process wait for peers that never come)
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "GROUP_RANK",
                 "NODE_RANK", "CROSS_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_COMM_WORLD_")
# after one rank failed, how long the others get to end by themselves before they are killed
# (a peer blocked in a collective with the failed rank may otherwise wait for the timeout)
FAILED_RANK_GRACE_S = 10.0
TAIL_CHARS = 4000


class RankError(AssertionError):
    """A rank failed without an exception that could be re-raised here (it died, or its
    exception could not be pickled)."""


class ProcessTimeout(AssertionError):
    """Processes still running at their timeout (they were killed)."""


def free_port() -> int:
    """A TCP port free on this host (in the current network namespace) right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(**overrides: str | None) -> dict[str, str]:
    """The environment of every process a test starts: this process's, without any launcher's
    rank variables, offline (no hub), tokenizers without their own threads, one OMP/MKL thread
    per process (two cores shared by up to four processes: more threads only spin-wait), and the
    repository on PYTHONPATH (``tests.helpers`` and the checkout's ``megavid``); then
    ``overrides`` (``None`` removes a variable). A lone ``megavid`` process picks a free
    rendezvous port itself; :func:`start_job` gives N ranks a free ``--master_port``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def python_module(module: str, *args: str) -> list[str]:
    """The command line running ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def _tail(text: str, n: int = TAIL_CHARS) -> str:
    return text if len(text) <= n else "..." + text[-n:]


@dataclass
class JobResult:
    """A finished job: what :class:`subprocess.CompletedProcess` holds, and its wall time."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        """The command, its exit code and the tails of its output, for a failure message."""
        cmd = " ".join(self.argv[:10]) + (" ..." if len(self.argv) > 10 else "")
        return (f"{cmd}\nexited {self.returncode} after {self.seconds:.0f} s\n"
                f"--- stdout (tail)\n{_tail(self.stdout)}\n--- stderr (tail)\n{_tail(self.stderr)}")

    def check(self) -> JobResult:
        """Fail the test unless the job exited 0, with the tails of its output."""
        __tracebackhide__ = True
        assert self.returncode == 0, self.describe()
        return self


class Job:
    """A started command: its own session (``os.killpg`` reaches every process it started),
    stdout and stderr in temporary files. ``nproc`` > 1 runs it as that many ranks under
    ``python -m torch.distributed.run`` on a free port (``--no-python``: ``argv`` is the whole
    command of one rank)."""

    def __init__(self, argv: Sequence[str], *, nproc: int = 1, env: dict[str, str] | None = None,
                 cwd: str | Path = ROOT) -> None:
        argv = [str(a) for a in argv]
        if nproc > 1:
            argv = python_module("torch.distributed.run", f"--nproc_per_node={nproc}",
                                 f"--master_port={free_port()}", "--no-python", *argv)
        self.argv = argv
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        self.started = time.time()
        self._t0 = time.monotonic()
        self._seconds: float | None = None
        self.proc = subprocess.Popen(argv, env=process_env() if env is None else env, cwd=str(cwd),
                                     stdout=self._out, stderr=self._err, start_new_session=True)

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        rc = self.proc.poll()
        if rc is not None and self._seconds is None:
            self._seconds = time.monotonic() - self._t0
        return rc

    def send_signal(self, sig: int) -> None:
        """Signal the command's own process (not its children)."""
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL every process left in the command's process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def result(self) -> JobResult:
        """The finished command's exit code and output."""
        rc = self.proc.wait()
        self.poll()

        def read(f) -> str:
            f.seek(0)
            return f.read().decode(errors="replace")

        return JobResult(self.argv, rc, read(self._out), read(self._err), self._seconds)

    def wait(self, timeout: float) -> JobResult:
        """Wait for the command to end; past ``timeout`` seconds its process group is killed and
        :class:`ProcessTimeout` names it with its output."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ProcessTimeout(f"still running after {timeout:.0f} s (killed):\n{self.result().describe()}") from None
        return self.result()


def start_job(argv: Sequence[str], *, nproc: int = 1, env: dict[str, str] | None = None,
              cwd: str | Path = ROOT) -> Job:
    """Start ``argv`` (see :class:`Job`) with ``env`` (default :func:`process_env`)."""
    return Job(argv, nproc=nproc, env=env, cwd=cwd)


def run_job(argv: Sequence[str], *, nproc: int = 1, env: dict[str, str] | None = None,
            timeout: float = 600, cwd: str | Path = ROOT) -> JobResult:
    """Run ``argv`` to its end (see :class:`Job`, :meth:`Job.wait`)."""
    return start_job(argv, nproc=nproc, env=env, cwd=cwd).wait(timeout)


# ------------------------------------------------------------------------------------------
# ranks of a function
# ------------------------------------------------------------------------------------------
def _import_root(fn: Callable) -> Path:
    """The sys.path entry the module of ``fn`` is imported from (pytest imports a test module
    by its base name from its own folder)."""
    module = sys.modules[fn.__module__]
    if fn.__module__ == "__main__" or not getattr(module, "__file__", None):
        raise TypeError(f"run_ranks needs a function of an importable module, not {fn!r}")
    return Path(module.__file__).resolve().parents[fn.__module__.count(".")]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300) -> list[Any]:
    """``fn(rank, *args)`` on ``world_size`` gloo ranks; their return values in rank order.

    Each rank is a fresh interpreter (never a fork of pytest, nor a re-import of its
    ``__main__``) with :func:`process_env` and the launcher variables torchrun sets (RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); torch.distributed is initialised on a fresh file
    store before ``fn`` runs and destroyed after it. ``fn``, ``args`` and the return values
    must pickle (``fn``: a module-level function).

    A rank that raises: its exception is re-raised here with a note naming the rank and
    holding its traceback (the other ranks get ``FAILED_RANK_GRACE_S`` to end, then are
    killed); a rank that dies without a result: :class:`RankError`; ranks still running after
    ``timeout`` seconds are killed: :class:`ProcessTimeout`.
    """
    __tracebackhide__ = True  # pytest shows the test's call, then the rank's traceback (a note)
    call = pickle.dumps((fn, args))  # a lambda or a local function fails here, in the test
    env = process_env(PYTHONPATH=os.pathsep.join(dict.fromkeys([str(_import_root(fn)), str(ROOT)])),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    name = f"{fn.__module__}.{fn.__qualname__}"
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        Path(tmp, "call.pkl").write_bytes(pickle.dumps({"call": call, "world_size": world_size,
                                                        "timeout": timeout}))
        jobs = [start_job(python_module(__name__, tmp, str(rank)),
                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                for rank in range(world_size)]
        try:
            hung = _wait_ranks(jobs, timeout)
        finally:
            for job in jobs:
                job.kill()
        results = [job.result() for job in jobs]
        records = [_read_record(Path(tmp, f"rank{rank}.pkl")) for rank in range(world_size)]
    raised = sorted((rec["time"], rank) for rank, rec in enumerate(records) if rec and rec["status"] == "raised")
    if raised:
        rank = raised[0][1]
        _reraise(name, rank, world_size, records[rank], _others(rank, results, records, hung))
    if hung:
        tails = "\n".join(f"--- rank {r}\n{results[r].describe()}" for r in hung)
        raise ProcessTimeout(f"{name}: rank(s) {hung} of {world_size} still running after {timeout:.0f} s "
                             f"(killed)\n{tails}")
    for rank, rec in enumerate(records):
        if rec is None:
            raise RankError(f"{name}: rank {rank} of {world_size} ended without a result\n"
                            f"{results[rank].describe()}")
    return [rec["value"] for rec in records]


def _wait_ranks(jobs: list[Job], timeout: float) -> list[int]:
    """Wait for every rank, at most ``timeout`` s, and ``FAILED_RANK_GRACE_S`` after the first
    failure; returns the ranks still running then."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [job.poll() for job in jobs]
        running = [r for r, c in enumerate(codes) if c is None]
        if not running:
            return []
        if any(c not in (None, 0) for c in codes):
            deadline = min(deadline, time.monotonic() + FAILED_RANK_GRACE_S)
        if time.monotonic() >= deadline:
            return running
        time.sleep(0.05)


def _read_record(path: Path) -> dict | None:
    return pickle.loads(path.read_bytes()) if path.is_file() else None


def _others(rank: int, results: list[JobResult], records: list[dict | None], hung: list[int]) -> str:
    """One line per other rank: how it ended."""
    lines = []
    for r, (res, rec) in enumerate(zip(results, records)):
        if r == rank:
            continue
        if rec is not None:
            how = "returned" if rec["status"] == "ok" else f"raised later: {rec['summary']}"
        elif r in hung:
            how = "was still running (killed)"
        else:
            how = f"exited {res.returncode} without a result"
        lines.append(f"rank {r}: {how}")
    return "\n".join(lines)


def _reraise(name: str, rank: int, world_size: int, rec: dict, others: str) -> NoReturn:
    __tracebackhide__ = True
    note = f"raised on rank {rank} of {world_size} in {name}; that rank's traceback:\n{rec['traceback']}"
    if others:
        note += f"\nthe other ranks:\n{others}"
    exc = pickle.loads(rec["exception"]) if rec["exception"] is not None else None
    if exc is None:
        exc = RankError(f"rank {rank} of {world_size} raised {rec['summary']}")
    exc.add_note(note)
    raise exc


def _run_rank(folder: Path, rank: int) -> int:
    """One rank of :func:`run_ranks`: run the call, write its record ``rank<R>.pkl``."""
    import torch.distributed as dist

    spec = pickle.loads((folder / "call.pkl").read_bytes())
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=rank,
                                world_size=spec["world_size"], timeout=timedelta(seconds=spec["timeout"]))
        fn, args = pickle.loads(spec["call"])
        record = pickle.dumps({"status": "ok", "value": fn(rank, *args), "time": time.time()})
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the test
        try:
            exception = pickle.dumps(e)
            pickle.loads(exception)
        except Exception:  # noqa: BLE001 - not re-raisable over there: its text still is
            exception = None
        record = pickle.dumps({"status": "raised", "exception": exception, "time": time.time(),
                               "summary": f"{type(e).__name__}: {e}",
                               "traceback": "".join(traceback.format_exception(e))})
    tmp = folder / f".rank{rank}.pkl"
    tmp.write_bytes(record)
    tmp.rename(folder / f"rank{rank}.pkl")
    return 0


# ------------------------------------------------------------------------------------------
# the end of a worker process
# ------------------------------------------------------------------------------------------
def worker_main(main: Callable[[], int | None]) -> NoReturn:
    """Run ``main`` as the whole of a worker or driver process, then end the process: its
    exception's traceback on stderr (code 1), the process group destroyed when one was
    initialised, logging and both standard streams flushed, then ``os._exit(code)`` (``main``'s
    return value, 0 for None).

    Why ``os._exit``: ranks that had finished their work and written every result sometimes died
    at interpreter teardown with "terminate called without an active exception" (exit -6) on
    this torch, a C++ thread (gloo's) still joinable during static destruction; that failed good
    runs. Skipping the teardown is what the ``megavid`` program itself does
    (``megavid.cli.run``); everything a worker writes it closes itself.
    """
    code = 1
    try:
        rc = main()
        code = 0 if rc is None else int(rc)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)  # what the interpreter prints for sys.exit("message")
    except BaseException:  # noqa: BLE001 - reported, then the process ends
        traceback.print_exc()
    finally:
        dist = sys.modules.get("torch.distributed")
        try:
            if dist is not None and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the process ends anyway
            traceback.print_exc()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


if __name__ == "__main__":
    worker_main(lambda: _run_rank(Path(sys.argv[1]), int(sys.argv[2])))

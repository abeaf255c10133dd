"""Fault injection: every failure ends the job (never hangs it) with a non-zero code and one
line naming the problem, leaves no process behind, keeps the last good checkpoint as
``latest``, and resuming from it reproduces the uninterrupted run.

The oracle is a second, uninterrupted run of the same job (its per-step losses), the
processes of the job's session read from /proc, and the files on disk. The faults are real
where this machine allows (a full tmpfs, an immutable folder, SIGTERM) and injected through
``tests/helpers/fault_driver.py`` otherwise (an exception in a loader worker or in one rank's
forward pass, PyTorch's CUDA out-of-memory error): that driver patches the code in its own
process only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megavid.engine.logging import read_metrics
from tests.helpers.multiprocess import python_module, start_job

pytestmark = [pytest.mark.slow]

EXIT_WITHIN_S = 60


def _session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (zombies excluded), from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(d.name))
    return out


class Job:
    """`megavid ...` with a fault (tests/helpers/fault_driver.py), started by the harness in its
    own session (so that every process it starts can be found), as ``nproc`` ranks."""

    def __init__(self, fault: str, args: tuple[str, ...], nproc: int = 1) -> None:
        self.job = start_job(python_module("tests.helpers.fault_driver", fault, *args), nproc=nproc)
        self.proc, self.started = self.job.proc, self.job.started

    def wait(self, timeout: float = 300) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once the job ended (killed, failing the test, at
        ``timeout``), after checking that no process of its session is left."""
        res = self.job.wait(timeout)
        self.elapsed = res.seconds
        deadline = time.monotonic() + 10
        while _session_processes(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _session_processes(self.proc.pid)
        if left:
            self.job.kill()
        assert not left, f"processes left behind: {left}"
        return res.returncode, res.stdout, res.stderr


def _megavid(fault: str, *args: str) -> Job:
    return Job(fault, args)


def _one_line_error(err: str, *needles: str) -> str:
    """The job's last stderr line: megavid's one-line error, with no traceback on stderr."""
    assert "Traceback" not in err, err[-4000:]
    errors = [ln for ln in err.splitlines() if " ERROR " in ln or ln.startswith("megavid ")]
    assert len(errors) == 1, errors
    last = err.strip().splitlines()[-1]
    assert last.startswith("megavid pretrain: "), err[-4000:]
    for n in needles:
        assert n in last, f"{n!r} not in {last!r}"
    return last


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def _losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in read_metrics(run_dir).items()}


@pytest.fixture
def tmpfs(tmp_path):
    """A 512 MiB tmpfs (a disk this test can fill), or skip where mounting is not allowed."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs (CI runs as root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)


def test_single_process_faults_end_the_job_and_resume_exactly(base_tokens, tmpfs):
    """worker exception, out of memory, unwritable checkpoints, full disk, SIGTERM: each ends
    the job with one line and the documented code; the chain of resumes equals one run."""
    steps = 8
    common = [t for t in base_tokens if not t.startswith(("run.output_dir=", "data.num_workers="))] + [
        f"run.output_dir={tmpfs}", "data.num_workers=2", f"train.max_steps={steps}",
        "train.ckpt_every=2", "train.log_every=1", "train.eval_every=0"]
    run = tmpfs / "faulty"

    # The reference: one uninterrupted run, its stderr a pipe (no terminal): plain lines.
    rc, _, err = _megavid("none", "pretrain", *common, "run.name=reference").wait()
    assert rc == 0, err[-4000:]
    ref = _losses(tmpfs / "reference")
    assert sorted(ref) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        line = next(ln for ln in err.splitlines() if f"step {s}/{steps} | epoch 0 | loss " in ln)
        assert f"loss {ref[s]:.6g}" in line and "samples/s" in line and "data wait" in line
        assert "feed " in line and "decode wait " in line
        assert "skipped 0" in line
    log0 = (tmpfs / "reference" / "logs" / "rank0.log").read_text()
    assert f"step {steps}/{steps} | epoch 0 | loss {ref[steps]:.6g}" in log0
    assert f"run finished: step {steps}/{steps} (epoch 0)" in err
    assert "skipped samples: 0" in err and str(tmpfs / "reference" / "checkpoints" / f"step_{steps}") in err

    # 1. An exception inside a DataLoader worker at step 3.
    job = _megavid("worker@3", "pretrain", *common, "run.name=faulty")
    rc, _, err = job.wait()
    assert rc == 1 and job.elapsed < EXIT_WITHIN_S, (rc, job.elapsed, err[-3000:])
    _one_line_error(err, "injected fault in loader worker", "traceback in")
    assert "Traceback" in (run / "logs" / "rank0.log").read_text()
    assert _latest(run) == "step_2"

    # 2. CUDA out of memory at step 5 (resumed from step_2: the default is the run's latest).
    job = _megavid("oom@5", "pretrain", *common, "run.name=faulty")
    rc, _, err = job.wait()
    assert rc == 1 and job.elapsed < EXIT_WITHIN_S, (rc, job.elapsed, err[-3000:])
    _one_line_error(err, "OutOfMemoryError", "lower data.batch_size")
    assert _latest(run) == "step_4"

    # 3. An unwritable checkpoints folder: refused before any work, naming the folder.
    _immutable(run / "checkpoints", True)
    try:
        job = _megavid("none", "pretrain", *common, "run.name=faulty")
        rc, _, err = job.wait()
    finally:
        _immutable(run / "checkpoints", False)
    assert rc == 2 and job.elapsed < EXIT_WITHIN_S, (rc, err[-3000:])
    _one_line_error(err, f"cannot write the output folder {run / 'checkpoints'}")
    assert _latest(run) == "step_4"

    # 4. The disk fills up: leave less room than one checkpoint, so saving step_6 fails.
    ckpt_bytes = sum(f.stat().st_size for f in (run / "checkpoints" / "step_4").rglob("*") if f.is_file())
    filler = tmpfs / "filler"
    free = shutil.disk_usage(tmpfs).free
    left = max(0, free - ckpt_bytes // 2)
    with open(filler, "wb") as f:
        while left > 0:
            n = min(left, 1 << 24)
            f.write(b"\1" * n)
            left -= n
    job = _megavid("none", "pretrain", *common, "run.name=faulty")
    rc, _, err = job.wait()
    filler.unlink()
    assert rc == 2 and job.elapsed < EXIT_WITHIN_S, (rc, err[-3000:])
    last = _one_line_error(err, "saving checkpoint", "step_6", "disk is full",
                           f"the last good checkpoint is {run / 'checkpoints' / 'step_4'}")
    assert _latest(run) == "step_4", last

    # 5. SIGTERM (preemption): checkpoint at the step boundary, then exit 143.
    job = _megavid("none", "pretrain", *common, "run.name=faulty", "train.ckpt_every=100")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.proc.poll() is None:
        if max(read_metrics(run), default=0) >= 5 and (run / "metrics.jsonl").stat().st_mtime > job.started:
            break
        time.sleep(0.1)
    job.proc.send_signal(signal.SIGTERM)
    rc, _, err = job.wait()
    assert rc == 128 + signal.SIGTERM, (rc, err[-3000:])
    stopped = int(_latest(run).split("_")[1])
    assert 5 <= stopped < steps, stopped
    assert f"stopped by SIGTERM at step {stopped}" in err.strip().splitlines()[-1]

    # 6. The last resume finishes the run: every step's loss equals the uninterrupted run's.
    rc, _, err = _megavid("none", "pretrain", *common, "run.name=faulty").wait()
    assert rc == 0, err[-4000:]
    assert _losses(run) == ref


def _torchrun(fault: str, *args: str) -> Job:
    return Job(fault, args, nproc=2)


@pytest.mark.distributed
def test_exception_on_one_of_two_ranks_ends_every_rank(base_tokens, tmp_path):
    """torchrun, gloo: rank 1 raises in its forward pass at step 3; both ranks end within a
    minute, rank 1 says why in one line, and the resumed run equals an uninterrupted one."""
    steps = 4
    common = base_tokens + [f"train.max_steps={steps}", "train.ckpt_every=2", "train.log_every=1",
                            "train.eval_every=0", "data.batch_size=8"]
    runs = tmp_path / "runs"

    job = _torchrun("forward@3:1", "pretrain", *common, "run.name=faulty")
    rc, out, err = job.wait()
    assert rc != 0 and job.elapsed < EXIT_WITHIN_S + 30, (rc, job.elapsed, err[-4000:])
    lines = [ln for ln in (out + err).splitlines() if ln.startswith("megavid pretrain: error: ")]
    assert any("injected fault in the forward pass of rank 1" in ln for ln in lines), (out + err)[-4000:]
    assert _latest(runs / "faulty") == "step_2"
    assert "Traceback" in (runs / "faulty" / "logs" / "rank1.log").read_text()

    rc, out, err = _torchrun("none", "pretrain", *common, "run.name=faulty").wait()
    assert rc == 0, (out + err)[-4000:]
    rc, out, err = _torchrun("none", "pretrain", *common, "run.name=reference").wait()
    assert rc == 0, (out + err)[-4000:]
    assert _losses(runs / "faulty") == _losses(runs / "reference")
    assert sorted(_losses(runs / "reference")) == list(range(1, steps + 1))


def test_a_truncated_shard_is_skipped_counted_once_and_reported(base_tokens, synthetic_root, tmp_path):
    """A train tar cut at 80%: every sample with a member past the cut (found from the index's
    byte offsets, not by the loader) is skipped, counted once, logged once, and reported in
    metrics.jsonl and the end-of-run summary; the job finishes."""
    src = synthetic_root / "shards" / "train"
    split = tmp_path / "train"
    split.mkdir()
    shutil.copy2(src / "index.jsonl", split / "index.jsonl")
    shutil.copy2(src / "00000.tar", split / "00000.tar")
    entries = [json.loads(ln) for ln in (src / "index.jsonl").read_text().splitlines()]
    entries = [e for e in entries if e["shard"] == "00000.tar"]
    cut = int((split / "00000.tar").stat().st_size * 0.8)
    with open(split / "00000.tar", "r+b") as f:
        f.truncate(cut)
    bad = {e["key"] for e in entries if any(o + n > cut for o, n in e["members"].values())}
    assert 0 < len(bad) < len(entries) // 4

    steps = len(entries) // 16  # one epoch at batch 16
    tokens = base_tokens + [f"data.train={split / '00000.tar'}", f"train.max_steps={steps}",
                            "train.eval_every=0", "train.log_every=1", "run.name=bad"]
    rc, _, err = _megavid("none", "pretrain", *tokens).wait()
    assert rc == 0, err[-4000:]
    run = tmp_path / "runs" / "bad"
    last = read_metrics(run)[steps]
    assert last["skipped_samples"] == last["skipped_truncated_shard"] == len(bad)
    assert f"skipped samples: {len(bad)} (truncated_shard {len(bad)})" in err
    log0 = (run / "logs" / "rank0.log").read_text()
    logged = [ln for ln in log0.splitlines() if "skipped sample " in ln]
    assert sorted(ln.split("skipped sample ")[1].split()[0] for ln in logged) == sorted(bad)


def test_dali_feed_fault_ends_the_job_and_resumes_exactly(base_tokens, tmp_path):
    """data.backend=dali (the CPU decoder on VP9 shards): an exception in the DALI feed stage
    ends the job with one line and no process left; the resumed run equals an uninterrupted one."""
    steps = 6
    common = base_tokens + ["data.backend=dali", "data.dali_device=cpu", f"train.max_steps={steps}",
                            "train.ckpt_every=2", "train.log_every=1", "train.eval_every=0"]
    runs = tmp_path / "runs"
    job = _megavid("dali_feed@6", "pretrain", *common, "run.name=faulty")
    rc, _, err = job.wait()
    # the DALI loader first looks for a culprit sample, finds none and says so (a DataError)
    assert rc == 2 and job.elapsed < EXIT_WITHIN_S, (rc, job.elapsed, err[-3000:])
    _one_line_error(err, "injected fault in the DALI feed")
    # DALI prepares batches ahead: the fault surfaces while an earlier step fetches its batch
    assert _latest(runs / "faulty") in ("step_2", "step_4")

    rc, _, err = _megavid("none", "pretrain", *common, "run.name=faulty").wait()
    assert rc == 0, err[-4000:]
    rc, _, err = _megavid("none", "pretrain", *common, "run.name=reference").wait()
    assert rc == 0, err[-4000:]
    assert _losses(runs / "faulty") == _losses(runs / "reference")
    assert sorted(_losses(runs / "reference")) == list(range(1, steps + 1))
    # one DALI pipeline for the whole run (the loader's counter, logged by the trainer)
    assert read_metrics(runs / "reference")[steps]["loader_pipeline_builds"] == 1

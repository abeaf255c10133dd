"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits 2."""


class MegavidError(Exception):
    """Base of every error that names a user-fixable problem."""


class ConfigError(MegavidError, ValueError):
    """Bad config key, value or combination."""


class DataError(MegavidError):
    """Missing data path, empty shard list, unreadable annotations, too many bad samples."""


class CheckpointError(MegavidError):
    """Missing or incompatible checkpoint."""


class LaunchError(MegavidError):
    """Malformed hostfile, unreachable host, bad launcher environment."""


class Preempted(MegavidError):
    """Training stopped by a signal (SIGTERM: preemption, SIGINT: Ctrl-C) after writing its
    checkpoint. The CLI exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT),
    as a shell reports a process the signal ended: schedulers and torchrun then see an
    unfinished run, and the same command resumes it.

    Args:
        message: what stopped and where the checkpoint is.
        signum: the signal's number.
        summary: the trainer's summary at the stop (``Trainer.fit``'s keys).
    """

    def __init__(self, message: str, signum: int, summary: dict) -> None:
        super().__init__(message)
        self.signum = signum
        self.summary = summary

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[:limit] + "..."


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _worker_original(exc: BaseException) -> str | None:
    """The original error of an exception torch re-raised from a DataLoader worker
    ("Caught X in DataLoader worker process N. Original Traceback ... X: message")."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("Caught ") or "DataLoader worker process" not in lines[0]:
        return None
    return lines[-1][:300]


def describe_exception(exc: BaseException) -> str:
    """One line for an error megavid did not expect: its type, the first line of its message,
    and the fix where the kind of failure is known (full disk, unwritable folder, out of memory,
    a lost rank, a killed loader worker). The CLI prints it; the traceback goes to the rank's log.

    Args:
        exc: the exception.
    """
    import errno

    head = f"{type(exc).__name__}: {_first_line(exc)}"
    worker = _worker_original(exc)
    if worker:  # torch re-raises a worker's exception with its traceback as the message
        head = f"in a data loader worker: {worker}"
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain)
    codes = {getattr(e, "errno", None) for e in chain if isinstance(e, OSError)}
    path = next((e.filename for e in chain if isinstance(e, OSError) and e.filename), None)
    where = f" ({path})" if path else ""
    if errno.ENOSPC in codes or "No space left on device" in text or "unexpected pos" in text:
        fix = (f"the disk is full{where}: free space (df -h), then run the same command again to "
               "resume from the last checkpoint")
    elif codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
        fix = f"cannot write{where}: make it writable or set run.output_dir to a writable folder"
    elif "out of memory" in text.lower():
        fix = ("out of memory: lower data.batch_size (raise train.grad_accum to keep the global "
               "batch) or set model.grad_checkpointing=1")
    elif "DataLoader worker (pid" in text:
        fix = ("a data loader worker died (often the kernel's out-of-memory killer): lower "
               "data.num_workers or data.batch_size")
    elif any(s in text for s in ("Connection closed by peer", "Connection reset by peer",
                                 "NCCL", "ProcessGroup", "Broken pipe")):
        fix = ("lost contact with another rank: that rank failed or was stopped; its "
               "logs/rank<R>.log in the run directory says why")
    else:
        return head
    return f"{head} -- {fix}"

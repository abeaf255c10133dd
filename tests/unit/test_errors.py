"""describe_exception: the one line the CLI prints for an error megavid did not expect. The
inputs are the exceptions the libraries really raise (messages copied from torch, gloo and
the OS), the oracle the fix each kind of failure needs."""

import errno

import pytest
import torch

from megavid.errors import describe_exception


def _oserror(code: int, path: str) -> OSError:
    return OSError(code, __import__("os").strerror(code), path)


@pytest.mark.parametrize("exc, fix", [
    (_oserror(errno.ENOSPC, "/runs/x/checkpoints/step_6/mp_rank_00_model_states.pt"),
     "the disk is full (/runs/x/checkpoints/step_6/mp_rank_00_model_states.pt): free space"),
    # torch's zip writer on a full disk reports no errno
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3264 vs 3152"),
     "the disk is full: free space"),
    (_oserror(errno.EACCES, "/runs/x/logs/rank0.log"), "cannot write (/runs/x/logs/rank0.log)"),
    (_oserror(errno.EROFS, "/runs/x"), "cannot write (/runs/x)"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."),
     "lower data.batch_size"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
                  "[127.0.0.1]:41234: Connection reset by peer"), "lost contact with another rank"),
    (RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "),
     "a data loader worker died"),
])
def test_known_failures_name_their_fix(exc, fix):
    line = describe_exception(exc)
    assert "\n" not in line and line.startswith(type(exc).__name__ + ": ")
    assert fix in line, line


def test_a_chained_cause_is_found():
    try:
        try:
            raise _oserror(errno.ENOSPC, "/tmp/full")
        except OSError as e:
            raise RuntimeError("saving failed") from e
    except RuntimeError as e:
        line = describe_exception(e)
    assert line.startswith("RuntimeError: saving failed") and "the disk is full (/tmp/full)" in line


def test_a_loader_worker_error_shows_the_original_error():
    # how torch re-raises a worker's exception in the main process (ExceptionWrapper.reraise)
    msg = ("Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent "
           "call last):\n  File \"x.py\", line 3, in f\n    raise ValueError('bad crop')\n"
           "ValueError: bad crop\n")
    assert describe_exception(RuntimeError(msg)) == "in a data loader worker: ValueError: bad crop"


def test_an_unknown_error_is_its_type_and_first_line():
    assert describe_exception(KeyError("step")) == "KeyError: 'step'"
    assert describe_exception(ValueError("first\nsecond")) == "ValueError: first"

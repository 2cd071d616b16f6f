"""Seeding, logging, device choice, memory bounds and the stage error type."""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import random
import resource
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class InputError(Exception):
    """Bad or missing input; the message names the file, the problem and the fix."""


def require_files(paths, stage: str) -> None:
    """Fail early, naming the earlier stage to run, when any of ``paths`` is missing."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise InputError(f"missing {', '.join(missing)}: run {stage} first")


# OS errors that are the user's to fix (permissions, a full or read-only disk), not bugs.
_USER_OS_ERRORS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                   errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
                   errno.EDQUOT: "disk quota exceeded"}


def one_line(message) -> str:
    """``message`` on one line (torch's and h5py's errors span several)."""
    return " ".join(str(message).split())


def run_stage(main, argv=None) -> None:
    """Run a stage's ``main``; an InputError (or a permission / disk-space error) becomes a one-line
    message and exit status 1. Any other exception is a bug and keeps its traceback."""
    logger = logging.getLogger("bulk2sc")
    try:
        main(argv)
        exit_torchrun_rank()
    except InputError as err:
        logger.error("%s", one_line(err))
        raise SystemExit(1) from None
    except OSError as err:
        if err.errno not in _USER_OS_ERRORS:
            raise
        where = err.filename or "an output file"
        logger.error("cannot access %s: %s; make DATA_DIR (and FIG_DIR) writable, with free space, or "
                     "choose another folder with --DATA_DIR=...", where, _USER_OS_ERRORS[err.errno])
        raise SystemExit(1) from None


def exit_torchrun_rank() -> None:
    """End a torchrun rank whose work is done and written (WORLD_SIZE > 1; otherwise nothing): flush the logs
    and streams, then os._exit(0). Interpreter teardown is skipped, because there gloo's worker threads can
    still be joinable and abort the rank after its process group was destroyed ("terminate called without
    an active exception", exit status -6: seen in 2 of about 8 CI runs of tests/test_distributed.py;
    pytorch/pytorch#179291). Every output is written atomically and closed before this point."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root handler once, in a script's ``main`` (modules only get loggers)."""
    root = logging.getLogger()
    if not any(getattr(h, "_bulk2sc", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._bulk2sc = True
        root.addHandler(handler)
    root.setLevel(level)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one number."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # stages 0-2 do not need torch
        return
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_device(name: str = "auto"):
    """``"auto"`` gives CUDA when present, else CPU; anything else is passed to torch."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"DEVICE={name!r} but CUDA is not available; use DEVICE=auto or cpu")
    return device


def set_torch_threads(n_threads: int = 0) -> int:
    """Use ``n_threads`` torch threads (0: one per available core). Returns the number set."""
    import torch

    if n_threads <= 0:
        n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n_threads)
    return n_threads


def bound_heap_fragmentation(threshold_bytes: int = 65536) -> bool:
    """Make glibc serve allocations above ``threshold_bytes`` with mmap, returned on free.

    Long torch training loops on glibc otherwise fragment the heap under the dynamic mmap
    threshold, and RSS climbs ~0.2 GB per scTAPE epoch (PERF_NOTES.md). Same effect as
    ``MALLOC_MMAP_THRESHOLD_=65536`` but settable after start-up. Returns False off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

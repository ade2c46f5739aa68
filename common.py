"""
The helpers that every script and library module shares: log(), atomic_write(), device_error() (every script's
check of its --device), and measure_peak_flops() (the matmul peak that train.py and bench.py report MFU against).

They sit below data.py, tokenizer.py and checkpoint.py (this module imports nothing of the project), so that
no module copies them and nothing has to import a script to get them (nanochat keeps its own in common.py).
"""
import errno
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm import tqdm


def log(msg):
    """Progress and diagnostics go to stderr; stdout carries only results (tables, sampled text). Under torchrun
    only rank 0 logs (nanochat's print0), and a tqdm progress bar is redrawn below the line, not broken by it."""
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(msg, file=sys.stderr)


class DiskFullError(OSError):
    """A write ran out of space. Its message is one line that says what was lost (nothing)."""


@contextmanager
def atomic_write(path):
    """
    Write `path` all at once or not at all:

        with atomic_write("data/meta.json") as tmp, open(tmp, "w") as f:
            json.dump(meta, f)             # or build a directory at tmp

    The block writes to `path + ".tmp"`, which replaces `path` in one rename when the block ends without
    error, so a reader sees the old file or the new one, never a part (POSIX rename is atomic on one file
    system). On any error or Ctrl-C the temporary is removed and `path` is left as it was; a full disk
    raises DiskFullError saying so. A stale temporary of a crashed write is removed first: it only holds
    disk space. A directory replaces a directory by two renames, the old one moved aside first.
    """
    tmp = path + ".tmp"
    remove(tmp)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.lexists(path):
            old = path + ".old"
            remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        remove(tmp)
        if disk_full(e):
            kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was written"
            raise DiskFullError(f"disk full while writing {path}: {kept} and the partial file was removed; "
                                f"free some space on {os.path.dirname(os.path.abspath(path))} and run again") from None
        raise


def disk_full(error):
    """True if the error, or one it was raised from, is the OS saying the disk (or the user's quota) is full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def remove(path):
    """Remove a file or a directory tree, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def device_error(device):
    """None if this machine can use `device`, else a one-line error naming it: 'cuda' without a GPU (or with a CPU
    build of torch) or a misspelled name would otherwise fail in the first tensor op, as a traceback."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # a CPU-only torch raises AssertionError for 'cuda'
        return f"device {device!r} is not usable here ({str(e).splitlines()[0][:120]}); use another device, e.g. cpu"
    return None


def measure_peak_flops(dtype, device="cpu", seconds=1.0):
    """The matmul FLOP/s this device reaches in dtype right now: the best of repeated products of two square
    matrices (2 n^3 FLOPs each). MFU is measured against this rather than a data sheet's figure: CPUs of one kind
    differ (bf16 peaks of 0.96 to 2.8 TFLOP/s measured on 2-core hosts) and other jobs may share the cores."""
    device = torch.device(device)
    n, per_sample = (8192, 10) if device.type == "cuda" else (1024, 1)  # enough work that timing noise is small
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # F.linear is a @ b.T, the layout of every projection in the model (a CPU without native bf16 runs a plain
    # bf16 a @ b through a path 10x slower than this one)
    F.linear(a, b)  # warm up: kernel selection, thread pool
    sync()
    best, spent, samples = math.inf, 0.0, 0
    while samples < 2 or (spent < seconds and samples < 50):
        t0 = time.perf_counter()
        for _ in range(per_sample):
            F.linear(a, b)
        sync()
        elapsed = time.perf_counter() - t0
        best, spent, samples = min(best, elapsed), spent + elapsed, samples + 1
    return 2 * n ** 3 * per_sample / best

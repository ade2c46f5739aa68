"""
The helpers that every script and library module shares: log(), atomic_write(), device_error() (every script's
check of its --device), keep_freed_memory() (a CPU training step's allocations), the compute dtype rule
(resolve_dtype, mixed_precision) and the peak FLOP/s that MFU is measured against (mfu_peak, measure_peak_flops).

They sit below data.py, tokenizer.py and checkpoint.py (this module imports nothing of the project), so that
no module copies them and nothing has to import a script to get them (nanochat keeps its own in common.py).
"""

import ctypes
import errno
import math
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm


def log(msg):
    """Progress and diagnostics go to stderr; stdout carries only results (tables, sampled text). Under torchrun
    only rank 0 logs (nanochat's print0), and a tqdm progress bar is redrawn below the line, not broken by it."""
    if int(os.environ.get("RANK", 0)) == 0:
        # the line and its newline in one write: a stop signal between the two would glue its line to this one
        tqdm.write(msg + "\n", file=sys.stderr, end="")


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
            raise DiskFullError(
                f"disk full while writing {path}: {kept} and the partial file was removed; "
                f"free some space on {os.path.dirname(os.path.abspath(path))} and run again"
            ) from None
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


def keep_freed_memory():
    """Have glibc keep the memory a CPU training step frees for the next step, as a GPU's caching allocator does.
    By default it returns large freed blocks to the OS (blocks over the mmap threshold, and the top of the heap past
    the trim threshold) and each step faults them back in, a page at a time: on the quick start's model that was a
    fifth of the step's CPU time (bf16, AVX-512 BF16 host; docs/performance.md). Blocks up to 32 MiB (glibc's
    largest mmap threshold) now come from the heap, which is trimmed only past 1 GiB free. False where the C library
    is not glibc (macOS, Windows, musl): nothing changes there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def measure_peak_flops(dtype, device="cpu", seconds=1.0):
    """The matmul FLOP/s this device reaches in dtype right now: the best of repeated products of two square
    matrices (2 n^3 FLOPs each). A CPU's MFU is measured against this, having no data sheet figure that holds:
    CPUs of one kind differ (bf16 peaks of 0.96 to 2.8 TFLOP/s measured on 2-core hosts) and other jobs may share
    the cores."""
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
    return 2 * n**3 * per_sample / best


# -----------------------------------------------------------------------------------------------
# The compute dtype: one rule for every script

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auto_dtype(device):
    """(dtype name, reason): what this device computes natively. A GPU: bf16 where it has it (Ampere and later),
    else fp16 (train.py adds the grad scaler). A CPU: bf16 only with bf16 units, AMX or AVX-512 BF16 (there bf16
    autocast trained the tiny model 1.6x faster than fp32 on an AMX host, and AVX-512 BF16 runs a matmul 2.1x
    faster); without them bf16 is emulated, and autocast ran 7-20x slower than fp32 on an AVX2 host, so fp32.
    MTLM_AUTO_DTYPE=NAME in the environment makes auto choose NAME on any device: a way to see on this host what
    auto runs on another kind (the tests run so both ways, whatever the host)."""
    forced = os.environ.get("MTLM_AUTO_DTYPE")
    if forced:
        if forced not in DTYPES:
            raise ValueError(f"MTLM_AUTO_DTYPE must be one of {', '.join(DTYPES)}, got {forced!r}")
        return forced, f"MTLM_AUTO_DTYPE={forced} in the environment"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", f"{name} computes bf16"
        return "float16", f"{name} has no bf16: fp16 with the grad scaler"
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        if caps.get("amx_bf16"):
            return "bfloat16", "this CPU has AMX"
        if caps.get("avx512_bf16"):
            return "bfloat16", "this CPU has AVX-512 BF16"
        return "float32", f"this CPU has no native bf16: {torch.backends.cpu.get_cpu_capability()}"
    return "float32", f"no bf16 rule for {device.type}"


def resolve_dtype(dtype, device):
    """The dtype a script computes in: an explicit float32, bfloat16 or float16 as given, "auto" by auto_dtype,
    saying what it chose and why (once, on stderr). Raises ValueError for any other name."""
    if dtype == "auto":
        dtype, reason = auto_dtype(device)
        log(f"dtype auto -> {dtype} ({reason})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def mixed_precision(dtype, device):
    """Mixed precision for a dtype name: matmuls in bf16/fp16, weights and optimizer in fp32; fp32 is no context."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


# -----------------------------------------------------------------------------------------------
# MFU's denominator

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s; fp16 for the GPUs without bf16
# (V100, T4). The first pattern found in torch.cuda.get_device_name() wins, so variants come before their family.
DATASHEET_PEAKS = [
    (r"H100 PCIe", 756e12),
    (r"H100 NVL|H200 NVL", 835e12),
    (r"H100|H200", 989e12),
    (r"B200", 2.25e15),
    (r"A100|A800", 312e12),
    (r"\bA10\b", 125e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
    (r"RTX 4090", 165e12),
    (r"V100", 125e12),
    (r"\bT4\b", 65e12),
]


def datasheet_peak(gpu_name):
    """The datasheet's dense bf16 FLOP/s of a GPU by its name, or None for a GPU not in DATASHEET_PEAKS."""
    return next((peak for pattern, peak in DATASHEET_PEAKS if re.search(pattern, gpu_name)), None)


def mfu_peak(dtype, device):
    """(peak, measured, what the peak is): MFU's denominator and the matmul peak measured now in dtype.
    On a GPU the datasheet's dense bf16 peak, as PaLM's MFU and nanoGPT's (A100: 312 TFLOP/s) use it, so that MFUs
    compare across runs and papers; a measured matmul falls short of it (cuBLAS's best shapes, clocks), so it is
    printed beside. An unknown GPU, and a CPU (whose peak depends on its kind and on the other jobs sharing it),
    use the measured peak."""
    device = torch.device(device)
    measured = measure_peak_flops(DTYPES[dtype], device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        sheet = datasheet_peak(name)
        if sheet is not None:
            return sheet, measured, f"{name}'s datasheet dense bf16 peak"
        return measured, measured, f"the measured {dtype} matmul peak ({name} is not in common.DATASHEET_PEAKS)"
    return measured, measured, f"the measured {dtype} matmul peak"

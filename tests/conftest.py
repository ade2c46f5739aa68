import gc
import io
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
import tqdm

import stopping  # noqa: F401  (imported before any run, so that run_here puts back the stop state a script sets)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pytest-xdist runs the tests in several processes at once (pytest.ini: -n logical): each computes in-process on its
# share of the cores, as the scripts it starts do on one (OMP_NUM_THREADS=1 below), so that none waits for a core
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))

# a model small enough that a training step takes milliseconds on a CPU; peak_flops given, so that no run spends a
# second measuring the matmul peak for its MFU (tests/test_train.py and test_signals.py run that probe)
TINY = [
    "--device=cpu",
    "--dtype=float32",
    "--compile=False",
    "--n_layer=2",
    "--n_head=2",
    "--n_kv_head=1",
    "--n_embd=64",
    "--intermediate_size=128",
    "--batch_size=4",
    "--block_size=64",
    "--gradient_accumulation_steps=2",
    "--val_tokens=1024",
    "--log_interval=1",
    "--warmup_iters=2",
    "--learning_rate=3e-3",
    "--min_lr=3e-4",
    "--peak_flops=1e12",
]


def run_script(*args, check=True, env=None):
    """Run one of the repository's scripts in a fresh interpreter, as a user would."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def start(args, log, launcher=(sys.executable,)):
    """One of the repository's scripts in the background, as a user starts one; its stderr goes to the file log
    (tqdm writes a lot)."""
    return subprocess.Popen(
        [*launcher, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_until(condition, proc, what):
    deadline = time.time() + 300  # a guard against a hang, not a speed test
    while not condition():
        assert proc.poll() is None, f"the process ended before {what}"
        assert time.time() < deadline, f"no {what} within 300 s"
        time.sleep(0.01)


# tqdm's monitor thread, started by the first progress bar, keeps the sys.excepthook of its start for good: when a
# run_here run starts it, the script's own hook, and through it the script's namespace and open files (train.lock)
tqdm.tqdm.monitor_interval = 0


def run_here(script, *args, check=True):
    """Run one of the repository's scripts in this process, where a process is not the point: what run_script
    returns (exit status, stdout, stderr) without the ~2.5 s a fresh interpreter spends importing torch and
    torch._dynamo (which the first optimizer imports). As a fresh process would, it runs in ROOT with one thread
    (OMP_NUM_THREADS=1), prints the message of a SystemExit on its stderr and hands an uncaught exception to
    sys.excepthook (train.py's answers an out-of-memory error in one line), and leaves this process as it found it:
    signal handlers, sys.excepthook, torch's threads and random state, cwd, argv, and the globals of the
    repository's modules (a script's hooks and handlers, stopping's among them, hold its namespace and so its open
    files, train.lock's among them)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in signal.valid_signals() if signal.getsignal(sig) is not None}
    modules = [
        m
        for m in list(sys.modules.values())
        if os.path.dirname(os.path.abspath(getattr(m, "__file__", None) or "/")) == ROOT
    ]
    module_globals = [(module, dict(vars(module))) for module in modules]
    threads, rng, cwd, argv, excepthook = (
        torch.get_num_threads(),
        torch.get_rng_state(),
        os.getcwd(),
        sys.argv,
        sys.excepthook,
    )
    returncode = 0
    try:
        os.chdir(ROOT)
        sys.argv = [script, *map(str, args)]
        torch.set_num_threads(1)
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as e:  # as the interpreter ends: None is 0, a number the status, else the message and 1
                if isinstance(e.code, int) or e.code is None:
                    returncode = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    returncode = 1
            except Exception:
                sys.excepthook(*sys.exc_info())  # as the interpreter does with an uncaught error
                returncode = 1
    finally:
        for sig, handler in handlers.items():
            if signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        for module, saved in module_globals:
            vars(module).update(saved)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        os.chdir(cwd)
        sys.argv, sys.excepthook = argv, excepthook
        gc.collect()  # the run's objects go, as at a process's end: its open files close, train.lock's flock with them
    proc = subprocess.CompletedProcess([script, *args], returncode, stdout.getvalue(), stderr.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"{(script, *args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def pydocs_data(tmp_path_factory):
    """A small dataset from the embedded corpus (pydoc topics), written in the shard format directly."""
    import pydoc_data.topics

    from data import write_meta, write_shard
    from tokenizer import Tokenizer

    out = str(tmp_path_factory.mktemp("pydocs"))
    docs = list(pydoc_data.topics.topics.values())
    random.Random(0).shuffle(docs)
    tok = Tokenizer.train_bpe(docs, 512)

    def encode(ds):
        return np.array([i for ids in tok.encode_batch(ds) for i in ids + [tok.eot_id]], dtype=np.uint16)

    n_val = len(docs) // 10
    splits = {"val": encode(docs[:n_val]), "train": encode(docs[n_val:])}
    for split, tokens in splits.items():
        write_shard(os.path.join(out, f"{split}_000000.bin"), tokens)
    # the manifest, as prepare_data.py writes it: the loader reads exactly these shards, of these sizes
    write_meta(
        out,
        tok,
        shards={split: [f"{split}_000000.bin"] for split in splits},
        shard_tokens={split: [len(tokens)] for split, tokens in splits.items()},
        tokens={split: len(tokens) for split, tokens in splits.items()},
    )
    return out


@pytest.fixture(scope="session")
def tiny_run(pydocs_data, tmp_path_factory):
    """One finished train.py run of TINY, 4 steps of a schedule that decays over 8 (evaluated at steps 0 and 4), for
    the tests that need a checkpoint and not a particular one. Read it, never write to it: copy_run(tiny_run, dst)
    gives a test its own copy to resume or change."""
    out = tmp_path_factory.mktemp("tiny_run")
    run_here(
        "train.py",
        f"--data_dir={pydocs_data}",
        f"--out_dir={out}",
        *TINY,
        "--max_iters=4",
        "--lr_decay_iters=8",
        "--eval_interval=4",
    )
    return out


def copy_run(run, dst):
    """A copy of a run's out_dir (checkpoint, metrics, lock file) at dst, a path that does not exist yet or an empty
    directory; returns dst."""
    shutil.copytree(run, dst, dirs_exist_ok=True)
    return dst


@pytest.fixture
def listed_data(tmp_path):
    """A dataset whose meta.json lists its shards and their sizes, as prepare_data.py writes it: a train split of 9
    steps of TINY (18 windows of 4 x 64 tokens, in two shards) and a val split, random tokens of a 300-token BPE."""
    from data import write_meta, write_shard
    from tokenizer import Tokenizer

    doc = " ".join(f"word{i} and word{i * 7 % 101} again" for i in range(2000))  # enough pairs for 43 merges
    tok = Tokenizer.train_bpe([doc], 300)
    rng = np.random.default_rng(0)
    shards = {"train_000000.bin": 3000, "train_000001.bin": 2000, "val_000000.bin": 1000}
    for name, n in shards.items():
        write_shard(str(tmp_path / name), rng.integers(0, 300, n).astype(np.uint16))
    write_meta(
        str(tmp_path),
        tok,
        shards={"train": ["train_000000.bin", "train_000001.bin"], "val": ["val_000000.bin"]},
        shard_tokens={"train": [3000, 2000], "val": [1000]},
        tokens={"train": 5000, "val": 1000},
    )
    return tmp_path

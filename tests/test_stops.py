"""Every script stops in one line (issue 25): real signals to real processes, while they import and while they work;
a second signal during a checkpoint write; two prepare_data.py runs on one out_dir; nanoGPT's replaced keys; the
small lines (invalid UTF-8, a truncated checkpoint, a NaN loss); a Windows Python, without fcntl and SIGUSR1.
Each case checks the exit status, that the output holds no traceback, and that the files are intact."""

import glob
import json
import os
import platform
import random
import signal
import time

import pytest
import torch
from conftest import TINY, run_script, start, wait_until

import checkpoint
import prepare_data


def handles_stops(pid):
    """True once the process has a handler for SIGTERM and SIGUSR1, the last signals stopping.py installs: Python
    itself catches SIGINT from its start, and nothing else in these scripts catches them."""
    with open(f"/proc/{pid}/status") as f:
        caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return all(caught >> (sig - 1) & 1 for sig in (signal.SIGTERM, signal.SIGUSR1))


def finish(proc, log):
    """(exit status, stderr, its lines without a progress bar's redraws)."""
    proc.wait(timeout=300)
    err = open(log).read()
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith(BARS)]
    return proc.returncode, err, lines


BARS = ("train:", "tokens:")  # tqdm's redraws


# --- 2. every script, while torch (and transformers) import --------------------------------------------------------

SCRIPTS = {  # what each would do if the signal came too late: the test would then see its output, not one line
    "prepare_data.py": ["--out_dir", "{tmp}/data"],
    "train.py": ["--out_dir={tmp}/out", "--max_iters=1"],
    "stack.py": ["--src", "{tmp}/none", "--out", "{tmp}/grown.pt"],
    "sample.py": ["--ckpt", "{tmp}/none"],
    "eval_mc.py": ["--ckpt", "{tmp}/none"],
    "export_hf.py": ["--ckpt", "{tmp}/none", "--out", "{tmp}/hf"],
    "study_growth.py": ["--out_dir", "{tmp}/study"],
    "bench.py": ["configs/tiny.py", "--params"],
    "bench_decode.py": ["--model", "{tmp}/none"],
    "plot_run.py": ["{tmp}/none"],
}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc to see the handler installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_while_a_script_imports_ends_it_in_one_line(script, tmp_path):
    log, work = tmp_path / "log", tmp_path / "work"
    work.mkdir()
    proc = start([script, *(a.format(tmp=work) for a in SCRIPTS[script])], log)
    wait_until(lambda: handles_stops(proc.pid), proc, "the stop handler")  # installed first: torch imports after it
    proc.send_signal(signal.SIGINT)
    rc, err, lines = finish(proc, log)
    assert rc == 128 + signal.SIGINT and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGINT"), err[-2000:]
    assert os.listdir(work) == []  # nothing written


def test_a_signal_while_bench_works_ends_it_in_one_line(tmp_path):
    log = tmp_path / "log"
    proc = start(["bench.py", "configs/tiny.py", "--device=cpu", "--modes=fp32", "--steps=100000", "--warmup=1"], log)
    # its first line (the model's size) comes once torch is imported and the model built
    wait_until(lambda: "parameters (" in log.read_text(), proc, "the benchmark")
    proc.send_signal(signal.SIGTERM)
    rc, err, lines = finish(proc, log)
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert lines[-1] == "stopped by SIGTERM: the table above holds the modes measured so far (bench.py writes no file)"


# --- 2. and 3. prepare_data.py: one build per out_dir; a stop keeps the build for the same command ----------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~2M tokens of local documents: a build of seconds, in shards of 20,000 tokens."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rng = random.Random(0)
    words = [f"{w}{i}" for w in ("river", "stone", "light", "field", "cloud") for i in range(40)]
    with open(path, "w") as f:
        for _ in range(6_000):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(80))}) + "\n")
    return str(path)


def test_two_builds_on_one_out_dir_and_a_stop_in_the_middle(corpus, tmp_path):
    out = str(tmp_path / "data")
    command = ["prepare_data.py", "--sources", corpus, "--vocab_size", "300", "--shard_size", "20000", "--out_dir", out]
    first = start(command, tmp_path / "log")
    lock = tmp_path / "data.lock"
    wait_until(lambda: lock.exists() and f"pid {first.pid} " in lock.read_text(), first, "the first build's lock")
    first.send_signal(signal.SIGSTOP)  # paused, it holds the lock for as long as the others take, however busy the host
    # the same command, and another one: each refused at start, in one line, before it reads or writes anything
    refused = f"error: {out} is in use by another prepare_data.py (pid {first.pid} on {platform.node()}): "
    for i, args in enumerate([command, [*command[:3], "--vocab_size", "280", "--out_dir", out]]):
        rc, err, lines = finish(start(args, tmp_path / f"log{i}"), tmp_path / f"log{i}")
        assert rc == 1 and "Traceback" not in err, err[-2000:]
        assert lines == [refused + "wait for it to finish, or give this run another out_dir"]
    first.send_signal(signal.SIGCONT)

    # the first build goes on; stopped after its first shard is recorded, it keeps its work and its out_dir is not
    # created (waiting for the shard's file alone raced the record written just after it)
    def recorded():
        try:
            return json.load(open(os.path.join(out + ".partial", "progress.json")))["writers"]["train"]["files"]
        except (OSError, ValueError, KeyError):  # not yet written, or no shard in it yet
            return False

    wait_until(recorded, first, "a recorded shard")
    first.send_signal(signal.SIGTERM)
    rc, err, lines = finish(first, tmp_path / "log")
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert (
        lines[-1]
        == f"stopped by SIGTERM: {out}.partial keeps the work done so far; run the same command to continue it"
    )
    progress = json.load(open(os.path.join(out + ".partial", "progress.json")))
    assert progress["writers"]["train"]["files"] and not os.path.exists(out)
    assert not glob.glob(os.path.join(out + ".partial", "*.tmp"))
    # the same command continues it, to a complete dataset
    proc = run_script(*command)
    assert "continuing the unfinished build" in proc.stderr and not os.path.exists(out + ".partial")
    assert prepare_data.finished_dataset(out, json.load(open(os.path.join(out, "meta.json")))["recipe"])


# --- 2. study_growth.py: a signal to it alone stops its runs, which save --------------------------------------------


def test_a_signal_to_the_study_stops_its_runs(pydocs_data, tmp_path):
    out = tmp_path / "study"
    command = ["study_growth.py", "--quick", "--seeds", "1", "--jobs", "1", "--dtype", "float32"]
    proc = start([*command, "--data_dir", pydocs_data, "--out_dir", str(out)], tmp_path / "log")

    def training():  # a train.py run of the study has taken a step
        return any('"loss"' in open(m).read() for m in glob.glob(str(out / "runs" / "*" / "metrics.jsonl")))

    wait_until(training, proc, "a training run")
    proc.send_signal(signal.SIGTERM)  # the study only, as a scheduler may send it
    rc, err, lines = finish(proc, tmp_path / "log")
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    (run,) = [os.path.basename(os.path.dirname(m)) for m in glob.glob(str(out / "runs" / "*" / "metrics.jsonl"))]
    assert lines[-1].startswith(
        f"stopped by SIGTERM: the finished runs are kept in {out}; {run} stopped where they were ({out}/logs); "
        "continue with the same command: python study_growth.py --quick"
    )
    # the run got the signal, saved the step it reached and ended (its log's last line says so)
    log = open(out / "logs" / f"{run}.log").read().replace("\r", "\n").strip().splitlines()
    step = torch.load(out / "runs" / run / "ckpt.pt", weights_only=True)["iter_num"]
    assert step >= 1 and log[-1].startswith(f"stopped by SIGTERM at step {step} of ")
    assert not (out / "runs" / run / "ckpt.pt.tmp").exists()


# --- 1. train.py: a second signal while the checkpoint is written ---------------------------------------------------


def test_a_second_signal_during_the_checkpoint_write_lets_it_finish(pydocs_data, tmp_path):
    first, second = signal.SIGTERM, signal.SIGINT  # (the other order ended the same way, by hand)
    # 4 x 512 with keep_last=3: a write of ~0.2 GB, long enough to be signalled in
    big = ["--n_layer=4", "--n_head=8", "--n_kv_head=8", "--n_embd=512", "--intermediate_size=1024", "--keep_last=3"]
    out, log = tmp_path / "out", tmp_path / "log"
    proc = start(["train.py", f"--data_dir={pydocs_data}", f"--out_dir={out}", *TINY, *big,
                  "--max_iters=1000000", "--eval_interval=1000000", "--peak_flops=1e12"], log)  # fmt: skip
    metrics = out / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and '"loss"' in metrics.read_text(), proc, "a step")
    proc.send_signal(first)  # saves at the end of this step...
    wait_until((out / "ckpt.pt.tmp").exists, proc, "the checkpoint write")
    time.sleep(0.03)
    proc.send_signal(second)  # ...and a second signal comes while the file is written
    rc, err, lines = finish(proc, log)
    assert rc == 128 + second and "Traceback" not in err, err[-2000:]
    step = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]  # whole, and the step the stop reached
    assert step >= 1 and lines[-1].startswith(
        f"stopped by a second signal ({second.name}) at step {step}: {out / 'ckpt.pt'} holds it; resume with: "
    )
    assert not (out / "ckpt.pt.tmp").exists() and (out / f"ckpt_{step:07d}.pt").exists()


# --- 4. nanoGPT's keys, 5. the small lines ---------------------------------------------------------------------------


def test_nanogpts_replaced_keys_are_answered(pydocs_data, tmp_path):
    config = tmp_path / "shakespeare.py"  # as nanoGPT's config/train_shakespeare_char.py sets them
    config.write_text("eval_iters = 200\ndropout = 0.2\nbatch_size = 64\nblock_size = 256\n")
    proc = run_script("train.py", str(config), "--eval_iters=20", "--dataset=shakespeare_char", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        "eval_iters (in the command line) is nanoGPT's key, which this repository replaced: use --val_tokens=327680 "
        "(20 batches x batch_size 64 x block_size 256)"
    )
    assert f"; dropout (in {config}) is nanoGPT's key" in line and "--data_dir=data/shakespeare_char" in line


def test_a_nan_loss_stops_on_a_line_of_its_own(pydocs_data, tmp_path):
    proc = run_script(
        "train.py", f"--data_dir={pydocs_data}", f"--out_dir={tmp_path}", *TINY, "--learning_rate=1e9",
        "--warmup_iters=0", "--max_iters=100", "--peak_flops=1e12", check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # the line is not glued after the progress bar's last redraw (a \r line)
    last = proc.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("loss is nan at step ") and last.endswith("(try a lower learning_rate, or grad_clip)")


def test_invalid_utf8_is_named_by_its_line(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--sources", str(docs), "--vocab_size", "300", "--out_dir", str(tmp_path / "out")])
    assert str(e.value) == (
        f"{docs}, line 3: not UTF-8 (byte 14 of the line, 0xe9: invalid continuation byte); re-encode the file as "
        "UTF-8 (iconv -f ITS_ENCODING -t utf-8)"
    )


def test_a_truncated_checkpoint_is_said_whole_in_one_line(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "model_args": {}}, path)
    path.write_bytes(path.read_bytes()[:2000])  # an interrupted copy
    with pytest.raises(ValueError) as e:
        checkpoint.load(str(path))
    assert str(e.value) == (
        f"cannot read checkpoint {str(path)!r}: it is truncated, corrupt or not a checkpoint "
        "(PytorchStreamReader failed reading zip archive: failed finding central directory.)"
    )


# --- 6. a Windows Python: no fcntl, no SIGUSR1 -----------------------------------------------------------------------

# Runs a script as a native Windows Python would: fcntl cannot be imported, signal has no SIGUSR1, and msvcrt
# locks (a stand-in with Windows' behaviour: a byte-range lock the holder's file keeps, EACCES to another file).
WINDOWS = """
import errno, os, runpy, signal, sys, types
import fcntl as posix_fcntl
import subprocess  # before msvcrt exists: subprocess takes a module named msvcrt to mean Windows
def locking(fd, mode, nbytes):
    try:
        posix_fcntl.flock(fd, posix_fcntl.LOCK_EX | posix_fcntl.LOCK_NB)
    except BlockingIOError:
        raise PermissionError(errno.EACCES, "Permission denied") from None
sys.modules["fcntl"] = None
sys.modules["msvcrt"] = types.SimpleNamespace(LK_NBLCK=2, locking=locking)
del signal.SIGUSR1
sys.argv = sys.argv[1:]
sys.path.insert(0, os.getcwd())
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_windows_python_starts_locks_and_trains(pydocs_data, tmp_path):
    args = [
        "train.py",
        f"--data_dir={pydocs_data}",
        f"--out_dir={tmp_path}",
        *TINY,
        "--max_iters=1",
        "--peak_flops=1e12",
    ]
    held = checkpoint.RunLock(str(tmp_path))  # another run on this out_dir
    try:
        proc = run_script("-c", WINDOWS, *args, check=False)
    finally:
        held.release()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path} is in use by another training run (pid {os.getpid()} on {platform.node()}): "
        "wait for it to finish, or give this run another out_dir"
    )
    proc = run_script("-c", WINDOWS, *args)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 1
    assert (tmp_path / "train.lock").read_text().startswith("pid ")


# --- 2. gpu_check.py: a stop ends the running step's process group too, and keeps the table so far ----------------


def children(pid):
    """The pids of pid's child processes (from /proc)."""
    kids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.split("/")[2]))
    return kids


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc to find the step's process")
def test_a_signal_to_gpu_check_stops_its_step_and_keeps_the_table(pydocs_data, tmp_path):
    out, work = tmp_path / "gc", tmp_path / "gcw"
    args = ["--dry_run", "--data_dir", pydocs_data, "--out", str(out), "--work", str(work)]
    proc = start(["gpu_check.py", *args], tmp_path / "log")
    wait_until(lambda: os.path.exists(out / "logs" / "cuda_tests.log") and children(proc.pid), proc, "the first step")
    (step,) = children(proc.pid)  # pytest, in a process group of its own: a terminal's Ctrl-C would not reach it
    proc.send_signal(signal.SIGTERM)
    rc, err, lines = finish(proc, tmp_path / "log")
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert lines[-1] == f"stopped by SIGTERM: the table so far is {out / 'table.md'}"
    assert "| step | result |" in (out / "table.md").read_text()
    with pytest.raises(ProcessLookupError):  # the step's whole group is gone
        os.killpg(step, 0)

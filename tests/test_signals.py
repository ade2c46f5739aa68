"""Stopping signals save: real train.py processes, real signals, one process and torchrun with 2 CPU ranks (gloo)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, run_script, start, wait_until

N = 20  # steps of the reference runs; a stopped run is signalled at step 3, far before
STEPS = [f"--lr_decay_iters={N}", "--eval_interval=1000", "--peak_flops=1e12"]  # no MFU probe: a second saved per start
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train_args(data, out, *extra):
    return ["train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, *STEPS, *extra]


def metrics(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path).read().splitlines() if line.endswith("}")]


def trained_to(out, step):
    return lambda: any("loss" in e and e["iter"] >= step for e in metrics(out))


def finish(proc, log):
    proc.wait(timeout=300)
    text = open(log).read()
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("train")]
    return proc.returncode, text, lines


def load(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def assert_same_state(a, b):
    assert a["iter_num"] == b["iter_num"] and a["loader"] == b["loader"] and a["tokens_seen"] == b["tokens_seen"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.fixture(scope="module")
def straight(pydocs_data, tmp_path_factory):
    """A run never stopped: N steps, the reference a stopped and resumed run must equal."""
    out = tmp_path_factory.mktemp("straight")
    run_script(*train_args(pydocs_data, out, f"--max_iters={N}"))
    return out


def test_sigterm_saves_the_step_reached_and_the_resume_is_bit_identical(pydocs_data, straight, tmp_path):
    out = tmp_path / "stopped"
    # the stopped run would go on for ever; the resume goes to N, as the straight run did
    proc = start(train_args(pydocs_data, out, "--max_iters=1000000"), tmp_path / "log")
    wait_until(trained_to(out, 3), proc, "step 3")
    proc.send_signal(signal.SIGTERM)
    rc, text, lines = finish(proc, tmp_path / "log")
    assert rc == 128 + signal.SIGTERM and "Traceback" not in text
    stopped = load(out)
    k = stopped["iter_num"]
    assert 3 <= k < N and max(e["iter"] for e in metrics(out)) == k  # saved the step it reached, nothing after it
    assert lines[-1].startswith(
        f"stopped by SIGTERM at step {k} of 1000000: {out / 'ckpt.pt'} holds it; "
        f"resume with: python train.py --data_dir="
    ) and lines[-1].endswith("--init_from=resume")
    assert any(line.startswith("SIGTERM: saving at the end of this step") for line in lines)
    # re-running the command instead of resuming refuses, and loses nothing
    before = (out / "ckpt.pt").read_bytes(), (out / "metrics.jsonl").read_bytes()
    proc = run_script(*train_args(pydocs_data, out, "--max_iters=1000000"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {out} already holds a run stopped at step {k} of 1000000: resume it with --init_from=resume, "
        "start over with --overwrite=True, or choose another out_dir"
    )
    assert ((out / "ckpt.pt").read_bytes(), (out / "metrics.jsonl").read_bytes()) == before
    # the resume ends where the run never stopped ends, bit for bit, and its metrics read as one run
    run_script(*train_args(pydocs_data, out, f"--max_iters={N}", "--init_from=resume"))
    assert_same_state(load(out), load(straight))
    assert [e["iter"] for e in metrics(out) if "loss" in e] == list(range(1, N + 1))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_sigint_and_sigusr1_save_too(pydocs_data, tmp_path, sig):
    proc = start(train_args(pydocs_data, tmp_path, "--max_iters=1000000"), tmp_path / "log")
    wait_until(trained_to(tmp_path, 2), proc, "step 2")
    proc.send_signal(sig)
    rc, text, lines = finish(proc, tmp_path / "log")
    assert rc == 128 + sig and "Traceback" not in text and "KeyboardInterrupt" not in text
    k = load(tmp_path)["iter_num"]
    assert k >= 2 and lines[-1].startswith(f"stopped by {sig.name} at step {k} of 1000000: ")


@pytest.fixture(scope="module")
def long_val_data(pydocs_data, tmp_path_factory):
    """pydocs_data with a val split long enough for an evaluation of seconds (its own holds 9k tokens): the train
    tokens again (a val set is the split's first val_tokens tokens, never read twice)."""
    from data import load_tokenizer, read_shard, write_meta, write_shard

    out = str(tmp_path_factory.mktemp("long_val"))
    tokens = np.asarray(read_shard(os.path.join(pydocs_data, "train_000000.bin")))
    for split in ("train", "val"):
        write_shard(os.path.join(out, f"{split}_000000.bin"), tokens)
    write_meta(
        out,
        load_tokenizer(pydocs_data),
        shards={s: [f"{s}_000000.bin"] for s in ("train", "val")},
        shard_tokens={s: [len(tokens)] for s in ("train", "val")},
        tokens={s: len(tokens) for s in ("train", "val")},
    )
    return out


def test_a_signal_during_evaluation_is_honoured_when_it_ends(long_val_data, tmp_path):
    # a long evaluation at step 5 (300 val batches of 4 x 64, seconds); the signal arrives while it runs
    proc = start(
        train_args(long_val_data, tmp_path, "--max_iters=1000000", "--eval_interval=5", "--val_tokens=76800"),
        tmp_path / "log",
    )
    wait_until(trained_to(tmp_path, 5), proc, "step 5")
    proc.send_signal(signal.SIGTERM)
    rc, text, lines = finish(proc, tmp_path / "log")
    assert rc == 128 + signal.SIGTERM and "Traceback" not in text
    # the evaluation ran to its end (its val loss is logged), its checkpoint is the stop's: no step after it
    assert [e["iter"] for e in metrics(tmp_path) if "val_loss" in e] == [0, 5] and load(tmp_path)["iter_num"] == 5
    assert max(e["iter"] for e in metrics(tmp_path)) == 5 and text.count("saved ") == 1
    assert lines[-1].startswith(f"stopped by SIGTERM at step 5 of 1000000: {tmp_path / 'ckpt.pt'} holds it")


def test_a_second_signal_stops_at_once_without_saving(long_val_data, tmp_path):
    proc = start(train_args(long_val_data, tmp_path, "--max_iters=1000000", "--val_tokens=153600"), tmp_path / "log")
    wait_until(lambda: "train:" in open(tmp_path / "log").read(), proc, "the loop")  # the bar: step 0's evaluation runs
    proc.send_signal(signal.SIGTERM)  # honoured after the long evaluation...
    wait_until(
        lambda: "SIGTERM: saving at the end of this step" in open(tmp_path / "log").read(), proc, "the first signal"
    )
    proc.send_signal(signal.SIGINT)  # ...unless a second signal says now
    rc, text, lines = finish(proc, tmp_path / "log")
    assert rc == 128 + signal.SIGINT and "Traceback" not in text and "KeyboardInterrupt" not in text
    assert lines[-1] == "stopped by a second signal (SIGINT): nothing saved"
    assert metrics(tmp_path) == [] and not (tmp_path / "ckpt.pt").exists()  # the evaluation did not finish


def test_a_signal_before_the_first_step_exits_at_once(pydocs_data, tmp_path):
    # peak_flops=None: the start-up measures the matmul peak (a second or more) after the first line is logged
    proc = start(train_args(pydocs_data, tmp_path, "--max_iters=1000000", "--peak_flops=None"), tmp_path / "log")
    wait_until(lambda: "tokens per optimizer step" in open(tmp_path / "log").read(), proc, "start-up")
    proc.send_signal(signal.SIGINT)
    rc, text, lines = finish(proc, tmp_path / "log")
    assert rc == 128 + signal.SIGINT and "Traceback" not in text and "KeyboardInterrupt" not in text
    assert lines[-1] == "stopped by SIGINT during start-up, before the first step: nothing to save"
    assert not (tmp_path / "ckpt.pt").exists()


# --- torchrun, 2 ranks on CPU (gloo) --------------------------------------------------------------


def rank_pids(launcher_pid):
    """{rank: pid} of torchrun's workers (its children), read from their environment."""
    pids = {}
    for pid in map(int, open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()):
        env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        if "RANK" in env:
            pids[int(env["RANK"])] = pid
    return pids


def test_torchrun_every_rank_stops_at_the_same_step_and_resumes_bit_identical(pydocs_data, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "stopped"
    run = subprocess.run(
        [*TORCHRUN, *train_args(pydocs_data, straight, f"--max_iters={N}")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    proc = start(train_args(pydocs_data, out, "--max_iters=1000000"), tmp_path / "log", launcher=TORCHRUN)
    wait_until(trained_to(out, 3), proc, "step 3")
    # only rank 1 gets the signal: the ranks agree on it at the step boundary, and rank 0 saves
    os.kill(rank_pids(proc.pid)[1], signal.SIGTERM)
    rc, text, lines = finish(proc, tmp_path / "log")
    assert rc != 0 and 'train.py", line' not in text  # torchrun reports its workers' status; no worker traceback
    assert "exitcode  : 143" in text and "exitcode  : -" not in text  # the ranks ended on their own, none was killed
    k = load(out)["iter_num"]
    assert 3 <= k < N and f"stopped by SIGTERM at step {k} of 1000000" in text and "torchrun [the same options]" in text
    assert load(out)["loader"]["offset"] == k * 2 * 4 * 64  # both ranks' windows of every step, none beyond
    run = subprocess.run(
        [*TORCHRUN, *train_args(pydocs_data, out, f"--max_iters={N}", "--init_from=resume")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_state(load(out), load(straight))

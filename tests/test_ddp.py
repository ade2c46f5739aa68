"""train.py under torchrun with 2 CPU ranks (gloo): the compiled model under DDP trains as one process does, MFU is
per device, and a write only rank 0 makes (metrics.jsonl) that fails stops every rank with one line."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, run_script

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
PEAK = 1e12  # a fixed MFU denominator: no matmul probe at start, and MFU a known function of tok/s


def train_args(data, out, *extra):
    return ["train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, f"--peak_flops={PEAK}", *extra]


def torchrun(*args):
    proc = subprocess.run(
        [*TORCHRUN, *args], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    return [json.loads(line) for line in open(path).read().splitlines() if line.endswith("}")]


def load(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def test_compiled_ddp_trains_as_one_process_and_mfu_is_per_device(pydocs_data, tmp_path):
    """DDP(torch.compile(model)) on 2 ranks against one eager process, the same tokens per step: the same weights
    but for rounding (the gradients are summed in another order, the compiled kernels round otherwise). Each rank
    does half the tokens, so its tok/s is half the total, and MFU, per device, is what one process reports at that
    throughput: flops_per_token * tok/s per device / peak."""
    steps = ["--max_iters=3", "--lr_decay_iters=3", "--eval_interval=3"]
    one = run_script(*train_args(pydocs_data, tmp_path / "one", *steps))
    two = torchrun(*train_args(pydocs_data, tmp_path / "two", *steps, "--compile=True"))
    assert "weights identical across 2 ranks: max |w_rank - w_0| = 0" in two.stderr
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    assert a["tokens_seen"] == b["tokens_seen"] == 3 * 2 * 4 * 64
    assert set(a["model"]) == set(b["model"]) and not any(k.startswith(("_orig_mod.", "module.")) for k in b["model"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-5, msg=k)
    for out, world_size in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        logged = [e for e in metrics(out) if "loss" in e]
        assert [e["iter"] for e in logged] == [1, 2, 3]
        for e in logged:
            flops_per_token = e["flops"] // e["tokens"]
            assert e["tok_per_s_per_device"] == pytest.approx(e["tok_per_s"] / world_size, rel=1e-12)
            assert e["mfu"] == pytest.approx(flops_per_token * e["tok_per_s_per_device"] / PEAK, rel=1e-12)
    assert " per device), MFU " in two.stderr and " per device)" not in one.stderr


def test_a_failed_metrics_write_on_rank_0_stops_every_rank_with_one_line(pydocs_data, tmp_path):
    """metrics.jsonl made unwritable mid-run (a directory in its place: the write fails as on a full disk): rank 0
    alone writes it, yet both ranks stop, at once, with one line and no traceback; the checkpoint is intact."""
    log = tmp_path / "log"
    proc = subprocess.Popen(
        [*TORCHRUN, *train_args(pydocs_data, tmp_path, "--max_iters=1000000", "--eval_interval=5")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 300
    while not any(e["iter"] >= 7 and "loss" in e for e in metrics(tmp_path)):
        assert proc.poll() is None and time.time() < deadline, open(log).read()[-3000:]
        time.sleep(0.05)
    os.remove(tmp_path / "metrics.jsonl")
    os.mkdir(tmp_path / "metrics.jsonl")
    proc.wait(timeout=60)  # a guard against a hang: the ranks stop within two steps of the failed write
    text = open(log).read()
    line = (
        f"error: cannot write {tmp_path / 'metrics.jsonl'} (Is a directory): stopping; the last checkpoint in "
        f"{tmp_path} is intact"
    )
    assert proc.returncode != 0 and text.count(line) == 1, text[-3000:]
    assert 'train.py", line' not in text  # torchrun reports its workers' status; no worker traceback
    assert text.count("exitcode  : 1") == 2 and "exitcode  : -" not in text  # both ranks ended on their own
    ckpt = load(tmp_path)
    assert ckpt["iter_num"] >= 5 and ckpt["iter_num"] % 5 == 0

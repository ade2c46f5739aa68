"""train.py and sample.py end to end (in this process, conftest.run_here, but for DDP's torchrun): learning, exact
resume, DDP, NaN guard, config errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, copy_run, run_here


def train(data, out, *extra, check=True):
    return run_here("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, *extra, check=check)


def load(path):
    return torch.load(os.path.join(path, "ckpt.pt"), weights_only=True)


def test_loss_falls_on_embedded_corpus(pydocs_data, tmp_path):
    # peak_flops=None (TINY gives one): MFU against the matmul peak measured at start-up, as a CPU run does
    proc = train(
        pydocs_data, tmp_path, "--max_iters=60", "--lr_decay_iters=60", "--eval_interval=30", "--peak_flops=None"
    )
    assert "MFU against the measured float32 matmul peak" in proc.stderr
    evals = [e for e in map(json.loads, open(tmp_path / "metrics.jsonl")) if "val_loss" in e]
    assert [e["iter"] for e in evals] == [0, 30, 60]
    assert abs(evals[0]["val_loss"] - torch.log(torch.tensor(512.0)).item()) < 0.3  # ~uniform at init
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    # and below the entropy of a unigram model of the val tokens: the model uses context
    from data import read_shard

    counts = np.bincount(np.asarray(read_shard(os.path.join(pydocs_data, "val_000000.bin"))), minlength=512)
    p = counts[counts > 0] / counts.sum()
    assert evals[-1]["val_loss"] < -(p * np.log(p)).sum()
    ckpt = load(tmp_path)
    assert ckpt["iter_num"] == 60 and ckpt["tokens_seen"] == 60 * 2 * 4 * 64
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert set(ckpt) >= {
        "model",
        "optimizer",
        "iter_num",
        "config",
        "tokenizer",
        "loader",
        "rng",
        "model_args",
        "history",
    }


def test_resume_is_bit_exact(pydocs_data, tmp_path):
    common = ["--lr_decay_iters=12", "--eval_interval=6"]
    train(pydocs_data, tmp_path / "straight", "--max_iters=12", *common)
    train(pydocs_data, tmp_path / "split", "--max_iters=6", *common)
    train(pydocs_data, tmp_path / "split", "--max_iters=12", "--init_from=resume", *common)
    a, b = load(tmp_path / "straight"), load(tmp_path / "split")
    assert a["iter_num"] == b["iter_num"] == 12 and a["loader"] == b["loader"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # the metrics log of the resumed run reads as one run
    iters = [e["iter"] for e in map(json.loads, open(tmp_path / "split" / "metrics.jsonl")) if "loss" in e]
    assert iters == list(range(1, 13))


def test_wsd_schedule_and_its_exact_resume(pydocs_data, tmp_path):
    """Warmup-stable-decay: linear warmup, the peak held, then 1 - sqrt down to min_lr over the last decay_frac of
    lr_decay_iters; decay_frac=0 holds the peak to the end. Resumed inside the decay, it ends bit-identical."""
    wsd = ["--lr_schedule=wsd", "--warmup_iters=2", "--lr_decay_iters=10", "--decay_frac=0.4", "--eval_interval=5"]
    train(pydocs_data, tmp_path / "straight", "--max_iters=10", *wsd)
    lrs = [e["lr"] for e in map(json.loads, open(tmp_path / "straight" / "metrics.jsonl")) if "lr" in e]
    peak, low = 3e-3, 3e-4  # TINY's learning_rate and min_lr
    # by hand: warmup peak*(it+1)/3 for it < 2; peak until it = 6; then progress (it - 6)/4
    expected = [peak / 3, 2 * peak / 3, peak, peak, peak, peak] + [
        low + (1 - ((it - 6) / 4) ** 0.5) * (peak - low) for it in range(6, 10)
    ]
    assert np.allclose(lrs, expected, rtol=1e-12, atol=0), (lrs, expected)
    train(pydocs_data, tmp_path / "split", "--max_iters=7", *wsd)
    train(pydocs_data, tmp_path / "split", "--max_iters=10", "--init_from=resume", *wsd)
    a, b = load(tmp_path / "straight"), load(tmp_path / "split")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    train(pydocs_data, tmp_path / "stable", "--max_iters=6", *wsd[:-2], "--decay_frac=0", "--eval_interval=6")
    lrs = [e["lr"] for e in map(json.loads, open(tmp_path / "stable" / "metrics.jsonl")) if "lr" in e]
    assert lrs[2:] == [peak] * 4  # a phase to be grown ends at its peak
    proc = train(pydocs_data, tmp_path / "bad", "--lr_schedule=linear", check=False)
    assert proc.returncode != 0 and "lr_schedule must be 'cosine' or 'wsd'" in proc.stderr


@pytest.mark.parametrize("muon", [False, True])
def test_ddp_two_cpu_ranks_stay_identical(pydocs_data, tmp_path, muon):
    # Muon orthogonalizes the all-reduced gradient on every rank: the same numbers in, the same update out
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train.py",
            f"--data_dir={pydocs_data}",
            f"--out_dir={tmp_path}",
            *TINY,
            f"--muon={muon}",
            "--max_iters=4",
            "--lr_decay_iters=4",
            "--eval_interval=4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights identical across 2 ranks: max |w_rank - w_0| = 0" in proc.stderr
    ckpt = load(tmp_path)
    # each step: 2 ranks x 1 micro-step each (accumulation 2 is split across the ranks) x 4 x 64 tokens
    assert ckpt["tokens_seen"] == 4 * 2 * 4 * 64
    assert ckpt["loader"]["offset"] == 4 * 2 * 4 * 64


def test_nan_loss_stops_and_keeps_last_good_checkpoint(pydocs_data, tiny_run, tmp_path):
    good = load(copy_run(tiny_run, tmp_path))  # a finished 4-step run
    # an absurd learning rate overflows the weights within a step or two
    proc = train(
        pydocs_data,
        tmp_path,
        "--init_from=resume",
        "--max_iters=50",
        "--learning_rate=1e30",
        "--decay_lr=False",
        "--grad_clip=0.0",
        "--eval_interval=100",
        check=False,
    )
    assert proc.returncode != 0
    assert "loss is nan" in proc.stderr or "loss is inf" in proc.stderr
    after = load(tmp_path)
    assert after["iter_num"] == 4
    for k in good["model"]:
        assert torch.equal(good["model"][k], after["model"][k])


def test_new_phase_from_checkpoint(pydocs_data, tiny_run, tmp_path):
    a = tiny_run  # a finished run, read here, never written
    train(
        pydocs_data,
        tmp_path / "b",
        f"--init_from={a}",
        "--max_iters=2",
        "--lr_decay_iters=2",
        "--eval_interval=2",
        "--n_layer=2",
    )  # restating the checkpoint's own value is fine
    load(a)  # a's checkpoint still loads after b started from it
    b = load(tmp_path / "b")
    assert b["iter_num"] == 2 and [h["out_dir"] for h in b["history"]] == [str(a), str(tmp_path / "b")]
    proc = train(pydocs_data, tmp_path / "c", f"--init_from={a}", "--n_layer=3", check=False)
    assert proc.returncode != 0 and "the checkpoint fixes the architecture: n_layer=2" in proc.stderr


def test_keep_last_k(pydocs_data, tmp_path):
    train(pydocs_data, tmp_path, "--max_iters=8", "--lr_decay_iters=8", "--eval_interval=2", "--keep_last=2")
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("ckpt")) == [
        "ckpt.pt",
        "ckpt_0000006.pt",
        "ckpt_0000008.pt",
    ]


def test_config_errors_name_the_problem(pydocs_data, tmp_path):
    proc = train(pydocs_data, tmp_path, "--max_itres=5", check=False)
    assert proc.returncode != 0 and "unknown config key 'max_itres'" in proc.stderr and "max_iters" in proc.stderr
    proc = train(pydocs_data, tmp_path, "--max_iters=fast", check=False)
    assert proc.returncode != 0 and "'max_iters' in the command line must be int" in proc.stderr
    proc = run_here("train.py", "configs/tiny.py", f"--data_dir={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode != 0 and "run prepare_data.py first" in proc.stderr


def test_sample_streams_prompt_then_text(tiny_run, tmp_path):
    args = ["sample.py", f"--ckpt={tiny_run}", "--prompt=The with statement", "--max_new_tokens=20"]
    a, b = run_here(*args, "--seed=1"), run_here(*args, "--seed=1")
    assert a.stdout.startswith("The with statement") and len(a.stdout) > len("The with statement") + 5
    assert a.stdout == b.stdout and "tok/s" in a.stderr and "tok/s" not in a.stdout
    greedy = run_here(*args, "--temperature=0", "--num_samples=2").stdout.split("\n" + "-" * 40 + "\n")
    assert len(greedy) == 2 and greedy[0].strip() == greedy[1].strip()  # greedy decoding is deterministic
    assert run_here("sample.py", f"--ckpt={tmp_path}/missing.pt", check=False).returncode != 0


# --- the out_dir is never overwritten by accident; a resume says when it is not exact --------------


def other_dataset(pydocs_data, out):
    """The same tokenizer, another token stream (as a re-prepared dataset with other sources): another fingerprint."""
    from data import load_tokenizer, read_shard, write_meta, write_shard

    splits = {
        split: np.asarray(read_shard(os.path.join(pydocs_data, f"{split}_000000.bin")))[1000:]
        for split in ("train", "val")
    }
    os.makedirs(out, exist_ok=True)
    for split, tokens in splits.items():
        write_shard(os.path.join(out, f"{split}_000000.bin"), tokens)
    write_meta(
        str(out),
        load_tokenizer(pydocs_data),
        shards={s: [f"{s}_000000.bin"] for s in splits},
        shard_tokens={s: [len(t)] for s, t in splits.items()},
        tokens={s: len(t) for s, t in splits.items()},
    )
    return out


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def test_rerunning_a_finished_run_reuses_it_other_settings_are_refused(pydocs_data, tmp_path):
    command = ["--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2", "--keep_last=2"]
    train(pydocs_data, tmp_path, *command)
    kept = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "ckpt_0000002.pt", "metrics.jsonl")}
    # the same command again (the quick start run twice): nothing to do, exit 0
    proc = train(pydocs_data, tmp_path, *command, "--log_interval=2")  # how the run is watched does not make it another
    val_loss = load(tmp_path)["history"][-1]["val_loss"]
    assert last_line(proc) == (
        f"{tmp_path} already holds this run, finished at step 4 (val loss {val_loss:.4f}): "
        "reusing it, nothing to do (--overwrite=True trains it again)"
    )
    # the same out_dir with other settings: refused, naming them
    proc = train(pydocs_data, tmp_path, *command, "--learning_rate=1e-3", "--max_iters=6", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc) == (
        f"error: {tmp_path} already holds a finished run (step 4) with other settings (learning_rate 0.003 "
        "-> 0.001; max_iters 4 -> 6): resume it with --init_from=resume, start over with "
        "--overwrite=True, or choose another out_dir"
    )
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept  # nothing lost
    # starting over is explicit: the old run's checkpoint, its numbered copies and metrics go
    proc = train(pydocs_data, tmp_path, "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2", "--overwrite=True")
    assert f"overwrite=True: starting over in {tmp_path}" in proc.stderr
    assert load(tmp_path)["iter_num"] == 2 and not (tmp_path / "ckpt_0000002.pt").exists()
    assert [e["iter"] for e in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in e] == [1, 2]


def test_a_resume_applies_the_configs_optimizer_settings_and_names_what_is_not_exact(pydocs_data, tiny_run, tmp_path):
    out, other = copy_run(tiny_run, tmp_path / "out"), other_dataset(pydocs_data, tmp_path / "other")
    ckpt = load(out)  # a run of 4 steps, lr decay over 8
    assert ckpt["world_size"] == 1 and ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    torch.save(dict(ckpt, world_size=2), out / "ckpt.pt")  # as if two processes had trained it
    proc = train(
        other,
        out,
        "--init_from=resume",
        "--max_iters=6",
        "--lr_decay_iters=8",
        "--eval_interval=4",
        "--beta2=0.99",
        "--weight_decay=0.0",
        "--batch_size=2",
        "--block_size=32",
        "--gradient_accumulation_steps=1",
    )
    log = proc.stderr
    assert "resuming with this run's optimizer settings: beta2 0.95 -> 0.99, weight_decay 0.1 -> 0.0" in log
    assert (
        "warning: resuming with batch_size 2 (sequences per micro-step), the checkpoint's is 4: 64 tokens per step "
        "instead of 512, so this is not the run the checkpoint would have gone on to"
    ) in log
    assert "warning: resuming with block_size 32 (tokens per sequence), the checkpoint's is 64" in log
    assert "warning: resuming with gradient_accumulation_steps 1 (micro-steps per step, across processes)" in log
    assert "warning: resuming on 1 processes, the checkpoint's run had 2: the same tokens per step" in log
    assert (f"warning: {other} holds another dataset than the checkpoint's {pydocs_data} (fingerprint ") in log
    assert f"starting {other} at its beginning (token 0), not at the checkpoint's position" in log
    after = load(out)
    assert [g["betas"] for g in after["optimizer"]["param_groups"]] == [(0.9, 0.99)] * 2
    assert [g["weight_decay"] for g in after["optimizer"]["param_groups"]] == [0.0, 0.0]
    assert after["loader"]["offset"] == 2 * 2 * 32  # two steps of the other data, from its start


def test_fp16_resume_restores_the_grad_scaler(pydocs_data, tmp_path):
    fp16 = ["--dtype=float16", "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3"]
    train(pydocs_data, tmp_path / "straight", *fp16, "--keep_last=2")
    os.makedirs(tmp_path / "split")
    os.link(tmp_path / "straight" / "ckpt_0000003.pt", tmp_path / "split" / "ckpt.pt")  # the run stopped at step 3
    train(pydocs_data, tmp_path / "split", *fp16, "--init_from=resume")
    a, b = load(tmp_path / "straight"), load(tmp_path / "split")
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 6  # a restarted scaler would count 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_new_phase_continues_the_stream_by_fingerprint_wherever_the_data_lives(pydocs_data, tmp_path):
    import shutil

    first, moved = tmp_path / "data", tmp_path / "moved"
    shutil.copytree(pydocs_data, first)
    short = ["--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2"]
    train(first, tmp_path / "a", *short)
    a = load(tmp_path / "a")["loader"]
    step = 2 * 4 * 64
    # the same dataset, moved: the phase goes on where phase a stopped
    os.rename(first, moved)
    proc = train(moved, tmp_path / "b", f"--init_from={tmp_path / 'a'}", *short)
    assert (
        f"continuing {moved} at shard 0, token {a['offset']:,} (the checkpoint's dataset, fingerprint "
        f"{a['fingerprint']}, found at {moved} instead of {first})"
    ) in proc.stderr
    assert load(tmp_path / "b")["loader"]["offset"] == a["offset"] + 2 * step
    # another dataset prepared where the first one was: the position means nothing there
    other_dataset(pydocs_data, first)
    proc = train(first, tmp_path / "c", f"--init_from={tmp_path / 'a'}", *short)
    assert f"warning: {first} holds another dataset than the checkpoint's {first} (fingerprint " in proc.stderr
    assert load(tmp_path / "c")["loader"]["offset"] == 2 * step
    # a checkpoint from before fingerprints: only its data_dir's path can tell
    old = load(tmp_path / "a")
    old["loader"].pop("fingerprint")
    torch.save(old, tmp_path / "old.pt")
    proc = train(moved, tmp_path / "d", f"--init_from={tmp_path / 'old.pt'}", *short)
    assert (
        f"warning: the checkpoint predates dataset fingerprints, so only paths compare: its data_dir '{first}' is "
        f"not '{moved}': starting {moved} at its beginning (token 0)"
    ) in proc.stderr


def test_the_quick_start_runs_twice(pydocs_data, tmp_path):
    """phase 1 -> stack.py -> phase 2, then the same commands again: each step says it reuses its work, and changes
    nothing."""
    short = ["--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2"]
    phase1 = ["train.py", f"--data_dir={pydocs_data}", f"--out_dir={tmp_path / 'tiny'}", *TINY, *short]
    grow = ["stack.py", "--src", str(tmp_path / "tiny"), "--out", str(tmp_path / "tiny_stacked.pt")]
    phase2 = [
        "train.py",
        f"--data_dir={pydocs_data}",
        f"--out_dir={tmp_path / 'tiny_stack'}",
        *TINY[:3],
        *TINY[8:],
        *short,
        f"--init_from={tmp_path / 'tiny_stacked.pt'}",
    ]
    for command in (phase1, grow, phase2):
        run_here(*command)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.suffix in (".pt", ".jsonl")}
    again = [run_here(*command) for command in (phase1, grow, phase2)]
    assert "already holds this run, finished at step 2" in again[0].stderr
    assert (
        f"{tmp_path / 'tiny_stacked.pt'} already holds {tmp_path / 'tiny'} grown by stack x2: reusing it"
        in again[1].stdout
    )
    assert "already holds this run, finished at step 2" in again[2].stderr
    assert {p: p.read_bytes() for p in files} == files

"""train.py's guards between phases and steps: an optimizer switch between phases is said; a non-finite loss that the
loop reads only at log steps is still never saved."""

import os
import re

import torch
from conftest import TINY, run_here

PHASE = [a for a in TINY if not a.startswith(("--n_", "--intermediate_size"))]  # a phase's shape is its checkpoint's


def train(data, out, *extra, args=TINY, check=True):
    return run_here(
        "train.py", f"--data_dir={data}", f"--out_dir={out}", *args, "--peak_flops=1e12", *extra, check=check
    )


def test_an_optimizer_switch_between_phases_is_said(pydocs_data, tmp_path):
    """A Muon phase 1, grown by stack.py with a fresh optimizer (--optim reset), continued by an AdamW phase: one
    line says so. A phase that keeps the optimizer says nothing."""
    short = ["--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2"]
    train(pydocs_data, tmp_path / "a", *short, "--muon=True")
    run_here("stack.py", "--src", str(tmp_path / "a"), "--out", str(tmp_path / "grown.pt"), "--optim", "reset")
    grown = tmp_path / "grown.pt"
    switched = train(pydocs_data, tmp_path / "b", *short, f"--init_from={grown}", "--muon=False", args=PHASE)
    assert (
        f"switching optimizer: {grown} was trained with muon=True (Muon + AdamW), this phase has "
        "muon=False (AdamW), starting fresh"
    ) in switched.stderr
    back = train(pydocs_data, tmp_path / "c", *short, f"--init_from={tmp_path / 'b'}", "--muon=True", args=PHASE)
    assert "was trained with muon=False (AdamW), this phase has muon=True (Muon + AdamW)" in back.stderr
    same = train(pydocs_data, tmp_path / "d", *short, f"--init_from={tmp_path / 'a'}", "--muon=True", args=PHASE)
    assert "switching optimizer" not in same.stderr


def test_a_non_finite_loss_read_late_is_never_saved(pydocs_data, tmp_path):
    """The loss is read every log_interval (10) steps, but before every save too: the weights that an absurd
    learning rate overflows at step 5 are not saved at the evaluation of step 6, and the run stops there."""
    train(pydocs_data, tmp_path, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=4")
    good = torch.load(os.path.join(tmp_path, "ckpt.pt"), weights_only=True)
    proc = train(
        pydocs_data,
        tmp_path,
        "--init_from=resume",
        "--max_iters=50",
        "--learning_rate=1e30",
        "--decay_lr=False",
        "--grad_clip=0.0",
        "--eval_interval=2",
        "--log_interval=10",
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"loss is (nan|inf) at (step 6|a step from 5 to 6): stopping; the last checkpoint", proc.stderr)
    after = torch.load(os.path.join(tmp_path, "ckpt.pt"), weights_only=True)
    assert after["iter_num"] == 4
    for k in good["model"]:
        assert torch.equal(good["model"][k], after["model"][k])

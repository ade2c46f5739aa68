"""
Growth vs scratch at equal training FLOPs, on CPU with the tiny configs.

    python prepare_data.py && python study_growth.py          # ~20 min on 2 idle cores -> study/

The runs share one training-FLOPs budget, and the base model's FLOPs count toward every grown model's:
    scratch     a 2L model (8 layers) trained from scratch on the whole budget;
    stack, interleave, dus, zero
                one L model (4 layers, configs/tiny.py) trained for --base_iters steps, grown by stack.py with each
                operator (dus with m = 1: 4 -> 6 layers) and trained on with configs/tiny_stack.py until the budget
                is spent. The budget is the base's FLOPs plus --grown_iters steps of the 8-layer model.
    no growth   the control: the L model trained on with configs/tiny_stack.py, unchanged, to the same budget.
                Growth beats scratch partly because a smaller model learns faster early on; this run shows how much.
FLOPs are train.py's own count (metrics.jsonl: tokens seen x model.flops_per_token, PaLM's formula).
The score is Du et al.'s (NeurIPS 2024): the FLOPs each run needs to reach scratch's final val loss, and
speedup = FLOPs_scratch / FLOPs_growth - 1 (linear interpolation between evaluations).

Writes study/growth_study.png (val loss against FLOPs) and study/growth_study.md (the table, also on stdout).
A run whose out_dir already holds its finished checkpoint is not run again, so an interrupted study resumes.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

import checkpoint
from common import log
from data import load_meta
from model import LLaMA, ModelConfig

METHODS = ["stack", "interleave", "dus", "zero"]


def evals(out_dir):
    """[(iter, flops, val_loss)] from a run's metrics.jsonl."""
    return [(e["iter"], e["flops"], e["val_loss"]) for e in checkpoint.read_metrics(out_dir) if "val_loss" in e]


def finished(out_dir, iters):
    path = os.path.join(out_dir, "ckpt.pt")
    return os.path.exists(path) and checkpoint.load(path)["iter_num"] == iters


def run(args, wall, name):
    """Run one script in a fresh interpreter, its log going to study/<name>.log; time it (wall_times.json keeps
    the times across invocations, so a resumed study still reports what every run took)."""
    log(f"[{time.strftime('%H:%M:%S')}] {name}: python {' '.join(args)}")
    t0 = time.perf_counter()
    with open(os.path.join(STUDY, f"{name}.log"), "w") as logfile:
        proc = subprocess.run([sys.executable, *args], stdout=logfile, stderr=subprocess.STDOUT)
    wall[name] = wall.get(name, 0.0) + time.perf_counter() - t0
    with open(os.path.join(STUDY, "wall_times.json"), "w") as f:
        json.dump(wall, f, indent=1)
    if proc.returncode != 0:
        sys.exit(f"error: {name} failed (exit {proc.returncode}); see {STUDY}/{name}.log")


def train(wall, name, config, iters, *extra):
    out_dir = os.path.join(STUDY, name)
    if finished(out_dir, iters):
        log(f"{name}: already trained for {iters} steps in {out_dir}")
        return
    run(["train.py", config, f"--out_dir={out_dir}", f"--data_dir={DATA}", f"--max_iters={iters}",
         f"--lr_decay_iters={iters}", f"--eval_interval={EVAL_INTERVAL}", *extra], wall, name)


def flops_per_token(n_layer):
    """Training FLOPs per token of the tiny model at a given depth (train.py counts with the same method)."""
    with torch.device("meta"):  # no memory, no init: only the shapes matter
        return LLaMA(ModelConfig(vocab_size=VOCAB, n_layer=n_layer, n_head=4, n_kv_head=4, n_embd=256,
                                 intermediate_size=688, block_size=256)).flops_per_token(256)


def flops_to_reach(curve, target):
    """First FLOPs at which a (flops, loss) curve gets down to target, interpolated; None if it never does."""
    if curve[0][1] <= target:
        return curve[0][0]
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if l1 <= target:  # l0 > target >= l1
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return None


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="study")
    p.add_argument("--data_dir", default="data/pydocs")
    p.add_argument("--base_iters", type=int, default=200, help="steps of the 4-layer base model")
    p.add_argument("--grown_iters", type=int, default=100, help="steps of an 8-layer grown model; sets the budget")
    p.add_argument("--eval_interval", type=int, default=20)
    args = p.parse_args()
    STUDY, DATA, EVAL_INTERVAL = args.out_dir, args.data_dir, args.eval_interval
    try:
        VOCAB = 64 * -(-load_meta(DATA)["vocab_size"] // 64)  # as train.py pads it
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    os.makedirs(STUDY, exist_ok=True)
    tokens_per_step = 16 * 256  # configs/tiny.py and configs/tiny_stack.py: batch 16 x block 256, no accumulation
    wall_path = os.path.join(STUDY, "wall_times.json")
    wall = json.load(open(wall_path)) if os.path.exists(wall_path) else {}

    # the base, then the budget it implies
    train(wall, "base", "configs/tiny.py", args.base_iters)
    base = evals(os.path.join(STUDY, "base"))
    base_flops = base[-1][1]
    budget = base_flops + args.grown_iters * tokens_per_step * flops_per_token(8)
    scratch_iters = round(budget / (tokens_per_step * flops_per_token(8)))
    log(f"budget: {budget:.3g} FLOPs = base {base_flops:.3g} + {args.grown_iters} grown steps = {scratch_iters} scratch steps")

    # scratch: the 8-layer model with the tiny recipe (its warmup, peak lr and cosine) over the whole budget
    train(wall, "scratch", "configs/tiny.py", scratch_iters, "--n_layer=8")

    # each operator: grow the base, train on for what is left of the budget
    depth = {"scratch": 8, "stack": 8, "interleave": 8, "zero": 8, "dus": 6, "no_growth": 4}
    for method in METHODS:
        grown_ckpt = os.path.join(STUDY, f"{method}.pt")
        iters = round((budget - base_flops) / (tokens_per_step * flops_per_token(depth[method])))
        if not finished(os.path.join(STUDY, method), iters):
            run(["stack.py", f"--src={STUDY}/base", f"--out={grown_ckpt}", f"--method={method}", "--force"]
                + (["--drop=1"] if method == "dus" else []), wall, f"stack_{method}")
        train(wall, method, "configs/tiny_stack.py", iters, f"--init_from={grown_ckpt}")
    iters = round((budget - base_flops) / (tokens_per_step * flops_per_token(4)))
    train(wall, "no_growth", "configs/tiny_stack.py", iters, f"--init_from={STUDY}/base")

    # -- score ---------------------------------------------------------------------------------------------------
    curves = {"scratch": [(f, l) for _, f, l in evals(os.path.join(STUDY, "scratch"))]}
    for name in METHODS + ["no_growth"]:
        curves[name] = [(base_flops + f, l) for _, f, l in evals(os.path.join(STUDY, name))]
    target = curves["scratch"][-1][1]
    flops_scratch = flops_to_reach(curves["scratch"], target)
    rows = ["| run | layers | final val loss | FLOPs to reach scratch's final loss | speedup |", "|---|---|---|---|---|"]
    for name, curve in curves.items():
        reach = flops_to_reach(curve, target)
        speedup = f"{flops_scratch / reach - 1:+.0%}" if reach else "< 0 (not reached within the budget)"
        rows.append(f"| {name} | {depth[name]} | {curve[-1][1]:.4f} | {f'{reach:.3g}' if reach else 'not reached'} | "
                    f"{'(reference)' if name == 'scratch' else speedup} |")
    summary = (f"Budget {budget:.3g} training FLOPs: base 4 layers x {args.base_iters} steps ({base_flops:.3g} FLOPs), "
               f"grown runs to the budget (8 layers: {args.grown_iters} steps), scratch 8 layers x {scratch_iters} steps; "
               f"{tokens_per_step:,} tokens per step on data/pydocs.\n"
               f"Wall time of the runs, summed: {sum(wall.values()):.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in wall.items())}).")
    table = "\n".join(rows) + "\n\n" + summary + "\n"
    with open(os.path.join(STUDY, "growth_study.md"), "w") as f:
        f.write("# Growth vs scratch at equal training FLOPs\n\n" + table)
    print(table)

    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot([f for _, f, _ in base], [l for *_, l in base], color="0.5", ls="--", label="base (4 layers)")
    ax.plot(*zip(*curves["scratch"]), color="black", lw=2, label="scratch (8 layers)")
    for name in METHODS + ["no_growth"]:
        ax.plot(*zip(*curves[name]), label=f"{name} ({depth[name]} layers)", ls=":" if name == "no_growth" else "-")
    ax.axhline(target, color="black", lw=0.5, ls=":")
    ax.set_xlabel("training FLOPs (base included)")
    ax.set_ylabel("val loss")
    ax.set_ylim(min(l for curve in curves.values() for _, l in curve) - 0.1, target + 1.5)  # the early drop is off the top
    ax.set_title("Growth vs scratch at equal FLOPs (tiny, pydocs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(STUDY, "growth_study.png"))
    log(f"wrote {STUDY}/growth_study.png and {STUDY}/growth_study.md")

"""
Should I grow, when, and how? Growth against training the target size from scratch, at equal training FLOPs.

    python prepare_data.py --sources pystdlib --vocab_size 2048       # ~10M train tokens, offline -> data/pystdlib
    python study_growth.py --jobs 2                                   # -> study/growth_study.json, study/*.png
    python study_growth.py --report > table.md                        # docs/growth.md's tables and plots, from the JSON
    python study_growth.py --quick --data_dir data/pydocs             # the whole pipeline in a few minutes
    python study_growth.py --crossover_only ...; python study_growth.py --budget B ...  # the crossover first

Growth is a claim about training a model of the target size more cheaply, so the study first checks its regime.
The crossover: the target (--layers) and the small model (--layers / factor) trained from scratch at each of
--crossover_budgets. Only at a budget where the large model wins is the target the right size, and only there
can growth be judged (below it, training the small model on wins, and any grown model looks good).
The growth study at --budget (training FLOPs, the base's included in every grown model's):
    scratch     the target trained from scratch on the whole budget, with the tiny recipe (configs/tiny.py);
    base        the small model trained with its own cosine on a fraction f of the budget (--growth_points);
    OPERATOR    the base grown by stack.py (stack, interleave, dus, zero; --noise, --optim, --factors) and
                trained on with configs/tiny_stack.py (fresh warmup and cosine) for the rest of the budget;
    no_growth   the control: the base trained on unchanged, with the same phase-2 recipe, to the same budget.
Every run keeps its config's recipe, with its step count set by its FLOPs and AdamW as its optimizer (the reference
recipe's; the tiny configs' Muon is not what the record measured): peak --learning_rate, warmup over the first 10%
of the steps, then down to a tenth of the peak at the end, under each of --schedules:
    cosine      each phase its own cosine: the base anneals before it grows, the grown model warms up and decays again;
    wsd         warmup-stable-decay (train.py's lr_schedule='wsd'): the base holds its peak to the growth step, the
                grown phase continues at that peak (not the cosine grown phase's half) and the decay comes once,
                over the last --decay_frac of the budget's FLOPs; a fresh AdamW (--optim reset) still warms up.
Cosine runs keep the names of the study before schedules; the others end in _wsd. The defaults are sized for 2 CPU
cores: 4 and 8 layers of width 32 with tied embeddings (~0.12M and ~0.17M parameters at vocab 2048), 8 x 128 tokens
per step; crossover budgets of 1.25e12 to 1e13 FLOPs (~0.9M to ~7.2M tokens of the 8-layer model), growth at 2e13,
past the crossover (~1e13, measured); no run sees more than ~2.2 epochs of pystdlib.
The first value of --growth_points, --factors, --optims, --noise and --lr_mults is the main setting: every
operator runs with it, and with every seed. The other values vary one thing at a time for the first operator,
with the first seed; --lr_mults also sweeps scratch's peak learning rate, and the grown phase's (under cosine
half of --learning_rate, as configs/phase2.py halves phase1.py's: the copies start trained).
The score is Du et al.'s (NeurIPS 2024): at scratch's final mean val loss, speedup = FLOPs_scratch / FLOPs_grown - 1,
read off the mean curves (linear interpolation between evaluations); it is reported only where the seeds of the
two runs do not overlap (every grown seed ends below every scratch seed), since a smaller gain is noise.
Seeds change the initialization; every run reads the same data in the same order.

Runs go to OUT/runs/NAME, logs to OUT/logs/NAME.log. A finished run is never run again and an interrupted one
resumes from its last checkpoint, so the study continues where it stopped. Results: OUT/growth_study.json
    {"corpus", "corpus_train_tokens", "budget_flops" (None: crossover only), "settings",
     "crossover": {budget: {layers: [seed records]}},
     "runs": {name: {"layers", "growth_point", "schedule", "seeds": [{"seed", "final_val_loss", "tokens", "flops",
                                                                      "curve", "final_eval_loss", "final_eval_bpb"}]}},
     "job_wall_s"}
The JSON is also the study's record: a run it holds is not run again, even where its directory is gone, so a study
runs in parts (--schedules cosine today, --schedules wsd tomorrow, or on another machine with the JSON copied over).
with flops counted by train.py (tokens x model.flops_per_token, PaLM's formula); final_val_loss and the curve are
train.py's (its val set: the first --eval_iters batches of --batch_size x --block_size val tokens), final_eval_loss
the final model on --final_eval_iters batches, the finer measure the crossover table uses, and final_eval_bpb the
same in bits per byte. settings.dtype is the dtype the runs computed in. Plots: OUT/crossover.png, OUT/growth_study.png.
stdout carries the tables; progress goes to stderr.
"""

import stopping

# first of all, before torch takes a second or two to import: a signal meanwhile ends in one line too
if __name__ == "__main__":
    stopping.stop_on_signals("stopped by {signal}: the finished runs are kept; run the same command to continue")

import argparse
import functools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch

import checkpoint
from common import DTYPES, atomic_write, log, mixed_precision, resolve_dtype
from data import ValSet, load_meta, read_shard, shard_paths
from model import LLaMA, ModelConfig

OPERATORS = ["stack", "interleave", "dus", "zero"]
SCHEDULES = ["cosine", "wsd"]
# what --quick changes: sizes, budgets and variations small enough that every kind of run finishes in seconds
QUICK = dict(
    n_embd=32,
    n_head=2,
    intermediate_size=64,
    layers=8,
    block_size=32,
    batch_size=4,
    eval_iters=2,
    evals=4,
    budget=4e9,
    crossover_budgets=[4e9],
    operators=["stack"],
    growth_points=[0.5],
    factors=[2],
    optims=["reset"],
    noise=[0.0],
    lr_mults=[1.0],
    compile=False,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="study")
    p.add_argument("--data_dir", default="data/pystdlib")
    # sizes: the target; the small model has layers / factor layers of the same width (tied embeddings)
    p.add_argument("--layers", type=int, default=8, help="depth of the target model (default: %(default)s)")
    p.add_argument("--n_embd", type=int, default=32, help="width of both models (default: %(default)s)")
    p.add_argument("--n_head", type=int, default=2)
    p.add_argument("--intermediate_size", type=int, default=88, help="SwiGLU width, ~8/3 n_embd (default: %(default)s)")
    # 1,024 tokens per step: at these budgets a model is limited by its number of steps, and a small batch gives it
    # 4x the steps of configs/tiny.py's 16 x 256 at the same tokens per second (measured on 2 CPU cores)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    # the peak every run of the record was trained at; a grown phase under cosine takes half (as configs/phase2.py
    # halves phase1.py's): the copies start trained
    p.add_argument(
        "--learning_rate",
        type=float,
        default=2e-3,
        help="peak learning rate of the scratch and base runs (AdamW; default: %(default)s)",
    )
    # budgets, in training FLOPs
    # past the crossover this study measured for the default pair (~1e13 FLOPs): there the target is the right size
    p.add_argument("--budget", type=float, default=2e13, help="the growth study's budget (default: %(default).3g)")
    p.add_argument(
        "--crossover_budgets",
        type=float,
        nargs="*",
        default=[1.25e12, 2.5e12, 5e12, 1e13],
        help="budgets of the small-vs-large scratch runs (none: skip the crossover)",
    )
    # what varies
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--crossover_seeds", type=int, nargs="+", default=[1], help="seeds of the crossover runs")
    p.add_argument("--operators", nargs="+", default=OPERATORS, choices=OPERATORS)
    p.add_argument(
        "--growth_points",
        type=float,
        nargs="+",
        default=[0.5, 0.25, 0.75],
        help="fractions of the budget spent on the base before growing",
    )
    p.add_argument(
        "--factors", type=int, nargs="+", default=[2], help="growth factors g (the base has layers/g layers)"
    )
    p.add_argument("--optims", nargs="+", default=["reset", "copy"], choices=["reset", "copy"])
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2], help="stack.py --noise values")
    p.add_argument(
        "--lr_mults",
        type=float,
        nargs="+",
        default=[1.0, 0.5, 2.0],
        help="multipliers of the configs' peak learning rates (a sweep for scratch and the grown phase)",
    )
    p.add_argument(
        "--schedules",
        nargs="+",
        default=SCHEDULES,
        choices=SCHEDULES,
        help="learning-rate schedules, each running the whole growth study (default: %(default)s)",
    )
    p.add_argument(
        "--decay_frac",
        type=float,
        default=0.2,
        help="wsd: the share of the budget's FLOPs spent "
        "decaying, at its end (default: %(default)s, Hägele et al., 2024)",
    )
    # how
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="auto: what the device computes natively "
        "(common.auto_dtype: fp32 on a CPU without AVX-512 BF16 or AMX, where bf16 autocast is several times "
        "slower); the JSON records the dtype that ran (default: %(default)s)",
    )
    p.add_argument("--eval_iters", type=int, default=10, help="val batches per evaluation")
    p.add_argument("--evals", type=int, default=12, help="evaluations per run: the points of each curve")
    p.add_argument(
        "--final_eval_iters",
        type=int,
        default=50,
        help="val batches for each run's final loss, "
        "final_eval_loss in the JSON (default: %(default)s, 5x the curve's)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at a time, the CPU's threads shared among them "
        "(default: one per CPU core, one thread each: at these sizes 2 runs of 1 thread do ~1.8x the work "
        "of 1 run of 2 threads; 1 on cuda)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile every run (default: on; on 2 CPU cores 1.2x the steps per second, ~50 s to "
        "compile once, then seconds from the inductor's cache)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets: the whole pipeline in minutes (tests)")
    p.add_argument(
        "--crossover_only",
        action="store_true",
        help="run the crossover's runs and no growth study: a first pass that says where to put --budget (its "
        "JSON takes the growth runs of any --budget later; gpu_check.py sizes its study so)",
    )
    p.add_argument("--no_run", action="store_true", help="run nothing: JSON, plots and tables from the finished runs")
    p.add_argument(
        "--report",
        action="store_true",
        help="print the markdown tables of OUT/growth_study.json, draw its plots into OUT, and exit",
    )
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.jobs = args.jobs or (1 if args.device.startswith("cuda") else os.cpu_count() or 1)
    for g in args.factors:
        if g < 2 or args.layers % g:
            p.error(f"--factors: {g} must be >= 2 and divide --layers {args.layers}")
    dus_factors = args.factors if args.operators[0] == "dus" else args.factors[:1] if "dus" in args.operators else []
    for g in dus_factors:
        if args.layers // g < 3:
            p.error(
                f"dus needs a base of at least 3 layers (it drops one at each seam): --layers {args.layers} / "
                f"factor {g} = {args.layers // g}"
            )
    if not all(0 < f < 1 for f in args.growth_points):
        p.error("--growth_points must be fractions strictly between 0 and 1")
    if args.budget <= 0 or any(b <= 0 for b in args.crossover_budgets) or args.jobs < 1:
        p.error("budgets and --jobs must be positive")
    if "wsd" in args.schedules and not 0 < args.decay_frac <= min(1 - f for f in args.growth_points):
        p.error(
            "--decay_frac must be positive and no larger than any grown phase's share of the budget (the decay "
            "belongs to the grown model)"
        )
    return args


# -----------------------------------------------------------------------------------------------
# Model arithmetic: train.py's own FLOPs count, from the shapes alone


def model_args(args, n_layer, vocab):
    return dict(
        vocab_size=vocab,
        n_layer=n_layer,
        n_head=args.n_head,
        n_kv_head=args.n_head,
        n_embd=args.n_embd,
        intermediate_size=args.intermediate_size,
        block_size=args.block_size,
        tie_embeddings=True,
    )


def flops_per_token(args, n_layer, vocab):
    with torch.device("meta"):  # no memory, no init: only the shapes matter
        return LLaMA(ModelConfig(**model_args(args, n_layer, vocab))).flops_per_token(args.block_size)


def iters_for(args, flops, n_layer, vocab):
    return max(1, round(flops / (args.batch_size * args.block_size * flops_per_token(args, n_layer, vocab))))


def measure_flops_per_second(args, vocab, threads):
    """A few training steps of the target model, timed in this process: the rate behind the time estimate."""
    torch.set_num_threads(threads)
    model = LLaMA(ModelConfig(**model_args(args, args.layers, vocab))).to(args.device)
    x = torch.randint(0, vocab, (args.batch_size, args.block_size), device=args.device)
    autocast = mixed_precision(args.dtype, args.device)
    for step in range(4):
        if step == 1:  # the first step warms up allocators and kernels
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast:
            loss = model(x, x)[1]
        loss.backward()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return 3 * args.batch_size * args.block_size * model.flops_per_token(args.block_size) / (time.perf_counter() - t0)


# -----------------------------------------------------------------------------------------------
# The plan: every run a named job with the jobs it needs first


class Job:
    """One subprocess: a train.py run (out_dir OUT/runs/NAME) or a stack.py growth (OUT/grown/NAME.pt)."""

    def __init__(self, name, flops, deps, argv, done):
        self.name, self.flops, self.deps, self.argv, self.done = name, flops, deps, argv, done


def finished_iters(out_dir):
    """(iter_num, max_iters) of a run's checkpoint, or None when it has none."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        return None
    ckpt = checkpoint.load(path)
    return ckpt["iter_num"], ckpt["config"]["max_iters"]


def train_job(
    args,
    vocab,
    name,
    config,
    flops,
    n_layer,
    lr_mult,
    seed,
    init_from=None,
    deps=(),
    schedule="cosine",
    decay_frac=None,
    warmup=True,
    lr_scale=1.0,
):
    """A train.py run spending `flops`; n_layer is a number, or a grown checkpoint whose model_args give it.
    Its peak learning rate is --learning_rate times lr_scale times lr_mult; warmup over its first 10% of steps
    (or none); `schedule` cosine, or wsd decaying over its last decay_frac (0: it ends at its peak)."""
    out_dir = os.path.join(args.out_dir, "runs", name)

    def argv():
        depth = n_layer if isinstance(n_layer, int) else checkpoint.load(n_layer)["model_args"]["n_layer"]
        iters = iters_for(args, flops, depth, vocab)
        base_lr = args.learning_rate * lr_scale
        state = finished_iters(out_dir)
        start = "resume" if state and state[1] == iters else init_from or "scratch"  # an interrupted run resumes
        return (
            [
                "train.py",
                config,
                f"--out_dir={out_dir}",
                f"--data_dir={args.data_dir}",
                f"--device={args.device}",
                f"--dtype={args.dtype}",
                f"--compile={args.compile}",
                f"--block_size={args.block_size}",
                f"--batch_size={args.batch_size}",
                "--gradient_accumulation_steps=1",
                f"--seed={seed}",
                f"--max_iters={iters}",
                f"--lr_decay_iters={iters}",
                f"--warmup_iters={max(1, iters // 10) if warmup else 0}",
                f"--learning_rate={base_lr * lr_mult}",
                f"--min_lr={base_lr * lr_mult / 10}",
                f"--eval_interval={max(1, iters // args.evals)}",
                f"--val_tokens={args.eval_iters * args.batch_size * args.block_size}",
                f"--log_interval={max(1, iters // 20)}",
                f"--init_from={start}",
                f"--lr_schedule={schedule}",
                "--muon=False",
            ]
            + (  # AdamW, whatever the config says: the reference recipe's, and the record's
                [f"--decay_frac={decay_frac}"] if schedule == "wsd" else []
            )
            + (["--overwrite=True"] if start != "resume" else [])
            + (  # a run of another length is redone, deliberately
                [
                    f"--n_layer={n_layer}",
                    f"--n_embd={args.n_embd}",
                    f"--n_head={args.n_head}",
                    f"--n_kv_head={args.n_head}",
                    f"--intermediate_size={args.intermediate_size}",
                    "--tie_embeddings=True",
                ]
                if init_from is None
                else []
            )
        )

    def done():
        state = finished_iters(out_dir)
        return state is not None and state[0] == state[1]

    job = Job(name, flops, list(deps), argv, done)
    job.schedule = schedule
    return job


def grow_job(args, name, base, method, noise, optim, factor):
    out = os.path.join(args.out_dir, "grown", f"{name}.pt")
    argv = [
        "stack.py",
        f"--src={os.path.join(args.out_dir, 'runs', base.name)}",
        f"--out={out}",
        f"--method={method}",
        f"--factor={factor}",
        f"--noise={noise}",
        f"--optim={optim}",
        f"--device={args.device}",
        "--force",
    ]
    if method == "dus":
        argv.append("--drop=1")  # SOLAR's m = L/4 of a 4-layer base; the smallest seam for any base
    return Job(f"grow_{name}", 0.0, [base], lambda: argv, lambda: os.path.exists(out)), out


def fmt(x):
    return f"{x:g}"


def run_name(name, schedule):
    """The JSON's name of a run: cosine runs keep the names of the study before schedules, so its records carry
    over; the others carry their schedule (scratch_wsd, stack_at0.25_wsd)."""
    return name if schedule == "cosine" else f"{name}_{schedule}"


def plan(args, vocab, best=None):
    """All jobs, cheapest first, and the study's run names -> [(job, seed, growth point, flops offset)].
    best: {schedule: the operator that runs every seed}, each known once best_operator() knows it."""
    best = best or {}
    jobs, runs = {}, {}

    def add(job, priority):
        job.priority = min(priority, getattr(jobs.get(job.name), "priority", priority))
        return jobs.setdefault(job.name, job)

    def scratch(n_layer, budget, seed, priority, lr_mult=1.0, schedule="cosine", decay_frac=None):
        tag = "" if schedule == "cosine" else "_stable" if decay_frac == 0 else f"_{schedule}"
        return add(
            train_job(
                args,
                vocab,
                f"scratch_L{n_layer}_b{budget:.3g}_lr{fmt(lr_mult)}{tag}_s{seed}",
                "configs/tiny.py",
                budget,
                n_layer,
                lr_mult,
                seed,
                schedule=schedule,
                decay_frac=decay_frac,
            ),
            priority,
        )

    # the order runs start in: the crossover, cheapest first (it says whether the budget is in the regime where
    # growth can be judged); scratch, the control and the first operator seed by seed, every schedule; the other
    # operators with the first seed; the best operator's other seeds; scratch's LR sweep; the other variations
    small = args.layers // args.factors[0]
    crossover = {}
    for budget in sorted(args.crossover_budgets):
        crossover[budget] = {
            n: [scratch(n, budget, s, (0, budget)) for s in args.crossover_seeds] for n in (small, args.layers)
        }
    main = dict(
        point=args.growth_points[0],
        factor=args.factors[0],
        optim=args.optims[0],
        noise=args.noise[0],
        lr=args.lr_mults[0],
    )
    first = args.operators[0]
    variants = [("scratch", None, main), ("no_growth", "none", main)] + [(op, op, main) for op in args.operators]
    variants += [(f"scratch_lr{fmt(lr)}", None, dict(main, lr=lr)) for lr in args.lr_mults[1:]]
    for key, values, label in (
        ("point", args.growth_points, "at"),
        ("factor", args.factors, "g"),
        ("optim", args.optims, ""),
        ("noise", args.noise, "noise"),
        ("lr", args.lr_mults, "lr"),
    ):
        variants += [(f"{first}_{label}{fmt(v) if label else v}", first, dict(main, **{key: v})) for v in values[1:]]
    for sched_index, schedule in enumerate([] if args.crossover_only else args.schedules):
        wsd, suffix = schedule == "wsd", "" if schedule == "cosine" else f"_{schedule}"
        for index, (name, op, v) in enumerate(variants):
            # every seed for scratch, the control, the first operator (the recipe's) and the best one (Du et al.'s
            # "best" is by seed 1's final loss, known once every operator's seed 1 has run); the rest run seed 1
            seeds = args.seeds if v == main and op in (None, "none", first, best.get(schedule)) else args.seeds[:1]
            for k, seed in enumerate(seeds):
                priority = (
                    (1, k, sched_index, index)
                    if v == main and op in (None, "none", first)
                    else (2, sched_index, index)
                    if k == 0 and v == main
                    else (3, k, sched_index)
                    if v == main
                    else (4, sched_index, index)
                    if name.startswith("scratch_lr")
                    else (5, sched_index, index)
                )
                if op is None:  # scratch: one phase, decaying over the budget's last decay_frac under wsd
                    job = scratch(
                        args.layers, args.budget, seed, priority, v["lr"], schedule, args.decay_frac if wsd else None
                    )
                    runs.setdefault(run_name(name, schedule), []).append((job, seed, None, 0.0))
                    continue
                # under wsd the base ends at its peak, un-annealed, and the grown phase continues at that peak
                # (--learning_rate, not the cosine phase's half) with the decay at the very end; a fresh AdamW (reset)
                # still warms up, since its moments start at zero; --optim copy carries them and needs no warmup
                base_layers, base_flops = args.layers // v["factor"], v["point"] * args.budget
                base = scratch(
                    base_layers, base_flops, seed, priority, schedule=schedule, decay_frac=0 if wsd else None
                )
                phase2 = dict(
                    schedule=schedule,
                    lr_scale=1.0 if wsd else 0.5,
                    warmup=not (wsd and op != "none" and v["optim"] == "copy"),  # the control: a fresh AdamW
                    decay_frac=args.decay_frac * args.budget / (args.budget - base_flops) if wsd else None,
                )
                tag = (
                    f"{op}_g{v['factor']}_at{fmt(v['point'])}_{v['optim']}_noise{fmt(v['noise'])}"
                    f"_lr{fmt(v['lr'])}_b{args.budget:.3g}{suffix}_s{seed}"
                )
                if op == "none":
                    job = train_job(
                        args,
                        vocab,
                        (
                            f"nogrowth_L{base_layers}_at{fmt(v['point'])}_lr{fmt(v['lr'])}"
                            f"_b{args.budget:.3g}{suffix}_s{seed}"
                        ),
                        "configs/tiny_stack.py",
                        args.budget - base_flops,
                        base_layers,
                        v["lr"],
                        seed,
                        init_from=os.path.join(args.out_dir, "runs", base.name),
                        deps=[base],
                        **phase2,
                    )
                else:
                    grow, grown_ckpt = grow_job(args, tag, base, op, v["noise"], v["optim"], v["factor"])
                    grow = add(grow, priority)
                    job = train_job(
                        args,
                        vocab,
                        tag,
                        "configs/tiny_stack.py",
                        args.budget - base_flops,
                        grown_ckpt,
                        v["lr"],
                        seed,
                        init_from=grown_ckpt,
                        deps=[grow],
                        **phase2,
                    )
                runs.setdefault(run_name(name, schedule), []).append((add(job, priority), seed, v["point"], base_flops))
    return jobs, runs, crossover


def best_operator(args, runs, records, schedule):
    """The operator whose first seed ends lowest (final_eval_loss) under `schedule`, once all of them have run or
    are recorded; None before."""
    if len(args.operators) == 1:
        return args.operators[0]
    losses = {}
    for op in args.operators:
        name = run_name(op, schedule)
        job, seed = runs[name][0][:2]
        if job.done():
            losses[op] = final_eval(args, os.path.join(args.out_dir, "runs", job.name))[0]
        elif (name, seed) in records["runs"]:
            losses[op] = records["runs"][name, seed]["final_eval_loss"]
        else:
            return None
    return min(losses, key=losses.get)


def best_operators(args, vocab, records):
    runs = plan(args, vocab)[1]
    return {s: op for s in args.schedules if (op := best_operator(args, runs, records, s))}


def to_run(args, jobs, runs, crossover, records):
    """The jobs still to run: every run of the study neither finished here nor recorded in the JSON, and the
    unfinished jobs it waits for (a base whose grown runs are all recorded is not run again)."""
    wanted = [
        job for name, entries in runs.items() for job, seed, _, _ in entries if (name, seed) not in records["runs"]
    ]
    wanted += [
        job
        for budget, sizes in crossover.items()
        for n, js in sizes.items()
        for job, seed in zip(js, args.crossover_seeds)
        if (f"{budget:g}", str(n), seed) not in records["crossover"]
    ]
    todo, stack = {}, [job for job in wanted if not job.done()]
    while stack:
        job = stack.pop()
        if job.name not in todo:
            todo[job.name] = job
            stack += [dep for dep in job.deps if not dep.done()]
    return todo


# -----------------------------------------------------------------------------------------------
# Running: at most --jobs subprocesses at a time, each job once its dependencies are done


def wall_times(args):
    """(path, {job name: seconds}): every job's wall time, kept across invocations of a resumed study."""
    path = os.path.join(args.out_dir, "wall_times.json")
    if not os.path.exists(path):
        return path, {}
    with open(path) as f:
        return path, json.load(f)


def run_jobs(args, replan, rate, total):
    """Run the jobs replan() says are to run; after each one, replan() again: the best operator's other seeds join
    once it is known. total: the FLOPs still to run, those seeds included, for the time estimate."""
    jobs, todo = replan()
    todo = sorted(todo.values(), key=lambda job: job.priority)
    log(
        f"{len(jobs) - len(todo)} of {len(jobs)} jobs done or recorded; {total:.3g} FLOPs to run: expected "
        f"~{total / rate / 60 / args.jobs:.1f} min with {args.jobs} at a time ({rate:.3g} FLOP/s each, measured)"
    )
    wall_path, wall = wall_times(args)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    os.makedirs(os.path.join(args.out_dir, "logs"), exist_ok=True)
    t_start, spent, count = time.time(), 0.0, 0
    # A stop signal stops the runs in progress too (a Ctrl-C reaches them from the terminal, a scheduler's SIGTERM to
    # this process alone would not): train.py saves the step it reached, stack.py writes nothing, and no other run
    # starts. The study stops once they have; the same command continues it (each run resumes from its checkpoint).
    procs, lock, stopped_by = {}, threading.Lock(), []  # the runs in progress; the signal, once one came

    def stop_runs(signum):
        stopping.ignore()  # the runs are saving: a second signal to the study changes nothing
        with lock:
            stopped_by.append(signum)
            stopped = dict(procs)
            for proc in stopped.values():
                proc.send_signal(signum)  # a run that got it from the terminal too takes both as one (train.py)
        for proc in stopped.values():
            proc.wait()
        stopping.stop(
            signum,
            f"stopped by {signal.Signals(signum).name}: the finished runs are kept in {args.out_dir}"
            + (f"; {', '.join(stopped)} stopped where they were ({args.out_dir}/logs)" if stopped else "")
            + f"; continue with the same command: {shlex.join(['python', *sys.argv])}",
        )

    def run(job):
        argv = job.argv()
        t0 = time.perf_counter()
        with open(os.path.join(args.out_dir, "logs", f"{job.name}.log"), "a") as logfile:
            logfile.write(f"$ python {' '.join(argv)}\n")
            logfile.flush()
            with lock:
                if stopped_by:
                    return None
                procs[job.name] = subprocess.Popen(
                    [sys.executable, *argv],
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                )
            returncode = procs[job.name].wait()
        with lock:
            del procs[job.name]
        if stopped_by:
            return None
        if returncode != 0:
            raise SystemExit(f"error: {job.name} failed (exit {returncode}); see {args.out_dir}/logs/{job.name}.log")
        return time.perf_counter() - t0

    pending, running = list(todo), {}
    stopping.on_stop(own_handler=stop_runs)
    with ThreadPoolExecutor(args.jobs) as pool:
        while pending or running:
            for job in [j for j in pending if all(d.done() for d in j.deps)][: args.jobs - len(running)]:
                pending.remove(job)
                running[pool.submit(run, job)] = job
            if not running:
                raise SystemExit(f"error: {', '.join(j.name for j in pending)} wait for jobs that cannot finish")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            known = {j.name for j in todo}
            for job in replan()[1].values():  # new jobs: the best operator's other seeds
                if job.name not in known:
                    todo.append(job)
                    pending = sorted(pending + [job], key=lambda j: j.priority)
            for future in finished:
                job = running.pop(future)
                seconds = future.result()
                wall[job.name] = wall.get(job.name, 0.0) + seconds
                with atomic_write(wall_path) as tmp, open(tmp, "w") as f:
                    json.dump(wall, f, indent=1)
                count, spent = count + 1, spent + job.flops
                left = (
                    (total - spent) / spent * (time.time() - t_start) if spent else None
                )  # a growth step trains nothing
                log(
                    f"[{time.strftime('%H:%M:%S')}] {count}/{len(todo)} {job.name}: {seconds:.0f} s; "
                    + (f"~{left / 60:.0f} min left" if left is not None else "time left: known after a training run")
                )
    stopping.on_stop(own_handler=None)
    return wall


# -----------------------------------------------------------------------------------------------
# Results: curves from metrics.jsonl, the JSON, the score


@functools.cache
def final_val_set(data_dir, tokens, block_size):
    """The val set every final evaluation shares, read once (its shards, and the bytes of every target token)."""
    return ValSet(data_dir, tokens, block_size)


def final_eval(args, out_dir):
    """(loss, bits per byte) of the final model over the first --final_eval_iters val batches of --batch_size x
    --block_size (data.ValSet), the loss cached beside its checkpoint. train.py's curve uses --eval_iters batches
    (10 x 8 x 128 = 10k tokens by default): enough to draw a curve, too few to rank two models whose losses differ
    by a few hundredths."""
    cache = os.path.join(out_dir, "final_val_loss.json")
    ckpt = checkpoint.load(out_dir)
    val = final_val_set(args.data_dir, args.final_eval_iters * args.batch_size * args.block_size, args.block_size)
    if os.path.exists(cache):
        with open(cache) as f:
            cached = json.load(f)
        if (cached["iter"], cached["batches"]) == (ckpt["iter_num"], args.final_eval_iters):
            return val.losses(cached["val_loss"] * val.tokens)
    model = checkpoint.build_model(ckpt, args.device)
    loss, bpb = val.losses(
        val.nats(model, args.batch_size, args.device, mixed_precision(args.dtype, args.device)).item()
    )
    with open(cache, "w") as f:
        json.dump({"iter": ckpt["iter_num"], "batches": args.final_eval_iters, "val_loss": loss}, f)
    return loss, bpb


def read_run(args, job, seed, offset, wall):
    """A finished run as the JSON's seed record; curve = [(flops incl. the base's, val loss)]; wall_s: its own
    wall time (the base's not included)."""
    out_dir = os.path.join(args.out_dir, "runs", job.name)
    evals = [e for e in checkpoint.read_metrics(out_dir) if "val_loss" in e]
    ckpt = checkpoint.load(out_dir)
    return {
        "seed": seed,
        "final_val_loss": evals[-1]["val_loss"],
        "tokens": evals[-1]["tokens"],
        "flops": offset + evals[-1]["flops"],
        "curve": [[offset + e["flops"], e["val_loss"]] for e in evals],
        "layers": ckpt["model_args"]["n_layer"],
        "run": job.name,
        "wall_s": wall.get(job.name),
        **dict(zip(("final_eval_loss", "final_eval_bpb"), final_eval(args, out_dir))),
    }


def load_records(args, meta):
    """What OUT/growth_study.json already holds, so that a study runs in parts (one schedule now, another later,
    or on another machine): {"runs": {(name, seed): record}, "crossover": {(budget, layers, seed): record},
    "extra": runs of other invocations, "wall": {job: seconds}}. A record is kept even where its run directory is
    gone. A JSON of other settings is refused rather than mixed. Runs recorded before schedules existed are cosine."""
    records = {"runs": {}, "crossover": {}, "extra": {}, "wall": {}, "budget": None}
    path = os.path.join(args.out_dir, "growth_study.json")
    if not os.path.exists(path):
        return records
    with open(path) as f:
        old = json.load(f)
    keys = (
        "layers",
        "n_embd",
        "n_head",
        "intermediate_size",
        "block_size",
        "batch_size",
        "eval_iters",
        "final_eval_iters",
        "dtype",
        "vocab_size",
    )
    mine = {**{k: getattr(args, k) for k in keys[:-1]}, "vocab_size": meta["vocab_size"]}
    theirs = {k: old["settings"].get(k) for k in keys}
    train_tokens = sum(len(read_shard(path)) for path in shard_paths(args.data_dir, "train"))
    # the budget is the growth runs': a JSON without any (--crossover_only) takes those of any budget
    other_budget = old["runs"] and not args.crossover_only and old["budget_flops"] != args.budget
    if theirs != mine or other_budget or old["corpus_train_tokens"] != train_tokens:
        raise SystemExit(
            f"error: {path} holds a study with other settings ({theirs}, budget {old['budget_flops']:g}, "
            f"{old['corpus_train_tokens']:,} train tokens); use another --out_dir"
        )
    for name, run in old["runs"].items():
        run.setdefault("schedule", "cosine")
        records["extra"][name] = run
        for record in run["seeds"]:
            records["runs"][name, record["seed"]] = record
    for budget, row in old["crossover"].items():
        for layers, seeds in row.items():
            for record in seeds:
                records["crossover"][budget, layers, record["seed"]] = record
    records["budget"] = old["budget_flops"] if old["runs"] else None
    records["wall"] = old.get("job_wall_s") or {"earlier runs (per job not recorded)": old.get("wall_s", 0.0)}
    # a record from before bits per byte gets them from its loss: the same val tokens, so the same bytes
    missing = [
        r for r in [*records["runs"].values(), *records["crossover"].values()] if r.get("final_eval_bpb") is None
    ]
    if missing:
        val = final_val_set(args.data_dir, args.final_eval_iters * args.batch_size * args.block_size, args.block_size)
        for record in missing:
            record["final_eval_bpb"] = val.losses(record["final_eval_loss"] * val.tokens)[1]
    return records


def collect(args, meta, runs, crossover, records):
    """The JSON: every run finished here, plus what the JSON already held (load_records)."""
    train_tokens = sum(len(read_shard(path)) for path in shard_paths(args.data_dir, "train"))
    results = {
        "corpus": args.data_dir,
        "corpus_train_tokens": train_tokens,
        "budget_flops": records["budget"] if args.crossover_only else args.budget,
        "settings": {
            k: getattr(args, k)
            for k in (
                "layers",
                "n_embd",
                "n_head",
                "intermediate_size",
                "block_size",
                "batch_size",
                "seeds",
                "growth_points",
                "factors",
                "optims",
                "noise",
                "lr_mults",
                "schedules",
                "decay_frac",
                "eval_iters",
                "final_eval_iters",
                "device",
                "dtype",
            )
        },
        "crossover": {},
        "runs": {},
    }
    results["settings"]["vocab_size"] = meta["vocab_size"]
    wall = {**records["wall"], **wall_times(args)[1]}
    results["job_wall_s"], results["wall_s"] = wall, sum(wall.values())

    def record(job, seed, offset, key, kept):  # a run finished here, else its record from the JSON, else None
        return read_run(args, job, seed, offset, wall) if job.done() else kept.get(key)

    for budget, sizes in crossover.items():
        row = {
            str(n): [
                r
                for job, seed in zip(jobs, args.crossover_seeds)
                if (r := record(job, seed, 0.0, (f"{budget:g}", str(n), seed), records["crossover"]))
            ]
            for n, jobs in sizes.items()
        }
        if all(row.values()):
            results["crossover"][f"{budget:g}"] = row
    for (budget, layers, _), kept in records["crossover"].items():  # budgets this invocation does not plan
        if float(budget) not in crossover:
            results["crossover"].setdefault(budget, {}).setdefault(layers, []).append(kept)
    results["crossover"] = dict(sorted(results["crossover"].items(), key=lambda kv: float(kv[0])))
    for name, entries in runs.items():
        seeds = [
            r for job, seed, _, offset in entries if (r := record(job, seed, offset, (name, seed), records["runs"]))
        ]
        planned = {seed for _, seed, _, _ in entries}
        seeds += [r for (n, seed), r in records["runs"].items() if n == name and seed not in planned]
        if seeds:
            results["runs"][name] = {
                "layers": seeds[0]["layers"],
                "growth_point": entries[0][2],
                "schedule": entries[0][0].schedule,
                "seeds": seeds,
            }
    for name, run in records["extra"].items():  # runs of other invocations (another --operators, say)
        results["runs"].setdefault(name, run)
    path = os.path.join(args.out_dir, "growth_study.json")
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {path}")
    return results


def flops_to_reach(curve, target):
    """FLOPs from which a (flops, loss) curve stays at or below target, interpolated; None if it ends above it.
    The last crossing, not the first: a tiny model's loss on the eval batches moves by a few hundredths from one
    evaluation to the next (measured: up 0.07 between two of scratch's), and a dip below the target that the run
    does not hold is not a model that reached it."""
    if curve[-1][1] > target:
        return None
    above = [i for i, (_, loss) in enumerate(curve) if loss > target]
    if not above:
        return curve[0][0]
    (f0, l0), (f1, l1) = curve[above[-1]], curve[above[-1] + 1]  # l0 > target >= l1
    return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)


def mean_curve(run):
    """The seeds' curves averaged point by point (the seeds of a run evaluate at the same FLOPs)."""
    curves = [s["curve"] for s in run["seeds"]]
    n = min(map(len, curves))
    return [[curves[0][i][0], sum(c[i][1] for c in curves) / len(curves)] for i in range(n)]


def score(results):
    """Per run: mean and range of the final loss, FLOPs to reach scratch's final mean loss, and the speedup
    where the seeds separate (None otherwise, with the reason)."""
    runs = results["runs"]
    scratch = runs.get("scratch")
    target = sum(s["final_val_loss"] for s in scratch["seeds"]) / len(scratch["seeds"]) if scratch else None
    flops_scratch = flops_to_reach(mean_curve(scratch), target) if scratch else None
    rows = {}
    for name, run in runs.items():
        finals = [s["final_val_loss"] for s in run["seeds"]]
        full = [s["final_eval_loss"] for s in run["seeds"]]
        row = {
            "mean": sum(finals) / len(finals),
            "spread": max(finals) - min(finals),
            "n": len(finals),
            "full": sum(full) / len(full),
            "full_bpb": mean_bpb(run["seeds"]),
            "reach": None,
            "speedup": None,
            "why": "",
        }
        if scratch and name != "scratch":
            row["reach"] = flops_to_reach(mean_curve(run), target)
            if row["reach"] is None:
                row["why"] = "does not reach scratch's loss"
            elif len(finals) < 2 or len(scratch["seeds"]) < 2:
                row["why"] = "1 seed: no spread to compare with"
            elif max(finals) >= min(s["final_val_loss"] for s in scratch["seeds"]):
                row["why"] = "within the seed spread"
            else:
                row["speedup"] = flops_scratch / row["reach"] - 1
        rows[name] = row
    return rows, target


def mean_bpb(records):
    """The mean final_eval_bpb of seed records, or None where one has none (a study run before bits per byte)."""
    bpb = [r.get("final_eval_bpb") for r in records]
    return None if None in bpb else sum(bpb) / len(bpb)


def with_bpb(loss, bpb):
    return f"{loss:.4f}" + (f" ({bpb:.4f} bpb)" if bpb is not None else "")


def report(results):
    """docs/growth.md's tables, as markdown."""
    st = results["settings"]
    out = [
        f"Corpus `{results['corpus']}`: {results['corpus_train_tokens']:,} train tokens, vocab {st['vocab_size']}. "
        f"Target {st['layers']} layers x {st['n_embd']} (SwiGLU {st['intermediate_size']}, {st['n_head']} heads, tied "
        f"embeddings), {st['batch_size']} x {st['block_size']} tokens per step, {st['dtype']} on {st['device']}. "
        f"Wall time of all runs, summed: {results['wall_s'] / 60:.0f} min.",
        "",
    ]
    if results["crossover"]:
        tokens = st["final_eval_iters"] * st["batch_size"] * st["block_size"]
        out += [
            f"The crossover: final val loss on the first {st['final_eval_iters']} val batches ({tokens:,} tokens); "
            "in brackets the tokens each model saw:",
            "",
            "| budget (FLOPs) | "
            + " | ".join(f"{n} layers from scratch" for n in next(iter(results["crossover"].values())))
            + " | winner |",
            "|---|---|---|---|",
        ]
        for budget, records in results["crossover"].items():
            row = {n: [r["final_eval_loss"] for r in v] for n, v in records.items()}
            means = {n: sum(v) / len(v) for n, v in row.items()}
            cells = [
                with_bpb(means[n], mean_bpb(records[n]))
                + (f" (range {max(v) - min(v):.4f}, {len(v)} seeds)" if len(v) > 1 else "")
                + f" ({records[n][0]['tokens'] / 1e6:.2f}M)"
                for n, v in row.items()
            ]
            (lo, l_lo), (hi, l_hi) = sorted(means.items(), key=lambda kv: int(kv[0]))
            ranges = {n: (min(v), max(v)) for n, v in row.items()}
            apart = ranges[lo][1] < ranges[hi][0] or ranges[hi][1] < ranges[lo][0]
            lower = f"{lo if l_lo < l_hi else hi} layers, by {abs(l_lo - l_hi):.3f}"
            if all(len(v) == 1 for v in row.values()):
                winner = f"{lower} (1 seed each: spread unknown)"
            else:
                winner = lower if apart else "tie (seeds overlap)"
            out.append(f"| {float(budget):.3g} | " + " | ".join(cells) + f" | {winner} |")
        out.append("")
    schedules = [sc for sc in SCHEDULES if any(run.get("schedule", "cosine") == sc for run in results["runs"].values())]
    finals = {}  # (schedule, name) -> the 50-batch final losses of its seeds
    for schedule in schedules:
        suffix = "" if schedule == "cosine" else f"_{schedule}"
        sub = {
            name[: len(name) - len(suffix)]: run
            for name, run in results["runs"].items()
            if run.get("schedule", "cosine") == schedule
        }
        finals |= {(schedule, name): [s["final_eval_loss"] for s in run["seeds"]] for name, run in sub.items()}
        rows, target = score({"runs": sub})
        out += [
            f"Schedule **{schedule}**, budget {results['budget_flops']:.3g} FLOPs; target loss = scratch's final mean "
            + (f"{target:.4f}." if target else "(scratch not run)."),
            "",
            f"| run | layers | grown at | seeds | final val loss (mean) | range | {st['final_eval_iters']}-batch loss "
            "| FLOPs to reach target | speedup |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            run = sub[name]
            point = "" if run["growth_point"] is None else f"{run['growth_point']:g}"
            reach = "" if name == "scratch" else (f"{row['reach']:.3g}" if row["reach"] else "not reached")
            speed = (
                "(reference)"
                if name == "scratch"
                else (f"{row['speedup']:+.0%}" if row["speedup"] is not None else row["why"])
            )
            out.append(
                f"| {name} | {run['layers']} | {point} | {row['n']} | {row['mean']:.4f} | {row['spread']:.4f} | "
                f"{with_bpb(row['full'], row['full_bpb'])} | {reach} | {speed} |"
            )
        # the sweeps, seed 1 against seed 1: the "best of each"
        mults = st["lr_mults"]
        swept = [n for n in sub if len(mults) > 1 and f"{n}_lr{fmt(mults[1])}" in sub]
        for base in swept:
            names = {m: base if i == 0 else f"{base}_lr{fmt(m)}" for i, m in enumerate(mults)}
            loss = {m: sub[n]["seeds"][0]["final_val_loss"] for m, n in names.items() if n in sub}
            best = min(loss, key=loss.get)
            out += [
                "",
                f"Learning-rate sweep of {base} (seed {sub[base]['seeds'][0]['seed']}, multiples of its "
                "config's peak): "
                + ", ".join(f"x{m:g} {val_loss:.4f}" for m, val_loss in sorted(loss.items()))
                + f"; best x{best:g}.",
            ]
        out.append("")
    if len(schedules) > 1:  # the runs every schedule has, side by side, on the finer 50-batch loss
        names = [n for n in ("scratch", "no_growth", *OPERATORS) if all((sc, n) in finals for sc in schedules)]
        out += [
            f"The schedules side by side: {st['final_eval_iters']}-batch final val loss, mean (range, seeds), and "
            "the gap to that schedule's scratch:",
            "",
            "| run | " + " | ".join(schedules) + " |",
            "|---" * (len(schedules) + 1) + "|",
        ]
        for name in names:
            cells = []
            for sc in schedules:
                v, ref = finals[sc, name], finals[sc, "scratch"]
                gap = "" if name == "scratch" else f", {sum(v) / len(v) - sum(ref) / len(ref):+.4f}"
                cells.append(f"{sum(v) / len(v):.4f} ({max(v) - min(v):.4f}, {len(v)}){gap}")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def plot(args, results):
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    if results["crossover"]:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        budgets, budget = [float(b) for b in results["crossover"]], results["budget_flops"]
        seeds = set()
        for n in next(iter(results["crossover"].values())):
            losses = [[r["final_eval_loss"] for r in results["crossover"][b][n]] for b in results["crossover"]]
            seeds |= {len(v) for v in losses}
            line = ax.plot(budgets, [sum(v) / len(v) for v in losses], marker="o", label=f"{n} layers, from scratch")
            if max(map(len, losses)) > 1:  # each seed as a dot beside its mean
                ax.scatter([b for b, v in zip(budgets, losses) for _ in v], [x for v in losses for x in v], s=10)
            # the growth study's budget: its 8-layer scratch runs and the small model trained on (the control, whose
            # second phase is a new cosine: not one run from scratch, so drawn apart from the line)
            at_budget = results["runs"].get("scratch" if int(n) == results["settings"]["layers"] else "no_growth")
            if at_budget and budget is not None:
                v = [s["final_eval_loss"] for s in at_budget["seeds"]]
                label = "scratch" if int(n) == results["settings"]["layers"] else "the control (trained on)"
                ax.scatter(
                    [budget] * len(v),
                    v,
                    marker="s",
                    color=line[0].get_color(),
                    s=25,
                    label=f"{n} layers at the growth study's budget: {label}, {len(v)} seed{'s' * (len(v) > 1)}",
                )
        if budget is not None:  # a --crossover_only study has no growth budget yet
            ax.axvline(budget, color="0.7", ls=":", lw=1)
        ax.set_xscale("log")
        ticks = sorted({*budgets, *([budget] if budget is not None else [])})
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.set_xticks([], minor=True)
        ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)
        ax.set_xlabel("training FLOPs")
        st = results["settings"]
        ax.set_ylabel(f"final val loss ({st['final_eval_iters'] * st['batch_size'] * st['block_size']:,} val tokens)")
        per = " and ".join(f"{k} seed{'s' * (k > 1)}" for k in sorted(seeds))
        ax.set_title(f"Crossover: small vs large from scratch ({per} per budget{', mean and dots' * (max(seeds) > 1)})")
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out_dir, "crossover.png"))
    if results["runs"]:
        schedules = [sc for sc in SCHEDULES if any(r.get("schedule", "cosine") == sc for r in results["runs"].values())]
        fig, axes = plt.subplots(
            1, len(schedules), figsize=(7 * len(schedules), 4.5), dpi=100, sharey=True, squeeze=False
        )
        lows = []
        for ax, schedule in zip(axes[0], schedules):
            for name in ("scratch", "no_growth", *OPERATORS):
                run = results["runs"].get(run_name(name, schedule))
                if run is None:
                    continue
                curve = mean_curve(run)
                lows.append(min(loss for _, loss in curve))
                ax.plot(
                    *zip(*curve),
                    label=f"{name} ({run['layers']} layers, {len(run['seeds'])} seed{'s' * (len(run['seeds']) > 1)})",
                    color="black" if name == "scratch" else None,
                    ls=":" if name == "no_growth" else "-",
                )
            ax.set_xlabel("training FLOPs (the base's included)")
            ax.set_title(f"{schedule}: growth vs scratch at {results['budget_flops']:.3g} FLOPs")
            ax.legend()
        axes[0][0].set_ylim(min(lows) - 0.05, min(lows) + 1.0)  # the early drop is off the top
        axes[0][0].set_ylabel("val loss (nats per token), mean over seeds")
        # one evaluation is a few hundred steps of a tiny model at a high learning rate: it swings by tenths
        fig.text(
            0.5,
            0.01,
            f"Each point: train.py's evaluation on {results['settings']['eval_iters']} val batches. Between "
            "evaluations a run swings by up to a few tenths of a nat, most while the learning rate is at its peak; "
            f"the tables compare final models on {results['settings']['final_eval_iters']} batches after the decay.",
            ha="center",
            va="bottom",
            fontsize=8,
            wrap=True,
        )
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        fig.savefig(os.path.join(args.out_dir, "growth_study.png"))


def main(argv=None):
    args = parse_args(argv)
    if args.report:  # the tables, and the plots beside the JSON, from the JSON alone
        path = os.path.join(args.out_dir, "growth_study.json")
        if not os.path.exists(path):
            raise SystemExit(f"error: no {path}: run the study first")
        with open(path) as f:
            results = json.load(f)
        plot(args, results)
        print(report(results), end="")
        return
    try:
        meta = load_meta(args.data_dir)
        args.dtype = resolve_dtype(args.dtype, args.device)  # every run gets it explicitly; the JSON records it
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e} (python prepare_data.py --sources pystdlib --vocab_size 2048)") from None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    vocab = 64 * math.ceil(meta["vocab_size"] / 64)  # as train.py pads it
    os.makedirs(args.out_dir, exist_ok=True)
    settings_path = os.path.join(args.out_dir, "settings.json")
    fixed = {
        k: getattr(args, k)
        for k in (
            "data_dir",
            "n_embd",
            "n_head",
            "intermediate_size",
            "block_size",
            "batch_size",
            "dtype",
            "eval_iters",
            "evals",
        )
    }
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            old = json.load(f)
        if old != fixed:
            raise SystemExit(f"error: {args.out_dir} holds runs with other settings ({old}); use another --out_dir")
    with open(settings_path, "w") as f:
        json.dump(fixed, f)
    records = load_records(args, meta)

    def replan(stand_in=False):
        """(all jobs, those to run). stand_in: a schedule whose best operator is not known yet counts the second
        operator's seeds in its place, for the time estimate."""
        best = best_operators(args, vocab, records)
        if stand_in:
            best = {sc: best.get(sc, args.operators[min(1, len(args.operators) - 1)]) for sc in args.schedules}
        jobs, runs, crossover = plan(args, vocab, best)
        return jobs, to_run(args, jobs, runs, crossover, records)

    if not args.no_run:
        rate = measure_flops_per_second(args, vocab, max(1, (os.cpu_count() or 1) // args.jobs))
        run_jobs(args, replan, rate, sum(job.flops for job in replan(stand_in=True)[1].values()))
    jobs, runs, crossover = plan(args, vocab, best_operators(args, vocab, records))
    results = collect(args, meta, runs, crossover, records)
    plot(args, results)
    print(report(results), end="")


if __name__ == "__main__":
    main()

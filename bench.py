"""
Benchmark the training step of model.py: forward + backward + the optimizer step on random tokens, no data loading.

    python bench.py configs/tiny.py                     # the dtype train.py would choose here, eager and compiled
    python bench.py configs/tiny.py --modes fp32,bf16,bf16+compile
    python bench.py configs/phase1.py --device cuda --modes bf16,bf16+compile
    python bench.py configs/phase1.py --params          # parameter counts and FLOPs per token, no timing
    python bench.py configs/phase2.py --params          # the grown shape, read from the config's init_from checkpoint
    python bench.py configs/phase1.py --memory --modes bf16   # memory of a training step, and what fits on a GPU

A mode is a dtype (fp32; bf16 or fp16 under autocast; auto: common.auto_dtype's choice for the device), with
+compile for torch.compile. Prints tokens/s, the achieved FLOP/s (model.flops_per_token, the PaLM count train.py
uses) and MFU as train.py reports it (common.mfu_peak: a GPU's datasheet peak, else the matmul peak this machine
reaches now in the mode's dtype), with the measured matmul peak beside it; one line per mode. It runs one process
on one device (no DDP: under torchrun each process would time itself alone), so its figures are per device, as
train.py's MFU is. Only the model's shape, batch and optimizer (AdamW, or Muon with muon = True) are read from the
config file (a config that starts from a checkpoint, as configs/phase2.py does, has that checkpoint's shape);
train.py's loop adds data loading and logging on top of this step. --memory measures the peak memory of the step
instead, in the first mode, at batch sizes 1 and 2 (on CUDA the allocator's peak; on a CPU the profiler's memory
timeline: minutes at the GPU recipe's shape), and prints the batch_size and gradient_accumulation_steps that fit
24, 40 and 80 GiB at the config's tokens per step.
"""

import stopping

# first of all, before torch takes a second or two to import: a signal meanwhile ends in one line too
if __name__ == "__main__":
    stopping.stop_on_signals(
        "stopped by {signal}: the table above holds the modes measured so far (bench.py writes no file)"
    )

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import torch

import checkpoint
from common import auto_dtype, device_error, mfu_peak, mixed_precision
from model import LLaMA, ModelConfig

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CONFIG_KEYS = [
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "intermediate_size",
    "rope_theta",
    "norm_eps",
    "tie_embeddings",
    "vocab_size",
    "block_size",
    "batch_size",
    "gradient_accumulation_steps",
    "muon",
    "init_from",
]
GPU_GIB = (24, 40, 80)  # an RTX 3090/4090; an A100 40GB (the reference card's GPU); an A100 80GB or H100


def read_config(path):
    """The model shape, batch size and optimizer a train.py config file sets (plain Python)."""
    namespace = {}
    with open(path) as f:
        exec(f.read(), namespace)
    return {k: namespace[k] for k in CONFIG_KEYS if k in namespace}


def parse_mode(mode, device):
    """'bf16+compile' -> ('bfloat16', True); 'auto' is the dtype train.py would choose on this device."""
    name, _, compile = mode.partition("+")
    if name not in (*DTYPE_NAMES, "auto") or compile not in ("", "compile"):
        raise ValueError(mode)
    return auto_dtype(device)[0] if name == "auto" else DTYPE_NAMES[name], compile == "compile"


def training_step(model, optimizer, dtype, compile, batch_size, device):
    """The bare training step on random tokens: forward, backward, the optimizer's step."""
    step_model = torch.compile(model) if compile else model
    autocast = mixed_precision(dtype, device)
    T, V = model.config.block_size, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, V, (batch_size, T), generator=g).to(device) for _ in range(2))

    def step():
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_mode(model, optimizer, dtype, compile, batch_size, steps, warmup, device):
    """Tokens per second of the bare training step, timed over `steps` after `warmup` untimed ones."""
    step = training_step(model, optimizer, dtype, compile, batch_size, device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):  # the first steps compile, allocate and pick kernels
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch_size * model.config.block_size * steps / (time.perf_counter() - t0)


def step_peak(model, optimizer, dtype, compile, batch_size, device):
    """Bytes allocated at the peak of one training step, weights and optimizer state included, after a first step
    has compiled and allocated the optimizer's state. On CUDA the caching allocator's own count (what its
    OutOfMemoryError is about); on a CPU the profiler's memory timeline, which follows every tensor's lifetime."""
    step = training_step(model, optimizer, dtype, compile, batch_size, device)
    step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    activities, tmp = [torch.profiler.ProfilerActivity.CPU], tempfile.mkdtemp()
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as p:
        step()
    with warnings.catch_warnings():  # deprecated for CUDA's memory snapshots, which a CPU does not have
        warnings.simplefilter("ignore", FutureWarning)
        p.export_memory_timeline(os.path.join(tmp, "memory.json"), device="cpu")
    with open(os.path.join(tmp, "memory.json")) as f:
        _, sizes = json.load(f)  # [times, bytes per category at each time]
    return max(sum(s) for s in sizes)


def print_memory(model, optimizer, peaks, sequences_per_step, gib):
    """The step's memory (from its peaks at batch 1 and 2) and the largest batch_size that fits each GPU size with
    10% to spare (the CUDA context, the allocator's fragmentation), at the same sequences per optimizer step."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    per_sequence = peaks[1] - peaks[0]
    fixed = peaks[0] - per_sequence
    print("| memory of a training step | GiB |\n|---|---|")
    print(f"| weights (fp32), and as many for their gradients | {weights / 2**30:.3f} |")
    print(f"| the optimizer's state (AdamW: 2 moments per weight; Muon: 1 for the matrices) | {state / 2**30:.3f} |")
    print(f"| the step at batch_size 1, at its peak (measured) | {peaks[0] / 2**30:.3f} |")
    print(f"| each sequence of {model.config.block_size} tokens more (measured) | {per_sequence / 2**30:.3f} |")
    print("\n| GPU memory | batch_size | gradient_accumulation_steps | peak (estimated) |\n|---|---|---|---|")
    for size in gib:
        fits = [b for b in range(1, sequences_per_step + 1) if sequences_per_step % b == 0]
        fits = [b for b in fits if fixed + b * per_sequence <= 0.9 * size * 2**30]
        if not fits:
            print(f"| {size:g} GiB | does not fit | | {(fixed + per_sequence) / 2**30:.1f} GiB at batch_size 1 |")
            continue
        b = max(fits)
        print(f"| {size:g} GiB | {b} | {sequences_per_step // b} | {(fixed + b * per_sequence) / 2**30:.1f} GiB |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="a train.py config file: its model shape, block_size and batch_size")
    p.add_argument(
        "--modes",
        default="auto,auto+compile",
        help="comma list of fp32, bf16, fp16 or auto, each optionally +compile (default: %(default)s)",
    )
    p.add_argument("--vocab_size", type=int, default=None, help="default: the config's, else ModelConfig's 50304")
    p.add_argument(
        "--n_layer",
        type=int,
        default=None,
        help="default: the config's (configs/phase2.py takes its depth "
        "from the stacked checkpoint: --n_layer 24 with configs/phase1.py is its model)",
    )
    p.add_argument(
        "--params",
        action="store_true",
        help="print the model's parameter counts and FLOPs per token, "
        "and exit: the figures the README and configs quote",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="measure the step's peak memory (in the first mode) and print what fits on 24, 40 and 80 GiB",
    )
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's, else 16")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        modes = {m: parse_mode(m, args.device) for m in (m.strip() for m in args.modes.split(",")) if m}
    except ValueError as e:
        p.error(f"--modes takes a comma list of fp32, bf16, fp16 or auto, each optionally +compile; got {e}")
    if not modes:
        p.error("--modes takes a comma list of fp32, bf16, fp16 or auto, each optionally +compile")
    if args.steps < 1 or args.warmup < 1:
        p.error("need --steps >= 1 and --warmup >= 1")
    if args.config and not os.path.isfile(args.config):
        p.error(f"no config file {args.config!r}")
    if device_error(args.device):
        p.error(device_error(args.device))
    shape = read_config(args.config) if args.config else {}
    init_from = shape.pop("init_from", "scratch")
    if init_from not in ("scratch", "resume"):  # a phase that starts from a checkpoint has that checkpoint's shape
        try:
            model_args = checkpoint.load(init_from, mmap=True)["model_args"]
        except (OSError, ValueError) as e:
            p.error(
                f"{args.config} takes its model's shape from {init_from} ({e}); write it first (for "
                "configs/phase2.py: python stack.py), or give the shape: python bench.py configs/phase1.py --n_layer 24"
            )
        print(f"the model's shape: {init_from}'s", file=sys.stderr)
        shape |= {k: v for k, v in model_args.items() if k in CONFIG_KEYS and k != "block_size"}
    # the config's tokens per step (--memory keeps them): batch_size x block_size x gradient_accumulation_steps
    sequences_per_step = shape.get("batch_size", 16) * shape.pop("gradient_accumulation_steps", 1)
    batch_size = args.batch_size or shape.pop("batch_size", 16)
    shape.pop("batch_size", None)
    muon = shape.pop("muon", False)
    if args.vocab_size:
        shape["vocab_size"] = args.vocab_size
    if args.n_layer:
        shape["n_layer"] = args.n_layer
    config = ModelConfig(**shape)
    if args.params:
        with torch.device("meta"):  # shapes only
            model = LLaMA(config)
        print(
            f"{config.n_layer} layers x {config.n_embd}, vocab {config.vocab_size}: {model.num_params():,} parameters "
            f"({model.num_params(non_embedding=True):,} non-embedding), {model.flops_per_token(config.block_size):,} "
            f"training FLOPs per token at {config.block_size} tokens of context"
        )
        return

    torch.manual_seed(0)
    model = LLaMA(config).to(args.device)
    flops_per_token = model.flops_per_token(config.block_size)
    print(
        f"{model.num_params() / 1e6:.1f}M parameters ({config.n_layer} layers x {config.n_embd}, "
        f"vocab {config.vocab_size}), "
        f"{'Muon + AdamW' if muon else 'AdamW'}, batch {batch_size} x {config.block_size} tokens, "
        f"{flops_per_token / 1e6:.1f} MFLOP per token, "
        f"{args.device}, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    if args.memory:
        mode, (dtype, compile) = next(iter(modes.items()))
        optimizer = model.configure_optimizer(0.1, 6e-4, (0.9, 0.95), torch.device(args.device).type, muon, dtype)
        print(f"{mode}: {dtype}{' + torch.compile' if compile else ''}; batch_size 1, then 2", file=sys.stderr)
        peaks = [step_peak(model, optimizer, dtype, compile, b, args.device) for b in (1, 2)]
        gib = GPU_GIB
        if torch.device(args.device).type == "cuda":
            gib = sorted({*gib, torch.cuda.get_device_properties(args.device).total_memory / 2**30})
        print_memory(model, optimizer, peaks, sequences_per_step, gib)
        return
    print("| mode | tokens/s | achieved TFLOP/s | peak TFLOP/s | MFU | measured matmul peak TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for mode, (dtype, compile) in modes.items():
        optimizer = model.configure_optimizer(0.1, 6e-4, (0.9, 0.95), torch.device(args.device).type, muon, dtype)
        tok_s = bench_mode(model, optimizer, dtype, compile, batch_size, args.steps, args.warmup, args.device)
        peak, measured, peak_name = mfu_peak(dtype, args.device)
        achieved = flops_per_token * tok_s
        print(f"{mode}: {dtype}{' + torch.compile' if compile else ''}; MFU against {peak_name}", file=sys.stderr)
        print(
            f"| {mode} | {tok_s:,.0f} | {achieved / 1e12:.3f} | {peak / 1e12:.3f} | {100 * achieved / peak:.1f}% | "
            f"{measured / 1e12:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

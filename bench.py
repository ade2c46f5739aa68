"""
Benchmark the training step of model.py: forward + backward + the optimizer step on random tokens, no data loading.

    python bench.py configs/tiny.py                     # the dtype train.py would choose here, eager and compiled
    python bench.py configs/tiny.py --modes fp32,bf16,bf16+compile
    python bench.py configs/phase1.py --device cuda --modes bf16,bf16+compile
    python bench.py configs/phase1.py --n_layer 24 --params      # parameter counts and FLOPs per token, no timing

A mode is a dtype (fp32; bf16 or fp16 under autocast; auto: common.auto_dtype's choice for the device), with
+compile for torch.compile. Prints tokens/s, the achieved FLOP/s (model.flops_per_token, the PaLM count train.py
uses) and MFU as train.py reports it (common.mfu_peak: a GPU's datasheet peak, else the matmul peak this machine
reaches now in the mode's dtype), with the measured matmul peak beside it; one line per mode. Only the model's
shape, batch and optimizer (AdamW, or Muon with muon = True) are read from the config file; train.py's loop adds
data loading and logging on top of this step.
"""

import argparse
import os
import sys
import time

import torch

from common import auto_dtype, device_error, keep_freed_memory, mfu_peak, mixed_precision
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
    "muon",
]


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


def bench_mode(model, optimizer, dtype, compile, batch_size, steps, warmup, device):
    """Tokens per second of the bare training step, timed over `steps` after `warmup` untimed ones."""
    device_type = torch.device(device).type
    step_model = torch.compile(model) if compile else model
    autocast = mixed_precision(dtype, device)
    T, V = model.config.block_size, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, V, (batch_size, T), generator=g).to(device) for _ in range(2))
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    def step():
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):  # the first steps compile, allocate and pick kernels
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch_size * T * steps / (time.perf_counter() - t0)


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

    if torch.device(args.device).type == "cpu":
        keep_freed_memory()  # as train.py does: the step as it runs there
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

"""
Train a Llama-style model on prepared token shards.

    python train.py configs/tiny.py                         # one process (CPU or one GPU)
    python train.py configs/phase1.py --max_iters=100       # any config key can be overridden
    torchrun --standalone --nproc_per_node=8 train.py configs/phase1.py   # DDP

The story: read the config -> set up devices (and DDP), lock out_dir against a second run -> open the data
(data.py) -> build or load the model (checkpoint.py) -> AdamW + warmup, then cosine or warmup-stable-decay -> loop { eval + checkpoint,
forward/backward with gradient accumulation, clip, step, log } -> final eval + checkpoint.
"""
import ast
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
from common import log, measure_peak_flops
from data import ShardLoader, load_meta, load_tokenizer
from model import LLaMA, ModelConfig
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------------------------
# Config: these defaults, then a config file (plain Python), then --key=value overrides.
# I/O
out_dir = "out"
data_dir = "data/pydocs"        # a directory written by prepare_data.py
eval_interval = 250             # evaluate and checkpoint every this many steps
log_interval = 10
eval_iters = 50                 # val batches per evaluation (the same batches every time)
keep_last = 0                   # > 0: also keep ckpt_<iter>.pt for the last k checkpoints
init_from = "scratch"           # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint file / out_dir / hf:DIR
wandb_log = False
wandb_project = "mtlm"
wandb_run_name = "run"
# data
batch_size = 16                 # sequences per micro-step per process
block_size = 1024               # tokens per sequence
gradient_accumulation_steps = 8 # micro-steps per optimizer step, across all processes
# model (ignored, and must not be set, when starting from a checkpoint: the checkpoint has its own)
n_layer = 12
n_head = 12
n_kv_head = 12
n_embd = 768
intermediate_size = 2048
rope_theta = 10000.0
norm_eps = 1e-5
tie_embeddings = False
# AdamW
learning_rate = 6e-4
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # clip the global gradient norm to this; 0 disables
# schedule: linear warmup, then down to min_lr at lr_decay_iters, by one of two shapes:
#   cosine  decays over the whole run (Loshchilov & Hutter, 2017)
#   wsd     warmup-stable-decay: the peak is held until the last decay_frac of the run, then falls as 1 - sqrt
#           (MiniCPM, Hu et al., 2024; the 1-sqrt cooldown over ~20% of the run matches cosine: Hägele et al., 2024).
#           decay_frac = 0 ends the run at its peak, un-annealed: a phase to be grown, which the next one continues
decay_lr = True
lr_schedule = "cosine"
warmup_iters = 200
lr_decay_iters = 5000
decay_frac = 0.2                # wsd only
min_lr = 6e-5                   # ~learning_rate/10, as in Chinchilla (Hoffmann et al., 2022)
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16"              # 'float32', 'bfloat16' (autocast, fp32 master weights) or 'float16' (+ grad scaler)
compile = None                  # torch.compile; None means on for CUDA, off for CPU
seed = 1337
peak_flops = None               # FLOP/s that MFU is relative to; None: measured at start (common.measure_peak_flops)
# -----------------------------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
MODEL_KEYS = ["n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "rope_theta", "norm_eps", "tie_embeddings"]


def apply_config(args, config):
    """Config files (Python) and --key=value overrides, in order. Returns the keys they set."""
    def check(key, value, where):
        if key not in config:
            raise SystemExit(f"unknown config key {key!r} in {where}. Valid keys: {', '.join(sorted(config))}")
        default = config[key]
        ok = (default is None or value is None or type(value) is type(default)
              or (isinstance(default, float) and type(value) is int))
        if not ok:
            raise SystemExit(f"config key {key!r} in {where} must be {type(default).__name__}, got {value!r}. "
                             f"Valid keys: {', '.join(sorted(config))}")
        config[key] = float(value) if isinstance(default, float) and type(value) is int else value
    explicit = set()
    for arg in args:
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"override {arg!r} must look like --key=value")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare string such as --out_dir=out-tiny
            check(key, value, "the command line")
            explicit.add(key)
        else:
            namespace = {}
            with open(arg) as f:
                exec(f.read(), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    check(key, value, arg)
                    explicit.add(key)
    return explicit


config = {k: globals()[k] for k in config_keys}
explicit_keys = apply_config(sys.argv[1:], config)
globals().update(config)
if compile is None:
    compile = device.startswith("cuda")
if lr_schedule not in ("cosine", "wsd"):
    raise SystemExit(f"lr_schedule must be 'cosine' or 'wsd', got {lr_schedule!r}")
if not 0 <= decay_frac <= 1:
    raise SystemExit(f"decay_frac must be between 0 and 1 (the share of lr_decay_iters spent decaying), got {decay_frac}")


# -----------------------------------------------------------------------------------------------
# Devices and DDP
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        raise SystemExit(f"gradient_accumulation_steps={gradient_accumulation_steps} must divide by the {world_size} processes")
    gradient_accumulation_steps //= world_size
else:
    rank, local_rank, world_size = 0, 0, 1
master_process = rank == 0
if master_process:  # one run per out_dir: a second one stops here, before it reads or writes anything
    try:
        run_lock = checkpoint.RunLock(out_dir)  # held until this process ends, however it ends
    except RuntimeError as e:
        raise SystemExit(f"error: {e}")
device_type = "cuda" if device.startswith("cuda") else "cpu"
torch.manual_seed(seed + rank)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
if ptdtype is None:
    raise SystemExit(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
# autocast runs matmuls in bf16/fp16 while the weights and the optimizer stay fp32
autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
tokens_per_step = gradient_accumulation_steps * world_size * batch_size * block_size
log(f"tokens per optimizer step: {tokens_per_step:,} ({world_size} processes x {gradient_accumulation_steps} "
    f"micro-steps x {batch_size} x {block_size})")

# -----------------------------------------------------------------------------------------------
# Data and tokenizer
try:
    meta = load_meta(data_dir)
    tokenizer = load_tokenizer(data_dir)
    train_loader = ShardLoader(data_dir, "train", batch_size, block_size, rank, world_size, device)
    val_loader = ShardLoader(data_dir, "val", batch_size, block_size, rank, world_size, device)
except (OSError, ValueError) as e:  # no dataset, a damaged one, ids outside its vocabulary: one line naming the file
    raise SystemExit(f"error: {e}")

# -----------------------------------------------------------------------------------------------
# Model: from scratch, resumed, or a new phase from another checkpoint
iter_num, best_val_loss, tokens_seen, history, ckpt = 0, float("inf"), 0, [], None
if init_from == "scratch":
    vocab = 64 * math.ceil(meta["vocab_size"] / 64)  # pad the vocab to a multiple of 64: faster matmuls
    model_args = dict(vocab_size=vocab, block_size=block_size, **{k: config[k] for k in MODEL_KEYS})
else:
    source = out_dir if init_from == "resume" else init_from
    log(f"loading {'run to resume' if init_from == 'resume' else 'initial weights'} from {source}")
    ckpt = checkpoint.load(source)
    model_args = dict(ckpt["model_args"], block_size=block_size)  # block_size may grow between phases
    clash = [k for k in MODEL_KEYS if k in explicit_keys and config[k] != model_args[k]]
    if clash:
        raise SystemExit(f"the checkpoint fixes the architecture: {', '.join(f'{k}={model_args[k]}' for k in clash)} "
                         f"(the config set {', '.join(f'{k}={config[k]}' for k in clash)}); remove these keys")
    if Tokenizer(ckpt["tokenizer"]).spec() != tokenizer.spec():
        raise SystemExit(f"{data_dir} was tokenized with a different tokenizer than {source}; prepare the data with the checkpoint's tokenizer")
    history = list(ckpt.get("history", []))
    if init_from == "resume":
        iter_num, best_val_loss, tokens_seen = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["tokens_seen"]
        history = history[:-1]  # the last entry is this run's own; it is rewritten at every save
if model_args["vocab_size"] < meta["vocab_size"]:
    raise SystemExit(f"model vocab {model_args['vocab_size']} is smaller than the data's {meta['vocab_size']}")
model = LLaMA(ModelConfig(**model_args))
if ckpt is not None:
    model.load_state_dict(ckpt["model"])
model.to(device)
log(f"parameters: {model.num_params():,} ({model.num_params(non_embedding=True):,} non-embedding)")

scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
optimizer = model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_type)
if init_from == "resume":
    optimizer.load_state_dict(ckpt["optimizer"])
    train_loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device_type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
elif ckpt is not None and ckpt.get("loader") and ckpt.get("config", {}).get("data_dir") == data_dir:
    # a new phase on the same data continues the stream where the last phase stopped: no token is seen twice
    train_loader.load_state_dict(ckpt["loader"])
    log(f"continuing {data_dir} at shard {train_loader.shard}, token {train_loader.offset:,}")
if init_from != "resume" and ckpt is not None and ckpt.get("optimizer") and history and history[-1].get("optim") == "copy":
    # stack.py --optim copy grew the AdamW moments with the model: keep them, but this phase's own lr, betas and
    # weight decay (load_state_dict would also restore the old phase's group settings)
    carried, params = ckpt["optimizer"]["state"], [p for group in optimizer.param_groups for p in group["params"]]
    if any(i >= len(params) or s["exp_avg"].shape != params[i].shape for i, s in carried.items()):
        raise SystemExit(f"the optimizer state in {init_from} does not fit the model's parameters")
    optimizer.load_state_dict(dict(optimizer.state_dict(), state=carried))
    log(f"AdamW moments carried over from {init_from} (stack.py --optim copy)")
ckpt = None  # free memory

raw_model = model  # the module whose state dict we save: never the compiled or DDP wrapper
if compile:
    log("compiling the model (torch.compile)...")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

flops_per_token = raw_model.flops_per_token(block_size)
if peak_flops is None and master_process:
    # MFU's denominator: what a matmul in this run's dtype reaches on this device now (hosts of one kind differ)
    peak_flops = measure_peak_flops(ptdtype, device)
    log(f"measured matmul peak: {peak_flops / 1e12:.3g} TFLOP/s in {dtype} (set peak_flops to use another)")


def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if lr_schedule == "wsd":
        decay_start = lr_decay_iters * (1 - decay_frac)
        if it < decay_start or decay_frac == 0:
            return learning_rate
        progress = min(1.0, (it - decay_start) / (lr_decay_iters - decay_start))
        return min_lr + (1 - math.sqrt(progress)) * (learning_rate - min_lr)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_val_loss():
    """Mean loss over the first eval_iters val batches: the same batches at every evaluation."""
    model.eval()
    val_loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(eval_iters):
        x, y = val_loader.next_batch()
        with autocast:
            total += raw_model(x, y)[1].float()
    if ddp:
        dist.all_reduce(total)
    model.train()
    return total.item() / (eval_iters * world_size)


def save_checkpoint(val_loss):
    phase = dict(event="train", out_dir=out_dir, data_dir=data_dir, init_from=init_from, iters=iter_num,
                 tokens=tokens_seen, flops=tokens_seen * flops_per_token, val_loss=val_loss)
    ckpt = dict(model=raw_model.state_dict(), model_args=model_args, tokenizer=tokenizer.spec(),
                optimizer=optimizer.state_dict(), iter_num=iter_num, config=config,
                loader=train_loader.state_dict(), best_val_loss=best_val_loss, tokens_seen=tokens_seen,
                rng={"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None},
                history=history + [phase])
    try:
        path = checkpoint.save(ckpt, out_dir, keep_last)
    except OSError as e:  # a full disk says so in one line (on its own, not after the progress bar); the last checkpoint is intact
        log(f"error: {e}")
        raise SystemExit(1)
    log(f"saved {path}")


def record(entry):
    """Append one JSON line to out_dir/metrics.jsonl (and to wandb)."""
    checkpoint.append_metrics(out_dir, entry)
    if wandb_log:
        wandb.log(entry, step=entry["iter"])


if master_process:
    # metrics.jsonl restarts with a new run; a resumed run drops what was logged after its checkpoint
    entries = checkpoint.read_metrics(out_dir) if init_from == "resume" else []
    checkpoint.write_metrics(out_dir, [e for e in entries if e["iter"] < iter_num or (e["iter"] == iter_num and "loss" in e)])
    if wandb_log:
        import wandb
        # with no API key, log offline (wandb sync later) instead of failing or prompting
        wandb.init(project=wandb_project, name=wandb_run_name, config=config, dir=out_dir,
                   mode="online" if os.environ.get("WANDB_API_KEY") else "offline")

# -----------------------------------------------------------------------------------------------
# The training loop
bar = tqdm(total=max_iters, initial=iter_num, desc="train", unit="step", file=sys.stderr, disable=not master_process,
           dynamic_ncols=True)
t0, timed_steps = time.perf_counter(), 0
while True:
    if iter_num % eval_interval == 0 or iter_num >= max_iters:
        val_loss = estimate_val_loss()
        if not math.isfinite(val_loss):
            raise SystemExit(f"val loss is {val_loss} at step {iter_num}: stopping; the last checkpoint in {out_dir} is intact")
        best_val_loss = min(best_val_loss, val_loss)
        log(f"step {iter_num}: val loss {val_loss:.4f}")
        if master_process:
            record({"iter": iter_num, "val_loss": val_loss, "tokens": tokens_seen, "flops": tokens_seen * flops_per_token})
            if iter_num > 0 or init_from != "scratch":
                save_checkpoint(val_loss)
        t0, timed_steps = time.perf_counter(), 0  # evaluation time is not training throughput
    if iter_num >= max_iters:
        break

    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        x, y = train_loader.next_batch()
        # under DDP, all-reduce the gradients only on the last micro-step
        sync = nullcontext() if not ddp or micro_step == gradient_accumulation_steps - 1 else model.no_sync()
        with sync:
            with autocast:
                _, loss = model(x, y)
            loss = loss / gradient_accumulation_steps  # the mean over micro-steps, not the sum
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    train_loss = loss_sum.item()  # one sync per step; also our NaN guard
    if not math.isfinite(train_loss):
        raise SystemExit(f"loss is {train_loss} at step {iter_num}: stopping; the last checkpoint in {out_dir} is intact "
                         f"(try a lower learning_rate, or grad_clip)")
    iter_num += 1
    timed_steps += 1
    tokens_seen += tokens_per_step
    bar.update(1)
    if iter_num % log_interval == 0 and master_process:
        tok_s = tokens_per_step * timed_steps / (time.perf_counter() - t0)
        mfu = flops_per_token * tok_s / peak_flops if peak_flops else None
        log(f"step {iter_num}: loss {train_loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s"
            + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""))
        record({"iter": iter_num, "loss": train_loss, "lr": lr, "tokens": tokens_seen,
                "flops": tokens_seen * flops_per_token, "tok_per_s": tok_s, "mfu": mfu})
        t0, timed_steps = time.perf_counter(), 0
bar.close()

if ddp:
    # every rank must hold the same weights: DDP averages gradients, so any drift is a bug
    flat = torch.cat([p.detach().flatten().float() for p in raw_model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    drift = (flat - ref).abs().max()
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    log(f"weights identical across {world_size} ranks: max |w_rank - w_0| = {drift.item():.3g}")
    if drift.item() != 0:
        raise SystemExit("DDP ranks ended with different weights")
    dist.destroy_process_group()

"""
Train a Llama-style model on prepared token shards.

    python train.py configs/tiny.py                         # one process (CPU or one GPU)
    python train.py configs/phase1.py --max_iters=100       # any config key can be overridden
    python train.py configs/tiny.py --init_from=resume      # continue out_dir/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train.py configs/phase1.py   # DDP

The story: read the config -> set up devices (and DDP), lock out_dir against a second run -> open the data
(data.py) -> build or load the model (checkpoint.py), never replacing a run's checkpoint by accident -> AdamW +
warmup, then cosine or warmup-stable-decay -> loop { eval + checkpoint, stop if a signal asked, forward/backward
with gradient accumulation, clip, step, log } -> final eval + checkpoint.
Every evaluation measures the same val tokens (val_tokens; data.ValSet) in nats per token and in bits per byte.

Nothing trained is lost: SIGTERM (a scheduler's time limit), SIGINT (Ctrl-C) or SIGUSR1 saves the step reached
and exits with status 128 + the signal's number; a run that is not a resume refuses an out_dir that holds a
checkpoint (re-running a finished run's command reuses it); under DDP whatever stops one rank stops them all.
"""

import stopping

# first of all, before torch takes a second or two to import: a signal meanwhile ends in one line too
if __name__ == "__main__":
    stopping.stop_on_signals("stopped by {signal} during start-up, before the first step: nothing to save")

import ast
import math
import os
import shlex
import signal
import sys
import time
import traceback
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
from common import device_error, keep_freed_memory, log, mfu_peak, mixed_precision, resolve_dtype
from data import ShardLoader, ValSet, load_meta, load_tokenizer
from model import LLaMA, ModelConfig
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------------------------
# Config: these defaults, then a config file (plain Python), then --key=value overrides.
# I/O
out_dir = "out"
data_dir = "data/pydocs"  # a directory written by prepare_data.py
eval_interval = 250  # evaluate and checkpoint every this many steps
log_interval = 10
val_tokens = 1_048_576  # tokens every evaluation measures: the val split's first, whatever the phase or process count
keep_last = 0  # > 0: also keep ckpt_<iter>.pt for the last k checkpoints
init_from = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint file / out_dir / hf:DIR
overwrite = False  # True: a run that is not a resume starts over in an out_dir that holds a checkpoint
wandb_log = False
wandb_project = "mtlm"
wandb_run_name = "run"
# data
batch_size = 16  # sequences per micro-step per process
block_size = 1024  # tokens per sequence
gradient_accumulation_steps = 8  # micro-steps per optimizer step, across all processes
# model (ignored, and must not be set, when starting from a checkpoint: the checkpoint has its own)
n_layer = 12
n_head = 12
n_kv_head = 12
n_embd = 768
intermediate_size = 2048
rope_theta = 10000.0
norm_eps = 1e-5
tie_embeddings = False
# optimizer: AdamW, or with muon = True Muon for the blocks' matrices and AdamW for the embedding and gains (muon.py);
# the learning rate, schedule and weight decay below serve both (Muon's update is scaled to AdamW's RMS)
muon = False
learning_rate = 6e-4
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
# schedule: linear warmup, then down to min_lr at lr_decay_iters, by one of two shapes:
#   cosine  decays over the whole run (Loshchilov & Hutter, 2017)
#   wsd     warmup-stable-decay: the peak is held until the last decay_frac of the run, then falls as 1 - sqrt
#           (MiniCPM, Hu et al., 2024; the 1-sqrt cooldown over ~20% of the run matches cosine: Hägele et al., 2024).
#           decay_frac = 0 ends the run at its peak, un-annealed: a phase to be grown, which the next one continues
decay_lr = True
lr_schedule = "cosine"
warmup_iters = 200
lr_decay_iters = 5000
decay_frac = 0.2  # wsd only
min_lr = 6e-5  # ~learning_rate/10, as in Chinchilla (Hoffmann et al., 2022)
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "auto"  # 'auto' (what the device computes natively: common.auto_dtype), 'float32',
# 'bfloat16' (autocast, fp32 master weights) or 'float16' (+ grad scaler)
compile = None  # torch.compile; None means on for CUDA, off for CPU
seed = 1337
peak_flops = None  # FLOP/s that MFU is relative to; None: a GPU's datasheet peak, else measured (common.mfu_peak)
# -----------------------------------------------------------------------------------------------
config_keys = [
    k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))
]
MODEL_KEYS = [
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "intermediate_size",
    "rope_theta",
    "norm_eps",
    "tie_embeddings",
]
# what a resume applies to the restored AdamW (and the schedule), saying which changed
OPTIMIZER_KEYS = [
    "learning_rate",
    "min_lr",
    "warmup_iters",
    "lr_decay_iters",
    "decay_lr",
    "lr_schedule",
    "decay_frac",
    "beta1",
    "beta2",
    "weight_decay",
    "grad_clip",
]
# keys that change how a run is watched, not what it trains: a finished run re-run with other values is still that run
WATCH_KEYS = [
    "eval_interval",
    "val_tokens",
    "log_interval",
    "keep_last",
    "wandb_log",
    "wandb_project",
    "wandb_run_name",
    "compile",
    "peak_flops",
    "overwrite",
]


# nanoGPT's keys that this repository replaced or dropped (a nanoGPT tutorial's config or command uses them), each
# answered in one line with what to do here; {value} is the value given, {val_tokens} eval_iters' in tokens
NANOGPT_KEYS = {
    "eval_iters": "use --val_tokens={val_tokens} ({value} batches x batch_size {batch_size} x block_size "
    "{block_size}): every evaluation measures the val split's first val_tokens tokens, the same ones every time",
    "eval_only": "to measure a checkpoint's val loss, start a run from it that takes no step: "
    "--init_from=CKPT --max_iters=0 --out_dir=ANOTHER",
    "always_save_checkpoint": "every evaluation saves a checkpoint, and so does a stop; remove the key "
    "(keep_last=K also keeps the last K)",
    "dataset": "name the directory prepare_data.py wrote: --data_dir=data/{value}",
    "dropout": "model.py has no dropout (pretraining uses none: nanoGPT's default is 0.0 too); remove the key",
    "bias": "Llama's linear layers and RMSNorm have no biases (nanoGPT's bias=False); remove the key",
    "backend": "DDP uses nccl on CUDA and gloo on CPU; remove the key",
}


def apply_config(args, config):
    """Config files (Python) and --key=value overrides, in order. Returns the keys they set."""
    replaced = {}  # nanoGPT's keys given: answered once the batch_size and block_size given are known too

    def check(key, value, where):
        if key in NANOGPT_KEYS:
            replaced[key] = value, where
            return
        if key not in config:
            raise SystemExit(f"unknown config key {key!r} in {where}. Valid keys: {', '.join(sorted(config))}")
        default = config[key]
        ok = (
            default is None
            or value is None
            or type(value) is type(default)
            or (isinstance(default, float) and type(value) is int)
        )
        if not ok:
            raise SystemExit(
                f"config key {key!r} in {where} must be {type(default).__name__}, got {value!r}. "
                f"Valid keys: {', '.join(sorted(config))}"
            )
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
            if not os.path.isfile(arg):
                raise SystemExit(
                    f"no config file {arg!r} (arguments are config files, e.g. configs/tiny.py, or --key=value)"
                )
            try:
                with open(arg) as f:
                    exec(f.read(), namespace)
            except Exception as e:  # a config file is Python: its error and where it is, in one line
                lines = (
                    [e.lineno]
                    if isinstance(e, SyntaxError)
                    else [
                        frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == "<string>"
                    ]
                )
                message = e.msg if isinstance(e, SyntaxError) else e
                raise SystemExit(f"{arg}, line {lines[-1] if lines else '?'}: {type(e).__name__}: {message}") from None
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    check(key, value, arg)
                    explicit.add(key)
    if replaced:
        batch_size, block_size = config["batch_size"], config["block_size"]
        raise SystemExit(
            "; ".join(
                f"{key} (in {where}) is nanoGPT's key, which this repository replaced: "
                + NANOGPT_KEYS[key].format(
                    value=value,
                    batch_size=batch_size,
                    block_size=block_size,
                    val_tokens=value * batch_size * block_size if type(value) is int else "N",
                )
                for key, (value, where) in replaced.items()
            )
        )
    return explicit


def check_values(config):
    """Values no run can use, refused in one line before anything starts (each would fail deep inside torch)."""
    for key in (
        "batch_size",
        "block_size",
        "gradient_accumulation_steps",
        "eval_interval",
        "log_interval",
        "val_tokens",
        "n_layer",
        "n_head",
        "n_kv_head",
        "n_embd",
        "intermediate_size",
    ):
        if config[key] < 1:
            raise SystemExit(f"{key} must be >= 1, got {config[key]}")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
        if not config[key] >= 0:
            raise SystemExit(f"{key} must be >= 0, got {config[key]}")
    for key in ("beta1", "beta2"):
        if not 0 <= config[key] < 1:
            raise SystemExit(f"{key} must be in [0, 1), got {config[key]}")
    if not config["out_dir"]:
        raise SystemExit("out_dir is empty: give the run a directory, e.g. --out_dir=out/run1")
    if config["overwrite"] and config["init_from"] == "resume":
        raise SystemExit("overwrite=True starts a run over, init_from=resume continues it: choose one")
    if device_error(config["device"]):
        raise SystemExit(device_error(config["device"]))


config = {k: globals()[k] for k in config_keys}
explicit_keys = apply_config(sys.argv[1:], config)
check_values(config)
globals().update(config)
if compile is None:
    compile = device.startswith("cuda")
if lr_schedule not in ("cosine", "wsd"):
    raise SystemExit(f"lr_schedule must be 'cosine' or 'wsd', got {lr_schedule!r}")
if not 0 <= decay_frac <= 1:
    raise SystemExit(
        f"decay_frac must be between 0 and 1 (the share of lr_decay_iters spent decaying), got {decay_frac}"
    )

# -----------------------------------------------------------------------------------------------
# Stopping signals. A scheduler stops a run with SIGTERM far more often than it crashes (SLURM's time limit and
# scancel, Kubernetes, spot instances; `#SBATCH --signal=TERM@120` sends it 2 minutes early), a person with Ctrl-C
# (SIGINT), and Lightning's SLURM convention is SIGUSR1 (stopping.STOP_SIGNALS: those the platform has). Before the
# loop there is nothing to save: a signal exits at once (the handler installed at the top). During training a signal
# only sets a flag: at the next step boundary the run saves that step and exits with status 128 + signum (what a
# shell reports for a process the signal killed), so a signal during an evaluation or torch.compile is honoured when
# it ends. A second signal means "now", but a checkpoint write under way is completed first (stopping.deferred: cut,
# torch.save's zip writer would end in a traceback), so a stop never leaves less than a whole checkpoint.
stop_signal, stop_signal_time = 0, 0.0  # the first signal received, and when


def on_stop_signal(signum):
    global stop_signal, stop_signal_time
    name = signal.Signals(signum).name
    if not stop_signal:
        stop_signal, stop_signal_time = signum, time.monotonic()
        log(
            f"{name}: saving at the end of this step, then stopping "
            "(a second signal stops at once, saving nothing more)"
        )
    elif signum != stop_signal or time.monotonic() - stop_signal_time > 1.0:
        # (the same signal again within a second is one event delivered twice: SLURM signals every process of a job
        # step and torchrun forwards what it receives, so each worker under `srun torchrun` gets SIGTERM twice)
        kept = os.path.join(out_dir, "ckpt.pt")
        if saved_at == iter_num:  # out_dir holds the step reached (the signal came during its save, or after it)
            line = f"stopped by a second signal ({name}) at step {iter_num}: {kept} holds it; resume with: {resume()}"
        else:
            line = f"stopped by a second signal ({name}): nothing saved" + (
                f"; {kept} is intact" if os.path.exists(kept) else ""
            )
        stopping.stop(signum, line)


def resume():
    """The command that continues this run."""
    args = [a for a in sys.argv[1:] if not a.startswith(("--init_from=", "--overwrite="))]
    return ("torchrun [the same options] " if ddp else "python ") + shlex.join(
        [sys.argv[0], *args, "--init_from=resume"]
    )


def leave(status):
    """Exit with this status, whatever signal arrives meanwhile. As soon as one rank exits, torchrun sends SIGTERM to
    the others, which may still be leaving: they ignore it (stopping.ignore)."""
    global model
    stopping.ignore()
    if ddp:
        # DDP's reducer holds gloo's last work, and its tensors, alive: freed here, while the interpreter is whole.
        # Freed during the interpreter's shutdown instead, gloo's threads abort the process (std::terminate: "terminate
        # called without an active exception", exit -6) in about 1 exit in 5 on 2 CPU ranks (torch 2.13)
        model = None
        dist.destroy_process_group()
    raise SystemExit(status)


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
        raise SystemExit(
            f"gradient_accumulation_steps={gradient_accumulation_steps} must divide by the {world_size} processes"
        )
    gradient_accumulation_steps //= world_size
else:
    rank, local_rank, world_size = 0, 0, 1
master_process = rank == 0


def stop_together(line, status=1):
    """Go on if no rank has a reason to stop (line None); else every rank stops at once with that line. At start-up
    and at a save one rank can fail alone (the lock and the writes are rank 0's; a file may be missing on one node):
    under DDP the ranks exchange what stopped them (one all-gather), so the others do not wait in the next
    collective until a timeout kills them, minutes later across nodes. One line per node says why."""
    if ddp:
        reasons = [None] * world_size
        try:
            dist.all_gather_object(reasons, (line, status) if line else None)
        except RuntimeError:  # a rank already gone: its own line said why
            reasons = [("error: another process of this run stopped (its message is above)", 1)]
        line, status = next((r for r in reasons if r), (None, 0))
    if line is None:
        return
    if master_process:
        log(line)
    elif local_rank == 0:
        print(line, file=sys.stderr)
    leave(status)


# one run per out_dir: a second one stops here, before it reads or writes anything
error = None
if master_process:
    try:
        if init_from == "resume" and not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            raise RuntimeError(
                f"nothing to resume in {out_dir}: it holds no ckpt.pt; start the run without --init_from=resume"
            )
        run_lock = checkpoint.RunLock(out_dir)  # held until this process ends, however it ends
    except RuntimeError as e:
        error = f"error: {e}"
stop_together(error)
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cpu":
    keep_freed_memory()  # the step's large buffers stay allocated instead of page-faulting back every step
torch.manual_seed(seed + rank)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
try:
    dtype = config["dtype"] = resolve_dtype(dtype, device)  # the checkpoint records the dtype that ran
except ValueError as e:
    raise SystemExit(f"error: {e}") from None
# autocast runs matmuls in bf16/fp16 while the weights and the optimizer stay fp32
autocast = mixed_precision(dtype, device)
tokens_per_step = gradient_accumulation_steps * world_size * batch_size * block_size
log(
    f"tokens per optimizer step: {tokens_per_step:,} ({world_size} processes x {gradient_accumulation_steps} "
    f"micro-steps x {batch_size} x {block_size})"
)


def out_of_memory_answer(exc_type, exc, tb):
    """An uncaught error that is, or was raised from, torch.cuda.OutOfMemoryError (in any step, the first compiled one
    included: inductor wraps errors in its own) ends in one line with settings that fit at the same tokens per step,
    a smaller micro-batch and more accumulation, instead of a traceback. Any other error keeps its traceback."""
    cause = exc
    while cause is not None and not isinstance(cause, torch.cuda.OutOfMemoryError):
        cause = getattr(cause, "inner_exception", None) or cause.__cause__ or cause.__context__
    if cause is None:
        return sys.__excepthook__(exc_type, exc, tb)
    where = device
    if device_type == "cuda":
        gpu = torch.cuda.get_device_properties(device)
        where = f"{device} ({gpu.name}, {gpu.total_memory / 2**30:.0f} GiB)"
    line = f"error: out of memory on {where} with batch_size={batch_size} x block_size={block_size}: "
    if batch_size > 1:  # the largest micro-batch below this one that divides it, so the tokens per step stay the same
        smaller = max(b for b in range(1, batch_size) if batch_size % b == 0)
        accumulation = config["gradient_accumulation_steps"] * batch_size // smaller  # across processes, as set
        line += (
            f"keep the {tokens_per_step:,} tokens per step with --batch_size={smaller} "
            f"--gradient_accumulation_steps={accumulation}"
        )
    else:
        line += "one sequence does not fit; a smaller block_size or a GPU with more memory"
    if "bar" in globals():  # the training loop's progress bar: closed, so the line is the last one
        bar.close()
    tqdm.write(line + " (what fits on which GPU: docs/training.md#memory-what-fits-on-one-gpu)", file=sys.stderr)


sys.excepthook = out_of_memory_answer  # exits with status 1 after it, as after a traceback

# -----------------------------------------------------------------------------------------------
# Data and tokenizer
error = None
try:
    meta = load_meta(data_dir)
    tokenizer = load_tokenizer(data_dir)
    train_loader = ShardLoader(data_dir, "train", batch_size, block_size, rank, world_size, device)
    val_set = ValSet(data_dir, val_tokens, block_size, rank, world_size)
except (OSError, ValueError) as e:  # no dataset, a damaged one, ids outside its vocabulary: one line naming the file
    error = f"error: {e}"
stop_together(error)
log(
    f"val set: the first {val_set.tokens:,} tokens of {data_dir}'s val split"
    + (
        f" (all it holds in windows of {block_size}; val_tokens asked {val_tokens:,})"
        if val_set.tokens < val_tokens - block_size
        else ""
    )
    + (
        f", {val_set.bytes:,} bytes of text"
        if val_set.bytes
        else "; no bits per byte: the bytes of this tokenizer's ids are unknown"
    )
)

# -----------------------------------------------------------------------------------------------
# Model: from scratch, resumed, or a new phase from another checkpoint
iter_num, best_val_loss, tokens_seen, history, ckpt, error = 0, float("inf"), 0, [], None, None
if init_from != "scratch":
    source = out_dir if init_from == "resume" else init_from
    log(f"loading {'run to resume' if init_from == 'resume' else 'initial weights'} from {source}")
    try:
        ckpt = checkpoint.load(source)
    except FileNotFoundError as e:
        error = (
            f"error: nothing to resume in {out_dir}: it holds no ckpt.pt; start the run without --init_from=resume"
            if init_from == "resume"
            else f"error: init_from: {e}"
        )
    except (OSError, ValueError, ImportError) as e:
        error = f"error: init_from: {e}"
stop_together(error)
if ckpt is None:
    vocab = 64 * math.ceil(meta["vocab_size"] / 64)  # pad the vocab to a multiple of 64: faster matmuls
    model_args = dict(vocab_size=vocab, block_size=block_size, **{k: config[k] for k in MODEL_KEYS})
else:
    model_args = dict(ckpt["model_args"], block_size=block_size)  # block_size may grow between phases
    clash = [k for k in MODEL_KEYS if k in explicit_keys and config[k] != model_args[k]]
    if clash:
        raise SystemExit(
            f"the checkpoint fixes the architecture: {', '.join(f'{k}={model_args[k]}' for k in clash)} "
            f"(the config set {', '.join(f'{k}={config[k]}' for k in clash)}); remove these keys"
        )
    if Tokenizer(ckpt["tokenizer"]).spec() != tokenizer.spec():
        raise SystemExit(
            f"{data_dir} was tokenized with a different tokenizer than {source}; "
            "prepare the data with the checkpoint's tokenizer"
        )
    history = list(ckpt.get("history", []))
    if init_from == "resume":
        iter_num, best_val_loss, tokens_seen = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["tokens_seen"]
        history = history[:-1]  # the last entry is this run's own; it is rewritten at every save
        # the run's origin (scratch, or the checkpoint its first phase started from), as a run never stopped records it
        config["init_from"] = (ckpt.get("config") or {}).get("init_from", "scratch")
if model_args["vocab_size"] < meta["vocab_size"]:
    raise SystemExit(f"model vocab {model_args['vocab_size']} is smaller than the data's {meta['vocab_size']}")


start_history = history if ckpt is not None else None  # the weights' lineage, when they come from a checkpoint
verdict = (None, 0)
if master_process:
    try:
        verdict = checkpoint.out_dir_verdict(
            out_dir, init_from, config, train_loader.fingerprint, start_history, WATCH_KEYS
        )
    except OSError as e:  # overwrite=True could not remove the old run's files
        verdict = (f"error: {e}", 1)
stop_together(*verdict)

try:
    model = LLaMA(ModelConfig(**model_args))
except ValueError as e:  # a shape ModelConfig refuses, e.g. n_embd not divisible by n_head
    raise SystemExit(f"error: {e}") from None
if ckpt is not None:
    model.load_state_dict(ckpt["model"])
model.to(device)
log(f"parameters: {model.num_params():,} ({model.num_params(non_embedding=True):,} non-embedding)")


scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
optimizer = model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_type, muon, dtype)
carried = init_from == "resume" or (
    ckpt is not None and ckpt.get("optimizer") and history and history[-1].get("optim") == "copy"
)
if carried:
    # the moments come from the checkpoint, the hyper-parameters from this run's config: load_state_dict would
    # restore the checkpoint's betas and weight decay, so `--init_from=resume --beta2=0.99` (a common move after a loss
    # spike) would change nothing. With the config unchanged the groups are the same: the resume stays bit-exact.
    if not ckpt.get("optimizer"):
        raise SystemExit(
            f"{source} holds no optimizer state, so it cannot be resumed: start a new phase from it "
            f"(--init_from={os.path.join(out_dir, 'ckpt.pt')} with another out_dir)"
        )
    state, params = ckpt["optimizer"]["state"], [p for group in optimizer.param_groups for p in group["params"]]
    # what each parameter's state holds: Muon's momentum, or AdamW's moments (muon.py)
    moment = [
        "momentum_buffer" if group.get("muon") else "exp_avg"
        for group in optimizer.param_groups
        for p in group["params"]
    ]
    if any(i < len(params) and moment[i] not in s for i, s in state.items()):
        raise SystemExit(
            f"the optimizer state in {source} was made with muon={not muon}, this run has muon={muon}: "
            f"continue it with --muon={not muon}, or start a new phase from it (a fresh optimizer)"
        )
    if any(i >= len(params) or s[moment[i]].shape != params[i].shape for i, s in state.items()):
        raise SystemExit(f"the optimizer state in {source} does not fit the model's parameters")
    optimizer.load_state_dict(dict(optimizer.state_dict(), state=state))
if init_from == "resume":
    old = ckpt.get("config") or {}
    changed = [f"{k} {old[k]} -> {config[k]}" for k in OPTIMIZER_KEYS if k in old and old[k] != config[k]]
    if changed:
        log(f"resuming with this run's optimizer settings: {', '.join(changed)}")
    checkpoint.warn_inexact_resume(ckpt, config, world_size)
    if scaler.is_enabled():
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])  # fp16's loss scale: restarting it would skip steps anew
        else:
            log(
                "warning: the checkpoint holds no fp16 grad-scaler state: its scale restarts, "
                "so the resume is not exact"
            )
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device_type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
elif carried:
    log(f"optimizer moments carried over from {init_from} (stack.py --optim copy)")
elif ckpt is not None and (ckpt.get("config") or {}).get("muon", muon) != muon:
    # a new phase may change optimizer (its own is fresh: stack.py --optim reset, or a checkpoint as init_from), but
    # not silently: a Muon phase 1 continued by an AdamW config reads like a mistake unless it is said
    name = {True: "Muon + AdamW", False: "AdamW"}
    log(
        f"switching optimizer: {source} was trained with muon={not muon} ({name[not muon]}), this phase has "
        f"muon={muon} ({name[muon]}), starting fresh"
    )
if ckpt is not None and ckpt.get("loader"):
    # a resume, or a new phase on the same data, continues the stream where the checkpoint stopped: no token is seen
    # twice. On another dataset the position means nothing: that data starts at its beginning.
    same, why = checkpoint.same_stream(ckpt, train_loader.fingerprint, data_dir)
    if same:
        train_loader.load_state_dict(ckpt["loader"])
        log(f"continuing {data_dir} at shard {train_loader.shard}, token {train_loader.offset:,} ({why})")
    else:
        log(f"warning: {why}: starting {data_dir} at its beginning (token 0), not at the checkpoint's position")
saved_at = iter_num if init_from == "resume" else None  # the step of the newest checkpoint in out_dir
ckpt = None  # free memory

raw_model = model  # the module whose state dict we save: never the compiled or DDP wrapper
if compile:
    log("compiling the model (torch.compile)...")
    model = torch.compile(model)
if ddp:
    # DDP wraps the compiled model, as PyTorch's "where to apply torch.compile" advises, and its gradient all-reduce
    # still overlaps the backward: while DDP's forward runs, Dynamo's DDPOptimizer splits the compiled graph at DDP's
    # bucket boundaries (compile(DDP(model)) is split alike), so each bucket is all-reduced as soon as its part of the
    # backward ends. Measured with a hook timing each bucket's launch: on 2 gloo ranks (torch 2.13) 11 buckets start
    # from 10% to 83% of the way through the backward, as eager DDP's do, and all at 89-90% with the splitting off
    # (optimize_ddp=False: the backward is one autograd node, its gradients all ready at its end); on an H200 (torch
    # 2.11, NCCL) from 10% to 92%, against 59% to 92%.
    # broadcast_buffers=False: the only buffers are RoPE's tables, constants every rank derives alike, which DDP
    # would otherwise send from rank 0 before every forward. torch 2.13 deprecates the name for forward_sync_buffers,
    # which would still sync at init, and its own warning says to keep broadcast_buffers=False meanwhile: it is not
    # repeated once per rank here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, broadcast_buffers=False)

flops_per_token = raw_model.flops_per_token(block_size)
if peak_flops is None and master_process:
    peak_flops, measured, peak_name = mfu_peak(dtype, device)
    log(
        f"MFU against {peak_name}: {peak_flops / 1e12:.3g} TFLOP/s"
        + (f"; measured matmul peak {measured / 1e12:.3g} TFLOP/s in {dtype}" if measured != peak_flops else "")
        + " (set peak_flops to use another)"
    )


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


# A scaled-down run (--max_iters=N alone) keeps the config's schedule, sized for lr_decay_iters steps: it would end
# without decaying, or still warming up. We say so rather than tie lr_decay_iters to max_iters: both keys are
# nanoGPT's with their own uses (a run resumed later with a larger max_iters continues the one schedule; decaying
# early and then holding min_lr is a choice), and a config that sets both should mean what it says.
if decay_lr and max_iters != lr_decay_iters and master_process:
    ends = (
        f"ends at lr {get_lr(max_iters - 1):.2e} (peak {learning_rate:.2e}, min_lr {min_lr:.2e})"
        + (", still warming up" if max_iters <= warmup_iters else "")
        if max_iters < lr_decay_iters
        else f"holds min_lr for its last {max_iters - lr_decay_iters} steps"
    )
    warmup = max(1, round(warmup_iters * max_iters / lr_decay_iters)) if warmup_iters else 0
    log(
        f"warning: max_iters={max_iters} but lr_decay_iters={lr_decay_iters}: the schedule is sized for "
        f"{lr_decay_iters} steps, so this run {ends}; to scale it to the run, add --lr_decay_iters={max_iters} "
        f"--warmup_iters={warmup}"
    )


@torch.no_grad()
def evaluate():
    """(val loss in nats per token, in bits per byte or None) over the val set, each rank its part."""
    model.eval()
    nats = val_set.nats(raw_model, batch_size, device, autocast)
    if ddp:
        dist.all_reduce(nats)
    model.train()
    return val_set.losses(nats.item())


def save_checkpoint(val_loss, val_bpb=None):
    """Write out_dir/ckpt.pt (rank 0). Returns None, or the one-line error that stops every rank (a full disk)."""
    global saved_at
    phase_entry = dict(
        event="train",
        out_dir=out_dir,
        data_dir=data_dir,
        init_from=config["init_from"],
        iters=iter_num,
        tokens=tokens_seen,
        flops=tokens_seen * flops_per_token,
        val_loss=val_loss,
        val_bpb=val_bpb,
    )
    ckpt = dict(
        model=raw_model.state_dict(),
        model_args=model_args,
        tokenizer=tokenizer.spec(),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        iter_num=iter_num,
        config=config,
        world_size=world_size,
        loader=train_loader.state_dict(),
        best_val_loss=best_val_loss,
        tokens_seen=tokens_seen,
        rng={"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None},
        history=history + [phase_entry],
    )
    with stopping.deferred():  # a signal meanwhile is honoured once the checkpoint is written and saved_at says so
        try:
            path = checkpoint.save(ckpt, out_dir, keep_last)
        except OSError as e:  # a full disk says so in one line (on its own, not after the bar); the last one is intact
            return f"error: {e}"
        saved_at = iter_num
        log(f"saved {path}")


def agreed_stop_signal():
    """The signal that stops the run at this step boundary, 0 for none, agreed at once: after an evaluation (long,
    and synchronous anyway). Under DDP every rank must stop at the same step (a rank that went on would wait for the
    others in its next collective): the ranks agree with one all-reduce of one number, the largest signal number any
    of them received."""
    if not ddp:
        return stop_signal
    agreed = torch.tensor(stop_signal, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return int(agreed.item())


# Between evaluations the ranks agree without a collective of their own, nor a wait: the all-reduce of each step's
# loss carries, summed over the ranks, how many received each stop signal and whether rank 0 failed to write its
# metrics (a full disk). Its result goes to the host without waiting and is read one boundary later: read at once,
# it would wait on a GPU for the whole step to finish (the GPU idle while the host launches the next one). So under
# DDP a stop lands one step after the step it arrived in, the same step on every rank; one process reads its own.
# (CUDA's sync debug mode on an H200 counted 3 host syncs per step before: the signal's tensor made on the GPU, its
# .item() and the loss's; none now between log steps.)
failure = None  # rank 0's one-line error when a write only it makes failed (metrics.jsonl, wandb)


def reduce_step(loss_sum):
    """(the step's loss averaged over the ranks, a device tensor; its reduction on the way to the host, or None)."""
    if not ddp:
        return loss_sum, None
    pin = device_type == "cuda"  # a copy from pinned memory does not wait for the GPU
    flags = torch.tensor(
        [float(stop_signal == s) for s in stopping.STOP_SIGNALS] + [float(failure is not None)], pin_memory=pin
    )
    packed = torch.cat([loss_sum.float().view(1), flags.to(device, non_blocking=True)])
    dist.all_reduce(packed)  # the sum over the ranks
    host = torch.empty(packed.shape, pin_memory=pin).copy_(packed, non_blocking=True)
    arrived = torch.cuda.Event() if pin else None
    if arrived:
        arrived.record()
    return packed[0] / world_size, (host, arrived)


def agreed_stop(reduced):
    """(signal, failed): what stops the run at this step boundary, the same on every rank. signal: the largest signal
    number any rank received (0: none); failed: a write of rank 0's failed (its line in `failure`)."""
    if not ddp:
        return stop_signal, failure is not None
    if reduced is None:
        return 0, False
    host, arrived = reduced
    if arrived:
        arrived.synchronize()  # long done: the GPU has been running the next step since
    counts = host.tolist()[1:]
    return max((int(s) for s, n in zip(stopping.STOP_SIGNALS, counts) if n), default=0), counts[-1] > 0


# The NaN guard. Reading the loss to the host waits for the step (a sync), so it is read only where it is logged,
# every log_interval steps, and before any save: a non-finite loss is seen up to log_interval - 1 steps after it
# happened (steps lost, never saved). The losses in between are summed on the device: a NaN or inf in any shows.
train_loss, unchecked, unchecked_steps = None, torch.zeros((), device=device), 0


def check_loss():
    """The last step's loss (None before any step of this run), after stopping if any step since the last check had
    a non-finite one. Every rank calls it at the same steps and reads the same (all-reduced) losses."""
    global unchecked_steps
    if not unchecked_steps:
        return None
    last, total = torch.stack([train_loss.float(), unchecked]).tolist()
    first, unchecked_steps = iter_num - unchecked_steps + 1, 0
    unchecked.zero_()
    if not math.isfinite(total):
        where = f"at step {iter_num}" if not math.isfinite(last) else f"at a step from {first} to {iter_num}"
        bar.close()  # the line below goes on a line of its own, not after the bar
        raise SystemExit(
            f"loss is {last if not math.isfinite(last) else total} {where}: stopping; the last checkpoint in "
            f"{out_dir} is intact (try a lower learning_rate, or grad_clip)"
        )
    return last


def stop(signum):
    """Save the step reached (unless out_dir already holds it), say so in one line with how to resume,
    exit 128+signum."""
    bar.close()
    check_loss()  # a step with a non-finite loss since the last check is not saved
    error = None
    if master_process and saved_at != iter_num and (iter_num > 0 or init_from != "scratch"):
        error = save_checkpoint(None)
    stop_together(error)  # every rank waits for rank 0's save: one that left early would have torchrun end rank 0
    stopping.ignore()  # saved: from here a signal (torchrun's, once another rank has left) changes nothing
    name = signal.Signals(signum).name
    if saved_at is None:
        log(f"stopped by {name} before the first step: nothing to save")
    else:
        log(
            f"stopped by {name} at step {iter_num} of {max_iters}: {os.path.join(out_dir, 'ckpt.pt')} holds it; "
            f"resume with: {resume()}"
        )
    leave(128 + signum)


def record(entry):
    """Append one JSON line to out_dir/metrics.jsonl (and to wandb). Rank 0 writes alone: a failure is returned as
    the one-line error that stops every rank (raised, it would end rank 0 alone, the others waiting in their next
    collective until a timeout kills them)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    try:
        checkpoint.append_metrics(out_dir, entry)
    except OSError as e:
        return f"error: cannot write {path} ({e.strerror or e}): stopping; the last checkpoint in {out_dir} is intact"
    if wandb_log:
        try:
            wandb.log(entry, step=entry["iter"])
        except Exception as e:  # wandb's errors share no class of their own
            return f"error: wandb.log failed ({type(e).__name__}: {e}): stopping; {path} holds the metrics"
    return None


error = None
if master_process:
    try:
        if init_from == "resume":  # a resumed run drops what was logged after its checkpoint
            entries = checkpoint.read_metrics(out_dir)
            checkpoint.write_metrics(
                out_dir, [e for e in entries if e["iter"] < iter_num or (e["iter"] == iter_num and "loss" in e)]
            )
        else:  # a new run: out_dir holds no checkpoint (out_dir_verdict), so a metrics.jsonl there goes with nothing
            if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
                log(f"warning: replacing {out_dir}/metrics.jsonl, left by a run that saved no checkpoint")
            checkpoint.write_metrics(out_dir, [])
    except (OSError, ValueError) as e:  # a full disk, a damaged metrics.jsonl (the error names its line)
        error = f"error: {e}"
    if wandb_log and error is None:
        try:
            import wandb

            # with no API key, log offline (wandb sync later) instead of failing or prompting
            wandb.init(
                project=wandb_project,
                name=wandb_run_name,
                config=config,
                dir=out_dir,
                mode="online" if os.environ.get("WANDB_API_KEY") else "offline",
            )
        except ImportError:
            error = "error: wandb_log=True needs the wandb package: pip install wandb (or set wandb_log=False)"
        except Exception as e:  # wandb's errors share no class of their own
            error = f"error: wandb.init failed ({type(e).__name__}: {e})"
stop_together(error)

# -----------------------------------------------------------------------------------------------
# The training loop
stopping.on_stop(own_handler=on_stop_signal)  # from here a signal is honoured at the next step boundary
bar = tqdm(
    total=max_iters,
    initial=iter_num,
    desc="train",
    unit="step",
    file=sys.stderr,
    disable=not master_process,
    dynamic_ncols=True,
)
t0, timed_steps = time.perf_counter(), 0
reduced, pending = None, None  # the last step's reduction (DDP), and the one before it: read at this boundary
while True:
    signum, failed = agreed_stop(pending)
    if iter_num % eval_interval == 0 or iter_num >= max_iters:
        check_loss()  # before the checkpoint below
        val_loss, val_bpb = evaluate()
        if not math.isfinite(val_loss):
            bar.close()  # the line below goes on a line of its own, not after the bar
            raise SystemExit(
                f"val loss is {val_loss} at step {iter_num}: stopping; the last checkpoint in {out_dir} is intact"
            )
        best_val_loss = min(best_val_loss, val_loss)
        log(f"step {iter_num}: val loss {val_loss:.4f}" + (f", val bpb {val_bpb:.4f}" if val_bpb is not None else ""))
        error = None
        if master_process:
            error = failure or record(
                {
                    "iter": iter_num,
                    "val_loss": val_loss,
                    "val_bpb": val_bpb,
                    "tokens": tokens_seen,
                    "flops": tokens_seen * flops_per_token,
                }
            )
            if iter_num > 0 or init_from != "scratch":
                error = save_checkpoint(val_loss, val_bpb) or error
        stop_together(error)
        signum = max(signum, agreed_stop_signal())  # a signal that came during the evaluation stops the run now
        t0, timed_steps = time.perf_counter(), 0  # evaluation time is not training throughput
    if iter_num >= max_iters:
        break
    if failed:
        stop_together(failure)  # rank 0's line; every rank stops
    if signum:
        stop(signum)

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
    pending, (train_loss, reduced) = reduced, reduce_step(loss_sum)
    unchecked += train_loss
    unchecked_steps += 1
    iter_num += 1
    timed_steps += 1
    tokens_seen += tokens_per_step
    bar.update(1)
    if iter_num % log_interval == 0:
        loss_value = check_loss()  # every rank: the same verdict
        if master_process:
            # tok/s counts every rank's tokens; MFU is per device: the peak is one device's
            tok_s = tokens_per_step * timed_steps / (time.perf_counter() - t0)
            tok_s_device = tok_s / world_size
            mfu = flops_per_token * tok_s_device / peak_flops if peak_flops else None
            log(
                f"step {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s"
                + (f" ({tok_s_device:,.0f} per device)" if world_size > 1 else "")
                + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "")
            )
            failure = failure or record(
                {
                    "iter": iter_num,
                    "loss": loss_value,
                    "lr": lr,
                    "tokens": tokens_seen,
                    "flops": tokens_seen * flops_per_token,
                    "tok_per_s": tok_s,
                    "tok_per_s_per_device": tok_s_device,
                    "mfu": mfu,
                    "epoch": train_loader.epoch,  # passes the loader has completed over the train split
                }
            )
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
    dist.barrier()  # every rank done with its collectives before any tears the group down
    leave(0)

"""
Checkpoint I/O, shared by every script, and what train.py checks before it starts in an out_dir or continues a
checkpoint's run (out_dir_verdict, same_stream, warn_inexact_resume).

A checkpoint is one torch.save'd dict (loaded with weights_only=True, so it holds only tensors and
plain Python values):
    model        state dict, names as transformers' LlamaForCausalLM (never torch.compile's _orig_mod.)
    model_args   ModelConfig as a dict
    tokenizer    the tokenizer's self-contained spec (see tokenizer.py)
    optimizer    the optimizer state dict (AdamW, or muon.MuonAdamW), or None (a fresh phase starts a new one)
    scaler       the fp16 grad scaler's state ({} in other dtypes)
    iter_num     optimizer steps taken in this phase
    config       the training config of the run that wrote it
    world_size   the number of processes that trained it
    loader       the train loader's position {shard, offset, epoch, fingerprint}: the fingerprint names the dataset
                 (data.compute_fingerprint) whose stream the position belongs to
    rng          torch (and CUDA) RNG states
    best_val_loss, tokens_seen
    history      list of dicts, one per phase (train runs, stacking), oldest first: the model's lineage

Wherever a checkpoint is named, a file, an out_dir (meaning out_dir/ckpt.pt) or hf:DIR is accepted: hf:DIR is a
Hugging Face Llama-family directory (config.json, safetensors or pytorch_model.bin, tokenizer.json), read into the
same dict by import_hf below. It lives here, not beside the export in export_hf.py, because it is one more way to
*read* a checkpoint, and every script reads checkpoints through this module; export_hf.py only writes.

A training run's out_dir holds, besides ckpt.pt (and ckpt_<iter>.pt copies with keep_last: hard links, or copies
where the file system refuses links):
    metrics.jsonl  one JSON object per line, appended by train.py: {"iter", "loss", "lr", "tokens", "flops",
                   "tok_per_s" (every process's), "tok_per_s_per_device", "mfu" (per device), "epoch" (the
                   loader's passes over the data)} after a logged step,
                   {"iter", "val_loss", "val_bpb", "tokens", "flops"} after an eval (val_bpb: bits per byte, null
                   when the tokenizer's bytes are unknown)
    train.lock     holds the pid of the train.py writing to the out_dir, locked while it runs (RunLock)

Every file is written through common.atomic_write, so a crash or a full disk never leaves a half-written one.
This module imports model.py, tokenizer.py and common.py, and no script.
"""

import glob
import json
import math
import os
import pickle
import platform
import shutil

import torch

import stopping
from common import atomic_write, disk_full, log, remove

try:  # the out_dir lock (RunLock): flock(2) on POSIX, msvcrt's byte-range lock on Windows
    import fcntl
except ImportError:
    fcntl = None
    import msvcrt
from model import LLaMA, ModelConfig
from tokenizer import Tokenizer, tokenizer_spec_from_hf


def resolve(name):
    """A checkpoint file, or out_dir -> out_dir/ckpt.pt."""
    path = os.path.join(name, "ckpt.pt") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint not found: {name!r}" + (" (no ckpt.pt in that directory)" if os.path.isdir(name) else "")
        )
    return path


def load(name, map_location="cpu", mmap=False):
    """Load a checkpoint dict from a file or out_dir, or import an hf:DIR model as one. mmap=True maps the tensors
    instead of reading them: a look at a checkpoint's config and history costs nothing, whatever its size."""
    if name.startswith("hf:"):
        return import_hf(name[3:])
    path = resolve(name)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch's own message, whole, on one line; for a pickle it suggests weights_only=False
        why = "not a file torch.save wrote" if isinstance(e, pickle.UnpicklingError) else " ".join(str(e).split())
        why = why.split(" This is an internal miniz error.")[0]  # the rest is advice this line already gives
        raise ValueError(
            f"cannot read checkpoint {path!r}: it is truncated, corrupt or not a checkpoint ({why})"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{path!r} is not an mtlm checkpoint (expected a dict with 'model' and 'model_args')")
    return ckpt


@stopping.deferred()
def save(ckpt, out_dir, keep_last=0):
    """Write out_dir/ckpt.pt atomically (temp file, then rename): a crash mid-write leaves the previous
    checkpoint intact. keep_last > 0 also keeps ckpt_<iter>.pt copies of the last k saves. A stop signal meanwhile
    is honoured once all is written (stopping.deferred)."""
    path = write(ckpt, os.path.join(out_dir, "ckpt.pt"))
    if keep_last > 0:
        numbered = os.path.join(out_dir, f"ckpt_{ckpt['iter_num']:07d}.pt")
        if os.path.exists(numbered):
            os.remove(numbered)
        try:
            os.link(path, numbered)  # a hard link: no second copy on disk
        except OSError as e:
            if disk_full(e):
                raise
            # bucket mounts (gcsfuse, s3fs) and FAT refuse hard links (EPERM, ENOTSUP): a copy costs space, not the run
            log(f"keep_last: {out_dir} refuses hard links ({e.strerror}): copying {os.path.basename(path)} instead")
            with atomic_write(numbered) as tmp:
                shutil.copyfile(path, tmp)
        for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_[0-9]*.pt")))[:-keep_last]:
            os.remove(old)
    return path


@stopping.deferred()
def write(ckpt, path):
    """Write one checkpoint file atomically (common.atomic_write), creating its directory. torch.save goes through
    a Python file so that a full disk surfaces as the OS's ENOSPC, not as a bare "unexpected pos" from the zip
    writer; for the same reason a stop signal is honoured when the file is written, not inside the writer."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(ckpt, f)
    return path


def build_model(ckpt, device="cpu", dtype=None):
    """The LLaMA a checkpoint describes, with its weights, in eval mode."""
    model = LLaMA(ModelConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device=device, dtype=dtype).eval()


def load_model(name, device="cpu", dtype=None):
    """(model, tokenizer, ckpt) from a checkpoint file, out_dir or hf:DIR."""
    ckpt = load(name)
    return build_model(ckpt, device, dtype), Tokenizer(ckpt["tokenizer"]), ckpt


# -----------------------------------------------------------------------------------------------
# hf:DIR: a Hugging Face Llama-family directory -> our checkpoint dict


def model_args_from_hf(cfg, where):
    """Map config.json onto ModelConfig, refusing every feature model.py does not implement.
    Missing keys take LlamaConfig's defaults."""

    def refuse(why):
        raise ValueError(f"{where}: unsupported model: {why}; model.py implements the plain Llama architecture")

    if cfg.get("model_type") != "llama":
        refuse(f"model_type is {cfg.get('model_type')!r}, not 'llama'")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        refuse("it has biases (attention_bias/mlp_bias)")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act is {cfg['hidden_act']!r}, not 'silu'")
    if any(cfg.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok")):
        refuse("it is a mixture of experts")
    if cfg.get("sliding_window") is not None:
        refuse(f"it uses sliding-window attention ({cfg['sliding_window']})")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        refuse(f"head_dim {cfg.get('head_dim')} is not hidden_size/num_attention_heads ({hidden}/{heads})")
    # RoPE: transformers 5 writes rope_parameters {rope_theta, rope_type}; older configs rope_theta + rope_scaling
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    for rope_type in (rope.get("rope_type"), scaling.get("rope_type") or scaling.get("type")):
        if rope_type not in (None, "default"):
            refuse(f"RoPE scaling {rope_type!r} (only the default, unscaled RoPE is implemented)")
    return dict(
        vocab_size=cfg["vocab_size"],
        n_layer=cfg["num_hidden_layers"],
        n_head=heads,
        n_kv_head=cfg.get("num_key_value_heads") or heads,
        n_embd=hidden,
        intermediate_size=cfg["intermediate_size"],
        block_size=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def read_weights(model_dir):
    """All tensors of a HF model dir: model.safetensors, sharded safetensors (index), else pytorch_model.bin."""
    from safetensors.torch import load_file

    for index, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
    ):
        if os.path.exists(os.path.join(model_dir, index)):
            with open(os.path.join(model_dir, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for shard in shards for k, v in loader(os.path.join(model_dir, shard)).items()}
    if os.path.exists(os.path.join(model_dir, "model.safetensors")):
        return load_file(os.path.join(model_dir, "model.safetensors"))
    if os.path.exists(os.path.join(model_dir, "pytorch_model.bin")):
        # weights_only: a pickle from the internet must not run code
        return torch.load(os.path.join(model_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{model_dir}: no weights (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def import_hf(model_dir):
    """A checkpoint dict (the format above) holding the model of a Hugging Face Llama-family directory."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"hf:{model_dir}: not a directory")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"hf:{model_dir}: no config.json (not a Hugging Face model directory)")
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    model_args = model_args_from_hf(cfg, f"hf:{model_dir}")
    with torch.device("meta"):  # shapes only: nothing allocated
        expected = LLaMA(ModelConfig(**model_args)).state_dict()
    weights = {
        k: v for k, v in read_weights(model_dir).items() if not k.endswith("rotary_emb.inv_freq")
    }  # derived, not learned
    if model_args["tie_embeddings"]:
        weights["lm_head.weight"] = weights.get("model.embed_tokens.weight")  # one tensor under both names, as in LLaMA
    missing = [k for k in expected if weights.get(k) is None]
    unexpected = [k for k in weights if k not in expected]
    wrong = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k not in missing and weights[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"hf:{model_dir}: weights do not match its config: "
            + "; ".join(
                f"{what}: {', '.join(ks[:4])}{' ...' if len(ks) > 4 else ''}"
                for what, ks in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if ks
            )
        )
    tokenizer = tokenizer_spec_from_hf(model_dir)
    # fp32 master weights, like a checkpoint from train.py (a bf16 hub file trains badly in bf16)
    state = {k: v.float() for k, v in weights.items()}
    if model_args["tie_embeddings"]:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    source = f"hf:{os.path.abspath(model_dir)}"
    return dict(
        model=state,
        model_args=model_args,
        tokenizer=tokenizer,
        optimizer=None,
        iter_num=0,
        config={},
        loader=None,
        rng=None,
        best_val_loss=math.inf,
        tokens_seen=0,
        history=[
            dict(
                event="import",
                source=source,
                name=cfg.get("_name_or_path") or os.path.basename(os.path.abspath(model_dir)),
                architectures=",".join(cfg.get("architectures") or []),
            )
        ],
    )


# -----------------------------------------------------------------------------------------------
# The rest of a run's out_dir: metrics.jsonl and the lock


def read_metrics(out_dir):
    """The entries of out_dir/metrics.jsonl ([] if there is none). A torn last line (a crash mid-write) is
    dropped with a warning; a bad line anywhere else is an error naming the file and the line."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or "iter" not in entry:
                raise ValueError("not an object with an 'iter'")
        except ValueError as e:
            if number == len(lines):  # the file does not end with a newline: a write that never finished
                log(f"warning: {path}: dropping its torn last line {number} ({line[:60]!r}), left by a crash mid-write")
                break
            raise ValueError(f"{path}, line {number}: not a metrics entry ({e}); fix or remove the line") from None
        entries.append(entry)
    return entries


def write_metrics(out_dir, entries):
    """Start out_dir/metrics.jsonl afresh with these entries (a new run: none; a resumed one: those before its
    checkpoint)."""
    with atomic_write(os.path.join(out_dir, "metrics.jsonl")) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)


def append_metrics(out_dir, entry):
    """One line per write call, so a crash can tear only the last line (which read_metrics drops)."""
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


# --- what a checkpoint's run has to do with this one (train.py) --------------------------------------------------
def same_stream(ckpt, fingerprint, data_dir):
    """(True if the checkpoint's train-data position belongs to the dataset in data_dir, whose fingerprint is given;
    the reason in words). A dataset is known by its fingerprint (data.compute_fingerprint: what was built, not where
    it lives), so a moved or copied directory continues its stream and a re-prepared one at the same path does not."""
    state, old_dir = ckpt.get("loader") or {}, (ckpt.get("config") or {}).get("data_dir")
    if "fingerprint" in state:
        if state["fingerprint"] == fingerprint:
            return True, f"the checkpoint's dataset, fingerprint {fingerprint}" + (
                f", found at {data_dir} instead of {old_dir}" if old_dir != data_dir else ""
            )
        return False, (
            f"{data_dir} holds another dataset than the checkpoint's {old_dir} (fingerprint "
            f"{fingerprint}, the checkpoint's {state['fingerprint']})"
        )
    if not state or old_dir is None:
        return False, "the checkpoint holds no data position"
    # a checkpoint written before datasets had fingerprints: only the path can tell
    same = os.path.realpath(old_dir) == os.path.realpath(data_dir)
    return same, (
        f"the checkpoint predates dataset fingerprints, so only paths compare: its data_dir {old_dir!r} is "
        f"{'' if same else 'not '}{data_dir!r}"
    )


def out_dir_verdict(out_dir, init_from, config, fingerprint, start_history, watch_keys):
    """(None, 0) if a run may start in out_dir, else (the line, the exit status). A run that is not a resume never
    replaces a checkpoint by accident: re-running the command of a run that crashed or was stopped would start it over
    and replace its progress at the first save. Re-running the command of a finished run reuses it (status 0), so a
    chain of commands such as the quick start runs again; anything else is refused, saying how to go on.
    config: the run's; fingerprint: its dataset's; start_history: the history of the checkpoint its weights come
    from (None from scratch); watch_keys: config keys that may differ in a re-run of the same run."""
    path = os.path.join(out_dir, "ckpt.pt")
    if init_from == "resume" or not os.path.exists(path):
        return None, 0
    if config["overwrite"]:
        for name in [path, os.path.join(out_dir, "metrics.jsonl"), *glob.glob(os.path.join(out_dir, "ckpt_[0-9]*.pt"))]:
            remove(name)
        log(f"overwrite=True: starting over in {out_dir}: removed its checkpoint, numbered copies and metrics.jsonl")
        return None, 0
    try:
        old = load(path, mmap=True)  # config and history only: the tensors are mapped, not read
    except ValueError as e:
        return f"error: {out_dir} holds a checkpoint that cannot be read ({e}); start over with --overwrite=True", 1
    old_config = old.get("config") or {}
    # data_dir is compared by what it holds (same_stream), not by its path
    changed = [
        f"{k} {old_config[k]!r} -> {v!r}"
        for k, v in config.items()
        if k in old_config and k not in watch_keys and k != "data_dir" and old_config[k] != v
    ]
    same_data, why = same_stream(old, fingerprint, config["data_dir"])
    if not same_data:
        changed.append(f"data: {why}")
    if start_history is not None and old.get("history", [])[:-1] != start_history:
        changed.append(f"initial weights: {init_from} is not the checkpoint this run started from")
    finished = old["iter_num"] >= old_config.get("max_iters", math.inf)
    if finished and not changed:
        val_loss = (old.get("history") or [{}])[-1].get("val_loss")
        return (
            f"{out_dir} already holds this run, finished at step {old['iter_num']}"
            + (f" (val loss {val_loss:.4f})" if val_loss is not None else "")
            + ": reusing it, nothing to do (--overwrite=True trains it again)"
        ), 0
    state = (
        f"a finished run (step {old['iter_num']})"
        if finished
        else f"a run stopped at step {old['iter_num']} of {old_config.get('max_iters', '?')}"
    )
    return (
        f"error: {out_dir} already holds {state}"
        + (f" with other settings ({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''})" if changed else "")
        + ": resume it with --init_from=resume, start over with --overwrite=True, or choose another out_dir"
    ), 1


def warn_inexact_resume(ckpt, config, world_size):
    """A resume is bit-exact only with the checkpoint's batch shape, number of processes and data: name each change
    and what it means. The data's own check (same_stream) decides where the stream goes on."""
    old = ckpt.get("config") or {}
    shape = ("gradient_accumulation_steps", "batch_size", "block_size")
    old_tokens, tokens = math.prod(old.get(k, config[k]) for k in shape), math.prod(config[k] for k in shape)
    for key, what in (
        ("batch_size", "sequences per micro-step"),
        ("block_size", "tokens per sequence"),
        ("gradient_accumulation_steps", "micro-steps per step, across processes"),
    ):
        if old.get(key, config[key]) != config[key]:
            log(
                f"warning: resuming with {key} {config[key]} ({what}), the checkpoint's is {old[key]}: "
                f"{tokens:,} tokens per step instead of {old_tokens:,}, "
                "so this is not the run the checkpoint would have gone on to"
            )
    old_world = ckpt.get("world_size", world_size)
    if old_world != world_size:
        log(
            f"warning: resuming on {world_size} processes, the checkpoint's run had {old_world}: the same tokens "
            "per step, but the gradients are summed in another order: close to the run it would have been, "
            "not bit-identical"
        )


class RunLock:
    """
    out_dir/train.lock, held while one train.py writes to out_dir, so that a second run on the same out_dir
    refuses at start instead of interleaving its checkpoints and metrics with the first. prepare_data.py holds
    OUT_DIR.lock beside its out_dir (path=), which a finished build replaces whole, the same way against a second
    build (user= names the holder in the refusal).

    flock(2) locks belong to the open file, and the kernel releases them when the process ends in any way
    (exit, exception, kill -9, a crash), so a lock left by a dead process is never in force: the next run simply
    takes it. Windows has no flock: there msvcrt locks a byte of the file, released the same way. The file holds the
    holder's pid, host and command for the message; it is not the lock.
    """

    def __init__(self, out_dir, path=None, user="another training run"):
        path = path or os.path.join(out_dir, "train.lock")
        directory = os.path.dirname(path) or "."
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise RuntimeError(f"out_dir {directory!r} is a file, not a directory: give the run another out_dir")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise RuntimeError(f"cannot create out_dir {directory!r}: {e.strerror}") from None
        self.path = path
        self.file = open(self.path, "a+")  # a+: do not truncate the holder's pid before we hold the lock
        try:
            if fcntl:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:  # Windows locks are mandatory: lock a byte past the text, so the loser can still read who holds it
                self.file.seek(1 << 20)
                msvcrt.locking(self.file.fileno(), msvcrt.LK_NBLCK, 1)
        except (BlockingIOError, PermissionError):  # flock's EWOULDBLOCK; msvcrt's EACCES
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RuntimeError(
                f"{out_dir} is in use by {user} ({holder}): wait for it to finish, or give this run another out_dir"
            ) from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {platform.node()}\n")
        self.file.flush()

    def release(self):
        self.file.close()  # closing the file releases the lock; the file itself stays, harmless

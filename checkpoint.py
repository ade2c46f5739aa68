"""
Checkpoint I/O, shared by every script.

A checkpoint is one torch.save'd dict (loaded with weights_only=True, so it holds only tensors and
plain Python values):
    model        state dict, names as transformers' LlamaForCausalLM (never torch.compile's _orig_mod.)
    model_args   ModelConfig as a dict
    tokenizer    the tokenizer's self-contained spec (see tokenizer.py)
    optimizer    AdamW state dict, or None (a fresh phase starts a new optimizer)
    iter_num     optimizer steps taken in this phase
    config       the training config of the run that wrote it
    loader       the train loader's position {shard, offset, epoch}
    rng          torch (and CUDA) RNG states
    best_val_loss, tokens_seen
    history      list of dicts, one per phase (train runs, stacking), oldest first: the model's lineage

Wherever a checkpoint is named, a file, an out_dir (meaning out_dir/ckpt.pt) or hf:DIR is accepted.
"""
import os
import glob

import torch

from model import LLaMA, ModelConfig
from tokenizer import Tokenizer


def resolve(name):
    """A checkpoint file, or out_dir -> out_dir/ckpt.pt."""
    path = os.path.join(name, "ckpt.pt") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {name!r}" + (" (no ckpt.pt in that directory)" if os.path.isdir(name) else ""))
    return path


def load(name, map_location="cpu"):
    """Load a checkpoint dict from a file or out_dir, or import an hf:DIR model as one."""
    if name.startswith("hf:"):
        from export_hf import import_hf  # the hub interop lives with the export
        return import_hf(name[3:])
    path = resolve(name)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path!r}: it is corrupt or not a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{path!r} is not an mtlm checkpoint (expected a dict with 'model' and 'model_args')")
    return ckpt


def save(ckpt, out_dir, keep_last=0):
    """Write out_dir/ckpt.pt atomically (temp file, then rename): a crash mid-write leaves the previous
    checkpoint intact. keep_last > 0 also keeps ckpt_<iter>.pt copies of the last k saves."""
    path = write(ckpt, os.path.join(out_dir, "ckpt.pt"))
    if keep_last > 0:
        numbered = os.path.join(out_dir, f"ckpt_{ckpt['iter_num']:07d}.pt")
        if os.path.exists(numbered):
            os.remove(numbered)
        os.link(path, numbered)  # a hard link: no second copy on disk
        for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_[0-9]*.pt")))[:-keep_last]:
            os.remove(old)
    return path


def write(ckpt, path):
    """Write one checkpoint file atomically (temp file, then rename), creating its directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
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

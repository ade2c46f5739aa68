"""
Grow a trained model's depth by duplicating its layers, so that training can go on with a deeper model.

    python stack.py                                        # the recipe's step: out/phase1 -> out/stacked.pt
    python stack.py --src out/phase1 --out out/stacked.pt  # the same, named: G_stack, g = 2, 12 -> 24 layers
    python stack.py --src out/tiny --out out/tiny_stacked.pt --method zero  # LLaMA Pro: same function, 2x depth
    python stack.py --src out/tiny --out out/dus.pt --method dus --drop 1   # SOLAR: 4 -> 6 layers
    python train.py configs/phase2.py                      # then train on (init_from=out/stacked.pt)

With no arguments it does the recipe's step: out/phase1 (configs/phase1.py) grown to out/stacked.pt, the
checkpoint configs/phase2.py starts from.

The four operators, for a source of L layers and a factor g (new layer i is a copy of source layer copy_of[i]):
    stack       copy_of[i] = i mod L: the whole stack repeats g times. Progressive stacking (Gong et al., 2019),
                G_stack in Du et al. (NeurIPS 2024), and what the reference model (MTLM1-200M) did with g = 2.
    interleave  copy_of[i] = i div g: each layer is repeated g times in place.
    dus         depth up-scaling (SOLAR, Kim et al., 2023): g copies of the stack, and at each seam the last m
                layers of the copy before and the first m of the copy after are dropped: L -> gL - 2m(g-1).
    zero        block expansion (LLaMA Pro, Wu et al., 2024): as interleave, but every added copy has its
                attention o_proj and MLP down_proj set to zero. A pre-norm block with both zeroed adds nothing
                to the residual stream, so the grown model computes exactly the source's function.
The embedding, the final norm and the LM head are copied unchanged.

--noise r adds N(0, (r * std(W))^2) to every tensor of every added copy (the first occurrence of each layer
stays exact). Du et al. report that about 20% noise helps slightly; it breaks the symmetry between copies.
--optim reset (the default) leaves the optimizer out: the next phase starts a fresh one with its own warmup.
--optim copy carries the source's optimizer moments over (AdamW's, or Muon's momentum), each copy getting those of
the layer it copies; train.py loads them when it starts from the grown checkpoint.

The grown checkpoint keeps the tokenizer, the training config and the loader position of the source (so the next
phase on the same data continues the stream) and its history, plus one entry for this operation.
stdout: parameter counts and the val loss of source and grown model on the source's val set (data.ValSet: the
tokens train.py measured it on), in nats per token and bits per byte. Logs go to stderr.
"""

import stopping

# first of all, before torch takes a second or two to import: a signal meanwhile ends in one line too
if __name__ == "__main__":
    stopping.stop_on_signals("stopped by {signal}: nothing was written; run the same command to grow the model")

import argparse
import glob
import math
import os
import re
import sys

import torch

import checkpoint
from common import DTYPES, device_error, log, mixed_precision, resolve_dtype
from data import ValSet, load_meta, load_tokenizer
from model import LLaMA, ModelConfig
from tokenizer import Tokenizer

RESIDUAL_WRITERS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # zeroed by `zero`: a block's only outputs
NOISE_SEED = 1337  # --noise is reproducible: the same source and flags give the same grown model


def layer_map(method, n_layer, factor, drop):
    """copy_of[i] for every new layer i: the source layer whose weights it starts from."""
    if method == "stack":
        return [i % n_layer for i in range(factor * n_layer)]
    if method in ("interleave", "zero"):
        return [i // factor for i in range(factor * n_layer)]
    if (
        method == "dus"
    ):  # each copy keeps layers [drop, n_layer - drop), except the first copy its start, the last its end
        return [
            i
            for copy in range(factor)
            for i in range(drop if copy > 0 else 0, n_layer - drop if copy < factor - 1 else n_layer)
        ]
    raise ValueError(f"unknown method {method!r}")


def added_layers(copy_of):
    """New layers that repeat a source layer already placed before them: the copies (noise, zeroing go there)."""
    seen, added = set(), []
    for i, source_layer in enumerate(copy_of):
        if source_layer in seen:
            added.append(i)
        seen.add(source_layer)
    return added


def layer_of(name):
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight'); (None, name) outside the layers."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    return (int(match[1]), match[2]) if match else (None, name)


def grow_state_dict(state, copy_of, method, noise):
    """The grown model's state dict: layer i is a copy of source layer copy_of[i]; everything else is copied."""
    grown = {}
    for name, tensor in state.items():
        if layer_of(name)[0] is None:
            grown[name] = tensor.clone()
    per_layer = [rest for name in state for idx, rest in [layer_of(name)] if idx == 0]
    added = set(added_layers(copy_of))
    gen = torch.Generator().manual_seed(NOISE_SEED)
    for i, source_layer in enumerate(copy_of):
        for rest in per_layer:
            w = state[f"model.layers.{source_layer}.{rest}"].clone()
            if i in added and noise > 0:
                w += noise * w.float().std() * torch.randn(w.shape, generator=gen).to(w.dtype)
            if i in added and method == "zero" and rest in RESIDUAL_WRITERS:
                w.zero_()
            grown[f"model.layers.{i}.{rest}"] = w
    return grown


def optimizer_names(model_args, muon):
    """Parameter names in the order of configure_optimizer's groups: the integer ids of the optimizer's state dict.
    Read off the real method (on the meta device: no memory, no init) so the order can never drift from it."""
    with torch.device("meta"):
        model = LLaMA(ModelConfig(**model_args))
        opt = model.configure_optimizer(0.0, 0.0, (0.9, 0.95), "cpu", muon=muon)
    names = {id(p): n for n, p in model.named_parameters()}  # tied lm_head is the embedding: one entry
    return [[names[id(p)] for p in group["params"]] for group in opt.param_groups]


def grow_optimizer(opt_state, src_args, new_args, copy_of):
    """Optimizer state for the grown model: each parameter takes the moments (and step) of the one it was copied
    from (AdamW's, or Muon's momentum). The groups keep the source's hyperparameters; train.py keeps only the
    moments and uses its own."""
    muon = any(group.get("muon") for group in opt_state["param_groups"])  # muon.MuonAdamW's groups say so
    src_ids = {n: i for i, n in enumerate(n for group in optimizer_names(src_args, muon) for n in group)}
    state, groups, j = {}, [], 0
    for src_group, names in zip(opt_state["param_groups"], optimizer_names(new_args, muon)):
        ids = []
        for name in names:
            idx, rest = layer_of(name)
            origin = src_ids[name if idx is None else f"model.layers.{copy_of[idx]}.{rest}"]
            if origin in opt_state["state"]:
                state[j] = {k: v.clone() for k, v in opt_state["state"][origin].items()}
            ids.append(j)
            j += 1
        groups.append(dict(src_group, params=ids))
    return {"state": state, "param_groups": groups}


def val_set(ckpt, args):
    """The val set train.py measured the source on: its config's val_tokens of its data (data.ValSet), or
    (None, why not)."""
    config = ckpt.get("config") or {}
    data_dir = args.data_dir or config.get("data_dir")
    if args.val_tokens == 0:
        return None, "--val_tokens 0"
    if data_dir is None:
        return None, "the source names no data_dir (give --data_dir)"
    if args.data_dir is None and not glob.glob(os.path.join(data_dir, "val_*.bin")):
        return None, f"the source's data_dir {data_dir!r} (its val shards) is not here (give --data_dir)"
    load_meta(data_dir)  # an explicit --data_dir that is not a dataset fails here, naming the problem
    if load_tokenizer(data_dir).spec() != Tokenizer(ckpt["tokenizer"]).spec():
        raise ValueError(f"{data_dir} was tokenized with a different tokenizer than the source checkpoint")
    block_size = ckpt["model_args"]["block_size"]
    # a train.py before val_tokens measured its first eval_iters batches of batch_size x block_size (one process)
    tokens = (
        args.val_tokens
        or config.get("val_tokens")
        or config.get("eval_iters", 10) * config.get("batch_size", 8) * block_size
    )
    val = ValSet(data_dir, tokens, block_size)
    return val, f"the first {val.tokens:,} val tokens of {data_dir}"


def parse_args(argv):
    """The arguments, with every check that needs no file done first, so that a refusal writes nothing."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--src", default="out/phase1", help="source checkpoint: a file, an out_dir, or hf:DIR (default: %(default)s)"
    )
    p.add_argument(
        "--out",
        default="out/stacked.pt",
        help="where to write: NAME.pt is a file, anything else an out_dir (-> out_dir/ckpt.pt) (default: %(default)s)",
    )
    p.add_argument("--method", default="stack", choices=["stack", "interleave", "dus", "zero"])
    p.add_argument(
        "--factor", default="2", help="g: the depth multiplier, an integer >= 2 (for dus: the number of copies)"
    )
    p.add_argument(
        "--drop", type=int, default=None, help="m, dus only: layers dropped on each side of a seam (default L/4)"
    )
    p.add_argument("--optim", default="reset", choices=["reset", "copy"])
    p.add_argument(
        "--noise", type=float, default=0.0, help="relative std of the noise added to the copies (0.2 = 20%%)"
    )
    p.add_argument("--data_dir", default=None, help="dataset for the val loss comparison (default: the source's)")
    p.add_argument(
        "--val_tokens", type=int, default=None, help="val tokens to measure (default: the source's val_tokens; 0 skips)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the val loss only")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="for the val loss: auto is what the device computes natively (common.auto_dtype) (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = p.parse_args(argv)
    try:
        args.factor = int(args.factor)
    except ValueError:
        p.error(f"--factor must be an integer >= 2, got {args.factor!r}")
    if args.factor < 2:
        p.error(f"--factor must be an integer >= 2, got {args.factor}: the model must grow")
    if args.drop is not None and args.method != "dus":
        p.error(f"--drop applies to --method dus only, not {args.method}")
    if args.noise < 0 or not math.isfinite(args.noise):
        p.error(f"--noise must be >= 0, got {args.noise}")
    if args.val_tokens is not None and args.val_tokens < 0:
        p.error(f"--val_tokens must be >= 0 (0 skips the val loss), got {args.val_tokens}")
    if device_error(args.device):
        p.error(device_error(args.device))
    args.out_path = args.out if args.out.endswith(".pt") else os.path.join(args.out, "ckpt.pt")
    args.recipe = args.src == p.get_default("src") and args.out == p.get_default("out")  # `python stack.py`
    return args


def load_source(args):
    """The source checkpoint, and m, the layers dus drops on each side of a seam (checked against its depth)."""
    try:
        ckpt = checkpoint.load(args.src)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(
            f"error: {e}"
            + ("; train phase 1 first (train.py configs/phase1.py), or name a source with --src" if args.recipe else "")
        )
    log(
        f"growing {args.src} into {args.out_path}"
        + (" (the recipe's step: configs/phase2.py starts from it)" if args.recipe else "")
    )
    n_layer = ckpt["model_args"]["n_layer"]
    drop = args.drop if args.drop is not None else (max(1, n_layer // 4) if args.method == "dus" else 0)
    # m < L/2 keeps the grown model deeper than the source (gL - 2m(g-1) > L) and leaves the middle copies a layer
    if args.method == "dus" and not 1 <= drop <= (n_layer - 1) // 2:
        sys.exit(
            f"error: --drop m must be between 1 and {(n_layer - 1) // 2} (m < L/2) for dus on {n_layer} layers, "
            f"got {drop}" + ("" if n_layer > 2 else ": a model this shallow cannot be depth-up-scaled")
        )
    return ckpt, drop


def reuse_existing(args, ckpt, drop):
    """An existing output is never replaced without --force. It is reused (exit 0) when it is this very growth of this
    source: the same operator and settings, from a source with the same history. So a chain of commands (the quick
    start) can run again."""
    try:
        existing = checkpoint.load(args.out_path, mmap=True)  # its history only: the tensors are mapped, not read
    except ValueError:
        existing = {}
    *lineage, entry = existing.get("history") or [{}]
    settings = dict(
        event="stack", method=args.method, factor=args.factor, drop=drop, optim=args.optim, noise=args.noise
    )
    if lineage == list(ckpt.get("history", [])) and all(entry.get(k) == v for k, v in settings.items()):
        print(
            f"{args.out_path} already holds {args.src} grown by {args.method} x{args.factor}: reusing it "
            "(--force grows it again)"
        )
        sys.exit(0)
    sys.exit(f"error: {args.out_path} already exists (not this growth of {args.src}); pass --force to overwrite it")


def compare(source, grown, ckpt, args):
    """{"source": (nats per token, bits per byte), "grown": ...} on the source's val set; {} when it is skipped."""
    try:
        val, what = val_set(ckpt, args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if val is None:
        print(f"val loss: skipped, {what}")
        return {}
    dtype = resolve_dtype(args.dtype, args.device)
    log(f"val loss on {what} ({args.device}, {dtype})")
    batch_size = (ckpt.get("config") or {}).get("batch_size", 8)
    losses = {}
    for label, model in (("source", source), ("grown", grown)):
        nats = val.nats(model.to(args.device).eval(), batch_size, args.device, mixed_precision(dtype, args.device))
        losses[label] = val.losses(nats.item())
        model.cpu()
    print(f"val loss: source {losses['source'][0]:.4f}, grown {losses['grown'][0]:.4f} (nats per token on {what})")
    if val.bytes:
        print(f"val bpb: source {losses['source'][1]:.4f}, grown {losses['grown'][1]:.4f} (bits per byte)")
    return losses


def main(argv=None):
    args = parse_args(argv)
    ckpt, drop = load_source(args)
    if os.path.exists(args.out_path) and not args.force:
        reuse_existing(args, ckpt, drop)

    # -- grow -------------------------------------------------------------------------------------------------
    src_args = ckpt["model_args"]
    n_layer = src_args["n_layer"]
    copy_of = layer_map(args.method, n_layer, args.factor, drop)
    new_args = dict(src_args, n_layer=len(copy_of))
    log(f"{args.method}: {n_layer} -> {len(copy_of)} layers; new layer i starts from source layer {copy_of}")
    grown = LLaMA(ModelConfig(**new_args))
    # strict: the grown dict must be exactly a model of the new depth
    grown.load_state_dict(grow_state_dict(ckpt["model"], copy_of, args.method, args.noise))
    optimizer = None
    if args.optim == "copy":
        if not ckpt.get("optimizer"):
            sys.exit(f"error: --optim copy needs an optimizer state, and {args.src} has none")
        optimizer = grow_optimizer(ckpt["optimizer"], src_args, new_args, copy_of)
    source = checkpoint.build_model(ckpt)
    print(
        f"source: {n_layer} layers, {source.num_params():,} parameters "
        f"({source.num_params(non_embedding=True):,} non-embedding)"
    )
    print(
        f"grown:  {len(copy_of)} layers, {grown.num_params():,} parameters "
        f"({grown.num_params(non_embedding=True):,} non-embedding)"
    )

    losses = compare(source, grown, ckpt, args)

    # -- write ------------------------------------------------------------------------------------------------
    entry = dict(
        event="stack",
        method=args.method,
        factor=args.factor,
        drop=drop,
        optim=args.optim,
        noise=args.noise,
        source=args.src,
        out=args.out_path,
        n_layer=[n_layer, len(copy_of)],
    )
    for key, label in (("_source", "source"), ("", "grown")):  # None when the val loss was skipped
        entry[f"val_loss{key}"], entry[f"val_bpb{key}"] = losses.get(label, (None, None))
    grown_ckpt = dict(
        model=grown.state_dict(),
        model_args=new_args,
        tokenizer=ckpt["tokenizer"],
        optimizer=optimizer,
        iter_num=0,
        config=ckpt.get("config") or {},
        loader=ckpt.get("loader"),
        best_val_loss=losses.get("grown", (float("inf"),))[0],
        tokens_seen=0,
        rng=ckpt.get("rng"),
        history=list(ckpt.get("history", [])) + [entry],
    )
    stopping.on_stop(  # a signal during the write is honoured once it is complete (checkpoint.write)
        f"stopped by {{signal}}: {args.out_path} is written whole or not at all; run the same command to finish"
    )
    try:
        checkpoint.write(grown_ckpt, args.out_path)
    except OSError as e:  # a full disk says so in one line, and nothing is left half-written
        sys.exit(f"error: {e}")
    print(f"wrote {args.out_path}" + ("; next: python train.py configs/phase2.py" if args.recipe else ""))


if __name__ == "__main__":
    main()

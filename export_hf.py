"""
Export a checkpoint as a standard Hugging Face `llama` model directory.

    python export_hf.py --ckpt out/phase2 --out hf/mtlm-200m [--dtype bfloat16] [--eval results.json]
    python export_hf.py --ckpt out/phase2 --out hf/mtlm-200m --push_to_hub user/mtlm-200m

The export is plain LlamaForCausalLM: transformers loads it without trust_remote_code, and so does every
tool that reads Llama checkpoints (vLLM, llama.cpp's convert_hf_to_gguf.py). model.py already uses
transformers' parameter names, so the weights are a copy; the work is in the files around them:
config.json, generation_config.json, a tokenizer.json converted from our tiktoken ranks, a model card.

The way back, `hf:DIR` wherever a checkpoint is named, is a checkpoint *reader* and lives in checkpoint.py
(import_hf), with every other way a checkpoint is read.
"""

import stopping

# first of all, before torch takes a second or two to import: a signal meanwhile ends in one line too
if __name__ == "__main__":
    stopping.stop_on_signals("stopped by {signal}: nothing was written (an export is written whole or not at all)")

import argparse
import json
import os
import sys

import torch

import checkpoint
from common import atomic_write, log
from data import load_meta
from model import LLaMA, ModelConfig
from tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# -----------------------------------------------------------------------------------------------
# Tokenizer: tiktoken ranks -> a byte-level BPE tokenizer.json


def hf_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` that encodes every text as `tokenizer` does (special-token strings aside:
    HF matches them in text, our encode treats them as plain text).

    tiktoken keeps only ranks (byte string -> id); a HF BPE also needs the merge list. transformers'
    TikTokenConverter recovers it from the ranks (each token is a merge of two lower-ranked tokens), spells
    the vocab in GPT-2's byte-to-unicode alphabet, and splits words with the encoding's own regex (GPT-2's
    for gpt2, GPT-4's for our rustbpe BPE), so the pieces are tiktoken's exactly."""
    if tokenizer.kind == "hf":
        return tokenizer.enc
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = tokenizer.enc

    class Converter(TikTokenConverter):
        # the library reads ranks from a file through tiktoken's loader, which caches every path it reads
        # in TIKTOKEN_CACHE_DIR (a stale entry would silently give another tokenizer): hand them over instead
        def load_tiktoken_bpe(self, _):
            return enc._mergeable_ranks

        def extract_vocab_merges_from_model(self, _):
            vocab, merges = super().extract_vocab_merges_from_model(None)
            # special tokens join the vocab under their own ids (cl100k's are not contiguous), so that the
            # converter's add_special_tokens finds them instead of appending new ids
            return vocab | enc._special_tokens, merges

    return Converter(pattern=enc._pat_str, extra_special_tokens=enc._special_tokens).converted()


def tokenizer_config(tokenizer, hf_tok, max_len):
    """tokenizer_config.json: the class to load (the generic fast tokenizer, not Llama's sentencepiece one)
    and the special tokens by name. Our models never saw a BOS, so none is added unless the model brought one."""

    def name(i):
        return hf_tok.id_to_token(i) if i is not None else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tokenizer.bos_id),
        "eos_token": name(tokenizer.eot_id),
        "add_bos_token": tokenizer.bos_id is not None,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }


# -----------------------------------------------------------------------------------------------
# Model: config.json and weights


def hf_config(model_args, tokenizer, dtype):
    config = ModelConfig(**model_args)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.n_embd // config.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        # transformers >= 5 reads rope_parameters; older versions and other tools read rope_theta
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eot_id,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # the key was renamed in transformers 5
    }


def export_weights(state_dict, tie, dtype):
    """Our state dict is LlamaForCausalLM's. A tied lm_head is the embedding itself: transformers leaves
    it out of the file (safetensors cannot hold two names for one tensor) and ties it again on load."""
    return {
        k: v.detach().to(DTYPES[dtype]).contiguous()
        for k, v in state_dict.items()
        if not (tie and k == "lm_head.weight")
    }


# -----------------------------------------------------------------------------------------------
# Model card


def model_card(ckpt, repo, eval_results=None):
    config = ModelConfig(**ckpt["model_args"])
    with torch.device("meta"):
        model = LLaMA(config)
    history = ckpt.get("history") or []
    trained = sum(e.get("tokens") or 0 for e in history if e.get("event") == "train")
    data = list(dict.fromkeys(e["data_dir"] for e in history if e.get("data_dir")))
    tok = ckpt["tokenizer"]
    tok_name = {
        "tiktoken": f"tiktoken `{tok.get('name')}`",
        "bpe": f"byte-level BPE trained with rustbpe (`{tok.get('name')}`)",
        "hf": "the imported model's own tokenizer.json",
    }[tok["kind"]]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [llama, mtlm]",
        "---",
        "",
        f"# {os.path.basename(repo.rstrip('/'))}",
        "",
        "A Llama-architecture language model exported by mtlm (a nanoGPT-style trainer whose models grow by layer "
        "stacking). It is a standard `llama` model: transformers loads it without `trust_remote_code`.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {model.num_params():,} ({model.num_params(non_embedding=True):,} non-embedding) |",
        f"| layers | {config.n_layer} |",
        f"| hidden size | {config.n_embd} |",
        (
            f"| attention heads | {config.n_head} query, {config.n_kv_head} key/value "
            f"(head dim {config.n_embd // config.n_head}) |"
        ),
        f"| MLP | SwiGLU, {config.intermediate_size} hidden |",
        f"| normalization | RMSNorm (pre-norm), eps {config.norm_eps:g} |",
        f"| position | RoPE, theta {config.rope_theta:g}; trained context {config.block_size} |",
        f"| vocabulary | {config.vocab_size} ({tok_name}) |",
        f"| tied embeddings | {'yes' if config.tie_embeddings else 'no'} |",
        "",
        "## Training",
        "",
        f"Tokens trained: {trained:,}"
        + (
            " (in this repository's runs; an imported model's pretraining is not counted)"
            if any(e.get("event") == "import" for e in history)
            else ""
        )
        + ".",
        "",
        "Data: " + (", ".join(f"`{d}`" + data_sources(d) for d in data) if data else "not recorded") + ".",
        "",
    ]
    if history:
        lines += ["### History (oldest first)", "", "| # | event | details |", "|---|---|---|"]
        for i, e in enumerate(history):
            details = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) or (isinstance(v, int) and v >= 10**7) else f"{k}={v}"
                for k, v in e.items()
                if k != "event"
            )
            lines.append(f"| {i} | {e.get('event', '?')} | {details} |")
        lines.append("")
    if eval_results:
        lines += [
            "## Evaluation (zero-shot, log-likelihood multiple choice)",
            "",
            "| task | metric | value | stderr | n |",
            "|---|---|---|---|---|",
        ]
        for task, metrics in sorted(eval_results.items()):
            for metric, value in metrics.items():
                if metric.endswith("_stderr") or metric == "n" or not isinstance(value, (int, float)):
                    continue
                err = metrics.get(f"{metric}_stderr")
                lines.append(
                    f"| {task} | {metric} | {value:.4f} | {'' if err is None else f'{err:.4f}'} | "
                    f"{metrics.get('n', '')} |"
                )
        lines.append("")
    lines += [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        'ids = tokenizer("The for statement", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=50, do_sample=False)",
        "print(tokenizer.decode(out[0]))",
        "```",
        "",
    ]
    return "\n".join(lines)


def data_sources(data_dir):
    """' (source specs and weights)' from a prepared data dir's meta.json, when it is still on this machine."""
    try:
        meta = load_meta(data_dir)
        return (
            " ("
            + ", ".join(f"{s['spec']} {s['weight']:.0%}" for s in meta["sources"])
            + f"; {sum(meta['tokens'].values()):,} tokens)"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def read_eval(path):
    """An eval_mc.py results file: {"results": {task: {metric: value, metric_stderr: value, "n": count}}, ...}."""
    try:
        with open(path) as f:
            results = json.load(f)["results"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read eval results {path!r} (expected JSON with a 'results' object): {e}") from None
    if not isinstance(results, dict) or not all(isinstance(m, dict) for m in results.values()):
        raise ValueError(f"{path!r}: 'results' must map each task to a {{metric: value}} object")
    return results


# -----------------------------------------------------------------------------------------------
# Export


def export(ckpt, out, dtype="float32", eval_results=None, force=False, repo=None):
    """Write the HF directory `out` atomically: everything goes into a temp dir beside it, renamed at the end
    (common.atomic_write), so an interrupted export never leaves a directory that looks complete."""
    from safetensors.torch import save_file

    out = os.path.abspath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not force:
        raise FileExistsError(f"{out} exists and is not empty: pass --force to replace it")
    tokenizer = Tokenizer(ckpt["tokenizer"])
    model_args = ckpt["model_args"]
    if tokenizer.vocab_size > model_args["vocab_size"]:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model_args['vocab_size']}"
        )
    hf_tok = hf_tokenizer(tokenizer)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with atomic_write(out) as tmp:
        os.mkdir(tmp)

        def write_json(name, obj):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)
                f.write("\n")

        write_json("config.json", hf_config(model_args, tokenizer, dtype))
        gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.eot_id}
        write_json("generation_config.json", {k: v for k, v in gen.items() if v is not None})
        save_file(
            export_weights(ckpt["model"], model_args.get("tie_embeddings", False), dtype),
            os.path.join(tmp, "model.safetensors"),
            metadata={"format": "pt"},
        )
        hf_tok.save(os.path.join(tmp, "tokenizer.json"))
        write_json("tokenizer_config.json", tokenizer_config(tokenizer, hf_tok, model_args["block_size"]))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(ckpt, repo or out, eval_results))
    return out


def check_hub(repo):
    """Fail before any work when the push cannot happen: a malformed repo id, or no token."""
    import huggingface_hub
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except ValueError as e:
        raise ValueError(f"--push_to_hub {repo!r}: {e}") from None
    if huggingface_hub.get_token() is None:
        raise RuntimeError("no Hugging Face token: run `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN")


def push_to_hub(folder, repo):
    """Upload the exported folder as one commit. Needs a token (hf auth login, or HF_TOKEN) and network."""
    import huggingface_hub

    check_hub(repo)
    try:
        huggingface_hub.create_repo(repo, repo_type="model", exist_ok=True)
        info = huggingface_hub.upload_folder(
            repo_id=repo, folder_path=folder, repo_type="model", commit_message="Upload mtlm export (export_hf.py)"
        )
    except Exception as e:  # network, auth, permissions: all end the same way, with the cause shown
        raise RuntimeError(
            f"push to https://huggingface.co/{repo} failed ({type(e).__name__}: {e}); "
            f"the export in {folder} is complete: upload it later with `hf upload {repo} {folder}`"
        ) from None
    return info


# -----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\nThe export")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="checkpoint file, out_dir, or hf:DIR")
    p.add_argument("--out", required=True, help="the directory to write (must not exist or be empty, unless --force)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights on disk (default: %(default)s)")
    p.add_argument("--eval", metavar="JSON", help="eval_mc.py results to put in the model card")
    p.add_argument("--push_to_hub", metavar="REPO", help="also upload the directory to the hub as REPO (user/name)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    try:
        if args.push_to_hub:
            check_hub(args.push_to_hub)
        eval_results = read_eval(args.eval) if args.eval else None
        ckpt = checkpoint.load(args.ckpt)
        out = export(ckpt, args.out, args.dtype, eval_results, args.force, args.push_to_hub)
        log(f"wrote {out}")
        if args.push_to_hub:
            stopping.on_stop(
                f"stopped by {{signal}} during the upload: the export in {out} is complete; "
                f"upload it later with `hf upload {args.push_to_hub} {out}`"
            )
            print(push_to_hub(out, args.push_to_hub))
    except (OSError, ValueError, RuntimeError) as e:  # missing files, an existing --out, bad models, no network
        sys.exit(f"error: {e}")
    print(out)


if __name__ == "__main__":
    main()

"""
One tokenizer interface for every script.

Three kinds sit behind it:
  - "tiktoken": a named OpenAI encoding (gpt2/r50k_base, cl100k_base, o200k_base);
  - "bpe":      a byte-level BPE trained on our corpus with rustbpe, run through tiktoken;
  - "hf":       a Hugging Face tokenizer.json (imported Llama-family models bring their own).

A tokenizer is fully described by a small JSON-able `spec` (for "bpe" and "hf" the spec carries the
vocabulary itself), so a checkpoint stores its tokenizer and never depends on the data directory.
Beside the data, prepare_data.py writes the spec into meta.json and, for "bpe", the merge ranks as
`tokenizer.tiktoken` (tiktoken's own format: base64 token, space, rank).
"""
import base64
import json
import os

import tiktoken

EOT = "<|endoftext|>"
TIKTOKEN_NAMES = {"gpt2": "r50k_base", "r50k_base": "r50k_base", "cl100k_base": "cl100k_base", "o200k_base": "o200k_base"}
# GPT-4's split pattern (also rustbpe's default); see tiktoken's cl100k_base
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def ranks_to_text(ranks):
    return "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


def text_to_ranks(text):
    ranks = {}
    for line in text.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


class Tokenizer:
    def __init__(self, spec):
        self._spec = dict(spec)
        kind = spec.get("kind")
        self.kind = kind
        self.bos_id = None
        if kind == "tiktoken":
            name = spec["name"]
            if name not in TIKTOKEN_NAMES:
                raise ValueError(f"unknown tiktoken encoding {name!r}; choose one of {sorted(TIKTOKEN_NAMES)}")
            self.enc = tiktoken.get_encoding(TIKTOKEN_NAMES[name])
            self.eot_id = self.enc.eot_token
            self.vocab_size = self.enc.n_vocab
        elif kind == "bpe":
            ranks = text_to_ranks(spec["ranks"])
            specials = {k: int(v) for k, v in spec["special_tokens"].items()}
            self.enc = tiktoken.Encoding(name=spec.get("name", "rustbpe"), pat_str=spec["pattern"],
                                         mergeable_ranks=ranks, special_tokens=specials)
            self.eot_id = specials[EOT]
            self.vocab_size = self.enc.n_vocab
        elif kind == "hf":
            from tokenizers import Tokenizer as HFTokenizer
            self.enc = HFTokenizer.from_str(spec["tokenizer_json"])
            self.enc.no_padding()
            self.enc.no_truncation()
            self.eot_id = spec.get("eos_token_id")
            self.bos_id = spec.get("bos_token_id")
            self.vocab_size = self.enc.get_vocab_size(with_added_tokens=True)
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'tiktoken', 'bpe' or 'hf')")

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_tiktoken(cls, name):
        return cls({"kind": "tiktoken", "name": name})

    @classmethod
    def train_bpe(cls, texts, vocab_size):
        """Train a byte-level BPE with rustbpe on an iterator of strings. The last id is <|endoftext|>."""
        import rustbpe
        if vocab_size < 257 + 1:
            raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens + 1 special")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size - 1, pattern=SPLIT_PATTERN)
        ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
        return cls({"kind": "bpe", "name": f"rustbpe-{vocab_size}", "pattern": bpe.get_pattern(),
                    "ranks": ranks_to_text(ranks), "special_tokens": {EOT: len(ranks)}})

    def spec(self):
        """Self-contained description: Tokenizer(t.spec()) rebuilds an identical tokenizer."""
        return dict(self._spec)

    # --- files beside the data ----------------------------------------------------------------
    def save(self, data_dir):
        """Write tokenizer files into data_dir; returns the (small) spec to put in meta.json."""
        if self.kind != "bpe":
            return self.spec()
        tmp = os.path.join(data_dir, "tokenizer.tiktoken.tmp")
        with open(tmp, "w") as f:
            f.write(self._spec["ranks"])
        os.replace(tmp, os.path.join(data_dir, "tokenizer.tiktoken"))
        ref = {k: v for k, v in self._spec.items() if k != "ranks"}
        ref["file"] = "tokenizer.tiktoken"
        return ref

    @classmethod
    def load(cls, data_dir):
        """The tokenizer of a prepared data directory (reads meta.json)."""
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: run prepare_data.py first (or point at a prepared data dir)")
        with open(meta_path) as f:
            spec = json.load(f)["tokenizer"]
        if "file" in spec:
            with open(os.path.join(data_dir, spec["file"])) as f:
                spec = {k: v for k, v in spec.items() if k != "file"} | {"ranks": f.read()}
        return cls(spec)

    # --- use ----------------------------------------------------------------------------------
    def encode(self, text):
        """Text to ids; special-token strings in the text are treated as plain text."""
        if self.kind == "hf":
            return self.enc.encode(text, add_special_tokens=False).ids
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        if self.kind == "hf":
            return [e.ids for e in self.enc.encode_batch(list(texts), add_special_tokens=False)]
        return self.enc.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.enc.decode(list(ids)) if self.kind != "hf" else self.enc.decode(list(ids), skip_special_tokens=False)

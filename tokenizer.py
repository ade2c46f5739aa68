"""
One tokenizer interface for every script.

Three kinds sit behind it:
  - "tiktoken": a named OpenAI encoding (gpt2/r50k_base, cl100k_base, o200k_base);
  - "bpe":      a byte-level BPE trained on our corpus with rustbpe, run through tiktoken;
  - "hf":       a Hugging Face tokenizer.json (imported Llama-family models bring their own).

A tokenizer is fully described by a small JSON-able `spec` (for "bpe" and "hf" the spec carries the
vocabulary itself), so a checkpoint stores its tokenizer and never depends on the data directory.
This module reads no file of ours: data.py keeps the spec in meta.json (a "bpe" spec's ranks go beside it
as tokenizer.tiktoken, in the format of ranks_to_text), checkpoint.py keeps it in the checkpoint.
It does read a Hugging Face directory's tokenizer.json (tokenizer_spec_from_hf), the one format that
arrives with its own tokenizer.
"""

import base64
import json
import os
import re

import numpy as np
import tiktoken

EOT = "<|endoftext|>"
# The tiktoken encodings by the names we accept: (tiktoken's name, vocab size). The sizes are known up front so
# that prepare_data.py can refuse a token dtype that is too small before it downloads anything.
TIKTOKEN = {
    "gpt2": ("r50k_base", 50257),
    "r50k_base": ("r50k_base", 50257),
    "cl100k_base": ("cl100k_base", 100277),
    "o200k_base": ("o200k_base", 200019),
}
# GPT-4's split pattern (also rustbpe's default); see tiktoken's cl100k_base
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def ranks_to_text(ranks):
    """Merge ranks in tiktoken's file format: one `base64(token) rank` line per token, by rank."""
    return "".join(
        f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    )


def text_to_ranks(text):
    ranks = {}
    for line in text.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def prepended_bos(ids_with_specials, ids_plain):
    """The id a tokenizer puts in front of every text by default (its BOS), or None. Decided on one text encoded
    with and without the special tokens, because that is what the tokenizer does, whatever its config calls BOS:
    Llama 2 and TinyLlama prepend <s>, SmolLM2 and GPT-2 prepend nothing."""
    n = len(ids_with_specials)
    if n > len(ids_plain) and ids_with_specials[1:] == ids_plain[: n - 1]:
        return ids_with_specials[0]
    return None


class Tokenizer:
    def __init__(self, spec):
        self._spec = dict(spec)
        kind = spec.get("kind")
        self.kind = kind
        self.bos_id = None
        if kind == "tiktoken":
            name = spec["name"]
            if name not in TIKTOKEN:
                raise ValueError(f"unknown tiktoken encoding {name!r}; choose one of {sorted(TIKTOKEN)}")
            self.enc = tiktoken.get_encoding(TIKTOKEN[name][0])
            self.eot_id = self.enc.eot_token
            self.vocab_size = self.enc.n_vocab
        elif kind == "bpe":
            ranks = text_to_ranks(spec["ranks"])
            specials = {k: int(v) for k, v in spec["special_tokens"].items()}
            self.enc = tiktoken.Encoding(
                name=spec.get("name", "rustbpe"),
                pat_str=spec["pattern"],
                mergeable_ranks=ranks,
                special_tokens=specials,
            )
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
            raise ValueError(
                f"vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens + 1 special"
            )
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size - 1, pattern=SPLIT_PATTERN)
        ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
        return cls(
            {
                "kind": "bpe",
                "name": f"rustbpe-{vocab_size}",
                "pattern": bpe.get_pattern(),
                "ranks": ranks_to_text(ranks),
                "special_tokens": {EOT: len(ranks)},
            }
        )

    @classmethod
    def from_hf(cls, model_dir):
        """The tokenizer of a Hugging Face model directory (its tokenizer.json)."""
        return cls(tokenizer_spec_from_hf(model_dir))

    def spec(self):
        """Self-contained description: Tokenizer(t.spec()) rebuilds an identical tokenizer."""
        return dict(self._spec)

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
        return (
            self.enc.decode(list(ids)) if self.kind != "hf" else self.enc.decode(list(ids), skip_special_tokens=False)
        )

    def token_bytes(self):
        """The UTF-8 bytes of text each id stands for, as a numpy array over the vocabulary; special tokens stand
        for none (nanochat's count, behind its bits per byte). None for a Hugging Face tokenizer whose decoder is
        neither byte-level nor sentencepiece-style: its tokens' bytes are not known without decoding in context."""
        table = np.zeros(self.vocab_size, dtype=np.int64)
        if self.kind != "hf":
            specials = {self.enc.encode_single_token(t) for t in self.enc.special_tokens_set}
            for i in range(self.vocab_size):
                if i not in specials:
                    try:
                        table[i] = len(self.enc.decode_single_token_bytes(i))
                    except KeyError:  # an id the encoding leaves unused (cl100k_base has a few)
                        pass
            return table
        config = json.loads(self._spec["tokenizer_json"])
        decoder = json.dumps(config.get("decoder"), ensure_ascii=False)
        if '"ByteLevel"' in decoder:  # GPT-2's scheme: a vocabulary entry writes each byte as one character
            length = len
        elif "▁" in decoder or config["model"].get("byte_fallback"):

            def length(token):
                """sentencepiece's scheme: "▁" is a space, <0x0A> one raw byte. Its dummy prefix (the space put
                before each text and dropped when decoding) counts as a byte, one per document."""
                return 1 if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token) else len(token.replace("▁", " ").encode())
        else:
            return None
        added = self.enc.get_added_tokens_decoder()
        for i in range(self.vocab_size):
            if i in added:
                table[i] = 0 if added[i].special else len(added[i].content.encode())
            elif (token := self.enc.id_to_token(i)) is not None:
                table[i] = length(token)
        return table


def tokenizer_spec_from_hf(model_dir):
    """Our "hf" tokenizer spec for a Hugging Face model directory: its tokenizer.json, its end-of-sequence id
    (what generate stops at), and the BOS id only if its tokenizer prepends one (prepended_bos)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{model_dir}: no tokenizer.json (a fast tokenizer is needed; if it has only tokenizer.model, "
            "save one with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
        )
    with open(path) as f:
        text = f.read()
    tok = HFTokenizer.from_str(text)
    bos = prepended_bos(tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids)
    eos = None
    for name in ("generation_config.json", "config.json"):
        if eos is None and os.path.exists(os.path.join(model_dir, name)):
            with open(os.path.join(model_dir, name)) as f:
                eos = json.load(f).get("eos_token_id")
    if isinstance(eos, list):  # several stop tokens (Llama 3 instruct): our sampler stops at one, the first
        eos = eos[0] if eos else None
    return {"kind": "hf", "tokenizer_json": text, "bos_token_id": bos, "eos_token_id": eos}

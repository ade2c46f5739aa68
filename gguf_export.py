"""
GGUF: llama.cpp's one-file format (hyperparameters, tokenizer and weights together), which llama.cpp's own tools,
llama-cpp-python, ollama and LM Studio run. export_hf.py --gguf TYPE writes one beside the Hugging Face files,
through the `gguf` package (the llama.cpp project's own writer), in llama.cpp's "llama" architecture.

Three things differ from the Hugging Face layout, and each is the lesson of a function below:
  - names: llama.cpp's (token_embd, blk.N.attn_q, ...), which gguf's own table maps from transformers' names;
  - RoPE (permute_for_rope): llama.cpp's llama rotates adjacent pairs of a head, (x_0, x_1), (x_2, x_3), ...,
    where we (and transformers) rotate its two halves, (x_i, x_i+D/2). Both give the same attention scores if
    the query and key rows are reordered so that each of our pairs becomes adjacent;
  - the tokenizer (gguf_vocab): llama.cpp does not run a tokenizer.json. It reads the vocabulary and the merges,
    and splits text into words with a regex it has compiled in, chosen by name (tokenizer.ggml.pre). The file
    can only name a rule llama.cpp has, so a tokenizer whose split rule is not one of them is refused.

Weights are stored as llama.cpp's converter (convert_hf_to_gguf.py) stores them: norms in f32, every matrix in
TYPE. q8_0 is blocks of 32 weights sharing one f16 scale (8.5 bits a weight); a matrix whose rows do not divide
into blocks of 32 falls back to f16, as the converter's does.
"""

import json

import torch

from model import LLaMA, ModelConfig
from tokenizer import SPLIT_PATTERN

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

# Our split rules, as a tokenizer.json's pre_tokenizer spells them (tiktoken's pattern for our own kinds, see
# export_hf.hf_tokenizer), each with the llama.cpp pre-tokenizer type (tokenizer.ggml.pre) that splits text the
# same way. llama.cpp's own table is src/llama-vocab.cpp (type -> regex) and unicode.cpp (a hand-written matcher
# for the gpt-2 and llama-bpe regexes). Patterns that differ in spelling only are listed separately: possessive
# quantifiers (?+, ++), "\s++$|...|\s" for "...|\s+" and "\s*[\r\n]" for "\s*[\r\n]+" match the same pieces.
GPT2_BYTELEVEL = "ByteLevel"  # transformers' GPT-2 (ByteLevel with use_regex): GPT-2's regex, built in
PRE_TOKENIZERS = {
    # GPT-2 / r50k_base: recent tiktoken (0.14 here) spells it with possessive quantifiers and \s++$, older releases
    # as GPT-2 did
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""": "gpt-2",
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""": "gpt-2",
    GPT2_BYTELEVEL: "gpt-2",
    # GPT-4's pattern: rustbpe's default, so our own BPE's, and Llama 3's spelling of it (cl100k_base's in older
    # tiktoken). Recent tiktoken's cl100k_base adds "\s++$", which keeps "\n  " at the end of a text whole where
    # llama-bpe splits it in two: no type has that rule, so it is refused.
    SPLIT_PATTERN: "llama-bpe",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+""": "llama-bpe",
    # o200k_base (GPT-4o): llama.cpp's gpt-4o type names this exact regex, and runs an ASCII approximation of its
    # upper/lower-case classes (docs/interop.md says where that differs)
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"""
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"""
    r"""\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "gpt-4o",
    # SmolLM / StarCoder (tokenizer.json: Digits(individual_digits) then ByteLevel): each digit alone, then GPT-2's
    r"\p{N} " + GPT2_BYTELEVEL: "smollm",
}


def split_rule(pre_tokenizer):
    """A tokenizer.json pre_tokenizer as one string, the key of PRE_TOKENIZERS: the regexes it splits with, in order
    ("\\p{N}" for Digits, GPT2_BYTELEVEL for a ByteLevel that splits). None for steps no llama.cpp type has."""
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer and pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    rule = []
    for step in steps:
        kind = step and step["type"]
        if kind == "Split" and "Regex" in step["pattern"] and step["behavior"] == "Isolated" and not step["invert"]:
            rule.append(step["pattern"]["Regex"])
        elif kind == "Digits" and step["individual_digits"]:
            rule.append(r"\p{N}")
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            if step.get("use_regex", True):
                rule.append(GPT2_BYTELEVEL)
        else:
            return None
    return " ".join(rule)


def gguf_vocab(tokenizer, hf_tok, n_vocab):
    """The tokenizer as llama.cpp's byte-level BPE ("gpt2" model) reads it: {key: value} for tokenizer.ggml.*.

    hf_tok is export_hf.hf_tokenizer's, the tokenizer.json export_hf.py writes: it already spells each token in
    GPT-2's byte-to-unicode alphabet and lists the merges in rank order, exactly what llama.cpp reads. Ids the
    tokenizer leaves unused up to the model's (padded) vocabulary get placeholder tokens of type UNUSED, so that
    the token list and the embedding have the same length, as llama.cpp requires."""
    import gguf

    config = json.loads(hf_tok.to_str())
    model = config["model"]
    decoder, normalizer = config.get("decoder"), config.get("normalizer")
    if model["type"] != "BPE" or normalizer or '"ByteLevel"' not in json.dumps(decoder) or model.get("byte_fallback"):
        found = (
            f"{model['type']} model, normalizer {(normalizer or {}).get('type')}, decoder {(decoder or {}).get('type')}"
        )
        raise ValueError(
            f"the tokenizer is not a byte-level BPE ({found}; sentencepiece-style?): the GGUF export writes byte-level "
            "BPE only; llama.cpp's convert_hf_to_gguf.py converts sentencepiece tokenizers from their tokenizer.model"
        )
    rule = split_rule(config.get("pre_tokenizer"))
    if rule not in PRE_TOKENIZERS:
        raise ValueError(
            f"no llama.cpp pre-tokenizer type splits text as this tokenizer does "
            f"({rule or json.dumps(config.get('pre_tokenizer'))}): a GGUF would tokenize differently from training"
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in config["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    # Our models never saw a BOS: llama.cpp must prepend none (it would for llama-bpe by default). It still wants a
    # BOS id; <|endoftext|> is GPT-2's own choice (its config's bos_token_id).
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
    return {
        "model": "gpt2",
        "pre": PRE_TOKENIZERS[rule],
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "bos": bos,
        "eos": tokenizer.eot_id,
        "add_bos": tokenizer.bos_id is not None,
    }


def permute_for_rope(w, n_heads):
    """Reorder the output rows of q_proj or k_proj, head by head, from the "rotate half" layout (a head's rows
    0..D/2-1 pair with D/2..D-1) to llama.cpp's adjacent pairs: new row 2i is old row i, new row 2i+1 is old row
    i + D/2. Query and key get the same order, so their dot products (the attention scores) are unchanged."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def gguf_tensors(state_dict, config):
    """(llama.cpp name, float32 array) for every weight, in model.py's order (an import's come sorted by name). A
    tied lm_head is left out: llama.cpp reads token_embd in its place when there is no output.weight."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layer)
    with torch.device("meta"):
        order = list(LLaMA(config).state_dict())
    for name in order:
        if config.tie_embeddings and name == "lm_head.weight":
            continue
        w = state_dict[name].detach().float().cpu()
        if name.endswith("q_proj.weight"):
            w = permute_for_rope(w, config.n_head)
        elif name.endswith("k_proj.weight"):
            w = permute_for_rope(w, config.n_kv_head)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"no llama.cpp tensor for {name!r}")
        yield gguf_name, w.numpy()


def write_gguf(path, ckpt, tokenizer, hf_tok, gguf_type, name):
    """Write the checkpoint `ckpt` as a GGUF file of weight type gguf_type (GGUF_TYPES) to path."""
    import gguf

    config = ModelConfig(**ckpt["model_args"])
    vocab = gguf_vocab(tokenizer, hf_tok, config.vocab_size)  # first: a refused tokenizer writes nothing
    quant = gguf.GGMLQuantizationType[gguf_type.upper()]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType[("ALL_" if gguf_type == "f32" else "MOSTLY_") + gguf_type.upper()])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.block_size)
    w.add_embedding_length(config.n_embd)
    w.add_block_count(config.n_layer)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.n_head)
    w.add_head_count_kv(config.n_kv_head)
    w.add_rope_dimension_count(config.n_embd // config.n_head)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["token_types"])
    w.add_token_merges(vocab["merges"])
    if vocab["bos"] is not None:
        w.add_bos_token_id(vocab["bos"])
    if vocab["eos"] is not None:  # an imported tokenizer may have none
        w.add_eos_token_id(vocab["eos"])
        w.add_eot_token_id(vocab["eos"])
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_eos_token(False)
    for tensor_name, data in gguf_tensors(ckpt["model"], config):
        qtype = quant if data.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms stay f32, as llama.cpp wants
        try:
            data = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # q8_0 needs rows that divide into blocks of 32
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(data, qtype)
        w.add_tensor(tensor_name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""export_hf.py --gguf: the GGUF read back with gguf's own reader, and run by llama.cpp itself (llama-cpp-python).

The writer's tests always run. Those against llama.cpp need llama-cpp-python, an optional dependency that builds
from source in 10-15 minutes (README, Tests); they skip without it. The models are trained a little first (a
random model's logits are near uniform, which says nothing about greedy choices or quantization error): our BPE
model is then grown by stacking, GPT-2's has tied embeddings, so both the grown and the tied paths are checked.
"""

import ctypes
import math
import os
import random

import numpy as np
import pytest
import torch
from test_export_hf import SAMPLE

import checkpoint
import export_hf
import gguf_export
import stack
from data import load_tokenizer, read_shard, shard_paths
from model import LLaMA, ModelConfig, apply_rope, rope_cache
from tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None,
    reason="llama-cpp-python is not installed (optional; README, Tests: pip install llama-cpp-python builds it)",
)


def pydoc_texts():
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())


def documents(n=1000):
    """n texts to tokenize: every pydoc topic whole (long, indented, trailing newlines), then their paragraphs, and
    test_export_hf's SAMPLE of unicode, emoji, whitespace runs, code and numbers."""
    topics = pydoc_texts()
    paragraphs = [p for t in topics for p in t.split("\n\n") if p.strip()]
    return SAMPLE + (topics + paragraphs)[: n - len(SAMPLE)]


def gpt2_tokenizer():
    try:
        return Tokenizer.from_tiktoken("gpt2")
    except Exception as e:  # needs the tiktoken cache (TIKTOKEN_CACHE_DIR) or the network
        pytest.skip(f"tiktoken's gpt2 encoding is unavailable here ({type(e).__name__})")


def train_briefly(tok, tokens, tie, steps, batch_size=8, seq_len=128, seed=0):
    """A 2-layer model trained for `steps` AdamW steps on random windows of `tokens`: enough for peaked logits."""
    args = dict(
        vocab_size=64 * math.ceil(tok.vocab_size / 64),
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        intermediate_size=128,
        block_size=256,
        rope_theta=10000.0,
        norm_eps=1e-5,
        tie_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LLaMA(ModelConfig(**args))
    opt = model.configure_optimizer(0.0, 3e-3, (0.9, 0.95), "cpu")
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        x = torch.stack([data[s : s + seq_len] for s in starts])
        y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts])
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    history = [dict(event="train", iters=steps, tokens=steps * batch_size * seq_len, val_loss=loss.item())]
    return dict(model=model.state_dict(), model_args=args, tokenizer=tok.spec(), history=history)


def grown(ckpt):
    """ckpt stacked to twice its depth, as stack.py grows a model."""
    args = dict(ckpt["model_args"], n_layer=2 * ckpt["model_args"]["n_layer"])
    copy_of = stack.layer_map("stack", ckpt["model_args"]["n_layer"], 2, 0)
    state = stack.grow_state_dict(ckpt["model"], copy_of, "stack", noise=0.0)
    history = ckpt["history"] + [dict(event="grow", method="stack", factor=2)]
    return dict(ckpt, model=state, model_args=args, history=history)


@pytest.fixture(scope="module", params=["bpe", "gpt2"])
def models(request, pydocs_data, tmp_path_factory):
    """(tokenizer, checkpoint, our model in float32, {type: GGUF path}): our BPE (pydocs_data's, 512 tokens), its
    model grown from 2 layers to 4; GPT-2's tokenizer with tied embeddings."""
    if request.param == "bpe":
        tok = load_tokenizer(pydocs_data)
        tokens = np.concatenate([read_shard(p) for p in shard_paths(pydocs_data, "train")])
        ckpt = grown(train_briefly(tok, tokens, tie=False, steps=150))
    else:
        tok = gpt2_tokenizer()
        tokens = [i for ids in tok.encode_batch(pydoc_texts()) for i in ids + [tok.eot_id]]
        ckpt = train_briefly(tok, tokens, tie=True, steps=40, batch_size=4, seq_len=64)
    out = export_hf.export(ckpt, str(tmp_path_factory.mktemp(request.param) / "f32"), gguf_type="f32")
    paths = {"f32": os.path.join(out, "model-f32.gguf"), "q8_0": os.path.join(out, "model-q8_0.gguf")}
    gguf_export.write_gguf(paths["q8_0"], ckpt, tok, export_hf.hf_tokenizer(tok), "q8_0", "q8_0")  # no 2nd HF copy
    return tok, ckpt, checkpoint.build_model(ckpt, dtype=torch.float32).eval(), paths


# -----------------------------------------------------------------------------------------------
# The file, read back with gguf's reader


def fields(reader):
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def unpermute_for_rope(w, n_heads):
    """The inverse of gguf_export.permute_for_rope: llama.cpp's adjacent pairs back to the two halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def read_tensors(reader, config):
    """{our name: float32 tensor} from a GGUF, de-quantized and un-permuted."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layer)
    with torch.device("meta"):
        ours = list(LLaMA(config).state_dict())
    by_gguf = {names.get_name(n, try_suffixes=(".weight",)): n for n in ours}
    out = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        name = by_gguf[t.name]
        if name.endswith("q_proj.weight"):
            w = unpermute_for_rope(w, config.n_head)
        elif name.endswith("k_proj.weight"):
            w = unpermute_for_rope(w, config.n_kv_head)
        out[name] = w
    return out


def test_every_key_and_tensor_reads_back(models):
    tok, ckpt, _, paths = models
    config = ModelConfig(**ckpt["model_args"])
    reader = gguf.GGUFReader(paths["f32"])
    kv = fields(reader)
    assert {k: v for k, v in kv.items() if not k.startswith(("tokenizer.ggml.token", "tokenizer.ggml.merges"))} == {
        "general.architecture": "llama",
        "general.name": "f32",
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "llama.vocab_size": config.vocab_size,
        "llama.context_length": config.block_size,
        "llama.embedding_length": config.n_embd,
        "llama.block_count": config.n_layer,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.n_head,
        "llama.attention.head_count_kv": config.n_kv_head,
        "llama.rope.dimension_count": config.n_embd // config.n_head,
        "llama.rope.freq_base": config.rope_theta,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(config.norm_eps),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe" if tok.kind == "bpe" else "gpt-2",
        "tokenizer.ggml.bos_token_id": tok.eot_id,
        "tokenizer.ggml.eos_token_id": tok.eot_id,
        "tokenizer.ggml.eot_token_id": tok.eot_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }
    # the vocabulary: each token is its bytes in GPT-2's byte-to-unicode alphabet, then placeholders up to the
    # embedding's rows; <|endoftext|> is a control token; one merge for every token that is not a single byte
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config.vocab_size
    for i in range(tok.vocab_size):
        if i != tok.eot_id:
            assert bytes(to_byte[c] for c in tokens[i]) == tok.enc.decode_single_token_bytes(i)
    assert tokens[tok.eot_id] == "<|endoftext|>" and types[tok.eot_id] == gguf.TokenType.CONTROL
    assert set(types[: tok.vocab_size]) - {gguf.TokenType.CONTROL} == {gguf.TokenType.NORMAL}
    assert set(types[tok.vocab_size :]) <= {gguf.TokenType.UNUSED}
    merges = kv["tokenizer.ggml.merges"]
    assert all(len(m.split(" ")) == 2 for m in merges)
    assert {"".join(m.split(" ")) for m in merges} == set(tokens[: tok.vocab_size]) - set(tokens[:256]) - {
        "<|endoftext|>"
    }
    # every tensor, un-permuted, equals ours; a tied lm_head is not stored
    back = read_tensors(reader, config)
    expected = {k: v for k, v in ckpt["model"].items() if not (config.tie_embeddings and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for name, w in expected.items():
        assert torch.equal(back[name], w.float()), name
    with open(os.path.join(os.path.dirname(paths["f32"]), "README.md")) as f:  # the model card says how to run it
        assert 'llama-completion -m model-f32.gguf -no-cnv -p "The for statement"' in f.read()


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_weight_types(gguf_type, pydocs_data, tmp_path):
    """f16 and bf16 round each weight as torch does; q8_0 keeps each weight within half a step of its block's
    scale (step = max |w| / 127 over 32 weights; stored in f16, which can add 127 steps x 2^-11); norms stay f32."""
    tok = load_tokenizer(pydocs_data)
    ckpt = grown(train_briefly(tok, read_shard(shard_paths(pydocs_data, "train")[0]), tie=False, steps=2))
    config = ModelConfig(**ckpt["model_args"])
    out = export_hf.export(ckpt, str(tmp_path / "hf"), gguf_type=gguf_type)
    reader = gguf.GGUFReader(os.path.join(out, f"model-{gguf_type}.gguf"))
    qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
    assert {t.name: t.tensor_type for t in reader.tensors if t.name.endswith("norm.weight")} == dict.fromkeys(
        [f"blk.{i}.{n}.weight" for i in range(config.n_layer) for n in ("attn_norm", "ffn_norm")]
        + ["output_norm.weight"],
        gguf.GGMLQuantizationType.F32,
    )
    assert {t.tensor_type for t in reader.tensors if not t.name.endswith("norm.weight")} == {qtype}
    for name, w in read_tensors(reader, config).items():
        ref = ckpt["model"][name].float()
        if w.dim() == 1:
            assert torch.equal(w, ref), name
        elif gguf_type == "f16":
            assert torch.equal(w, ref.half().float()), name
        elif gguf_type == "bf16":
            assert torch.equal(w, ref.bfloat16().float()), name
        else:
            blocks, err = ref.reshape(-1, 32), (w - ref).reshape(-1, 32).abs()
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            assert (err <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name
            assert err.max() > 0  # really quantized


def test_q8_0_falls_back_to_f16_where_rows_do_not_divide_into_blocks(pydocs_data, tmp_path):
    """n_embd 48: every matrix that reads the residual stream has rows of 48, not a multiple of q8_0's 32."""
    tok = load_tokenizer(pydocs_data)
    args = dict(vocab_size=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=48, intermediate_size=64, block_size=64)
    ckpt = dict(model=LLaMA(ModelConfig(**args)).state_dict(), model_args=args, tokenizer=tok.spec())
    out = export_hf.export(ckpt, str(tmp_path / "hf"), gguf_type="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(os.path.join(out, "model-q8_0.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of intermediate_size, 64
    assert {types[n] for n in types if n != "blk.0.ffn_down.weight" and not n.endswith("norm.weight")} == {"F16"}


def test_rope_permutation_keeps_attention_scores():
    """The lesson of permute_for_rope, checked without llama.cpp: rotating adjacent pairs (llama.cpp's llama) of the
    permuted q/k projections gives the attention scores that rotating halves (ours) gives of the originals."""
    n_head, head_dim, n_embd, T = 4, 16, 64, 12
    torch.manual_seed(0)
    wq, wk, x = torch.randn(n_head * head_dim, n_embd), torch.randn(n_head * head_dim, n_embd), torch.randn(T, n_embd)
    cos, sin = rope_cache(head_dim, T, 10000.0)

    def rotate_adjacent(v):  # (T, H, D): pairs (v_2i, v_2i+1) rotated by angle i
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)

    def scores(q, k):
        return torch.einsum("thd,shd->hts", q, k)

    ours = scores(*(apply_rope((x @ w.T).view(1, T, n_head, head_dim), cos, sin)[0] for w in (wq, wk)))
    theirs = scores(
        *(rotate_adjacent((x @ gguf_export.permute_for_rope(w, n_head).T).view(T, n_head, head_dim)) for w in (wq, wk))
    )
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(scores(*(rotate_adjacent((x @ w.T).view(T, n_head, head_dim)) for w in (wq, wk))), ours)


@pytest.mark.parametrize("models", ["bpe"], indirect=True)
def test_hf_import_gives_the_same_gguf(models, tmp_path):
    """hf:DIR (our own export read back): the tokenizer comes from tokenizer.json, and the GGUF is the same."""
    _, _, _, paths = models
    back = checkpoint.load(f"hf:{os.path.dirname(paths['f32'])}")
    assert back["tokenizer"]["kind"] == "hf"
    out = export_hf.export(back, str(tmp_path / "f32"), gguf_type="f32")
    a, b = gguf.GGUFReader(paths["f32"]), gguf.GGUFReader(os.path.join(out, "model-f32.gguf"))
    assert fields(a) == fields(b)
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors, strict=True))


def hf_tokenizer_json(pre_tokenizer, decoder="ByteLevel"):
    """A small byte-level BPE tokenizer.json trained on pydoc topics with the given pre-tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoders.ByteLevel() if decoder == "ByteLevel" else decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(pydoc_texts(), trainer)
    return tk.to_str()


def hf_ckpt(tokenizer_json):
    tok = Tokenizer({"kind": "hf", "tokenizer_json": tokenizer_json, "eos_token_id": 0, "bos_token_id": None})
    args = dict(vocab_size=640, n_layer=1, n_head=2, n_kv_head=2, n_embd=64, intermediate_size=64, block_size=64)
    return tok, dict(model=LLaMA(ModelConfig(**args)).state_dict(), model_args=args, tokenizer=tok.spec())


@pytest.mark.parametrize(
    "pattern",
    [r"\w+|\s+|[^\w\s]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+|x"],
)
def test_unknown_split_rule_is_refused_in_one_line(pattern, tmp_path, capsys):
    """A BPE whose split pattern no llama.cpp type has (even one alternative more than GPT-2's): one line naming
    the pattern, and nothing written, not even the Hugging Face files."""
    bpe = Tokenizer.train_bpe(pydoc_texts()[:20], 300)
    ckpt = train_briefly(Tokenizer(dict(bpe.spec(), pattern=pattern)), list(range(300)) * 2, tie=True, steps=1)
    checkpoint.save(ckpt, str(tmp_path / "ck"))
    with pytest.raises(SystemExit) as e:
        export_hf.main(["--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"), "--gguf", "q8_0"])
    message = str(e.value)
    assert message.startswith("error: no llama.cpp pre-tokenizer type") and pattern in message
    assert "\n" not in message and not os.path.exists(tmp_path / "hf")
    export_hf.main(["--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")])  # the HF export alone works
    assert os.path.isdir(tmp_path / "hf") and capsys.readouterr().out.strip() == str(tmp_path / "hf")


def test_sentencepiece_style_tokenizer_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    _, ckpt = hf_ckpt(hf_tokenizer_json(pre_tokenizers.Metaspace(), decoder="Metaspace"))
    with pytest.raises(ValueError, match="not a byte-level BPE .BPE model, normalizer None, decoder Metaspace"):
        export_hf.export(ckpt, str(tmp_path / "hf"), gguf_type="f32")
    assert not os.path.exists(tmp_path / "hf")


# -----------------------------------------------------------------------------------------------
# Against llama.cpp


def llama(path, **kw):
    return llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, seed=0, verbose=False, **kw)


def pieces(llm, ids):
    """The text of ids as llama.cpp prints it, piece by piece (llama-cli does the same). Not llama-cpp-python's
    detokenize: it cuts each piece at 32 bytes, and GPT-2 has longer tokens ("=" * 64)."""
    vocab, buf = llama_cpp.llama_model_get_vocab(llm.model), ctypes.create_string_buffer(256)
    out = b""
    for i in ids:
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, False)
        assert 0 <= n <= len(buf)
        out += buf.raw[:n]
    return out


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_us(models):
    """Token ids identical on 1,000 documents, and llama.cpp decodes them back to the text."""
    tok, _, _, paths = models
    vocab = llama(paths["f32"], vocab_only=True)
    docs = documents()
    ours = tok.encode_batch(docs)
    for text, ids in zip(docs, ours, strict=True):
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == ids, text[:200]
        assert pieces(vocab, ids) == text.encode()


@needs_llama_cpp
@pytest.mark.parametrize("pre_tokenizer", ["smollm", "split"])
def test_llama_cpp_tokenizes_hf_imports_like_us(pre_tokenizer, tmp_path):
    """hf:DIR tokenizers: SmolLM's kind (Digits, then ByteLevel's GPT-2 regex) and Llama 3's (a Split regex)."""
    from tokenizers import Regex, pre_tokenizers

    from tokenizer import SPLIT_PATTERN

    if pre_tokenizer == "smollm":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)])
    else:
        split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
        pre = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok, ckpt = hf_ckpt(hf_tokenizer_json(pre))
    out = export_hf.export(ckpt, str(tmp_path / "hf"), gguf_type="f32")
    path = os.path.join(out, "model-f32.gguf")
    expected = "smollm" if pre_tokenizer == "smollm" else "llama-bpe"
    assert fields(gguf.GGUFReader(path))["tokenizer.ggml.pre"] == expected
    vocab = llama(path, vocab_only=True)
    for text in documents(300):
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text[:200]


def prompts(tok, n, length, seed):
    """n windows of `length` tokens at random places in the pydoc topics, as tok encodes them."""
    ids = [i for d in tok.encode_batch(pydoc_texts()) for i in d + [tok.eot_id]]
    rng = random.Random(seed)
    return [ids[s : s + length] for s in (rng.randrange(len(ids) - length) for _ in range(n))]


def llama_cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


@needs_llama_cpp
def test_llama_cpp_f32_logits_and_greedy_match_ours(models):
    """f32: logits within 1e-3 of ours on 3 prompts of 120 tokens, and 64 greedy tokens identical. The KV cache in
    f32 too: llama.cpp's default, f16, moves these logits by up to ~1e-3 by itself."""
    tok, _, model, paths = models
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama(paths["f32"], logits_all=True, type_k=f32, type_v=f32)
    generator = llama(paths["f32"], type_k=f32, type_v=f32)  # without logits_all: only the last position's
    for ids in prompts(tok, 3, 120, seed=1):
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0][0]
        diff = (llama_cpp_logits(llm, ids) - ours).abs().max().item()
        print(f"{tok.kind}: max |logit difference| {diff:.2e} (logits up to {ours.abs().max().item():.1f})")
        assert diff < 1e-3, diff
        theirs = []
        for t in generator.generate(ids, temp=0.0, repeat_penalty=1.0):
            theirs.append(t)
            if len(theirs) == 64:
                break
        greedy = [int(t) for t in model.generate(torch.tensor([ids]), 64, temperature=0)]
        assert theirs == greedy


@needs_llama_cpp
def test_llama_cpp_q8_0_agrees_with_ours(models):
    """q8_0: >= 95% of greedy next-token choices equal to ours (f32) over 1,000 positions, mean KL <= 0.01 nats."""
    tok, _, model, paths = models
    llm = llama(paths["q8_0"], logits_all=True)
    agree, kl = [], []
    for ids in prompts(tok, 4, 250, seed=2):
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0][0].log_softmax(-1)
        theirs = llama_cpp_logits(llm, ids).log_softmax(-1)
        agree.append(ours.argmax(-1) == theirs.argmax(-1))
        kl.append((ours.exp() * (ours - theirs)).sum(-1))
    agree, kl = torch.cat(agree).float().mean().item(), torch.cat(kl).mean().item()
    assert agree >= 0.95 and kl <= 0.01, (agree, kl)
    assert kl > 0  # the weights really are quantized
    print(f"{tok.kind} q8_0: greedy agreement {agree:.4f}, mean KL {kl:.2e} nats")

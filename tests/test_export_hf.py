"""export_hf.py against transformers: export -> AutoModelForCausalLM / AutoTokenizer, and hf:DIR imports back."""

import json
import os
import random

import pytest
import torch
from conftest import TINY, run_here

import checkpoint
import export_hf
from data import load_tokenizer
from model import LLaMA, ModelConfig
from tokenizer import Tokenizer, tokenizer_spec_from_hf

transformers = pytest.importorskip("transformers")

# every kind of text a tokenizer can trip on: unicode, emoji (multi-codepoint too), whitespace runs, code, numbers
SAMPLE = [
    "Hello, world!",
    "",
    " ",
    "    ",
    "\n",
    "\n\n\n",
    "a\n\n\nb",
    "trailing spaces   ",
    "   leading spaces",
    (
        "naïve café, Straße, "  # Latin with diacritics
        "日本語のテキスト, 中文, 한국어, "  # Japanese, Chinese, Korean
        "Ελληνικά, русский, עברית, العربية"  # Greek, Russian, Hebrew, Arabic
    ),
    "emoji 🤖🎉 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽 " + "😀" * 7,
    "tabs\tand  double  spaces   and\t\ttabs \t mixed",
    "windows\r\nline\r\n\r\nendings\r",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n    \n",
    "for (int i = 0; i < n; ++i) { s += a[i] >> 2; }  // C\nx = {'k': [1, 2.5e-3, None]}",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F 1,000,000 2024-11-26 12:40 99.9%",
    "contractions: don't I'll we've they're SHE'S YOU'D it's O'Neil",
    "\u00a0nbsp\u2003em\u200bzero\ufeffbom",
    '<html><body class="x">&amp; &lt;</body></html>',
    "a" * 60 + " " * 17 + "!" * 9 + "\n" * 5 + "z",
    "mixed 中文and English混合text123数字",
    "  \n \n\t\n  x  \n",
    "ǅ ﬁ Ⅻ ½ ² ℃ ∑∫√ ≠≤",
    "$$$ ### @@@ ~~~ ^^^ ||| \\\\ //",
]


def bpe_tokenizer():
    import pydoc_data.topics

    docs = list(pydoc_data.topics.topics.values())
    return Tokenizer.train_bpe(docs, 600)


def gpt2_tokenizer():
    try:
        return Tokenizer.from_tiktoken("gpt2")
    except Exception as e:  # needs the tiktoken cache (TIKTOKEN_CACHE_DIR) or the network
        pytest.skip(f"tiktoken's gpt2 encoding is unavailable here ({type(e).__name__})")


def tiny_ckpt(tok, tie, seed=0):
    args = dict(
        vocab_size=64 * -(-tok.vocab_size // 64),
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        intermediate_size=96,
        block_size=64,
        rope_theta=500.0,
        norm_eps=1e-6,
        tie_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LLaMA(ModelConfig(**args))
    with torch.no_grad():  # norms away from 1, so a swapped norm weight would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return dict(
        model=model.state_dict(),
        model_args=args,
        tokenizer=tok.spec(),
        optimizer=None,
        iter_num=10,
        config={},
        history=[dict(event="train", data_dir="data/pydocs", iters=10, tokens=20480, val_loss=5.5)],
    )


@pytest.fixture(scope="module", params=["bpe", "gpt2"])
def exported(request, tmp_path_factory):
    """(ckpt, our model, tokenizer, export dir): the rustbpe kind with tied embeddings, GPT-2 untied."""
    tok = bpe_tokenizer() if request.param == "bpe" else gpt2_tokenizer()
    ckpt = tiny_ckpt(tok, tie=request.param == "bpe")
    out = str(tmp_path_factory.mktemp(request.param) / "hf")
    export_hf.export(ckpt, out, eval_results={"arc_easy": {"acc": 0.61, "acc_stderr": 0.012, "n": 2376}})
    return ckpt, checkpoint.build_model(ckpt), tok, out


def test_export_files_and_plain_llama_config(exported):
    ckpt, _, tok, out = exported
    assert sorted(os.listdir(out)) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]  # no temp dir left behind
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    a = ckpt["model_args"]
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in cfg
    assert (
        cfg["num_key_value_heads"],
        cfg["rope_theta"],
        cfg["rope_parameters"]["rope_theta"],
        cfg["rms_norm_eps"],
        cfg["tie_word_embeddings"],
        cfg["eos_token_id"],
    ) == (2, 500.0, 500.0, 1e-6, a["tie_embeddings"], tok.eot_id)
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    assert (hf_cfg.num_key_value_heads, hf_cfg.rope_parameters["rope_theta"], hf_cfg.tie_word_embeddings) == (
        2,
        500.0,
        a["tie_embeddings"],
    )


def test_transformers_logits_and_greedy_match(exported):
    ckpt, ours, tok, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff < 1e-5, diff
    prompt = torch.tensor([tok.encode("The for statement")])
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.size(1) :].tolist()
    got = [int(t) for t in ours.generate(prompt, 20, temperature=0, eot_id=tok.eot_id)]
    assert got == ref


def test_autotokenizer_encodes_like_ours(exported):
    _, _, tok, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    import pydoc_data.topics

    texts = SAMPLE + [t[:300] for t in random.Random(0).sample(sorted(pydoc_data.topics.topics.values()), 20)]
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == tok.eot_id and hf_tok.convert_ids_to_tokens(tok.eot_id) == "<|endoftext|>"
    assert hf_tok.bos_token_id is None  # our models never saw a BOS: nothing may be prepended


def test_model_card(exported):
    _, _, _, out = exported
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "| arc_easy | acc | 0.6100 | 0.0120 | 2376 |" in card
    assert "Tokens trained: 20,480" in card and "| 0 | train |" in card and "`data/pydocs`" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "trust_remote_code" not in card.split("## Usage")[1]


def test_sample_greedy_equals_transformers_generate(exported, tmp_path):
    ckpt, _, tok, out = exported
    checkpoint.save(ckpt, str(tmp_path))
    prompt = "The for statement"
    proc = run_here(
        "sample.py",
        "--ckpt",
        str(tmp_path),
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max_new_tokens",
        "24",
        "--device",
        "cpu",
        "--dtype",
        "float32",  # transformers computes in float32; auto is bf16 on some hosts
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    new = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.size(1) :]
    assert proc.stdout == prompt + hf_tok.decode(new, skip_special_tokens=True) + "\n"


def test_import_round_trip(exported):
    ckpt, ours, tok, out = exported
    back = checkpoint.load(f"hf:{out}")
    assert back["model_args"] == ckpt["model_args"]
    for k, v in ckpt["model"].items():
        assert torch.equal(back["model"][k], v), k
    assert back["optimizer"] is None and back["iter_num"] == 0 and back["history"][-1]["event"] == "import"
    model, back_tok, _ = checkpoint.load_model(f"hf:{out}")
    assert back_tok.kind == "hf" and back_tok.eot_id == tok.eot_id and back_tok.bos_id is None
    for text in SAMPLE:
        assert back_tok.encode(text) == tok.encode(text), text
    idx = torch.randint(0, tok.vocab_size, (1, 30))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], ours(idx)[0])
    # and out again: an imported model exports unchanged
    again = export_hf.export(back, out + "-again")
    for name in ("config.json", "tokenizer.json"):
        with open(os.path.join(out, name)) as a, open(os.path.join(again, name)) as b:
            assert json.load(a) == json.load(b), name


def test_bf16_export(tmp_path):
    from safetensors.torch import load_file

    ckpt = tiny_ckpt(bpe_tokenizer(), tie=False)
    out = export_hf.export(ckpt, str(tmp_path / "bf16"), dtype="bfloat16")
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert all(w.dtype == torch.bfloat16 for w in weights.values()) and "lm_head.weight" in weights
    back = checkpoint.import_hf(out)
    assert all(torch.equal(back["model"][k], v.bfloat16().float()) for k, v in ckpt["model"].items())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16


def test_out_dir_is_never_half_written(tmp_path):
    ckpt = tiny_ckpt(bpe_tokenizer(), tie=True)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    checkpoint.save(ckpt, str(tmp_path / "ck"))
    with pytest.raises(SystemExit, match="exists and is not empty: pass --force"):
        export_hf.main(["--ckpt", str(tmp_path / "ck"), "--out", str(out)])
    assert os.listdir(out) == ["keep.txt"]
    export_hf.main(["--ckpt", str(tmp_path / "ck"), "--out", str(out), "--force"])
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf"]  # no temp or old dirs left
    # a failure mid-write (here: a vocab larger than the model) leaves nothing behind
    bad = dict(ckpt, model_args=dict(ckpt["model_args"], vocab_size=64))
    with pytest.raises(ValueError, match="tokenizer has"):
        export_hf.export(bad, str(tmp_path / "bad"))
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ckpt", "no/such/ckpt.pt"], "checkpoint not found"),
        (["--ckpt", "hf:no/such/dir"], "not a directory"),
        (["--eval", "no/such/results.json"], "cannot read eval results"),
    ],
)
def test_cli_errors(tmp_path, argv, message, capsys):
    argv = argv + ["--out", str(tmp_path / "o")] + ([] if "--ckpt" in argv else ["--ckpt", "x"])
    with pytest.raises(SystemExit) as e:
        export_hf.main(argv)
    assert message in str(e.value) and not os.path.exists(tmp_path / "o")


def test_push_to_hub_fails_clearly_without_token(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # as on a machine never logged in
    with pytest.raises(RuntimeError, match="no Hugging Face token"):
        export_hf.push_to_hub(str(tmp_path), "user/model")
    with pytest.raises(SystemExit, match="Repo id must be"):  # checked before any export work
        export_hf.main(["--ckpt", "x", "--out", str(tmp_path / "o"), "--push_to_hub", "not a//repo"])
    assert not os.path.exists(tmp_path / "o")


# --- import of models written by transformers -------------------------------------------------


def hf_dir(tmp_path, tok_json_from, tie=False, n_kv=2, theta=250.0, vocab_size=640, **overrides):
    """A tiny LlamaForCausalLM saved by transformers, with a tokenizer.json."""
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv,
        max_position_embeddings=128,
        rope_theta=theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=599,
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path / "llama"
    model.save_pretrained(d, **overrides)
    (d / "tokenizer.json").write_text((tok_json_from / "tokenizer.json").read_text())
    return d, model


@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "hf"
    export_hf.export(tiny_ckpt(bpe_tokenizer(), tie=True), str(out))
    return out


@pytest.mark.parametrize("tie,n_kv", [(False, 2), (True, 1), (False, 4)])
def test_import_matches_transformers(tmp_path, bpe_export, tie, n_kv):
    d, ref = hf_dir(tmp_path, bpe_export, tie=tie, n_kv=n_kv)
    model, tok, ckpt = checkpoint.load_model(f"hf:{d}")
    assert ckpt["model_args"]["rope_theta"] == 250.0 and ckpt["model_args"]["tie_embeddings"] == tie
    idx = torch.randint(0, 640, (2, 33))
    with torch.no_grad():
        assert (model(idx)[0] - ref(idx).logits).abs().max().item() < 1e-5
    assert tok.eot_id == 599


def test_import_sharded_and_legacy_formats(tmp_path, bpe_export):
    d, ref = hf_dir(tmp_path, bpe_export, max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").exists() and not (d / "model.safetensors").exists()
    sharded = checkpoint.import_hf(str(d))
    # pytorch_model.bin (older checkpoints), with the rotary inv_freq buffers some of them carry,
    # and rope_theta at the top level of config.json as transformers 4 wrote it
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = {k: v for k, v in ref.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, legacy / "pytorch_model.bin")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    (legacy / "config.json").write_text(json.dumps(cfg))
    (legacy / "tokenizer.json").write_text((d / "tokenizer.json").read_text())
    old = checkpoint.import_hf(str(legacy))
    assert old["model_args"] == sharded["model_args"] and old["model_args"]["rope_theta"] == 250.0
    for k, v in ref.state_dict().items():
        assert torch.equal(sharded["model"][k], v) and torch.equal(old["model"][k], v), k


@pytest.mark.parametrize(
    "change,message",
    [
        ({"attention_bias": True}, "biases"),
        ({"mlp_bias": True}, "biases"),
        ({"model_type": "mistral"}, "model_type is 'mistral'"),
        ({"num_local_experts": 8}, "mixture of experts"),
        ({"sliding_window": 4096}, "sliding-window"),
        ({"head_dim": 32}, "head_dim 32"),
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "RoPE scaling 'llama3'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
    ],
)
def test_import_refuses_unsupported(tmp_path, bpe_export, change, message):
    d, _ = hf_dir(tmp_path, bpe_export)
    cfg = json.loads((d / "config.json").read_text()) | change
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"unsupported model: .*{message}"):
        checkpoint.load(f"hf:{d}")


def test_import_bad_dirs(tmp_path, bpe_export):
    d, _ = hf_dir(tmp_path, bpe_export)
    (d / "tokenizer.json").rename(d / "tok.bak")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        checkpoint.import_hf(str(d))
    (d / "tok.bak").rename(d / "tokenizer.json")
    from safetensors.torch import load_file, save_file

    w = load_file(d / "model.safetensors")
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, d / "model.safetensors")
    with pytest.raises(ValueError, match="missing: model.layers.1.mlp.up_proj.weight"):
        checkpoint.import_hf(str(d))
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        checkpoint.import_hf(str(d))
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        checkpoint.import_hf(str(d))


def test_bos_comes_from_the_tokenizers_own_template(tmp_path, bpe_export):
    """A Llama-2-style tokenizer.json prepends <s>: that id becomes bos and sample.py puts it first;
    a tokenizer without one (SmolLM2, ours) gets none."""
    tj = json.loads((bpe_export / "tokenizer.json").read_text())
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [599], "tokens": ["<|endoftext|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert tokenizer_spec_from_hf(str(tmp_path))["bos_token_id"] == 599
    assert tokenizer_spec_from_hf(str(bpe_export))["bos_token_id"] is None


def test_train_from_hf_import(tmp_path, pydocs_data, bpe_export):
    """init_from='hf:DIR' continues training an imported model on data prepared with its own tokenizer
    (prepare_data.py --tokenizer hf:DIR), and refuses data tokenized otherwise."""
    import pydoc_data.topics

    import prepare_data

    # the architecture comes from the checkpoint: TINY's model keys must go
    args = [
        a
        for a in TINY
        if a.split("=")[0] not in {"--n_layer", "--n_head", "--n_kv_head", "--n_embd", "--intermediate_size"}
    ]
    proc = run_here(
        "train.py",
        *args,
        f"--data_dir={pydocs_data}",
        f"--out_dir={tmp_path / 'refused'}",
        f"--init_from=hf:{bpe_export}",
        "--max_iters=1",
        check=False,
    )
    assert proc.returncode != 0 and "different tokenizer" in proc.stderr
    docs = tmp_path / "docs.jsonl"  # pydoc topics, tokenized with the imported model's own tokenizer
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in list(pydoc_data.topics.topics.values())[:40]))
    data = tmp_path / "data"
    prepare_data.main(
        ["--sources", str(docs), "--tokenizer", f"hf:{bpe_export}", "--val_fraction", "0.2", "--out_dir", str(data)]
    )
    assert load_tokenizer(str(data)).spec() == checkpoint.load(f"hf:{bpe_export}")["tokenizer"]
    run_here(
        "train.py",
        *args,
        f"--data_dir={data}",
        f"--out_dir={tmp_path / 'out'}",
        f"--init_from=hf:{bpe_export}",
        "--max_iters=2",
        "--eval_interval=2",
    )
    ckpt = checkpoint.load(str(tmp_path / "out"))
    assert [e["event"] for e in ckpt["history"]] == ["import", "train"] and ckpt["iter_num"] == 2


def test_sentencepiece_style_import_samples_like_transformers(tmp_path):
    """A Llama-2 / TinyLlama-style tokenizer (Metaspace, BOS from its template): sample.py prepends the BOS and
    prints the same text as transformers' greedy generate, spaces included."""
    import pydoc_data.topics

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tk = HFTokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")  # drops the first token's space
    tk.train_from_iterator(
        pydoc_data.topics.topics.values(), trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tk.save(str(tok_dir / "tokenizer.json"))
    d, ref = hf_dir(tmp_path, tok_dir, vocab_size=tk.get_vocab_size())  # every id it can emit decodes
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    _, ours, _ = checkpoint.load_model(f"hf:{d}")
    assert ours.bos_id == 1
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    prompt = "def f(x):"  # its greedy continuation starts with a word: "▁\"__"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == [1] + ours.encode(prompt)
    out = ref.generate(ids, max_new_tokens=16, do_sample=False)[0]
    # decoded alone, it would lose its space
    assert hf_tok.convert_ids_to_tokens(int(out[ids.size(1)])).startswith("▁")
    proc = run_here(
        "sample.py",
        "--ckpt",
        f"hf:{d}",
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max_new_tokens",
        "16",
        "--dtype",
        "float32",  # as transformers computes
    )
    assert proc.stdout == hf_tok.decode(out, skip_special_tokens=True) + "\n"

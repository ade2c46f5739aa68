"""
Zero-shot multiple-choice evaluation by log-probability, faithful to lm-evaluation-harness 0.4.x.

    python eval_mc.py --ckpt out/phase2                                   # all tasks, data from the HF hub
    python eval_mc.py --ckpt hf:/path/to/llama --data_dir path/to/benchmarks --tasks arc_easy,copa --dtype bfloat16
    python eval_mc.py --ckpt out/phase2 --limit 100 --out results.json

Every task turns a row into (context, continuation) pairs, one per choice, exactly as lm-eval 0.4.13's
task YAMLs do (prompts, splits, preprocessing, the " " target delimiter, "\\n\\n" between few-shot
examples, partial evaluation for winogrande/wsc273). Each pair is scored as lm-eval's HFLM scores it:
trailing whitespace of the context moves to the continuation; the continuation's tokens are those of
context+continuation beyond the context's tokens; BOS is prepended if the tokenizer does so by default.
The prediction is the argmax of the summed log-probs (acc) or of log-prob / len(choice) in characters
(acc_norm). stdout gets a markdown table; progress and speed go to stderr.

Speed: the pairs of one context are scored together. The context runs once into a KV cache, its last
position scoring every choice's first token; the cache is copied to each choice's row, and only the choices'
other tokens run after it. Contexts that share a long prefix (truthfulqa's 6-shot preamble, a boolq passage
asked twice) run it once. Contexts of equal length are batched, so no padding enters the cache, and choices
run longest first, so little padding enters the batch. For boolq or truthfulqa this is 2-6x fewer tokens than
scoring every pair whole, and the lm_head runs only where a choice's token is predicted.
On a busy machine, OMP_NUM_THREADS=1 can be several times faster than oversubscribed threads.
"""

import stopping

# first of all, before torch takes a second or two to import: a signal meanwhile ends in one line too
if __name__ == "__main__":
    stopping.stop_on_signals(
        "stopped by {signal}: no results were written (--out is written at the end); run the same command again"
    )

import argparse
import copy
import json
import math
import os
import random
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

import checkpoint
from common import DTYPES, atomic_write, device_error, resolve_dtype
from tokenizer import prepended_bos

# ----------------------------------------------------------------------------------------------
# Tasks. Each formatter maps a row to either
#   {"text": context, "choices": [...], "gold": [indices]}       continuation = " " + choice
#   {"contexts": [...], "target": str, "gold": [indices]}         partial evaluation: one context
#                                                                  per choice, one shared continuation
# "gold" is a list because AGIEval's aqua_rat allows several right answers (lm-eval: acc = pred in gold).


def hellaswag_clean(text):  # lm-eval hellaswag/utils.py: the brackets are WikiHow artifacts
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(d):
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return {
        "text": hellaswag_clean(d["activity_label"] + ": " + ctx),
        "choices": [hellaswag_clean(e) for e in d["endings"]],
        "gold": [int(d["label"])],
    }


def arc(d):
    return {
        "text": f"Question: {d['question']}\nAnswer:",
        "choices": d["choices"]["text"],
        "gold": [d["choices"]["label"].index(d["answerKey"])],
    }


def openbookqa(d):
    return {
        "text": d["question_stem"],
        "choices": d["choices"]["text"],
        "gold": [d["choices"]["label"].index(d["answerKey"].lstrip())],
    }


def piqa(d):
    return {"text": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]], "gold": [int(d["label"])]}


def winogrande(d):
    i = d["sentence"].index("_")
    return {
        "contexts": [d["sentence"][:i] + d["option1"], d["sentence"][:i] + d["option2"]],
        "target": d["sentence"][i + 1 :].strip(),
        "gold": [{"1": 0, "2": 1}[d["answer"]]],
    }


def copa(d):
    # lm-eval drops the premise's period and joins with a connective; its choices keep a leading space
    # on top of the " " delimiter, so the continuation really starts with two spaces (as lm-eval scores it)
    connective = {"cause": "because", "effect": "therefore"}[d["question"]]
    lower_first = lambda c: " " + c[0].lower() + c[1:]
    return {
        "text": d["premise"].strip()[:-1] + f" {connective}",
        "choices": [lower_first(d["choice1"]), lower_first(d["choice2"])],
        "gold": [int(d["label"])],
    }


def boolq(d):
    return {
        "text": f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
        "choices": ["no", "yes"],
        "gold": [int(d["label"])],
    }


def detokenize(s):  # lm_eval.utils.general_detokenize
    s = s.replace(" n't", "n't").replace(" )", ")").replace("( ", "(").replace('" ', '"').replace(' "', '"')
    return re.sub(r" (['.,])", r"\1", s)


def wsc(d):
    # span2_index counts words, not characters; the pronoun is marked *like this*
    pre = " ".join(d["text"].split()[: d["span2_index"]])
    post = d["text"][len(pre) + len(d["span2_text"]) + 1 :]
    passage = detokenize(pre + f" *{d['span2_text']}*" + post)
    text = (
        f"Passage: {passage}\n"
        f'Question: In the passage above, does the pronoun "*{d["span2_text"]}*" '
        f'refer to "*{d["span1_text"]}*"?\nAnswer:'
    )
    return {"text": text, "choices": ["no", "yes"], "gold": [int(d["label"])]}


def wsc273(d):
    # lm-eval wsc273/utils.py: collapse double spaces (pronoun_loc is not shifted, as there), add 's to
    # possessive options, lowercase a leading article/pronoun unless the blank starts a sentence
    text = d["text"].replace("  ", " ")
    loc = d["pronoun_loc"]

    def option(o):
        if d["pronoun"].lower() in ["my", "his", "her", "our", "their"]:
            o += "'s"
        first = o.split()[0]
        upper = ["A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their"]
        return o.replace(first, first.lower()) if text[loc - 2] != "." and first in upper else o

    # the target keeps its leading space, so with the delimiter it starts with two (as in lm-eval)
    return {
        "contexts": [text[:loc] + option(o) for o in d["options"]],
        "target": text[loc + len(d["pronoun"]) :],
        "gold": [int(d["label"])],
    }


TRUTHFULQA_PROMPT = (  # lm-eval truthfulqa_mc1.yaml: a fixed 6-shot QA preamble (Lin et al., 2021)
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\nA: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain."
)


def truthfulqa(targets):
    def fmt(d):
        t = d[targets]
        if len(t["choices"]) != len(t["labels"]) or t["labels"][0] != 1:
            raise ValueError(f"{targets}: needs one label per choice, the first one true")
        return {
            "text": TRUTHFULQA_PROMPT + "\n\nQ: " + d["question"] + "\nA:",
            "choices": t["choices"],
            "gold": [i for i, label in enumerate(t["labels"]) if label == 1],
            "labels": t["labels"],
        }

    return fmt


def aqua_rat(d):  # AGIEval's query already holds the question, the options and "the answer is"
    return {"text": d["query"], "choices": d["choices"], "gold": [int(g) for g in d["gold"]]}


def commonsense_qa(d):
    text = f"Question: {d['question'].strip()}\n" + "".join(
        f"{k}. {d['choices']['text'][i]}\n" for i, k in enumerate("ABCDE")
    )
    return {"text": text + "Answer:", "choices": list("ABCDE"), "gold": [list("ABCDE").index(d["answerKey"])]}


@dataclass(frozen=True)
class Task:
    """One benchmark as lm-eval 0.4.13 defines it: where its rows live, how a row becomes a prompt, what is reported."""

    name: str
    hub_path: str  # HF hub dataset, read through `datasets` when no --data_dir is given
    hub_config: str | None
    split: str  # the split that is scored
    fewshot_split: str  # lm-eval's rule: the training split if the task has one, else validation, else test
    format_row: Callable  # row -> doc (see above)
    metrics: tuple = ("acc",)
    folder: str = ""  # --data_dir/<folder>/<split>.jsonl; default: the task's name

    def __post_init__(self):
        object.__setattr__(self, "folder", self.folder or self.name)


ACC_AND_NORM = ("acc", "acc_norm")
TASKS = {
    task.name: task
    for task in [
        Task("hellaswag", "Rowan/hellaswag", None, "validation", "train", hellaswag, ACC_AND_NORM),
        Task("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", "train", arc, ACC_AND_NORM),
        Task("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "train", arc, ACC_AND_NORM),
        Task("openbookqa", "allenai/openbookqa", "main", "test", "train", openbookqa, ACC_AND_NORM),
        Task("winogrande", "allenai/winogrande", "winogrande_xl", "validation", "train", winogrande),
        Task("copa", "aps/super_glue", "copa", "validation", "train", copa),
        Task("boolq", "aps/super_glue", "boolq", "validation", "train", boolq),
        Task("wsc", "aps/super_glue", "wsc.fixed", "validation", "train", wsc),
        Task("wsc273", "lighteval/winograd_wsc", "wsc273", "test", "test", wsc273),
        Task(
            "truthfulqa_mc1",
            "truthfulqa/truthful_qa",
            "multiple_choice",
            "validation",
            "validation",
            truthfulqa("mc1_targets"),
            folder="truthfulqa_mc",
        ),
        Task(
            "truthfulqa_mc2",
            "truthfulqa/truthful_qa",
            "multiple_choice",
            "validation",
            "validation",
            truthfulqa("mc2_targets"),
            ("mc2",),
            folder="truthfulqa_mc",
        ),
        Task("aqua_rat", "hails/agieval-aqua-rat", None, "test", "test", aqua_rat, ACC_AND_NORM),
        Task("commonsense_qa", "tau/commonsense_qa", None, "validation", "train", commonsense_qa),
        Task("piqa", "baber/piqa", None, "validation", "train", piqa, ACC_AND_NORM),
    ]
}
DEFAULT_TASKS = [t for t in TASKS if t != "piqa"]  # the reference card's 12 benchmarks (13 scores)


def load_rows(task, split, data_dir):
    """[(row, where)] for one split: DIR/<folder>/<split>.jsonl, or the hub through `datasets`."""
    spec = TASKS[task]
    if data_dir is None:
        import datasets

        rows = datasets.load_dataset(spec.hub_path, spec.hub_config, split=split)
        return [(row, f"{spec.hub_path} {split} row {i}") for i, row in enumerate(rows)]
    file = os.path.join(data_dir, spec.folder, f"{split}.jsonl")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{task}: {file} not found (--data_dir expects <dir>/{spec.folder}/{split}.jsonl)")
    rows = []
    with open(file) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{n}: not valid JSON ({e})") from None
                rows.append((row, f"{file}:{n}"))
    return rows


def format_rows(task, rows):
    """Run the task's formatter over every row; a row it cannot read is an error that names it."""
    fmt, out = TASKS[task].format_row, []
    for row, where in rows:
        try:
            doc = fmt(row)
            n = len(doc["contexts"] if "contexts" in doc else doc["choices"])
            if not doc["gold"] or not all(0 <= g < n for g in doc["gold"]):
                raise ValueError(f"gold {doc['gold']} out of range for {n} choices")
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{where}: malformed {task} row ({type(e).__name__}: {e})") from None
        out.append(doc)
    return out


def shot(doc):
    """One solved example for a few-shot prompt: question, delimiter, right answer, blank line."""
    if "contexts" in doc:
        return doc["contexts"][doc["gold"][0]] + " " + doc["target"] + "\n\n"
    return doc["text"] + " " + doc["choices"][doc["gold"][0]] + "\n\n"


def build_requests(task, docs, raw, pool, num_fewshot):
    """(context, continuation) pairs per doc, few-shot examples drawn as lm-eval draws them: one
    Random(1234) per task, rnd.sample(pool, k) per doc in order; when the task is not scored on its
    test split lm-eval samples k+1 and drops copies of the doc itself (its eval_doc rule)."""
    rnd, drop_self = random.Random(1234), TASKS[task].split != "test"
    out = []
    for doc, row in zip(docs, raw):
        prefix = ""
        if num_fewshot:
            if drop_self:
                picks = [p for p in rnd.sample(range(len(pool[0])), num_fewshot + 1) if pool[1][p] != row][:num_fewshot]
                if len(picks) < num_fewshot:
                    picks = rnd.sample([p for p in range(len(pool[0])) if pool[1][p] != row], num_fewshot)
            else:
                picks = rnd.sample(range(len(pool[0])), num_fewshot)
            prefix = "".join(shot(pool[0][p]) for p in picks)
        if "contexts" in doc:
            out.append([(prefix + c, " " + doc["target"]) for c in doc["contexts"]])
        else:
            out.append([(prefix + doc["text"], " " + c) for c in doc["choices"]])
    return out


# ----------------------------------------------------------------------------------------------
# Models: ours (checkpoint.load_model: our checkpoints, Llama-family hf:DIR) or any other transformers causal LM
# (hf:DIR), behind one small interface:
#   encode(texts) -> ids without special tokens; bos: the id the tokenizer prepends by default, or None;
#   prefix_id: lm-eval's token for an empty context; max_len;
#   new_cache(batch, length); run(ids, cache, keep) runs ids after the cache (extending it) and returns the
#   logits at the positions keep (or nothing);
#   select(cache, rows) returns a new cache whose row i is row rows[i] of cache.


class OurLM:
    def __init__(self, name, dtype, device):
        self.model, self.tok, _ = checkpoint.load_model(name, device, dtype)
        self.device, self.dtype, self.max_len = device, dtype, self.model.config.block_size
        bos = self.tok.bos_id
        # an hf tokenizer.json says in its post-processor whether BOS goes first; tiktoken/bpe never add one
        self.bos = prepended_bos(self.tok.enc.encode("a").ids, self.tok.encode("a")) if self.tok.kind == "hf" else None
        self.prefix_id = bos if bos is not None else self.tok.eot_id

    def encode(self, texts):
        return self.tok.encode_batch(texts)

    def new_cache(self, batch, length):
        from model import KVCache

        return KVCache(self.model.config, batch, length, self.device, self.dtype)

    def run(self, ids, cache, keep=None):
        no_logits = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)  # contexts only fill the cache
        logits = self.model(ids, kv_cache=cache, keep=no_logits if keep is None else keep)[0]
        return logits if keep is not None else None

    def select(self, cache, rows):
        new = copy.copy(cache)  # indexing copies k and v: the source cache stays as it was
        new.k, new.v = cache.k[:, rows], cache.v[:, rows]
        return new


class HFLM:
    def __init__(self, path, dtype, device):
        import inspect

        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.body = self.model.get_decoder()  # the transformer without lm_head: contexts need no logits
        self.cache_kw = "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"
        self.device = device
        bos = self.tok.bos_token_id
        self.bos = prepended_bos(self.tok("a")["input_ids"], self.tok("a", add_special_tokens=False)["input_ids"])
        self.prefix_id = bos if bos is not None else self.tok.eos_token_id
        self.max_len = getattr(self.model.config, "max_position_embeddings", None) or 2048  # lm-eval's fallback

    def encode(self, texts):
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def new_cache(self, batch, length):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def run(self, ids, cache, keep=None):
        h = self.body(input_ids=ids, use_cache=True, **{self.cache_kw: cache}).last_hidden_state
        return self.model.lm_head(h[keep]) if keep is not None else None

    def select(self, cache, rows):
        new = copy.deepcopy(cache)  # batch_select_indices works in place; the source cache serves several chunks
        new.batch_select_indices(rows)
        return new


def load_lm(name, dtype, device="cpu"):
    """model.py for our checkpoints and for a Llama-family hf:DIR (the import is exact, and our KV cache takes
    the batched contexts with no per-call overhead of transformers' model classes); transformers for any other
    hf:DIR, whose architecture model.py does not implement."""
    if not name.startswith("hf:"):
        return OurLM(name, dtype, device)
    try:
        return OurLM(name, dtype, device)
    except ValueError as e:  # checkpoint.load refuses what model.py cannot run exactly, and says why
        print(f"{e}: scoring through transformers instead", file=sys.stderr)
        return HFLM(name[3:], dtype, device)


def tokenize_pairs(lm, pairs, bos):
    """lm-eval's _encode_pair for every (context, continuation): returns [(context ids, continuation ids)]."""
    ctxs, conts = [], []
    for ctx, cont in pairs:
        n = len(ctx) - len(ctx.rstrip())  # "Answer: " + "B" is tokenized as "Answer:" + " B"
        ctxs.append(ctx[: len(ctx) - n])
        conts.append(ctx[len(ctx) - n :] + cont)
    unique = sorted(set(ctxs) | {c + k for c, k in zip(ctxs, conts)})
    ids = dict(zip(unique, lm.encode(unique)))
    head = [bos] if bos is not None else []
    out = []
    for ctx, cont in zip(ctxs, conts):
        if ctx == "":  # lm-eval conditions an empty context on the prefix token (BOS, else EOS)
            c, k = [lm.prefix_id], lm.encode([cont])[0]
        else:
            whole = head + ids[ctx + cont]
            c = head + ids[ctx]
            k = whole[len(c) :]
        if not k:
            raise ValueError(f"continuation {cont!r} adds no tokens to context {ctx[-60:]!r}")
        over = len(c) + len(k) - (lm.max_len + 1)  # lm-eval keeps the last max_len+1 tokens
        out.append((tuple(c[over:] if over > 0 else c), tuple(k)))
    return out


# ----------------------------------------------------------------------------------------------
# Scoring. The definition first, then the same numbers fast.
#
# A pair's score is log p(continuation | context): the sum, over the continuation's tokens, of the log-probability
# the model gives each one after everything before it. A worked example with GPT-2's tokenizer (COPA, "cause"):
#     context       "The man broke his toe because"       -> [464, 582, 6265, 465, 21189, 780]
#     continuation  " he dropped a hammer on his foot."   -> [339, 5710, 257, 15554, 319, 465, 2366, 13]
#     one pass over [464, ..., 780, 339, ..., 2366] (the last token, 13, is never an input): the logits at the
#     context's last position (after "because") score 339 (" he"), the next position's score 5710 (" dropped"),
#     ..., the last position's score 13 ("."); the pair's score is the sum of those 8 log-probabilities.
# The other choice (" he got a hole in his sock.") is scored the same way, and the prediction
# is the choice with the higher sum (acc), or the higher sum per character of the choice (acc_norm).


@torch.inference_mode()
def score_plain(lm, pairs):
    """The definition, one (context ids, continuation ids) pair at a time: context + continuation[:-1] in one
    pass, the log-probabilities of the continuation's tokens at the positions that predict them, summed.
    score() below returns the same numbers (tests check it) with a shared cache, batches and prefixes."""
    lls = []
    for context, continuation in pairs:
        ids = torch.tensor([list(context) + list(continuation[:-1])], device=lm.device)
        predicts = torch.zeros(ids.shape, dtype=torch.bool, device=lm.device)
        predicts[0, len(context) - 1 :] = True  # the context's last position onwards: one per continuation token
        logprobs = torch.log_softmax(lm.run(ids, lm.new_cache(1, ids.shape[1]), predicts).double(), dim=-1)
        lls.append(logprobs[torch.arange(len(continuation)), torch.tensor(continuation)].sum().item())
    return lls


def choices_by_context(pairs):
    """{context ids: sorted continuation ids}: every context is encoded once, whatever its number of choices."""
    groups = defaultdict(set)
    for context, continuation in pairs:
        groups[context].add(continuation)
    return {context: sorted(continuations) for context, continuations in groups.items()}


SHARED_MIN = 32  # tokens: a shorter shared prefix saves less than its extra, smaller pass costs on a CPU


def runs_by_prefix(contexts):
    """[(contexts, shared_len)]: the contexts in token order, cut into runs whose neighbours share at least
    SHARED_MIN tokens, with the length of the prefix the whole run shares (truthfulqa's 6-shot preamble, a boolq
    passage asked about several times): it runs once per run. Every context keeps a token of its own, whose
    logits score its choices' first token. The contexts that share with none form one last run, sharing nothing."""
    runs = []
    for context in sorted(contexts):
        n = len(os.path.commonprefix([runs[-1][0][-1], context])) if runs else 0
        if n >= SHARED_MIN:
            runs[-1][0].append(context)
            runs[-1][1] = min(runs[-1][1], n, len(context) - 1)
        else:
            runs.append([[context], len(context) - 1])
    alone = [run[0] for run, _ in runs if len(run) == 1]  # one run, so that equal lengths still batch together
    return [(run, shared_len) for run, shared_len in runs if len(run) > 1] + ([(alone, 0)] if alone else [])


def groups_of_equal_length(contexts, batch_size):
    """Lists of at most batch_size contexts of one token length, longest first: equal lengths put no padding
    into the KV cache."""
    groups = []
    for context in sorted(contexts, key=len, reverse=True):
        if groups and len(groups[-1][0]) == len(context) and len(groups[-1]) < batch_size:
            groups[-1].append(context)
        else:
            groups.append([context])
    return groups


def encode_contexts(lm, contexts, prefix, cache_len):
    """Run each context into a cache row of its own: after a copy of the prefix's cache when the contexts share
    one (prefix = (cache, its length)), else whole into a new cache. Returns the cache and the log-probs of the
    token after each context, (contexts, vocab): every choice's first token is scored there, so a one-token
    choice (boolq's "yes", commonsense_qa's "A") needs no pass of its own."""
    prefix_cache, shared_len = prefix or (None, 0)
    ids = torch.tensor([c[shared_len:] for c in contexts], dtype=torch.long, device=lm.device)
    if prefix_cache is None:
        cache = lm.new_cache(len(contexts), cache_len)
    else:
        cache = lm.select(prefix_cache, torch.zeros(len(contexts), dtype=torch.long, device=lm.device))
    last = torch.zeros(ids.shape, dtype=torch.bool, device=lm.device)
    last[:, -1] = True
    return cache, torch.log_softmax(lm.run(ids, cache, last).float(), dim=-1)


def score_group(lm, contexts, choices_of, batch_size, prefix=None):
    """{(context, continuation): log-likelihood} for one group of contexts. The contexts run once into a cache,
    which scores every choice's first token; then the choices' other tokens, longest first, in chunks of up to
    batch_size: each chunk row continues a copy of its context's cache row with continuation[:-1] as input, so
    its logits predict exactly continuation[1:]. Rows are right-padded (the padding is seen by no real token);
    sorting by length keeps the padding small."""
    pairs = sorted(
        ((row, continuation) for row, context in enumerate(contexts) for continuation in choices_of[context]),
        key=lambda pair: len(pair[1]),
        reverse=True,
    )
    context_cache, first_logprobs = encode_contexts(lm, contexts, prefix, len(contexts[0]) + len(pairs[0][1]) - 1)
    rows = torch.tensor([row for row, _ in pairs], device=lm.device)
    lls = first_logprobs[rows, torch.tensor([c[0] for _, c in pairs], device=lm.device)].double()
    chunks = []  # indices into pairs; a chunk is full at batch_size rows or when a row would be under half its width:
    for i, (_, continuation) in enumerate(pairs):  # past that, padding costs more than a smaller matmul saves
        if len(continuation) == 1:
            break  # longest first: what is left are one-token choices, scored by their context's pass
        width = len(continuation) - 1
        if not chunks or len(chunks[-1]) == batch_size or 2 * width < len(pairs[chunks[-1][0]][1]) - 1:
            chunks.append([])
        chunks[-1].append(i)
    for chunk in chunks:
        inputs = [pairs[i][1][:-1] for i in chunk]
        width = len(inputs[0])
        input_ids = torch.tensor([list(ids) + [0] * (width - len(ids)) for ids in inputs], device=lm.device)
        is_real = torch.tensor([[j < len(ids) for j in range(width)] for ids in inputs], device=lm.device)
        cache = lm.select(context_cache, rows[chunk])
        logits = lm.run(input_ids, cache, is_real).float()  # (real tokens of the chunk's rows, vocab)
        targets = torch.tensor([t for i in chunk for t in pairs[i][1][1:]], device=lm.device)
        token_logprobs = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        pair_of_token = torch.tensor([i for i in chunk for _ in pairs[i][1][1:]], device=lm.device)
        lls.index_add_(0, pair_of_token, token_logprobs.double())
    return {(contexts[row], continuation): ll for (row, continuation), ll in zip(pairs, lls.tolist())}


@torch.inference_mode()
def score(lm, pairs, batch_size, progress=True):
    """Sum of log p(continuation | context) for each (context ids, continuation ids) pair."""
    choices_of = choices_by_context(pairs)
    result = {}
    bar = tqdm(
        total=sum(map(len, choices_of.values())), desc="scoring", unit="pair", disable=not progress, file=sys.stderr
    )
    for run, shared_len in runs_by_prefix(choices_of):
        prefix = None
        if shared_len:  # room for the run's longest context and its longest choice but one token
            prefix = (lm.new_cache(1, max(len(c) + max(map(len, choices_of[c])) - 1 for c in run)), shared_len)
            lm.run(torch.tensor([run[0][:shared_len]], device=lm.device), prefix[0])
        for contexts in groups_of_equal_length(run, batch_size):
            scored = score_group(lm, contexts, choices_of, batch_size, prefix)
            result.update(scored)
            bar.update(len(scored))
    bar.close()
    return [result[p] for p in pairs]


# ----------------------------------------------------------------------------------------------
# Metrics


def mc2(lls, labels):
    """TruthfulQA MC2: the probability mass on the true answers, the choices' probabilities normalized
    to sum to 1 (lm-eval truthfulqa/utils.py; shifted by the max first, which changes nothing but underflow)."""
    m = max(lls)
    p = [math.exp(x - m) for x in lls]
    return sum(q for q, label in zip(p, labels) if label == 1) / sum(p)


def argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first index on ties, as np.argmax


def stderr(values):  # lm-eval's mean_stderr: sample standard deviation / sqrt(n)
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def task_results(task, docs, lls):
    per_metric, samples = defaultdict(list), []
    for i, (doc, ll) in enumerate(zip(docs, lls)):
        pred = argmax(ll)
        for metric in TASKS[task].metrics:
            if metric == "acc":
                per_metric["acc"].append(float(pred in doc["gold"]))
            elif metric == "acc_norm":  # divide by the choice's length in characters (lm-eval's completion_len)
                per_metric["acc_norm"].append(
                    float(argmax([lp / len(c) for lp, c in zip(ll, doc["choices"])]) in doc["gold"])
                )
            else:
                per_metric["acc"].append(mc2(ll, doc["labels"]))  # lm-eval reports mc2 under "acc"
        samples.append(
            {
                "doc_index": i,
                "loglikelihoods": ll,
                "pred": pred,
                "gold": doc["gold"][0] if len(doc["gold"]) == 1 else doc["gold"],
            }
        )
    res = {}
    for metric, vals in per_metric.items():
        res[metric] = sum(vals) / len(vals)
        res[metric + "_stderr"] = stderr(vals)
    res["n"] = len(docs)
    return res, samples


def prepare(tasks, data_dir=None, limit=None, num_fewshot=0):
    """Load and format every task's rows; returns (docs per task, all (context, continuation) pairs,
    each doc's slice of the pairs per task)."""
    docs, pairs, spans = {}, [], {}
    for task in tasks:
        split, fewshot_split = TASKS[task].split, TASKS[task].fewshot_split
        raw = load_rows(task, split, data_dir)[:limit]
        docs[task] = format_rows(task, raw)
        pool = None
        if num_fewshot:
            pool_raw = load_rows(task, fewshot_split, data_dir)
            pool = (format_rows(task, pool_raw), [r for r, _ in pool_raw])
            if len(pool[0]) <= num_fewshot:
                raise ValueError(
                    f"{task}: {num_fewshot}-shot needs more than {len(pool[0])} examples in its {fewshot_split} split"
                )
        spans[task] = []
        for r in build_requests(task, docs[task], [r for r, _ in raw], pool, num_fewshot):
            spans[task].append((len(pairs), len(pairs) + len(r)))
            pairs += r
    return docs, pairs, spans


def evaluate(lm, prepared, batch_size=32, bos=None, progress=True):
    """{"results": ..., "samples": ...} for prepare()'s output. bos: None = the tokenizer's convention."""
    docs, pairs, spans = prepared
    bos_id = lm.bos if bos is None else (lm.prefix_id if bos else None)
    print(f"{sum(map(len, docs.values()))} examples, {len(pairs)} (context, continuation) pairs", file=sys.stderr)
    lls = score(lm, tokenize_pairs(lm, pairs, bos_id), batch_size, progress)
    out = {"results": {}, "samples": {}}
    for task in docs:
        out["results"][task], out["samples"][task] = task_results(task, docs[task], [lls[a:b] for a, b in spans[task]])
    return out


def table(results):
    lines = ["| task | metric | score | stderr |", "|---|---|---|---|"]
    for task, res in results.items():
        for metric in ("acc", "acc_norm"):
            if metric in res:
                lines.append(f"| {task} | {metric} | {res[metric]:.4f} | ± {res[metric + '_stderr']:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file, out_dir, or hf:DIR (any transformers causal LM)")
    p.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma list of: {', '.join(TASKS)} (default: all but piqa, the reference card's 12 benchmarks)",
    )
    p.add_argument(
        "--data_dir",
        default=None,
        help="read DIR/<task>/<split>.jsonl (hub field schema; both truthfulqa tasks read DIR/truthfulqa_mc) "
        "instead of the HF hub",
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows of each task")
    p.add_argument("--num_fewshot", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32, help="contexts, or continuations, per forward pass")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="auto: what the device computes natively (common.auto_dtype). bfloat16: ~4x faster on CPUs with "
        "AMX; on SmolLM2-135M it moved acc by <= 1 point (well inside one stderr), with 95-99%% of "
        "predictions unchanged",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda when there is a GPU (as every script), else cpu",
    )
    p.add_argument(
        "--bos",
        default="auto",
        choices=["auto", "on", "off"],
        help="prepend BOS: auto = as the tokenizer does by default",
    )
    p.add_argument("--out", default=None, help="write results and per-example log-likelihoods to this JSON file")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        p.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if args.limit is not None and args.limit < 1 or args.num_fewshot < 0 or args.batch_size < 1:
        p.error("need --limit >= 1, --num_fewshot >= 0 and --batch_size >= 1")
    if device_error(args.device):
        p.error(device_error(args.device))

    try:
        prepared = prepare(tasks, args.data_dir, args.limit, args.num_fewshot)  # bad data fails before the model loads
        t0 = time.time()
        args.dtype = resolve_dtype(args.dtype, args.device)
        lm = load_lm(args.ckpt, DTYPES[args.dtype], args.device)
        print(f"loaded {args.ckpt} in {time.time() - t0:.1f}s", file=sys.stderr)
        t1 = time.time()
        out = evaluate(
            lm, prepared, args.batch_size, {"auto": None, "on": True, "off": False}[args.bos], not args.no_progress
        )
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    dt = time.time() - t1
    n = sum(r["n"] for r in out["results"].values())
    print(
        f"scored {n} examples in {dt:.1f}s: {n / dt:.2f} examples/s ({args.dtype}, {torch.get_num_threads()} threads)",
        file=sys.stderr,
    )
    print(table(out["results"]))
    if args.out:
        with atomic_write(args.out) as tmp, open(tmp, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()

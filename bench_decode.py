"""
Decode speed on CPU: sample.py against transformers' generate, and against llama.cpp on the model's GGUF files,
on the same Hugging Face Llama, greedy.

    python bench_decode.py --model path/to/SmolLM2-135M-Instruct
        [--tokens 128] [--reps 2] [--threads 1 2] [--dtypes float32 bfloat16]
    python bench_decode.py --model hf/tiny --gguf hf/tiny/model-f32.gguf hf/tiny/model-q8_0.gguf --threads 1 2

Each run is a fresh process (sample.py itself, a small transformers script, a small llama-cpp-python script),
timed the same way: the second of two generations from the same prompt (the first warms up), prompt encoding
included, tokens counted until max_new_tokens or end of text. Runs alternate ours, theirs, ours, theirs... so
that load from other processes on a shared machine falls on all alike. Prints a markdown table (median tok/s),
each run's speed against sample.py's first dtype at the same threads, and whether its text is sample.py's.
"""

import stopping

# first of all, before torch takes a second or two to import: a signal meanwhile ends in one line too
if __name__ == "__main__":
    stopping.stop_on_signals(
        "stopped by {signal}: the runs above are measured; no table (bench_decode.py writes no file)"
    )

import argparse
import os
import re
import statistics
import subprocess
import sys

from common import resolve_dtype

HF_SCRIPT = r"""
import sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, dtype, n, prompt = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
for _ in range(2):  # as sample.py --num_samples 2: the second is timed
    t0 = time.perf_counter()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    if new and new[-1] == model.generation_config.eos_token_id:
        new = new[:-1]
    text = tok.decode(new, skip_special_tokens=True)
    dt = time.perf_counter() - t0
print(prompt + text)
print(f"[{len(new)} tokens in {dt:.2f}s, {len(new) / dt:.1f} tok/s]", file=sys.stderr)
"""
# llama.cpp through llama-cpp-python (an optional dependency): its own tokenizer, greedy sampler and thread pool
LLAMA_CPP_SCRIPT = r"""
import os, sys, time
from llama_cpp import Llama
path, n, prompt, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(os.environ["OMP_NUM_THREADS"])
llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
for _ in range(2):  # as sample.py --num_samples 2: the second is timed
    t0 = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, repeat_penalty=1.0)
    dt = time.perf_counter() - t0
print(prompt + out["choices"][0]["text"])
k = out["usage"]["completion_tokens"]
print(f"[{k} tokens in {dt:.2f}s, {k / dt:.1f} tok/s]", file=sys.stderr)
"""
RATE = re.compile(r"\[(\d+) tokens in ([\d.]+)s, ([\d.]+) tok/s\]")


def run(cmd, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    rates = RATE.findall(proc.stderr)
    if proc.returncode != 0 or not rates:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    n, _, rate = rates[-1]  # the warm run
    return float(rate), int(n), proc.stdout.split("\n" + "-" * 40 + "\n")[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face Llama directory (e.g. SmolLM2-135M)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per generation (default: %(default)s)")
    p.add_argument("--reps", type=int, default=2, help="runs of each (default: %(default)s)")
    p.add_argument(
        "--threads", type=int, nargs="+", default=[os.cpu_count()], help="threads, every side (default: all cores)"
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["auto"],
        choices=["auto", "float32", "bfloat16"],
        help="auto: what this CPU computes natively (common.auto_dtype) (default: %(default)s)",
    )
    p.add_argument(
        "--gguf", nargs="*", default=[], help="GGUF files of the same model (export_hf.py --gguf) to run in llama.cpp"
    )
    p.add_argument("--prompt", default="Once upon a time, in a small village,")
    args = p.parse_args()
    args.dtypes = list(dict.fromkeys(resolve_dtype(d, "cpu") for d in args.dtypes))  # both sides get the same name
    if args.gguf:
        try:
            import llama_cpp  # noqa: F401  (only to fail here, before any run, if it is missing)
        except ImportError:
            sys.exit(
                "error: --gguf needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp from source)"
            )
    # label -> command; each run takes its thread count from OMP_NUM_THREADS (run())
    sample = [sys.executable, "sample.py", "--ckpt", f"hf:{args.model}", "--prompt", args.prompt, "--temperature", "0"]
    sample += ["--max_new_tokens", str(args.tokens), "--num_samples", "2", "--device", "cpu"]
    runs = {f"sample.py {d}": sample + ["--dtype", d] for d in args.dtypes}
    for d in args.dtypes:
        runs[f"transformers {d}"] = [sys.executable, "-c", HF_SCRIPT, args.model, d, str(args.tokens), args.prompt]
    for path in args.gguf:
        runs[f"llama.cpp {os.path.basename(path)}"] = [sys.executable, "-c", LLAMA_CPP_SCRIPT, path, str(args.tokens)]
        runs[f"llama.cpp {os.path.basename(path)}"].append(args.prompt)
    results = {}
    for rep in range(args.reps):
        for threads in args.threads:
            for label, cmd in runs.items():
                rate, n, text = run(cmd, threads)
                results.setdefault((threads, label), []).append((rate, n, text))
                print(f"rep {rep} {threads} threads {label:32s} {rate:6.1f} tok/s ({n} tokens)", file=sys.stderr)
    print(
        f"\nDecode speed, {args.model}, {args.tokens} new tokens, greedy "
        f"(median of {args.reps} interleaved runs; tok/s)\n"
    )
    first = next(iter(runs))
    print(f"| threads | run | tok/s | vs {first} | same text as {first} |")
    print("|---|---|---|---|---|")
    for threads in args.threads:
        base = results[(threads, first)]
        for label in runs:
            rs = results[(threads, label)]
            rate = statistics.median(r for r, _, _ in rs)
            same = all(t == base[0][2] for _, _, t in rs)
            ratio = rate / statistics.median(r for r, _, _ in base)
            print(f"| {threads} | {label} | {rate:.1f} | {ratio:.2f}x | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()

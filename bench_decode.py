"""
Decode speed on CPU: sample.py against transformers' generate, on the same Hugging Face Llama, greedy.

    python bench_decode.py --model path/to/SmolLM2-135M-Instruct
        [--tokens 128] [--reps 2] [--threads 2] [--dtypes float32 bfloat16]

Each run is a fresh process (sample.py itself, and a small transformers script), timed the same way: the
second of two generations from the same prompt (the first warms up), prompt encoding included, tokens
counted until max_new_tokens or end of text. Runs alternate ours, theirs, ours, theirs... so that load
from other processes on a shared machine falls on both alike. Prints a markdown table (median tok/s) and
whether both produced the same text.
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
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides (default: all cores)")
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["auto"],
        choices=["auto", "float32", "bfloat16"],
        help="auto: what this CPU computes natively (common.auto_dtype) (default: %(default)s)",
    )
    p.add_argument("--prompt", default="Once upon a time, in a small village,")
    args = p.parse_args()
    args.dtypes = list(dict.fromkeys(resolve_dtype(d, "cpu") for d in args.dtypes))  # both sides get the same name
    results = {}
    for rep in range(args.reps):
        for dtype in args.dtypes:
            ours = [
                sys.executable,
                "sample.py",
                "--ckpt",
                f"hf:{args.model}",
                "--prompt",
                args.prompt,
                "--temperature",
                "0",
                "--max_new_tokens",
                str(args.tokens),
                "--dtype",
                dtype,
                "--num_samples",
                "2",
                "--device",
                "cpu",
            ]
            theirs = [sys.executable, "-c", HF_SCRIPT, args.model, dtype, str(args.tokens), args.prompt]
            for who, cmd in (("ours", ours), ("transformers", theirs)):
                rate, n, text = run(cmd, args.threads)
                results.setdefault((dtype, who), []).append((rate, n, text))
                print(f"rep {rep} {dtype:8s} {who:12s} {rate:6.1f} tok/s ({n} tokens)", file=sys.stderr)
    print(
        f"\nDecode speed, {args.model}, {args.tokens} new tokens, greedy, {args.threads} threads "
        f"(median of {args.reps} interleaved runs; tok/s)\n"
    )
    print("| dtype | sample.py | transformers generate | ours / theirs | same text |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes:
        ours, theirs = results[(dtype, "ours")], results[(dtype, "transformers")]
        a, b = statistics.median(r for r, _, _ in ours), statistics.median(r for r, _, _ in theirs)
        same = all(t == theirs[0][2] for _, _, t in ours + theirs)
        print(f"| {dtype} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()

"""
Sample text from a trained model, streaming tokens as they are generated.

    python sample.py --ckpt out/tiny --prompt "The for statement" --max_new_tokens 200
    python sample.py --ckpt hf:path/to/llama_dir --prompt "Once upon a time" --temperature 0

stdout carries only the text (the prompt, then the continuation); logs go to stderr.
"""

import stopping

# first of all, before torch takes a second or two to import: a signal meanwhile ends in one line too
if __name__ == "__main__":
    stopping.stop_on_signals("stopped by {signal} (sample.py writes no file: nothing to keep)")

import argparse
import sys
import time

import torch

import checkpoint
from common import DTYPES, device_error, resolve_dtype


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/tiny", help="checkpoint file, out_dir, or hf:DIR")
    p.add_argument("--prompt", default="\n", help="text to continue; @FILE reads it from a file")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="the weights' dtype; auto: what the device computes natively (common.auto_dtype)",
    )
    args = p.parse_args(argv)
    if (
        args.temperature < 0
        or (args.top_p is not None and not 0 < args.top_p <= 1)
        or (args.top_k is not None and args.top_k < 1)
    ):
        p.error("need temperature >= 0, 0 < top_p <= 1 and top_k >= 1")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        p.error("need --max_new_tokens >= 1 and --num_samples >= 1")
    if device_error(args.device):
        p.error(device_error(args.device))
    prompt = args.prompt
    if prompt.startswith("@"):
        with open(prompt[1:]) as f:
            prompt = f.read()

    try:
        model, tokenizer, _ = checkpoint.load_model(
            args.ckpt, args.device, DTYPES[resolve_dtype(args.dtype, args.device)]
        )
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    ids = tokenizer.encode(prompt)
    if tokenizer.bos_id is not None:  # models trained with a BOS token (Llama family) expect it first
        ids = [tokenizer.bos_id] + ids
    if not ids:
        sys.exit("error: the prompt encodes to no tokens; give a non-empty --prompt")
    if len(ids) + args.max_new_tokens > model.rope_cos.size(0):
        sys.exit(
            f"error: prompt ({len(ids)} tokens) + max_new_tokens exceeds the model's {model.rope_cos.size(0)} positions"
        )
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40, flush=True)
        sys.stdout.write(prompt)
        t0, new_ids, printed = time.perf_counter(), [], ""
        # the continuation is decoded after the prompt, not alone: sentencepiece-style tokenizers (Llama 2,
        # TinyLlama) strip the leading space of a sequence, which would glue the first new word to the prompt
        prefix = tokenizer.decode(ids)
        for step in model.generate(
            torch.tensor([ids], device=args.device),
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            eot_id=tokenizer.eot_id,
            generator=generator,
        ):
            if int(step[0]) == tokenizer.eot_id:  # end of text ends the sample; it is not printed
                break
            new_ids.append(int(step[0]))
            # a byte-level token can stop inside a multi-byte character: print only complete text
            text = tokenizer.decode(ids + new_ids)[len(prefix) :]
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(printed) :])
                sys.stdout.flush()
                printed = text
        sys.stdout.write(tokenizer.decode(ids + new_ids)[len(prefix) :][len(printed) :])
        print(flush=True)
        dt = time.perf_counter() - t0
        print(f"[{len(new_ids)} tokens in {dt:.2f}s, {len(new_ids) / dt:.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()

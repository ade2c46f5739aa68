"""
Check a GPU in one command: the CUDA tests, the training step's speed at both phases' shapes, torchrun with NCCL,
and a growth study at a width the CPU could not afford. Under 9.5 minutes on one GPU, offline.

    python prepare_data.py --sources pystdlib --vocab_size 2048   # once, beforehand (offline, ~1 min on a CPU)
    python gpu_check.py                                           # on the GPU machine: out/gpu_check/table.md
    python gpu_check.py --dry_run                                 # every step at toy size on the CPU (CI does)

Each step runs in its own process group with its own time limit (a step's limit is also cut to what is left of
--time_limit); a step that fails or runs out of time is recorded with its log, and the next one still runs:
    cuda_tests    pytest tests/test_cuda.py (compiled bf16 training, FlashAttention, SIGTERM and resume, eval_mc
                  and Muon against the CPU, torchrun with NCCL)
    bench_phase1  bench.py configs/phase1.py in bf16 + torch.compile: tokens/s, MFU against the datasheet peak
    bench_phase2  the same at phase 2's shape: 24 layers, configs/phase2.py's batch of 8
    torchrun      configs/tiny.py under a 1-process torchrun (NCCL), compiled: SIGTERM after step 20, resume 20 further
    growth        4 vs 8 layers at width 64 on data/pystdlib (study_growth.py): the crossover at a few budgets,
                  then scratch, the no-growth control and stack at 2 seeds at about twice the crossover, sized
                  from the speed the first crossover runs measure; OUT/growth/growth_study.json, study_growth's
                  format, so docs/growth.md can put width 64 beside width 32
The table (OUT/table.md, rewritten after every step, so a kill leaves the finished steps; printed at the end):
the commit, the GPU and torch, then per step pass / fail / timeout / skipped, its figures and its wall time against
its limit. A failed step's reason is the end of its log, OUT/logs/STEP.log. docs/performance.md says how to read it.
The exit status is 1 if any step did not pass. `--steps cuda_tests,bench_phase1` runs only those (the others are
listed as skipped), e.g. to re-check one step or to fit a shorter lease. Checkpoints and runs stay under --work
(they do not come back from a lent GPU machine: only OUT does).
"""

import stopping

if __name__ == "__main__":
    stopping.stop_on_signals("stopped by {signal}: the table so far is in the output directory")

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="out/gpu_check", help="the table and every log (default: %(default)s)")
p.add_argument("--work", default="out/gpu_check_runs", help="runs and checkpoints (default: %(default)s)")
p.add_argument("--data_dir", default="data/pystdlib", help="prepared data for torchrun and growth")
p.add_argument("--dry_run", action="store_true", help="every step at toy size on the CPU (CUDA tests skip)")
p.add_argument(
    "--time_limit",
    type=float,
    default=None,
    help="seconds for all steps, each step's in proportion (default: 570, dry run 600)",
)
p.add_argument(
    "--steps",
    default=None,
    help="a comma-separated subset of the steps to run (default: all), e.g. cuda_tests,bench_phase1",
)
args = p.parse_args()
out, work = os.path.abspath(args.out), os.path.abspath(args.work)
os.makedirs(os.path.join(out, "logs"), exist_ok=True)
os.makedirs(work, exist_ok=True)
# The device command that runs this is killed at 10 minutes: 570 s of steps leave 30 s for start-up and the table.
# The dry run's 600 s and its steps' limits are guards against a hang: on 2 cores shared with other jobs (load 10-12,
# AVX-512 BF16 AMD EPYC) it took 400-530 s, most of it process start-ups; on quiet cores, a fraction of that.
default_limit = 600 if args.dry_run else 570
time_limit = args.time_limit or default_limit
t_start = time.monotonic()
deadline = t_start + time_limit
device = "cpu" if args.dry_run else "cuda"

# Each step's own limit on the GPU (an H200 host, 16 cores), none of it measured there yet: assumed, ~10 s for a
# process to import torch and start CUDA (a 2-core AVX-512 BF16 host shared with other jobs took 7.9 s for
# `import torch` alone), torch.compile at ~40-60 s for 12 layers of 768 and ~60-90 s for 24 (Dynamo unrolls the
# layers into one graph, so compiling grows with depth), the CUDA tests ~2 minutes (their processes start in
# turn). The growth study takes what the others leave, at most 300 s: they should finish well under their limits.
LIMITS = dict(cuda_tests=150, bench_phase1=100, bench_phase2=120, torchrun=100, growth=300)
if args.dry_run:
    LIMITS = dict(data=120, cuda_tests=90, bench_phase1=60, bench_phase2=60, torchrun=120, growth=240)
LIMITS = {name: limit * time_limit / default_limit for name, limit in LIMITS.items()}  # --time_limit scales them
rows = []  # (step, result, figures, seconds, limit)
selected = set(LIMITS) if args.steps is None else set(args.steps.split(","))
if selected - set(LIMITS):
    raise SystemExit(f"--steps: no step {', '.join(sorted(selected - set(LIMITS)))}; the steps: {', '.join(LIMITS)}")
running = None  # the step's process, whose group a stop of this script stops too


def left():
    return deadline - time.monotonic()


def log_tail(path, n=6):
    """The last lines of a log, progress bars dropped: what a failed row shows."""
    try:
        text = open(path, errors="replace").read().replace("\r", "\n")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not re.match(r"^\S*:?\s*\d+%\|", line)]
    return " / ".join(lines[-n:])


def start(name, argv):
    """argv in its own process group (so a time-out stops its children too), output to OUT/logs/NAME.log."""
    with open(os.path.join(out, "logs", f"{name}.log"), "w") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        global running
        running = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        return running


def finish(proc, timeout):
    """The exit status, or None after stopping the process group at the time-out."""
    try:
        return proc.wait(timeout=max(timeout, 0))
    except subprocess.TimeoutExpired:
        stop_group(proc)
        return None


def stop_group(proc):
    """SIGTERM to proc's process group first (train.py saves and exits), SIGKILL 10 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:  # the group is gone already
            break
    proc.wait()


def stop_step(signum):
    """A stop of gpu_check.py stops the running step too (in a session of its own, a Ctrl-C at the terminal does not
    reach it), then writes the table so far and says where it is."""
    stopping.ignore()
    if running is not None and running.poll() is None:
        stop_group(running)
    write_table()
    stopping.stop(
        signum, f"stopped by {signal.Signals(signum).name}: the table so far is {os.path.join(out, 'table.md')}"
    )


def run(name, argv, timeout):
    """Run argv to its end or to the time-out. Returns (exit status or None, its log's text)."""
    rc = finish(start(name, argv), timeout)
    return rc, open(os.path.join(out, "logs", f"{name}.log"), errors="replace").read()


class StepFailed(Exception):
    """A step's one-line reason for failing."""


def step(name, body):
    """Run one step (body(limit) returns its figures, or raises StepFailed) and record it in the table."""
    limit = min(LIMITS[name], left() - 15)  # a step stopped at its limit takes a few seconds more to end
    if name not in selected:
        rows.append((name, "skipped", "not in --steps", 0.0, LIMITS[name]))
        write_table()
        return
    if limit < 10:
        rows.append((name, "skipped", "no time left", 0.0, LIMITS[name]))
        write_table()
        return
    t0 = time.monotonic()
    result = "pass"
    try:
        figures = body(limit)
    except StepFailed as e:
        result, figures = "timeout" if "timed out" in str(e) else "fail", str(e)
    except Exception as e:  # a bug of this script's own: recorded, and the next step still runs
        result, figures = "fail", f"gpu_check.py: {type(e).__name__}: {e}"
    rows.append((name, result, figures, time.monotonic() - t0, limit))
    write_table()


def checked(name, argv, timeout):
    rc, text = run(name, argv, timeout)
    if rc is None:
        raise StepFailed(f"timed out after {timeout:.0f} s: {log_tail(os.path.join(out, 'logs', name + '.log'))}")
    if rc != 0:
        raise StepFailed(f"exit {rc}: {log_tail(os.path.join(out, 'logs', name + '.log'))}")
    return text


def write_table():
    lines = [
        f"GPU check, {'a dry run on the CPU' if args.dry_run else 'on the GPU'}: `python {' '.join(sys.argv)}`",
        "",
        "| | |",
        "|---|---|",
        f"| commit | {commit} |",
        f"| GPU | {info.get('gpu') or 'none'} |",
        f"| torch | {info.get('torch', '?')} (CUDA {info.get('cuda') or 'none'}) |",
        f"| wall time | {time.monotonic() - t_start:.0f} s of {time_limit:.0f} |",
        "",
        "| step | result | figures | wall time (limit) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {r} | {f.replace('|', '/')} | {s:.0f} s ({lim:.0f} s) |" for n, r, f, s, lim in rows]
    with open(os.path.join(out, "table.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out, "table.md.tmp"), os.path.join(out, "table.md"))
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# What runs here: the commit, the GPU, torch (in a process of its own, like everything that touches CUDA)
try:
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    commit = git.stdout.strip() if git.returncode == 0 else "unknown (not a git checkout)"
except OSError:
    commit = "unknown (no git here)"
probe = (
    "import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
    "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) + ' (compute capability %d.%d)' "
    "% torch.cuda.get_device_capability(0) if c else None}))"
)
try:
    info = json.loads(subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=60).stdout)
except (subprocess.TimeoutExpired, ValueError):
    info = {}
write_table()
stopping.on_stop(own_handler=stop_step)
if not args.dry_run and not info.get("gpu"):
    raise SystemExit(
        f"error: torch sees no CUDA GPU here ({info or 'torch did not start'}); "
        "python gpu_check.py --dry_run runs every step at toy size on the CPU"
    )

# -----------------------------------------------------------------------------------------------
# Data: prepared beforehand (prepare_data.py needs rustbpe to train its BPE, which a GPU machine may not have);
# a dry run without it makes the small pydocs set in a minute
data = os.path.abspath(args.data_dir)
if args.dry_run and not os.path.exists(os.path.join(data, "meta.json")):
    data = os.path.join(work, "data", "pydocs")

    def prepare(limit):
        shutil.rmtree(data, ignore_errors=True)
        checked(
            "data", [PY, "prepare_data.py", "--sources", "pydocs", "--vocab_size", "2048", "--out_dir", data], limit
        )
        return f"{data}: pydocs, a 2048-token BPE"

    step("data", prepare)
has_data = os.path.exists(os.path.join(data, "meta.json"))
no_data = f"no prepared data in {data}: python prepare_data.py --sources pystdlib --vocab_size 2048, beforehand"


# -----------------------------------------------------------------------------------------------
# 1. The CUDA tests (on a CPU every one of them skips, and says so)
def cuda_tests(limit):
    # pytest.ini's addopts are left out: a plugin they may name (xdist) need not be installed here
    pytest = [PY, "-m", "pytest", "-q", "-ra", "-o", "addopts=", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    text = checked("cuda_tests", pytest, limit)
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|skipped|failed)", line)]
    return summary[-1].strip("= ") if summary else "no summary line"


step("cuda_tests", cuda_tests)


# -----------------------------------------------------------------------------------------------
# 2. The training step's speed at phase 1's and phase 2's shapes (bench.py: random tokens, no data loading)
def bench(name, config, mode, *extra):
    def body(limit):
        text = checked(name, [PY, "bench.py", config, "--device", device, "--modes", mode, *extra], limit)
        row = next((line for line in text.splitlines() if line.startswith(f"| {mode} |")), None)
        if row is None:
            raise StepFailed(
                f"no row for {mode} in bench.py's table: {log_tail(os.path.join(out, 'logs', name + '.log'))}"
            )
        cells = [c.strip() for c in row.strip("|").split("|")]
        peak = re.search(r"MFU against (.+)", text)
        return f"{cells[1]} tok/s, MFU {next(c for c in cells if c.endswith('%'))}" + (
            f" against {peak.group(1).strip()}" if peak else ""
        )

    return body


if args.dry_run:  # the tiny config's shape, eager fp32: the same script and table, seconds each
    toy = ("--steps", "2", "--warmup", "1", "--vocab_size", "2048")
    step("bench_phase1", bench("bench_phase1", "configs/tiny.py", "fp32", *toy))
    step("bench_phase2", bench("bench_phase2", "configs/tiny.py", "fp32", *toy, "--n_layer", "8"))
else:
    step("bench_phase1", bench("bench_phase1", "configs/phase1.py", "bf16+compile"))
    step(
        "bench_phase2",
        bench("bench_phase2", "configs/phase1.py", "bf16+compile", "--n_layer", "24", "--batch_size", "8"),
    )


# -----------------------------------------------------------------------------------------------
# 3. torchrun: one process (NCCL on a GPU, gloo on the CPU), the tiny config compiled as the GPU recipe is;
# SIGTERM to torchrun after step 20, as a scheduler sends it (torchrun passes it on); resume 20 steps further.
# The signal lands some steps after the one seen (toy steps take milliseconds), so the end counts from the stop.
STOP_AT, MORE = (3, 5) if args.dry_run else (20, 20)


def metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path).read().splitlines() if line.endswith("}")]


def torchrun(limit):
    if not has_data:
        raise StepFailed(no_data)
    t_end = time.monotonic() + limit
    run_dir = os.path.join(work, "torchrun")
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", "configs/tiny.py"]
    argv += [f"--data_dir={data}", f"--out_dir={run_dir}", f"--device={device}", f"--compile={not args.dry_run}"]
    argv += ["--log_interval=1", f"--lr_decay_iters={2 * (STOP_AT + MORE)}", "--warmup_iters=2"]
    if args.dry_run:  # toy steps of 2 x 64 tokens, and no matmul-peak probe (a second per start)
        argv += ["--batch_size=2", "--block_size=64", "--val_tokens=2048", "--peak_flops=1e12"]
    proc = start("torchrun", argv + ["--max_iters=1000000"])
    while not any("loss" in e and e["iter"] >= STOP_AT for e in metrics(run_dir)):
        if proc.poll() is not None or time.monotonic() > t_end - 30:  # 30 s kept for the resume
            finish(proc, 0)
            raise StepFailed(
                f"no step {STOP_AT} (exit {proc.returncode}): {log_tail(os.path.join(out, 'logs', 'torchrun.log'))}"
            )
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    rc = finish(proc, 45)  # torchrun gives its workers 30 s to leave
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", open(os.path.join(out, "logs", "torchrun.log")).read())
    if not stopped:
        raise StepFailed(f"SIGTERM saved nothing (exit {rc}): {log_tail(os.path.join(out, 'logs', 'torchrun.log'))}")
    k = int(stopped.group(1))
    end = k + MORE
    text = checked("torchrun_resume", argv + [f"--max_iters={end}", "--init_from=resume"], t_end - time.monotonic())
    steps = [e["iter"] for e in metrics(run_dir) if "loss" in e]
    if steps != list(range(1, end + 1)) or "weights identical across 1 ranks" not in text:
        raise StepFailed(f"the resume did not continue step by step from {k} to {end}: logged steps {steps}")
    tok_s = statistics.median(e["tok_per_s"] for e in metrics(run_dir) if "tok_per_s" in e)
    return f"stopped by SIGTERM at step {k} (exit {rc}), resumed to {end}; {tok_s:,.0f} tok/s (median)"


step("torchrun", torchrun)


# -----------------------------------------------------------------------------------------------
# 4. Growth at width 64 (issue 27): the widest width for which twice the crossover fits in <= 4 epochs of
# pystdlib's 10M train tokens, by the width-32 study's crossover at ~43 tokens per parameter (docs/growth.md: 8 x 32,
# 166k parameters, tied at 7.2M tokens): 43 x 534k parameters = 23M tokens, 9.2e13 FLOPs. A batch of 64 x 128 tokens
# (the CPU study's 8 x 128 would leave the GPU idle: a tiny model's step costs kernel launches, not FLOPs), eager (a
# compile per run would cost more than the runs), 4 runs at a time.
# In three calls of study_growth.py, one output directory: the crossover at C/8 and C/4, whose runs also measure
# the speed; then the larger budgets, up to C, that leave time for the growth runs; then scratch, the no-growth
# control and stack at 2 seeds at twice the smallest budget from which 8 layers win, at most 4 epochs of the
# 8-layer model (more epochs would confound the answer) and at most what the time left affords.
if args.dry_run:
    SIZES = dict(n_embd=16, n_head=2, intermediate_size=48, block_size=32, batch_size=4, jobs=2)
    SIZES.update(eval_iters=2, evals=4, final_eval_iters=4)
else:
    SIZES = dict(n_embd=64, n_head=4, intermediate_size=176, block_size=128, batch_size=64, jobs=4)
    SIZES.update(eval_iters=5, evals=12, final_eval_iters=40)
TOKENS_PER_PARAM_AT_CROSSOVER = 43
MAX_EPOCHS = 4


def model_shape(n_layer, vocab):
    """(parameters, training FLOPs per token) of one of the study's models, by model.py's own count."""
    import torch

    from model import LLaMA, ModelConfig

    s = SIZES
    shape = dict(n_head=s["n_head"], n_kv_head=s["n_head"], n_embd=s["n_embd"], block_size=s["block_size"])
    shape.update(tie_embeddings=True)
    config = ModelConfig(vocab_size=vocab, n_layer=n_layer, intermediate_size=s["intermediate_size"], **shape)
    with torch.device("meta"):
        m = LLaMA(config)
    return m.num_params(), m.flops_per_token(s["block_size"])


def calibrate(study):
    """{layers: (tokens/s of one run beside the others, seconds of start-up and evaluation per run)} of the finished
    runs: train.py's logged tok/s, and the wall time study_growth recorded for each (without a logged rate, the
    rate over the whole wall time, which counts the start-up in: slower, so safe)."""
    wall = json.load(open(os.path.join(study, "wall_times.json")))
    seen = {}
    for name, seconds in wall.items():
        entries = metrics(os.path.join(study, "runs", name))
        layers = re.match(r"scratch_L(\d+)_", name)
        if layers and entries:
            tokens = max(e.get("tokens", 0) for e in entries)
            rates = [e["tok_per_s"] for e in entries if e.get("tok_per_s")]
            rate = statistics.median(rates) if rates else tokens / seconds
            seen.setdefault(int(layers.group(1)), []).append((rate, max(0.0, seconds - tokens / rate)))
    return {n: (min(r for r, _ in v), max(s for _, s in v)) for n, v in seen.items()}


def growth(limit):
    if not has_data:
        raise StepFailed(no_data)
    t_end = time.monotonic() + limit
    study, copied = os.path.join(work, "growth"), os.path.join(out, "growth")
    shutil.rmtree(study, ignore_errors=True)
    meta = json.load(open(os.path.join(data, "meta.json")))
    vocab = 64 * math.ceil(meta["vocab_size"] / 64)  # as train.py pads it
    (params, fpt8), (_, fpt4) = model_shape(8, vocab), model_shape(4, vocab)
    fpt = {8: fpt8, 4: fpt4}
    estimate = 2e9 if args.dry_run else TOKENS_PER_PARAM_AT_CROSSOVER * params * fpt8  # toy: seconds a run
    # 3 significant digits, as study_growth names its runs: every call then means the same runs
    ladder = [float(f"{estimate * f:.3g}") for f in (1 / 8, 1 / 4, 1 / 2, 1)]
    epochs_cap = float(f"{MAX_EPOCHS * meta['tokens']['train'] * fpt8:.3g}")
    argv = [PY, "study_growth.py", "--out_dir", study, "--data_dir", data, "--device", device, "--no-compile"]
    argv += [f"--{k}={v}" for k, v in SIZES.items()]
    argv += ["--layers=8", "--factors=2", "--seeds", "1", "2", "--crossover_seeds=1", "--operators=stack"]
    argv += ["--schedules=cosine", "--growth_points=0.5", "--optims=reset", "--noise=0", "--lr_mults=1"]
    spent = {}

    def study_growth(name, *extra):
        t0 = time.monotonic()
        try:
            return checked(name, argv + list(extra), t_end - time.monotonic())
        finally:  # what it wrote comes back with OUT, finished or not; the runs' checkpoints stay in --work
            os.makedirs(copied, exist_ok=True)
            for f in ("growth_study.json", "wall_times.json", "crossover.png", "growth_study.png"):
                if os.path.exists(os.path.join(study, f)):
                    shutil.copy(os.path.join(study, f), copied)
            if os.path.isdir(os.path.join(study, "logs")):
                shutil.copytree(os.path.join(study, "logs"), os.path.join(copied, "logs"), dirs_exist_ok=True)
            spent[name] = time.monotonic() - t0

    calibration = ladder[: SIZES["jobs"] // 2]  # as many runs as run at a time: their speed is the study's
    study_growth("growth_calibrate", "--crossover_only", "--crossover_budgets", *map(str, calibration))
    speed = calibrate(study)

    def run_time(layers, flops):
        rate, start_up = speed[layers]
        return start_up + flops / fpt[layers] / rate

    def runs_time(runs):
        """[(layers, flops)] --jobs at a time: the longest run, or all the work spread over the jobs."""
        return max(max(run_time(*r) for r in runs), sum(run_time(*r) for r in runs) / SIZES["jobs"])

    # a call's cost beyond its runs: study_growth's start-up, its speed probe, the final evaluations, the plots
    overhead = max(5.0, spent["growth_calibrate"] - runs_time([(n, b) for b in calibration for n in (4, 8)]))

    def growth_time(budget):
        """Scratch (8 layers, the budget) beside the chain base (4 layers, half) -> stack.py -> stack's grown phase
        and the control (half each); 2 seeds of each."""
        half = budget / 2
        chain = run_time(4, half) + speed[8][1] + max(run_time(8, half), run_time(4, half))
        per_seed = [(8, budget), (4, half), (8, half), (4, half)]
        return overhead + max(chain, runs_time(2 * per_seed) + 2 * speed[8][1] / SIZES["jobs"])

    def fits(seconds):
        return seconds < 0.85 * (t_end - time.monotonic())  # a margin: the speed varies with what runs beside

    def growth_budget(crossover):
        return min(2 * crossover, epochs_cap)

    # the larger crossover budgets, as many as leave time for a growth study at twice the largest of them
    n = len(calibration)
    more = next(
        (
            ladder[n:k]
            for k in range(len(ladder), n, -1)
            if fits(
                overhead
                + runs_time([(m, b) for b in ladder[n:k] for m in (4, 8)])
                + growth_time(growth_budget(ladder[k - 1]))
            )
        ),
        [],
    )
    if more:
        study_growth("growth_crossover", "--crossover_only", "--crossover_budgets", *map(str, calibration + more))
    crossover = json.load(open(os.path.join(study, "growth_study.json")))["crossover"]
    winner = {
        float(b): min(row, key=lambda layers: statistics.mean(r["final_eval_loss"] for r in row[layers]))
        for b, row in crossover.items()
    }
    budgets = sorted(winner)
    seen = ", ".join(f"{b:.3g}: {winner[b]} layers win" for b in budgets)
    # the crossover: the smallest budget from which 8 layers win at every larger budget measured
    won = [b for i, b in enumerate(budgets) if all(winner[c] == "8" for c in budgets[i:])]
    budget = target = growth_budget(won[0] if won else budgets[-1])
    while not fits(growth_time(budget)) and budget > ladder[0]:
        budget = float(f"{budget / 1.25:.3g}")
    if not fits(growth_time(budget)) and not args.dry_run:  # (toy runs take seconds: a dry run checks the path)
        raise StepFailed(f"crossover {seen}; no time left for the growth runs")
    study_growth("growth_study", "--budget", str(budget), "--crossover_budgets", *map(str, budgets))
    runs = json.load(open(os.path.join(study, "growth_study.json")))["runs"]
    final = {name: [s["final_eval_loss"] for s in run["seeds"]] for name, run in runs.items()}
    scratch = statistics.mean(final["scratch"])
    gaps = ", ".join(f"{n} {statistics.mean(final[n]) - scratch:+.4f}" for n in ("stack", "no_growth") if n in final)
    why = (
        "cut to the time left"
        if budget < target
        else f"{MAX_EPOCHS} epochs"
        if target == epochs_cap
        else "2x the crossover"
        if won
        else "no crossover seen: 2x the largest budget"
    )
    return (
        f"width {SIZES['n_embd']}, crossover {seen}; at {budget:.3g} FLOPs ({why}): scratch {scratch:.4f} (seeds "
        f"{', '.join(f'{x:.4f}' for x in final['scratch'])}), {gaps} (final loss on {SIZES['final_eval_iters']} val "
        f"batches); growth/growth_study.json"
    )


step("growth", growth)

table = write_table()
print(table)
sys.exit(0 if all(r[1] == "pass" or r[0] not in selected for r in rows) else 1)

"""study_growth.py: the quick study end to end (runs, growth, JSON shape, FLOPs accounting, resume, report), and
the score against hand-computed values."""

import json
import os

import pytest
from conftest import run_here, run_script

import study_growth


def test_flops_to_reach_interpolates():
    curve = [[0.0, 8.0], [10.0, 6.0], [20.0, 5.0]]
    assert study_growth.flops_to_reach(curve, 5.5) == 15.0  # halfway between 6.0 and 5.0
    assert study_growth.flops_to_reach(curve, 9.0) == 0.0
    assert study_growth.flops_to_reach(curve, 4.9) is None
    # a dip below the target that the run does not hold does not count: the last crossing does
    noisy = [[0.0, 8.0], [10.0, 4.0], [20.0, 6.0], [30.0, 4.0]]
    assert study_growth.flops_to_reach(noisy, 5.0) == 25.0
    assert study_growth.flops_to_reach(noisy[:3], 5.0) is None


def results(scratch, grown, curve_grown):
    run = lambda finals, curve, layers: {
        "layers": layers,
        "growth_point": None,
        "seeds": [
            {"seed": i + 1, "final_val_loss": f, "final_eval_loss": f, "curve": curve[:-1] + [[curve[-1][0], f]]}
            for i, f in enumerate(finals)
        ],
    }
    return {"runs": {"scratch": run(scratch, [[0.0, 8.0], [100.0, 5.0]], 8), "stack": run(grown, curve_grown, 8)}}


def test_speedup_only_beyond_the_seed_spread():
    # scratch ends at 5.0 on average after 100 FLOPs; the grown run gets there at 50 (mean curve 6.0 -> 4.0 over 0..100)
    rows, target = study_growth.score(results([4.95, 5.05], [3.9, 4.1], [[0.0, 6.0], [100.0, 4.0]]))
    assert target == pytest.approx(5.0)
    assert rows["stack"]["reach"] == pytest.approx(50.0) and rows["stack"]["speedup"] == pytest.approx(1.0)
    assert rows["stack"]["spread"] == pytest.approx(0.2) and rows["scratch"]["mean"] == pytest.approx(5.0)
    # the seeds overlap: no speedup is claimed, and the table says why
    rows, _ = study_growth.score(results([4.95, 5.05], [4.9, 5.06], [[0.0, 6.0], [100.0, 4.98]]))
    assert rows["stack"]["speedup"] is None and rows["stack"]["why"] == "within the seed spread"
    rows, _ = study_growth.score(results([5.0], [4.0], [[0.0, 6.0], [100.0, 4.0]]))
    assert rows["stack"]["speedup"] is None and "1 seed" in rows["stack"]["why"]


def test_bad_flags_are_refused():
    for flags, message in (
        (["--factors", "3"], "must be >= 2 and divide --layers 8"),
        (["--growth_points", "1.0"], "strictly between 0 and 1"),
        (["--budget", "0"], "must be positive"),
        (["--layers", "4"], "dus needs a base of at least 3 layers"),
    ):
        proc = run_script("study_growth.py", *flags, check=False)
        assert proc.returncode != 0 and message in proc.stderr


def test_every_seed_for_scratch_the_control_the_first_and_the_best_operator_only():
    args = study_growth.parse_args(
        [
            "--seeds",
            "1",
            "2",
            "--operators",
            "stack",
            "zero",
            "interleave",
            "--growth_points",
            "0.5",
            "0.25",
            "--schedules",
            "cosine",
        ]
    )
    seeds = lambda runs: {name: [seed for _, seed, _, _ in entries] for name, entries in runs.items()}
    before = seeds(study_growth.plan(args, 2048)[1])  # the best operator is not known yet
    assert before == {
        "scratch": [1, 2],
        "no_growth": [1, 2],
        "stack": [1, 2],
        "zero": [1],
        "interleave": [1],
        "scratch_lr0.5": [1],
        "scratch_lr2": [1],
        "stack_at0.25": [1],
        "stack_copy": [1],
        "stack_noise0.2": [1],
        "stack_lr0.5": [1],
        "stack_lr2": [1],
    }
    jobs, runs, _ = study_growth.plan(args, 2048, best={"cosine": "zero"})
    assert seeds(runs) == {**before, "zero": [1, 2]}
    # the order runs start in: scratch, the control and the first operator before any other operator's second
    # seed, the sweeps last
    order = [job.name for job in sorted(jobs.values(), key=lambda job: job.priority) if job.flops]
    first = lambda prefix: next(i for i, name in enumerate(order) if name.startswith(prefix))
    assert (
        first("nogrowth")
        < first("stack_g2_at0.5_reset_noise0_lr1_b2e+13_s2")
        < first("zero_g2_at0.5_reset_noise0_lr1_b2e+13_s1")
        < first("zero_g2_at0.5_reset_noise0_lr1_b2e+13_s2")
        < first("scratch_L8_b2e+13_lr0.5")
        < first("stack_g2_at0.25")
    )


def test_wsd_runs_hold_the_peak_to_the_growth_step_and_decay_once():
    args = study_growth.parse_args(
        ["--seeds", "1", "--operators", "stack", "--growth_points", "0.75", "--optims", "copy", "--noise", "0"]
    )
    jobs, runs, _ = study_growth.plan(args, 2048)
    assert set(runs) == {
        "scratch",
        "no_growth",
        "stack",
        "scratch_lr0.5",
        "scratch_lr2",
        "stack_lr0.5",
        "stack_lr2",
        "scratch_wsd",
        "no_growth_wsd",
        "stack_wsd",
        "scratch_lr0.5_wsd",
        "scratch_lr2_wsd",
        "stack_lr0.5_wsd",
        "stack_lr2_wsd",
    }
    assert {name: entries[0][0].schedule for name, entries in runs.items()} == {
        name: "wsd" if name.endswith("_wsd") else "cosine" for name in runs
    }
    flags = lambda name: dict(a[2:].split("=", 1) for a in jobs[name].argv() if a.startswith("--"))
    scratch = flags("scratch_L8_b2e+13_lr1_wsd_s1")
    assert scratch["lr_schedule"] == "wsd" and scratch["decay_frac"] == "0.2" and scratch["learning_rate"] == "0.002"
    base = flags("scratch_L4_b1.5e+13_lr1_stable_s1")  # the base ends at its peak: no decay
    assert base["lr_schedule"] == "wsd" and base["decay_frac"] == "0"
    control = flags("nogrowth_L4_at0.75_lr1_b2e+13_wsd_s1")
    # the grown phase continues at the base's peak (not the cosine phase's half) and spends the budget's last 20%
    # decaying
    assert control["learning_rate"] == "0.002" and float(control["decay_frac"]) == pytest.approx(0.2 / 0.25)
    assert control["init_from"].endswith("scratch_L4_b1.5e+13_lr1_stable_s1") and int(control["warmup_iters"]) > 0
    # under cosine each phase is as before: half the peak, its own warmup, no decay_frac
    cosine = flags("nogrowth_L4_at0.75_lr1_b2e+13_s1")
    assert cosine["learning_rate"] == "0.001" and cosine["lr_schedule"] == "cosine" and "decay_frac" not in cosine
    # every run is AdamW at the record's peak, whatever the tiny configs (Muon, 6e-3) say
    assert scratch["muon"] == control["muon"] == cosine["muon"] == "False"
    proc = run_script("study_growth.py", "--growth_points", "0.9", check=False)
    assert (
        proc.returncode != 0
        and "--decay_frac must be positive and no larger than any grown phase's share" in proc.stderr
    )


def test_quick_study_end_to_end(pydocs_data, tmp_path, capsys):
    out = tmp_path / "study"
    args = [
        "study_growth.py",
        "--quick",
        "--seeds",
        "1",
        "--jobs",
        "2",
        f"--data_dir={pydocs_data}",
        f"--out_dir={out}",
        "--dtype=float32",  # pinned: the refusal below needs another dtype than the one that ran, on any host
    ]
    first = run_here(*args)
    with open(out / "growth_study.json") as f:
        res = json.load(f)
    # the JSON shape of the issue, with train.py's own FLOPs and the base's included in the grown runs'
    assert res["corpus"] == pydocs_data and res["budget_flops"] == 4e9 and res["settings"]["dtype"] == "float32"
    assert res["corpus_train_tokens"] == (os.path.getsize(os.path.join(pydocs_data, "train_000000.bin")) - 256) // 2
    assert sorted(res["runs"]) == ["no_growth", "no_growth_wsd", "scratch", "scratch_wsd", "stack", "stack_wsd"]
    assert {k: res["runs"][k]["layers"] for k in res["runs"]} == {
        "scratch": 8,
        "no_growth": 4,
        "stack": 8,
        "scratch_wsd": 8,
        "no_growth_wsd": 4,
        "stack_wsd": 8,
    }
    assert {k: res["runs"][k]["schedule"] for k in res["runs"]} == {
        k: "wsd" if k.endswith("wsd") else "cosine" for k in res["runs"]
    }
    step = 4 * 32  # tokens per step of --quick
    for name, run in res["runs"].items():
        (seed,) = run["seeds"]
        assert (
            set(seed) >= {"seed", "final_val_loss", "tokens", "flops", "curve", "final_eval_loss"} and seed["seed"] == 1
        )
        assert 0 < seed["final_eval_loss"] < 10
        assert seed["final_val_loss"] == seed["curve"][-1][1] and seed["flops"] == seed["curve"][-1][0]
        assert all(a[0] < b[0] for a, b in zip(seed["curve"], seed["curve"][1:]))
        assert abs(seed["flops"] - 4e9) < step * 2e6  # the budget, to within a step or so of the largest model
        if not name.startswith("scratch"):  # the curve starts where the base stopped
            assert run["growth_point"] == 0.5 and 0.45 * 4e9 < seed["curve"][0][0] < 0.55 * 4e9
    assert list(res["crossover"]) == ["4e+09"] and set(res["crossover"]["4e+09"]) == {"4", "8"}
    assert res["crossover"]["4e+09"]["8"] == res["runs"]["scratch"]["seeds"]  # one run, shared
    assert os.path.getsize(out / "growth_study.png") > 0 and os.path.getsize(out / "crossover.png") > 0
    assert "| scratch | 8 |" in first.stdout and "| stack | 8 | 0.5 | 1 |" in first.stdout
    assert "1 seed: no spread" in first.stdout and "Schedule **wsd**" in first.stdout
    assert "| stack | " in first.stdout.split("The schedules side by side")[1]
    # resumable: a second run finds every job done, runs nothing and writes the same results
    study_growth.main(args[1:])
    assert "11 of 11 jobs done or recorded; 0 FLOPs to run" in capsys.readouterr().err
    assert json.load(open(out / "growth_study.json")) == res
    # the JSON is the record: a run it holds is not run again, even where its directory is gone
    import shutil

    shutil.rmtree(out / "runs" / res["runs"]["stack_wsd"]["seeds"][0]["run"])
    study_growth.main(args[1:])
    assert "11 of 11 jobs done or recorded; 0 FLOPs to run" in capsys.readouterr().err
    assert json.load(open(out / "growth_study.json")) == res
    # a record from before bits per byte gets them from its loss: the same val tokens, so the same bytes
    stripped = json.load(open(out / "growth_study.json"))
    for seed in [s for run in stripped["runs"].values() for s in run["seeds"]]:
        del seed["final_eval_bpb"]
    with open(out / "growth_study.json", "w") as f:
        json.dump(stripped, f)
    study_growth.main(args[1:])
    capsys.readouterr()
    backfilled = json.load(open(out / "growth_study.json"))
    for name, run in res["runs"].items():
        assert backfilled["runs"][name]["seeds"][0]["final_eval_bpb"] == pytest.approx(
            run["seeds"][0]["final_eval_bpb"], rel=1e-6
        )
    # docs/growth.md's tables come from the JSON alone
    study_growth.main(["--report", f"--out_dir={out}"])
    assert capsys.readouterr().out == first.stdout
    # the same directory with other settings is refused rather than mixed
    with pytest.raises(SystemExit, match="holds runs with other settings"):
        study_growth.main([*args[1:], "--dtype=bfloat16"])

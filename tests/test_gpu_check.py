"""What gpu_check.py's growth step relies on: study_growth.py --crossover_only plans the crossover alone, and the
JSON it writes takes the growth runs of whatever --budget the crossover then points to. (gpu_check.py itself runs
end to end in CI, as `python gpu_check.py --dry_run`.)"""

import json
import os

import pytest

import study_growth


def test_crossover_only_plans_the_crossover_and_nothing_else():
    args = study_growth.parse_args(["--crossover_only", "--crossover_budgets", "1e12", "2e12", "--operators", "stack"])
    jobs, runs, crossover = study_growth.plan(args, 2048)
    assert runs == {} and sorted(crossover) == [1e12, 2e12]
    assert sorted(jobs) == sorted(f"scratch_L{n}_b{b}_lr1_s1" for n in (4, 8) for b in ("1e+12", "2e+12"))


def write_json(args, data_dir, budget, runs):
    """A growth_study.json as study_growth writes it, with one crossover budget and the given runs."""
    from data import read_shard, shard_paths

    record = {"seed": 1, "final_val_loss": 5.0, "final_eval_loss": 5.0, "final_eval_bpb": 2.0, "tokens": 1, "flops": 1}
    keys = ("layers", "n_embd", "n_head", "intermediate_size", "block_size", "batch_size", "eval_iters")
    results = {
        "corpus": data_dir,
        "corpus_train_tokens": sum(len(read_shard(p)) for p in shard_paths(data_dir, "train")),
        "budget_flops": budget,
        "settings": {
            **{k: getattr(args, k) for k in keys},
            "final_eval_iters": args.final_eval_iters,
            "dtype": args.dtype,
            "vocab_size": study_growth.load_meta(data_dir)["vocab_size"],
        },
        "crossover": {"1e+12": {"4": [dict(record)], "8": [dict(record, final_eval_loss=4.9)]}},
        "runs": runs,
        "job_wall_s": {},
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "growth_study.json"), "w") as f:
        json.dump(results, f)


def test_a_crossover_only_json_takes_the_growth_runs_of_any_budget(pydocs_data, tmp_path):
    common = ["--out_dir", str(tmp_path), "--data_dir", pydocs_data, "--dtype", "float32"]
    args = study_growth.parse_args([*common, "--budget", "3e12"])
    meta = study_growth.load_meta(pydocs_data)
    write_json(args, pydocs_data, None, {})  # what --crossover_only wrote
    records = study_growth.load_records(args, meta)
    assert set(records["crossover"]) == {("1e+12", "4", 1), ("1e+12", "8", 1)} and records["budget"] is None
    # once it holds growth runs, their budget is the study's: another one is refused rather than mixed
    run = {"layers": 8, "growth_point": None, "schedule": "cosine", "seeds": []}
    write_json(args, pydocs_data, 2e12, {"scratch": run})
    with pytest.raises(SystemExit, match="budget 2e"):
        study_growth.load_records(args, meta)
    # ...except by a --crossover_only pass, which adds crossover runs and keeps the budget the runs were made at
    args = study_growth.parse_args([*common, "--crossover_only"])
    assert study_growth.load_records(args, meta)["budget"] == 2e12


def test_a_crossover_only_study_plots_without_a_growth_budget(pydocs_data, tmp_path):
    """--crossover_only writes budget_flops None (gpu_check's growth step plots after each pass): the crossover plot
    is drawn without the growth budget's marker, and with it once the growth runs have a budget."""
    args = study_growth.parse_args(["--out_dir", str(tmp_path), "--data_dir", pydocs_data, "--dtype", "float32"])
    for budget in (None, 2e12):
        write_json(args, pydocs_data, budget, {})
        results = json.load(open(os.path.join(args.out_dir, "growth_study.json")))
        os.remove(os.path.join(args.out_dir, "growth_study.json"))
        study_growth.plot(args, results)
        assert os.path.getsize(tmp_path / "crossover.png") > 0
        os.remove(tmp_path / "crossover.png")

"""analysis.py: what is done is skipped, an interrupted run resumes, the table's spread is right, the
figures are drawn. (The runs themselves are train.py and evaluate.py, tested elsewhere.)"""
import json
import os
import re

import numpy as np
import pytest

import analysis


def args_for(tmp_path, *extra):
    return analysis.parser.parse_args(["run", "ablation", "--out", str(tmp_path), *extra])


def fake_run(out, run, seed, summary, curve, config=None):
    d = analysis.run_dir(out, run, seed)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "eval.json"), "w") as f:
        json.dump({"summary": summary, "trained": {"config": config}}, f)
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        for step, f1 in curve:
            f.write(json.dumps({"step": step, "val": {"F1": f1}}) + "\n")


def test_commands_resume_a_started_run_and_pass_the_runs_flags(tmp_path):
    args = args_for(tmp_path, "--steps", "50", "--device", "cuda", "--train-args", "--d-m 64")
    train, evaluate = analysis.commands(args, "no-scale", 1)
    assert train[1] == "train.py" and "--resume" not in train
    assert train[train.index("--steps") + 1] == "50" and train[train.index("--seed") + 1] == "1"
    assert "--no-scale" in train and "--d-m" in train and train[train.index("--device") + 1] == "cuda"
    assert evaluate[evaluate.index("--skip") + 1] == "1000" and "--device" in evaluate and "--d-m" not in evaluate
    for cmd in (train, evaluate):                                       # the data and the shared lower-block states
        assert cmd[cmd.index("--data-dir")
                   + 1] == "data" and cmd[cmd.index("--cache-dir") + 1] == os.path.join(str(tmp_path), "cache")
    os.makedirs(analysis.run_dir(str(tmp_path), "no-scale", 1))
    open(os.path.join(analysis.run_dir(str(tmp_path), "no-scale", 1), "latest.pt"), "w").close()
    assert "--resume" in analysis.commands(args, "no-scale", 1)[0]


def test_run_skips_what_is_done_and_reports_failures(tmp_path, monkeypatch, capsys):
    for run in ("default", "no-ib", "no-scale"):
        fake_run(str(tmp_path), run, 0, {"F1": 0.5}, [(10, 0.5)])
    called = []
    monkeypatch.setattr(analysis.subprocess, "run", lambda *a,
                        **k: called.append(a) or type("R", (), {"returncode": 1})())
    analysis.run(args_for(tmp_path, "--seeds", "0"))
    assert not called and capsys.readouterr().out.count("done before") == 3
    with pytest.raises(SystemExit, match="3 runs failed"):
        analysis.run(args_for(tmp_path, "--seeds", "1"))                 # new seed: trains; every train fails
    assert len(called) == 3
    with pytest.raises(SystemExit, match="no experiment 'betas'"):
        analysis.runs_of("betas")


def test_report_table_has_mean_and_sample_std_and_draws_figures(tmp_path):
    out = str(tmp_path)
    for seed, (f1, ls) in enumerate([(0.6, 0.5), (0.8, 0.7)]):
        summary = {"F1": f1, "ES": 0.9, "GS": 0.8, "LS": ls, "NS_p": 0.3}
        for run in ("default", "no-ib", "no-scale", "beta=0.01", "beta=1", "c_loc_end=10"):
            fake_run(out, run, seed, summary, [(250, f1 - 0.1), (500, f1)])
    rng = np.random.default_rng(0)                                      # a latent map: 60 edits, 2 seeds and 1
    domain = np.array(["counterfact"] * 40 + ["zsre"] * 20)
    relation = np.array(["{} is in", "{} speaks"] * 20 + [""] * 20)
    separable = [rng.normal(size=(60, 8)) + 10 * (domain == "zsre")[:, None] for _ in range(2)]   # datasets 10σ apart
    np.savez(os.path.join(out, "latent.npz"), domain=domain, relation=relation, **{"mu_default@seed0": separable[0],
             "mu_default@seed1": separable[1], "mu_no-ib": rng.normal(size=(60, 8))})   # no-ib: a file without seeds
    analysis.report(analysis.parser.parse_args(["report", "--out", out]))
    text = open(os.path.join(out, "README.md")).read()
    # F1 0.6 and 0.8: mean 0.7, sample std 0.1414
    assert "| default | 2 | 500 | 0.700 ± 0.141 | 0.900 ± 0.000 | 0.800 ± 0.000 | 0.600 ± 0.141 |" in text
    assert "| default | 2 | 1.000 ± 0.000 (0.667, 60 edits) |" in text        # k-NN tells 10σ apart; chance: 40 of 60
    assert float(re.search(r"\| no-ib \| 1 \| ([0-9.]+) \(0.667", text).group(1)) < 0.9   # noise: near chance
    for name in ("beta.png", "ablation.png", "c_loc.png", "latent.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000 and f"]({name})" in text


def test_report_names_settings_in_which_runs_differ_beyond_their_own_flags(tmp_path):
    out, summary = str(tmp_path), {"F1": 0.5, "ES": 0.9, "GS": 0.8, "LS": 0.5, "NS_p": 0.3}
    base = {"beta": 0.1, "c_loc_end": 6.0, "steps": 2000, "out": "x"}
    fake_run(out, "default", 0, summary, [(10, 0.5)], {**base, "seed": 0, "out": "a"})
    fake_run(out, "beta=1", 0, summary, [(10, 0.5)], {**base, "beta": 1.0, "seed": 0})
    fake_run(out, "default", 1, summary, [(10, 0.5)], {**base, "seed": 1})
    # β is beta=1's own flag; seeds and --out differ
    assert analysis.recipe_differences(analysis.collect(out)) == []
    fake_run(out, "no-ib", 0, summary, [(10, 0.5)], {**base, "c_loc_end": 4.0, "no_ib": True})   # an older default
    assert analysis.recipe_differences(analysis.collect(out)) == ["c_loc_end"]
    analysis.report(analysis.parser.parse_args(["report", "--out", out]))
    text = open(os.path.join(out, "README.md")).read()
    assert "the runs differ in c_loc_end" in text
    assert "| beta=1 | 1 | 10 | 0.500 | 0.900 | 0.800 | 0.500 | 0.300 |" in text   # one seed: no ± (no spread measured)


def test_latent_map_of_fewer_edits_than_t_snes_perplexity(tmp_path):
    """t-SNE needs perplexity < samples: a map of 12 edits (perplexity 30 by default) is drawn, and the
    report of that folder works (it once failed on every later report)."""
    out, rng = str(tmp_path), np.random.default_rng(0)
    domain, relation = np.array(["counterfact"] * 8 + ["zsre"] * 4), np.array(["{} is in"] * 8 + [""] * 4)
    np.savez(os.path.join(out, "latent.npz"), domain=domain, relation=relation,
             **{"mu_default@seed0": rng.normal(size=(12, 8))})
    assert analysis.latent_figures(out) == ["latent.png"]
    assert os.path.getsize(os.path.join(out, "latent.png")) > 1000

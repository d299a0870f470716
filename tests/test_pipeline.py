"""train.py and evaluate.py end to end on tiny local models: the loss goes down, the checkpoint
rebuilds the editor, training and evaluation resume, another model's checkpoint is refused."""
import glob
import json
import math
import re
import sys

import pytest
import torch

from conftest import CHATML, DATA_DIR, TINY_EDITOR, random_batch, run, tiny
from data import chat_text, load
from hooks import functional_edit, grad_decomposition
from hypernet import IBKE, EditorConfig
from losses import LossWeights, answer_nll, ibke_loss, locality_kl, scored
from model import edit_module_names, native_dtype, weight_shape

MEND = {"latent_len": 0, "ib": False, "token_scale": False}       # the peers as configurations (hypernet.py)


@pytest.mark.parametrize("config", [{"aggregate": "sum"}, {"aggregate": "ridge"}, {"aggregate": "cancel"}, MEND,
                                    MEND | {"aggregate": "ridge"}], ids=["sum", "ridge", "cancel", "mend", "malmen"])
def test_training_steps_lower_the_loss(config):
    """The loop of train.py, on a fixed batch of a tiny model: Adam on the hypernetwork lowers L."""
    model = tiny("llama", init=0.2)
    names = edit_module_names(model)
    editor = IBKE({n: weight_shape(model.get_submodule(n)) for n in names},
                  EditorConfig(d_m=32, latent_dim=16, heads=2, eta_init=0.1, **config)).train()
    if not config.get("latent_len", 1):                            # MEND: no latent, nothing to bottleneck
        assert not any("attn" in k or "queries" in k or "to_mu" in k for k in editor.state_dict())
    optimizer = torch.optim.Adam(editor.parameters(), lr=1e-2)
    edit, loc = random_batch(seed=5), random_batch(seed=7)
    gen = edit                                     # random tokens have no rephrase; reuse the edit rows
    with torch.no_grad():
        pre = scored(model(input_ids=loc["input_ids"]).logits, loc["labels"])[0]
    losses = []
    for _ in range(30):
        decomposition, mask = grad_decomposition(model, names, edit)
        deltas, kl = editor(decomposition, mask)
        with functional_edit(model, deltas):
            edit_nll = answer_nll(*scored(model(input_ids=edit["input_ids"]).logits, edit["labels"]), 3).mean()
            gen_nll = answer_nll(*scored(model(input_ids=gen["input_ids"]).logits, gen["labels"]), 3).mean()
            post = scored(model(input_ids=loc["input_ids"]).logits, loc["labels"])[0]
        loss, _ = ibke_loss(edit_nll, gen_nll, locality_kl(pre, post), kl, LossWeights())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses


def test_checkpoint_rebuilds_editor_with_same_validation_numbers(trained):
    out, data_dir = trained
    validations = [json.loads(line) for line in open(out / "b" / "log.jsonl") if '"val"' in line]
    best = max(validations, key=lambda v: v["val"]["F1"])             # what best.pt holds (first best)
    best = next(v for v in validations if v["val"]["F1"] == best["val"]["F1"])
    ckpt = torch.load(out / "b" / "best.pt", weights_only=False)
    assert ckpt["step"] == best["step"] and "tiny-gpt2" in ckpt["model"]
    run("evaluate.py", "--ckpt", out / "b" / "best.pt", "--split", "val", "--data-dir", data_dir, "--out",
        out / "val.json")
    summary = json.load(open(out / "val.json"))["summary"]
    for k in ("ES", "GS", "LS", "F1"):
        assert summary[k] == pytest.approx(best["val"][k], abs=1e-9), k


def test_loaded_editor_holds_no_optimizer_state(trained, monkeypatch):
    """evaluate.py reads the checkpoint on the host and keeps only the hypernetwork: Adam's moments
    (twice the hypernetwork's size) once sat on the evaluation device for the whole run."""
    import checkpoint
    from editor import Editor
    out, _ = trained
    where = []
    load = torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: where.append(k.get("map_location")) or load(*a, **k))
    loaded = Editor.load(str(out / "b" / "best.pt"), "cpu")
    hypernet, ckpt = loaded.hypernet, loaded.ckpt
    assert where == ["cpu"] and "optimizer" not in ckpt and "hypernet" not in ckpt
    assert ckpt["step"] > 0 and not hypernet.training


def test_resume_continues_step_count_and_optimizer_state(trained):
    out, _ = trained
    resumed, straight = (torch.load(out / d / "latest.pt", weights_only=False) for d in ("a", "b"))
    assert resumed["step"] == straight["step"] == 10
    steps = [json.loads(line)["step"] for line in open(out / "a" / "log.jsonl") if '"val"' not in line]
    assert steps == list(range(1, 11))                                   # 1..6, then 7..10
    adam_steps = {s["step"].item() for s in resumed["optimizer"]["state"].values()}
    assert adam_steps == {10.0}
    assert resumed["sampler"] == straight["sampler"]                    # the same edits drawn: exact
    assert torch.equal(resumed["torch_rng"], straight["torch_rng"])      # the same latent samples: exact
    # The same run, interrupted or not, up to rounding: after the resume the hidden-state cache is
    # refilled by other batches, so sums run in another order (conftest.reorder_rtol: ~4e-5 relative
    # for this model, forward and backward). Adam passes that on to each update component with
    # gradient signal; one that is pure rounding noise can step by up to lr either way, so compare
    # the update since the resume in norm, at 1e-2: 250x the rounding, 9x under what drawing other
    # edits changes (a sampler left unrestored: 0.087, by mutation).
    start = torch.load(out / "step6.pt", weights_only=False)["hypernet"]
    floats = [k for k in start if start[k].is_floating_point()]
    moved = torch.cat([(straight["hypernet"][k] - start[k]).flatten() for k in floats])
    apart = torch.cat([(resumed["hypernet"][k] - straight["hypernet"][k]).flatten() for k in floats])
    assert moved.norm() > 0 and apart.norm() <= 1e-2 * moved.norm(), (apart.norm() / moved.norm()).item()


def test_resume_with_cache_dir_reuses_the_saved_states(tiny_folders, data_dir, tmp_path):
    """--cache-dir: the resumed run takes the lower blocks' states of the texts seen before the stop
    from disk (8 records, so texts recur), and ends where the straight run ends, as a resume without
    them does (the bound and its reasons: test_resume_continues_step_count_and_optimizer_state)."""
    common = ["--model", tiny_folders["gpt2"], "--data-dir", data_dir, "--val-every", "3", "--val-size", "6",
              "--batch-size", "3", "--eta-init", "1e-2", "--train-size", "8", "--extra-loc", "0", "--dtype", "float32",
              *TINY_EDITOR]
    run("train.py", *common, "--steps", "10", "--out", tmp_path / "straight")
    run("train.py", *common, "--steps", "6", "--out", tmp_path / "c", "--cache-dir", tmp_path / "cache")
    start = torch.load(tmp_path / "c" / "latest.pt", weights_only=False)["hypernet"]
    resumed = run("train.py", "--resume", "--steps", "10", "--out", tmp_path / "c")
    assert int(re.search(r"(\d+) texts' lower-block states", resumed.stdout).group(1)) > 0
    straight, ours = (torch.load(tmp_path / d / "latest.pt", weights_only=False)["hypernet"] for d in ("straight", "c"))
    floats = [k for k in start if start[k].is_floating_point()]
    moved = torch.cat([(straight[k] - start[k]).flatten() for k in floats])
    apart = torch.cat([(ours[k] - straight[k]).flatten() for k in floats])
    assert moved.norm() > 0 and apart.norm() <= 1e-2 * moved.norm(), (apart.norm() / moved.norm()).item()


def test_dtype_auto_is_resolved_once_and_saved(tiny_folders, data_dir, tmp_path):
    """train.py's default --dtype auto becomes what this CPU computes natively, printed and saved as
    that dtype (never "auto"), so evaluate.py and a resume run what training ran."""
    log = run("train.py", "--model", tiny_folders["gpt2"], "--data-dir", data_dir, "--steps", "1", "--val-every", "1",
              "--val-size", "4", "--batch-size", "2", *TINY_EDITOR, "--out", tmp_path / "auto")
    chosen = native_dtype("cpu")
    assert f"dtype: {chosen} (--dtype auto" in log.stdout
    assert torch.load(tmp_path / "auto" / "latest.pt", weights_only=False)["config"]["dtype"] == chosen


@pytest.mark.slow
def test_c_after_trains_on_the_unedited_models_continuations(data_dir, tmp_path):
    """--c-after, on the real model: the continuations are made, and every step's log has the term,
    above 0 on some step (the first step's ΔW is already a gradient step of size η)."""
    log = run("train.py", "--data-dir", data_dir, "--steps", "2", "--val-every", "2", "--val-size", "4",
              "--batch-size", "2", "--train-size", "8", "--dtype", "float32", *TINY_EDITOR, "--c-after", "1",
              "--after-len", "4", "--out", tmp_path / "after")
    steps = [json.loads(line) for line in open(tmp_path / "after" / "log.jsonl") if '"val"' not in line]
    assert len(steps) == 2 and all("after" in s for s in steps) and max(s["after"] for s in steps) > 0, steps
    assert " after " in log.stdout                                     # in the printed step line too


def test_chat_asks_a_steps_loss_prompts_in_the_template(tiny_folders, tmp_path, monkeypatch):
    """train.py --chat 1: every generality and locality prompt of a step (the --extra-loc records' too) is
    the template's text with the prompt said again after it; the edit prompts stay plain (how the share
    is drawn: test_data)."""
    import train
    from model import load_model
    loaded, seen = [], []

    class Drawn(Exception):
        pass

    def with_template(*args, **kwargs):
        model, tok = load_model(*args, **kwargs)
        tok.chat_template = CHATML
        loaded.append(tok)
        return model, tok

    def first_step(runner, hypernet, batch, others, *rest):
        seen.append((batch, others))
        raise Drawn
    monkeypatch.setattr(train, "load_model", with_template)
    monkeypatch.setattr(train, "train_step", first_step)
    monkeypatch.setattr(sys, "argv", ["train.py", "--model", tiny_folders["gpt2"], "--data-dir", DATA_DIR, *TINY_EDITOR,
                                      "--val-size", "6", "--batch-size", "3", "--chat", "1", "--out", str(tmp_path)])
    with pytest.raises(Drawn):
        train.main()
    (batch, others), tok = seen[0], loaded[0]
    asked = [q for r in batch for q, _ in r.generality + r.locality] + [o.prompt for o in others]
    said = [q.rsplit("<|im_start|>assistant\n", 1)[-1] for q in asked]
    assert len(asked) > len(batch) and asked == [chat_text(tok, q) + q for q in said]
    assert not any("<|im_start|>" in r.prompt for r in batch)


def test_second_phase_from_another_runs_checkpoint(trained):
    """--resume CKPT --out NEW: step and optimizer carry on, given flags override, fixed ones are refused."""
    out, _ = trained
    run("train.py", "--resume", out / "a" / "latest.pt", "--steps", "12", "--c-loc", "3", "--lr", "5e-5", "--out",
        out / "p2")
    phase2 = torch.load(out / "p2" / "latest.pt", weights_only=False)
    assert phase2["step"] == 12 and phase2["config"]["c_loc"] == 3 and phase2["config"]["val_size"] == 6
    assert phase2["config"]["c_loc_end"] is None                    # a --c-loc given alone is held
    # the last step ran at step 11 of 12 of the cosine from the given lr (the trained run's schedule)
    assert phase2["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-5 * 0.5 * (1 + math.cos(math.pi * 11 / 12)))
    assert {s["step"].item() for s in phase2["optimizer"]["state"].values()} == {12.0}
    assert torch.load(out / "a" / "latest.pt", weights_only=False)["step"] == 10   # the first run is untouched
    validations = [json.loads(line) for line in open(out / "p2" / "log.jsonl") if '"val"' in line]
    assert [v["step"] for v in validations] == [12] and (out / "p2" / "best.pt").exists()  # its own best
    refused = run("train.py", "--resume", out / "a" / "latest.pt", "--d-m", "64", "--out", out / "p3", check=False)
    assert refused.returncode != 0 and "fixes --d-m" in refused.stderr and "Traceback" not in refused.stderr


def test_second_phase_may_change_the_aggregation(trained):
    """--resume CKPT --aggregate cancel from a sum run: the hypernetwork carries over, λ starts at
    --ridge-init with its own learning rate, the optimizer is fresh; the run's own continuation keeps
    its aggregation."""
    out, _ = trained
    run("train.py", "--resume", out / "a" / "latest.pt", "--aggregate", "cancel", "--ridge-init", "0.5",
        "--steps", "11", "--lr", "1e-4", "--lr-lambda", "1e-2", "--out", out / "agg")
    ckpt = torch.load(out / "agg" / "latest.pt", weights_only=False)
    before, after = torch.load(out / "a" / "latest.pt", weights_only=False)["hypernet"], ckpt["hypernet"]
    lams = [k for k in after if k.endswith("log_lambda")]
    assert lams and not any(k.endswith("log_lambda") for k in before) and set(after) == set(before) | set(lams)
    # the one step (10 of 11) ran at the cosine's 0.5(1 + cos(10π/11)) of each group's peak
    lr = [peak * 0.5 * (1 + math.cos(math.pi * 10 / 11)) for peak in (1e-4, 1e-2)]
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == pytest.approx(lr)
    # a fresh Adam's first step moves each parameter by at most its lr (it is ±lr·g/(|g| + eps))
    assert all((after[k] - math.log(0.5)).abs().max() <= lr[1] * (1 + 1e-3) for k in lams)
    params = [k for k in before if ".norm." not in k]                   # not the inputs' running statistics
    assert all((after[k] - before[k]).abs().max() <= lr[0] * (1 + 1e-3) for k in params)
    refused = run("train.py", "--resume", "--aggregate", "sum", "--out", out / "agg", check=False)
    assert refused.returncode != 0 and "fixes --aggregate" in refused.stderr and "Traceback" not in refused.stderr


def test_second_phase_may_edit_more_blocks(trained):
    """--resume CKPT --edit-layers 4 from a 3-block run: the new block's modules join (IBKE.carry_over),
    Adam starts afresh, evaluate.py rebuilds the wider editor; the run's own continuation keeps its modules."""
    out, data_dir = trained
    log = run("train.py", "--resume", out / "a" / "latest.pt", "--edit-layers", "4", "--steps", "11", "--out",
              out / "wide")
    assert ("edited modules: 6 -> 8; new, from the nearest edited block: transformer.h.0.mlp.c_fc, "
            "transformer.h.0.mlp.c_proj") in log.stdout
    assert "a fresh optimizer (the edited modules changed)\n" in log.stdout            # a sum editor still: no λ
    ckpt = torch.load(out / "wide" / "latest.pt", weights_only=False)
    assert len(ckpt["shapes"]) == 8 and ckpt["config"]["edit_layers"] == 4 and ckpt["step"] == 11
    assert all(s["step"] == 1 for s in ckpt["optimizer"]["state"].values())      # one step of a fresh Adam
    run("evaluate.py", "--ckpt", out / "wide" / "latest.pt", "--data-dir", data_dir, "--limit", "2", "--out",
        out / "wide.json")
    assert json.load(open(out / "wide.json"))["summary"]["n"] == 2
    refused = run("train.py", "--resume", "--edit-layers", "3", "--out", out / "wide", check=False)
    assert refused.returncode != 0 and "fixes --edit-layers" in refused.stderr and "Traceback" not in refused.stderr


def test_interrupted_evaluation_resumes(trained):
    out, data_dir = trained
    args = ["--ckpt", out / "b" / "latest.pt", "--data-dir", data_dir, "--limit", "6", "--edits-per-batch", "2"]
    run("evaluate.py", *args, "--out", out / "full.json")
    full = json.load(open(out / "full.json"))
    assert len(full["batches"]) == 3 and not (out / "full.json.partial.jsonl").exists()   # finished: nothing stray
    lines = [json.dumps(full["signature"]) + "\n", json.dumps(full["batches"][0]) + "\n",
             json.dumps(full["batches"][1])[:40]]
    with open(out / "cut.json.partial.jsonl", "w") as f:               # as if stopped while writing batch 2
        f.writelines(lines)
    resumed = run("evaluate.py", *args, "--out", out / "cut.json")
    assert "resuming: 1 of 3 batches" in resumed.stdout                 # the cut line dropped and redone
    cut = json.load(open(out / "cut.json"))
    timing = ("ms_per_edit", "peak_mib")                                  # the machine's, not the editor's
    def scores(results):
        return {k: v for k, v in results["summary"].items() if k not in timing}
    assert scores(full) == scores(cut)
    assert full["summary"]["peak_mib"] > 50                              # torch alone takes more resident memory
    with open(out / "cut.json.partial.jsonl", "w") as f:               # another checkpoint's partial file
        f.writelines(lines[:2])
    other = [*args[:1], out / "a" / "latest.pt", *args[2:], "--out", out / "cut.json"]
    kept = open(out / "cut.json").read()
    refused = run("evaluate.py", *other, check=False)                   # cut.json holds b's results: kept
    assert refused.returncode != 0 and "holds the results of another checkpoint" in refused.stderr
    assert open(out / "cut.json").read() == kept and "Traceback" not in refused.stderr
    replaced = run("evaluate.py", *other, "--overwrite")
    assert "holds another evaluation (ckpt, ckpt_sha256 differ); starting afresh" in replaced.stdout


def test_evaluation_skip_takes_a_later_slice(trained):
    out, data_dir = trained
    args = ["--ckpt", out / "b" / "latest.pt", "--data-dir", data_dir, "--edits-per-batch", "2"]
    run("evaluate.py", *args, "--limit", "6", "--out", out / "first6.json")
    run("evaluate.py", *args, "--skip", "2", "--limit", "4", "--out", out / "skip2.json")
    first6, skip2 = ([b["results"] for b in json.load(open(out / f"{f}.json"))["batches"]] for f in ("first6", "skip2"))
    assert len(skip2) == 2 and skip2 == first6[1:] and first6[0] != first6[1]   # the slices differ


def test_evaluation_with_cache_dir_gives_the_same_numbers(trained, tmp_path):
    """--cache-dir: a second evaluation of the same records takes every text's lower-block states (and,
    --generate, the unedited model's continuations) from disk, and scores as an evaluation without the
    cache does (the same states, computed in the same batches: argmax and NLL comparisons, no tie within
    float32 rounding in a random model)."""
    out, data_dir = trained
    args = ["--ckpt", out / "b" / "latest.pt", "--data-dir", data_dir, "--limit", "6", "--edits-per-batch", "2",
            "--generate"]
    run("evaluate.py", *args, "--out", tmp_path / "plain.json")
    first = run("evaluate.py", *args, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "first.json")
    again = run("evaluate.py", *args, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "again.json")
    taken = [int(re.search(r"(\d+) texts' lower-block states", r.stdout).group(1)) for r in (first, again)]
    assert taken[0] == 0 and taken[1] > 6                               # the second: every text of the 6 records
    assert len(glob.glob(str(tmp_path / "cache" / "continuations-*.json"))) == 1
    plain, first, again = ([b["results"] for b in json.load(open(tmp_path / f"{f}.json"))["batches"]]
                           for f in ("plain", "first", "again"))
    assert plain == first == again


def test_checkpoint_of_another_model_is_refused(trained, tiny_folders):
    out, data_dir = trained
    result = run("evaluate.py", "--ckpt", out / "b" / "best.pt", "--model", tiny_folders["llama"],
                 "--data-dir", data_dir, "--limit", "1", "--out", out / "x.json", check=False)
    assert result.returncode != 0 and "was trained on" in result.stderr and "Traceback" not in result.stderr
    result = run("train.py", "--resume", "--model", tiny_folders["llama"], "--out", out / "a", check=False)
    assert result.returncode != 0 and "is a checkpoint of" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_baselines_run(trained):
    out, data_dir = trained
    for method in ("none", "ft"):
        run("evaluate.py", "--ckpt", out / "b" / "best.pt", "--method", method, "--ft-steps", "3",
            "--data-dir", data_dir, "--limit", "2", "--out", out / f"{method}.json")
        summary = json.load(open(out / f"{method}.json"))["summary"]
        assert summary["n"] == 2 and 0 <= summary["ES"] <= 1
        if method == "none":
            assert summary["LS"] == 1.0                                     # nothing edited: nothing moves
    for method, layers in (("rome", "2"), ("memit", "1,2"), ("alphaedit", "1,2")):   # the tiny model's blocks
        run("evaluate.py", "--ckpt", out / "b" / "best.pt", "--method", method, "--peer-layers", layers,
            "--cov-tokens", "300", "--data-dir", data_dir, "--limit", "2", "--out", out / f"{method}.json")
        summary = json.load(open(out / f"{method}.json"))["summary"]
        assert summary["n"] == 2 and 0 <= summary["ES"] <= 1 and 0 <= summary["LS"] <= 1
    assert list((out / "b").glob("cov-*-1-2-300.pt"))                      # C kept beside the checkpoint
    run("evaluate.py", "--ckpt", out / "b" / "best.pt", "--method", "alphaedit", "--peer-layers", "1,2",    # its cache
        "--cov-tokens", "300", "--data-dir", data_dir, "--limit", "4", "--edits-per-batch", "2", "--sequential",
        "merge", "--out", out / "alphaedit-seq.json")
    assert json.load(open(out / "alphaedit-seq.json"))["summary"]["n"] == 4
    bad = run("evaluate.py", "--ckpt", out / "b" / "best.pt", "--method", "rome", "--peer-layers", "9",
              "--data-dir", data_dir, "--out", out / "bad.json", check=False)
    assert bad.returncode != 0 and "0 to 3" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_ft_l_edits_the_real_model(smollm):
    """FT-L (its defaults: 25 Adam steps at 5e-4 on the same six matrices) makes SmolLM2 give the new
    answers: ES well above the unedited model's on the same records. (A tiny random model cannot show
    it: in 32 dimensions most of 50k token embeddings are never an argmax, whatever the update.)"""
    from editor import ft_editor, no_editor
    from metrics import measure, summarise
    from model import edit_module_names
    from runner import Runner
    model, tokenizer = smollm
    names = edit_module_names(model, None, 3)
    records = load("counterfact", DATA_DIR, split="eval")["eval"][:4]
    runner = Runner(model, tokenizer, names, cache=False)
    es = {name: summarise([r for record in records for r in measure(runner, editor, [record])[0]])["ES"]
          for name, editor in (("none", no_editor), ("ft", ft_editor(names)))}
    assert es["none"] < 0.3 and es["ft"] > es["none"] + 0.5, es


def test_draw_takes_locality_records_of_the_edits_relation_or_answer():
    import random
    from data import EditRequest
    from draws import draw, loc_groups
    records = [EditRequest(f"{s} is located in", "Rome", old_target=o, subject=s)
               for s, o in (("Paris", "France"), ("Lyon", "France"), ("Nice", "France"), ("Metz", "Germany"))]
    records += [EditRequest(f"The mother tongue of {s} is", "English", old_target=o, subject=s)
                for s, o in (("Ann", "French"), ("Bob", "German"), ("Cid", "French"))]
    records += [EditRequest(f"{s} is a native speaker of", "Dutch", old_target="French",
                            subject=s) for s in ("Eve", "Flo")]
    for loc_from, key in (("relation", lambda r: r.relation), ("answer", lambda r: r.old_target)):
        groups, sampler = loc_groups(records, loc_from), random.Random(0)
        for _ in range(50):
            batch, others = draw(sampler, records, 2, 1, loc_from, groups)
            for edit, other in zip(batch, others):
                if len(groups[key(edit)]) > 2:                 # enough of its group beside the two edits
                    assert key(other) == key(edit) and other.subject != edit.subject
                assert other not in batch
    assert records[0].relation == "{} is located in" and len(loc_groups(records, "answer")["French"]) == 4
    assert EditRequest("Who is it?", "x").relation is None   # no subject: no relation, drawn from any record


def test_schedule_ramps_the_weights_between_its_fractions_and_holds_them():
    import argparse
    from train import schedule
    args = argparse.Namespace(steps=100, lr=1e-3, lr_schedule="cosine", ramp_start=0.2, ramp_end=0.6, c_edit=1.0,
                              c_gen=1.0, c_gen_end=0.5, c_loc=1.0, c_loc_end=5.0, no_ib=False, beta=0.1,
                              c_after=0.0)
    at = {s: schedule(args, s) for s in (0, 20, 40, 60, 80, 100)}
    assert [w.c_loc for _, w in at.values()] == pytest.approx([1, 1, 3, 5, 5, 5])      # linear from 20 to 60, then held
    assert [w.c_gen for _, w in at.values()] == pytest.approx([1, 1, 0.75, 0.5, 0.5, 0.5])
    assert at[0][0] == pytest.approx(1e-3) and at[100][0] == pytest.approx(0.0, abs=1e-12)   # the cosine
    assert schedule(args, 50)[0] == pytest.approx(0.5e-3)
    args.c_loc_end = None                                   # a weight without an -end is held
    assert schedule(args, 80)[1].c_loc == 1.0


def test_bench_with_a_checkpoint_loads_one_model(trained, tmp_path, monkeypatch):
    """bench.py --ckpt takes the base model from the checkpoint and loads it once (it once loaded a
    second copy, after the peak-memory reset)."""
    import sys
    import bench
    out, data_dir = trained
    loads = []
    load = bench.load_model
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: loads.append(a[0]) or load(*a, **k))
    monkeypatch.setattr(sys, "argv",
                        ["bench.py", "--ckpt", str(out / "b" / "best.pt"), "--repeats", "1", "--dtype", "float32",
                                      "--data-dir", data_dir, "--out", str(tmp_path / "bench.json")])
    bench.main()
    figures = json.load(open(tmp_path / "bench.json"))
    assert len(loads) == 1 and "tiny-gpt2" in loads[0]
    assert figures["args"]["dtype"] == "float32" and figures["train_step_counts"]["host_syncs"] == 0
    assert figures["train_step_counts"]["cuda_never_waits"] is None                # only asked on CUDA
    assert figures["memory"]["size"] == 10000 and figures["memory"]["rank"] == "auto"  # the edit memory's costs

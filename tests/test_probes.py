"""Bad input and bad luck: each probe ends in one line naming the problem (no traceback), or in what
the user meant, and nothing already written changes. Argument probes run the scripts' main() in
this process; a signal needs a real process."""
import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate
import train
from conftest import ROOT, TINY_EDITOR, run, start, wait_for
from data import DataError, load, tokenize


def snapshot(folder) -> dict:
    """Every file under folder: its size and sha256."""
    return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)),
                                 hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest())
            for d, _, files in os.walk(folder) for f in files}


def fails(main, argv, message, monkeypatch) -> str:
    """main() with argv exits with one line holding `message` (not a traceback)."""
    monkeypatch.setattr(sys, "argv", ["script", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_:
        main()
    text = str(exit_.value.code)
    assert message in text, text
    assert text.startswith("error: ")
    return text


@pytest.fixture
def setting(trained, tiny_folders):
    """A finished tiny run (out/b: best.pt, latest.pt, log.jsonl) and the flags that train it."""
    out, data_dir = trained
    common = ["--model", tiny_folders["gpt2"], "--data-dir", data_dir, *TINY_EDITOR, "--val-size", "6", "--batch-size",
              "3"]
    return out, data_dir, common


TRAIN_ARGS = [  # (flags, message)
    (["--steps", "0"], "--steps 0: give at least 1"),
    (["--batch-size", "0"], "--batch-size 0: give at least 1"),
    (["--val-every", "0"], "--val-every 0: give at least 1"),
    (["--val-size", "0"], "--val-size 0: give at least 1"),
    (["--latent-len", "-1"], "--latent-len -1: give 0 (no latent: MEND) or more"),
    (["--latent-len", "0"], "--latent-len 0 has no latent to bottleneck: add --no-ib"),
    (["--heads", "3"], "--heads 3 must divide --d-m 32"),
    (["--extra-loc", "-1"], "--extra-loc -1: give 0 or more"),
    (["--lr", "nan"], "--lr nan: give a positive number below 3.4e38"),
    (["--edit-layers", "-1"], "--edit-layers -1"),
    (["--edit-layers", "999"], "has 4 blocks; give 1..4"),
    (["--chunk", "0"], "--chunk 0: give at least 1"),
    (["--dtype", "float16"], "no loss scaling"),
    (["--ridge-init", "0"], "--ridge-init 0.0: give a positive number below 3.4e38"),
    (["--lr-lambda", "-1"], "--lr-lambda -1.0: give a positive number below 3.4e38"),
    (["--p-single", "1.5"], "--p-single 1.5: give a probability from 0 to 1"),
    (["--c-loc-end", "-1"], "--c-loc-end -1.0: give 0 or a positive weight below 3.4e38"),
    (["--ramp-start", "1"], "--ramp-start 1.0: give a fraction of --steps, 0 to below 1"),
    (["--ramp-start", "0.6", "--ramp-end", "0.5"],
     "--ramp-end 0.5: give a fraction of --steps above --ramp-start (0.6), at most 1"),
    (["--lr", "1e300"], "--lr 1e+300: give a positive number below 3.4e38"),             # inf in float32
    (["--seed", str(10 ** 30)], "give 0 to 2^63 - 1"),
    (["--d-m", str(10 ** 12), "--heads", "1"], "does not fit"),                          # cannot be allocated
    (["--edit-modules", "lm_head", "--edit-layers", "0"], "outside the blocks of transformer.h"),
    (["--eta-scale", "0.5"], "at the start of a second phase; give --resume CKPT"),
    (["--c-after", "-1"], "--c-after -1.0: give 0 or a positive weight below 3.4e38"),
    (["--c-after", "1", "--after-len", "0"], "--after-len 0: give at least 1"),
    (["--c-after", "1", "--after-len", "33"], "--after-len 33: give at most 32"),
    (["--chat", "1.5"], "--chat 1.5: give a share of the prompts from 0 to 1"),
    (["--chat", "0.5"], "--chat: the tokenizer of"),                           # GPT-2's has no chat template
    (["--chat-rows", "generality"], "give --chat SHARE too"),
]


@pytest.mark.parametrize("flags,message", TRAIN_ARGS, ids=[" ".join(f) for f, _ in TRAIN_ARGS])
def test_train_argument_probes(setting, tmp_path, monkeypatch, flags, message):
    out, _, common = setting
    before = snapshot(out)
    fails(train.main, [*common, "--out", tmp_path / "new", *flags], message, monkeypatch)
    assert snapshot(out) == before and not os.listdir(tmp_path)


def test_train_never_clobbers_a_run(setting, tmp_path, monkeypatch):
    out, data_dir, common = setting
    before = snapshot(out / "b")
    fails(train.main, [*common, "--steps", "2", "--out", out / "b"], "holds a run (latest.pt, best.pt)", monkeypatch)
    # a second phase too
    fails(train.main, ["--resume", out / "a" / "latest.pt", "--out", out / "b"], "holds a run", monkeypatch)
    (tmp_path / "file").write_text("x")
    fails(train.main, [*common, "--out", tmp_path / "file"], "is a file; give a folder", monkeypatch)
    assert snapshot(out / "b") == before
    shutil.copytree(out / "b", tmp_path / "b")
    run("train.py", *common, "--steps", "2", "--val-every", "2", "--out", tmp_path / "b", "--overwrite")   # asked for
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "log.jsonl")]
    assert steps == [1, 2, 2] and torch.load(tmp_path / "b" / "latest.pt", weights_only=False)["step"] == 2
    # missing parents: made
    run("train.py", *common, "--steps", "2", "--val-every", "2", "--out", tmp_path / "deep" / "er")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut here", b"not a checkpoint", "pickle"])
def test_unreadable_checkpoints_get_one_line(setting, tmp_path, monkeypatch, content):
    out, data_dir, _ = setting
    path = tmp_path / "bad.pt"
    if content == "pickle":
        torch.save({"weights": torch.zeros(2)}, path)                     # a foreign checkpoint
    else:
        cut = content == b"PK\x03\x04 cut here"                     # a checkpoint's first 4 kB
        path.write_bytes(open(out / "b" / "best.pt", "rb").read()[:4096] if cut else content)
    before = snapshot(tmp_path)
    fails(evaluate.main, ["--ckpt", path, "--data-dir", data_dir, "--out", tmp_path / "r.json"],
          f"not a checkpoint of this project: {path}", monkeypatch)
    fails(train.main, ["--resume", path, "--out", tmp_path / "p2"], f"not a checkpoint of this project: {path}",
          monkeypatch)
    assert snapshot(tmp_path) == before


EVALUATE_ARGS = [
    (["--limit", "0"], "--limit 0: give at least 1"),
    (["--limit", "-1"], "--limit -1"),
    (["--edits-per-batch", "0"], "--edits-per-batch 0: give at least 1"),
    (["--skip", "20000"], "--skip 20000 leaves no records of counterfact eval (10000 in all)"),
    (["--data", "mquake", "--split", "train"], "mquake has no train split (it has: eval)"),
    (["--sequential", "merge", "--generate"], "--generate with --sequential merge"),
    (["--chat"], "--chat is for --generate"),
    (["--generate", "--chat"], "--chat: the tokenizer of"),
    (["--method", "ft", "--ft-lr", "1e300"], "--ft-lr 1e+300: give a positive learning rate below 3.4e38"),
]


@pytest.mark.parametrize("flags,message", EVALUATE_ARGS, ids=[" ".join(f) for f, _ in EVALUATE_ARGS])
def test_evaluate_argument_probes(setting, tmp_path, monkeypatch, flags, message):
    out, data_dir, _ = setting
    before = snapshot(out)
    fails(evaluate.main,
          ["--ckpt", out / "b" / "best.pt", "--data-dir", data_dir, "--out", tmp_path / "r.json", *flags], message,
          monkeypatch)
    assert snapshot(out) == before and not os.listdir(tmp_path)


def test_evaluate_never_writes_over_what_it_did_not_write(setting, tmp_path, monkeypatch):
    out, data_dir, _ = setting
    before = snapshot(out)
    args = ["--ckpt", out / "b" / "best.pt", "--data-dir", data_dir, "--limit", "1"]
    fails(evaluate.main, [*args, "--out", out / "b" / "best.pt"], "is not a results file of evaluate.py", monkeypatch)
    fails(evaluate.main, [*args, "--out", out / "b"], "is a folder", monkeypatch)
    assert snapshot(out) == before
    run("evaluate.py", *args, "--out", tmp_path / "new" / "r.json")                 # a missing folder is made
    run("evaluate.py", *args, "--out", tmp_path / "new" / "r.json")                 # its own results: replaced
    assert os.listdir(tmp_path / "new") == ["r.json"]                               # no partial file left


def test_data_probes(data_dir, tmp_path, capsys, gpt2_tokenizer):
    os.makedirs(tmp_path / "empty" / "counterfact")
    json.dump([], open(tmp_path / "empty" / "counterfact" / "counterfact-edit.json", "w"))
    with pytest.raises(DataError, match="counterfact-edit.json holds no records"):
        load("counterfact", str(tmp_path / "empty"), split="eval")
    records = json.load(open(os.path.join(data_dir, "counterfact", "counterfact-edit.json")))[:4]
    records[1]["target_new"], records[2]["prompt"] = None, " "
    os.makedirs(tmp_path / "bad" / "counterfact")
    json.dump(records, open(tmp_path / "bad" / "counterfact" / "counterfact-edit.json", "w"))
    assert len(load("counterfact", str(tmp_path / "bad"), split="eval")["eval"]) == 2     # no train file needed
    note = capsys.readouterr().out
    assert "left out 2 record(s)" in note and "record 1: field 'target_new' is null" in note
    assert "record 2: field 'prompt' is empty" in note
    wrong = {"a number": (b"42", "holds a JSON int, not a list of records"),          # the file's shape
             "not UTF-8": (b"\xff\xfe[1", "is not UTF-8 text"),
             "a record": (json.dumps(records[:1] + ["text"]).encode(), "record 1: a record must be a JSON object"),
             "a field": (json.dumps([dict(records[0], ground_truth=7)]).encode(),   # a field's type
                         "record 0: field 'ground_truth' is 7, not a string"),
             "a list": (json.dumps([dict(records[0], rephrase_prompt=["a"])]).encode(),
                        "record 0: field 'rephrase_prompt' is [\"a\"], not a string")}
    for name, (content, message) in wrong.items():
        (tmp_path / "bad" / "counterfact" / "counterfact-edit.json").write_bytes(content)
        with pytest.raises(DataError, match=re.escape(message)):
            load("counterfact", str(tmp_path / "bad"), split="eval")
    cases = json.load(open(os.path.join(data_dir, "mquake", "MQuAKE-hard.json")))[:2]
    os.makedirs(tmp_path / "mq" / "mquake")
    for field, value, message in [("prompt", "{} is {x} in", "must be a template with one {} for the subject"),
                                  ("target_true", "Paris", "field 'target_true' is \"Paris\", not an object")]:
        case = json.loads(json.dumps(cases[0]))
        case["requested_rewrite"][0][field] = value
        json.dump([case], open(tmp_path / "mq" / "mquake" / "MQuAKE-hard.json", "w"))
        with pytest.raises(DataError, match=re.escape(message)):
            load("mquake", str(tmp_path / "mq"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="--data-dir .*a_file is a file"):
        load("counterfact", str(tmp_path / "a_file"))
    os.makedirs(tmp_path / "dangling")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling" / "counterfact")
    with pytest.raises(DataError, match="is a link to .*nowhere, which does not exist"):
        load("counterfact", str(tmp_path / "dangling"))
    os.symlink(tmp_path / "nowhere", tmp_path / "data")                      # data/ itself dangling
    with pytest.raises(DataError, match=f"{tmp_path / 'data'} is a link to .*nowhere, which does not exist"):
        load("counterfact", str(tmp_path / "data"))
    (ids, start), = tokenize(gpt2_tokenizer, ["Q:"], ["word " * 1000])              # answers are capped
    assert len(ids) - start == 32


def test_float16_on_cpu_gets_a_note(capsys):
    from model import check_device
    check_device("cpu", "float16")
    assert "float16 matrix products are slow on most CPUs" in capsys.readouterr().out


def test_model_folder_without_config(tmp_path):
    from model import ModelError, load_model
    with pytest.raises(ModelError, match="folder without config.json"):
        load_model(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu(setting, tmp_path, monkeypatch):
    out, data_dir, common = setting
    fails(train.main, [*common, "--device", "cuda", "--out", tmp_path / "x"], "no CUDA GPU is visible", monkeypatch)
    fails(evaluate.main, ["--ckpt", out / "b" / "best.pt", "--device", "cuda", "--out", tmp_path / "r.json"],
          "no CUDA GPU is visible", monkeypatch)


def test_sigint_saves_latest_and_resume_keeps_the_log_in_step(setting, tmp_path):
    """Ctrl-C mid-run: latest.pt holds the last step, one line says so; --resume drops the log lines
    written after it and redoes those steps."""
    _, data_dir, common = setting
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, common), "--steps", "100000", "--val-every",
           "100000",
           "--save-every", "100000", "--log-every", "1", "--out", str(tmp_path / "run")]
    proc = start(cmd)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "stopped by SIGINT at step" in stderr
    step = torch.load(tmp_path / "run" / "latest.pt", weights_only=False)["step"]
    assert step == len(log.read_text().splitlines()) >= 3                    # every step logged, none lost
    with open(log, "a") as f:                                                # as if steps ran after the save
        f.write(json.dumps({"step": step + 1, "loss": 0.0}) + "\n")
    run("train.py", "--resume", "--steps", step + 2, "--out", tmp_path / "run")
    steps = [json.loads(line)["step"] for line in open(log) if '"val"' not in line]
    assert steps == list(range(1, step + 3))


def test_a_diverged_loss_skips_the_update_on_the_device():
    """A loss of 4e15 is finite but diverged: update() leaves the parameters and Adam's step count
    alone, as for NaN, and a sound loss still steps."""
    weight = torch.nn.Parameter(torch.ones(3))
    net = torch.nn.Module()
    net.weight = weight
    optimizer = torch.optim.Adam([weight], lr=0.1, fused=True)
    for scale, moves in ((4e15, False), (float("nan"), False), (1.0, True)):
        before = weight.detach().clone()
        loss = scale * weight.sum()
        parts = {"loss": loss.detach()}
        train.update(net, optimizer, loss, parts, clip=1.0)
        assert (not torch.equal(weight.detach(), before)) == moves, scale
    assert optimizer.state[weight]["step"].item() == 1


def test_a_second_run_into_the_same_out_stops_at_once(setting, tmp_path):
    """Two real processes: a run owns its --out (train.py: the folder; evaluate.py: the results file);
    the second stops with one line naming the first, and changes nothing of it."""
    out, data_dir, common = setting
    script = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, common), "--steps", "100000", "--val-every",
              "100000",
              "--save-every", "100000", "--out", str(tmp_path / "run")]
    first = start(script)
    try:
        wait_for(tmp_path / "run" / "run.lock")
        second = run("train.py", *common, "--seed", "1", "--steps", "5", "--out", tmp_path / "run", check=False)
        assert second.returncode != 0 and f"in use by another run (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr and first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert not (tmp_path / "run" / "run.lock").exists()                        # released at the end
    results = str(tmp_path / "r.json")
    evaluation = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--ckpt", str(out / "b" / "best.pt"), "--data-dir",
                  data_dir,
                  "--limit", "5000", "--out", results]
    first = start(evaluation)
    try:
        wait_for(results + ".lock")
        second = run("evaluate.py", "--ckpt", out / "a" / "latest.pt", "--data-dir", data_dir, "--limit", "2", "--out",
                     results, check=False)
        assert second.returncode != 0 and f"in use by another run (pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=120)
    assert "Traceback" not in stderr and "the same command resumes" in stderr   # Ctrl-C: one line


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    from rundir import RunLock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "out.lock").write_text(dead.stdout.strip())
    with RunLock(str(tmp_path / "out"), "--out out"):
        assert (tmp_path / "out.lock").read_text() == str(os.getpid())
    assert not (tmp_path / "out.lock").exists()


def test_outputs_are_checked_before_any_work(setting, tmp_path, monkeypatch):
    """A --cache-dir that is a file, a read-only --out: one line before the model is loaded."""
    out, data_dir, common = setting
    (tmp_path / "file").write_text("mine")
    fails(train.main, [*common, "--cache-dir", tmp_path / "file", "--out", tmp_path / "new"], "--cache-dir",
          monkeypatch)
    fails(evaluate.main, ["--ckpt", out / "b" / "best.pt", "--data-dir", data_dir, "--cache-dir", tmp_path / "file",
                          "--out", tmp_path / "r.json"], "is a file; give a folder", monkeypatch)
    assert (tmp_path / "file").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["file"]
    if os.geteuid() != 0:                                                    # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        fails(train.main, [*common, "--out", tmp_path / "ro" / "run"], "cannot write", monkeypatch)


def test_non_finite_weights_are_never_an_editor(setting, tmp_path, monkeypatch, capsys):
    """A diverged checkpoint (NaN in the hypernetwork) is refused in one line by evaluate.py; train.py
    never saves such weights as best.pt (here a NaN written into them after each update)."""
    out, data_dir, common = setting
    ckpt = torch.load(out / "b" / "best.pt", weights_only=False)
    first = next(k for k, v in ckpt["hypernet"].items() if v.is_floating_point())
    ckpt["hypernet"][first] = torch.full_like(ckpt["hypernet"][first], float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    fails(evaluate.main, ["--ckpt", tmp_path / "nan.pt", "--data-dir", data_dir, "--out", tmp_path / "r.json"],
          "non-finite weights", monkeypatch)
    real = train.update

    def diverging(hypernet, *args, **kwargs):
        real(hypernet, *args, **kwargs)
        next(hypernet.parameters()).data.fill_(float("nan"))
    monkeypatch.setattr(train, "update", diverging)
    monkeypatch.setattr(signal, "signal", lambda *args: None)            # pytest keeps its own Ctrl-C
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, common), "--steps", "2", "--val-every", "2", "--out",
                                      str(tmp_path / "run")])
    train.main()
    assert not (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "latest.pt").exists()
    assert "non-finite weights: not saved as best.pt" in capsys.readouterr().out


def test_resume_after_a_torn_log_line(setting, tmp_path):
    """Killed while writing log.jsonl: --resume drops the torn last line and goes on."""
    _, _, common = setting
    run("train.py", *common, "--steps", "3", "--val-every", "3", "--out", tmp_path / "run")
    with open(tmp_path / "run" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    resumed = run("train.py", "--resume", "--steps", "4", "--out", tmp_path / "run")
    assert "Traceback" not in resumed.stderr
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl") if '"val"' not in line]
    assert steps == [1, 2, 3, 4]


def test_a_run_killed_before_its_first_checkpoint(setting, tmp_path, monkeypatch):
    """It left only log.jsonl: --resume says so (nothing to resume), and a plain run replaces its lines."""
    out, _, common = setting
    os.makedirs(tmp_path / "k")
    (tmp_path / "k" / "log.jsonl").write_text('{"step": 1, "n": 2, "loss": 3.0}\n{"step": 2, "n"')   # torn too
    fails(train.main, [*common, "--out", tmp_path / "k", "--resume"], "stopped before its first checkpoint",
          monkeypatch)
    run("train.py", *common, "--steps", "2", "--val-every", "2", "--out", tmp_path / "k")
    steps = [json.loads(line)["step"] for line in open(tmp_path / "k" / "log.jsonl")]
    assert steps == [1, 2, 2] and torch.load(tmp_path / "k" / "latest.pt", weights_only=False)["step"] == 2


def test_validation_leaves_out_copies_of_training_records(capsys):
    from data import EditRequest, split_val
    records = [EditRequest(f"q{i % 5}", "a") for i in range(20)]                   # five edits, four copies each
    train_part, val = split_val(records, 4, seed=0)
    assert len(train_part) == 16 and val == []
    assert "4 of the 4 validation records are left out" in capsys.readouterr().out
    unique = [EditRequest(f"q{i}", "a") for i in range(20)]
    assert split_val(unique, 4, seed=0)[1] == [unique[i] for i in split_order(20, 0)[:4]]


def split_order(n, seed):
    import random
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def test_a_damaged_states_file_is_set_aside(tiny_folders, tmp_path, capsys):
    from model import edit_module_names, load_model
    from runner import Runner
    model, tokenizer = load_model(tiny_folders["gpt2"], "float32", "cpu")
    runner = Runner(model, tokenizer, edit_module_names(model), cache=True)
    path = runner.states_file(str(tmp_path))
    open(path, "wb").write(b"PK\x03\x04 cut short")
    assert runner.use_states(str(tmp_path)) == path and not os.path.exists(path)
    assert open(path + ".damaged", "rb").read() == b"PK\x03\x04 cut short"              # kept, not deleted
    assert "could not be read" in capsys.readouterr().out


@pytest.mark.parametrize("script,argv,message", [
    ("analysis", ["run", "beta", "--jobs", "0"], "--jobs 0: give at least 1"),
    ("analysis", ["latent", "--out", "{tmp}"], "no best.pt in"),
    ("bench", ["--repeats", "0"], "--repeats 0: give at least 1"),
    ("bench", ["--meta", "--model", "{tmp}/no-such-model"], "could not load model"),
])
def test_analysis_and_bench_flags(script, argv, message, tmp_path, monkeypatch):
    import importlib
    main = importlib.import_module(script).main
    fails(main, [a.replace("{tmp}", str(tmp_path)) for a in argv], message, monkeypatch)
    assert not os.listdir(tmp_path)


def test_every_docstring_prints_its_commands_as_written():
    """A module docstring's ready commands reach --help line for line: a line ending in one backslash
    would join the next in the string Python reads (its shell continuation lost), so each is doubled."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in sorted(f for f in os.listdir(root) if f.endswith(".py")):
        node = ast.parse(open(os.path.join(root, name)).read()).body[0]
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            lines = node.value.value.count("\n") + 1                     # as Python reads it
            assert lines == node.end_lineno - node.lineno + 1, f"{name}: a docstring line ends in one backslash"

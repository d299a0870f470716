"""On a CUDA GPU (skipped without one): the paths users run, in float32 and bfloat16, on tiny GPT-2 and
Llama models and on the default model; the same ΔW and logits as on the CPU; a warm training step
that never waits for the device (torch.cuda.set_sync_debug_mode("error")); --dtype auto; a resumed
run against an uninterrupted one; cancel with --chunk; a non-finite step skipped on the device;
the edit's clock; the evaluation's memory; the edit memory, edit.py and the peers end to end.

    python -m pytest tests/test_cuda.py -v
    bash tests/gpu_check.sh          # these, the paper's command on gpt2-xl, bench.py: the whole GPU check
"""
import json
import re

import pytest
import torch

from conftest import DATA_DIR, TINY_EDITOR, perturb_zero_init, reorder_rtol, run, tiny
from data import load
from editor import ibke_editor
from metrics import measure
from hooks import dense
from hypernet import IBKE, EditorConfig
from losses import LossWeights
from model import edit_module_names, load_model, weight_shape
from runner import Runner
from train import DIVERGED, train_step, update

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=["gpt2", "llama", "smollm2-135m"])
def model_name(request, tiny_folders):
    return tiny_folders.get(request.param, request.param)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_resume_evaluate_and_bench_on_cuda(model_name, dtype, tmp_path):
    small = TINY_EDITOR if "tiny" in model_name else ["--d-m", "64", "--latent-dim", "64"]
    common = ["--model", model_name, "--data-dir", DATA_DIR, "--device", "cuda", "--dtype", dtype, *small,
              "--val-every", "2", "--val-size", "4", "--batch-size", "4", "--log-every", "2"]
    run("train.py", *common, "--steps", "2", "--out", tmp_path / "run")            # through one validation
    run("train.py", "--resume", "--steps", "4", "--out", tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "latest.pt", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["cuda_rng"] is not None
    evaluations = [("n1", ["--limit", "2"]), ("n8", ["--limit", "8", "--edits-per-batch", "8"]),
                   ("mquake", ["--data", "mquake", "--limit", "1"]),
                   ("ft", ["--method", "ft", "--ft-steps", "2", "--limit", "2"])]
    for name, flags in evaluations:
        run("evaluate.py", "--ckpt", tmp_path / "run" / "best.pt", "--data-dir", DATA_DIR, "--device", "cuda",
            *flags, "--out", tmp_path / f"{name}.json")
        summary = json.load(open(tmp_path / f"{name}.json"))["summary"]
        assert 0 <= summary["ES"] <= 1, (name, summary)
    if model_name == "smollm2-135m":
        run("bench.py", "--device", "cuda", "--dtype", dtype, "--repeats", "2", "--data-dir", DATA_DIR,
            "--out", tmp_path / "bench.json")
        counts = json.load(open(tmp_path / "bench.json"))["train_step_counts"]
        assert counts["host_syncs"] == 0 and counts["cuda_never_waits"] is True


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ridge_training_and_cached_evaluation_on_cuda(tiny_folders, dtype, tmp_path):
    """--aggregate ridge (its solve in float64 on the GPU, over the real tokens) trains through a
    validation at n = 4; evaluate.py --cache-dir reads the states back and scores the same."""
    common = ["--model", tiny_folders["gpt2"], "--data-dir", DATA_DIR, "--device", "cuda", "--dtype", dtype,
              *TINY_EDITOR,
              "--aggregate", "ridge", "--val-every", "2", "--val-size", "8", "--val-n", "4", "--batch-size", "8"]
    run("train.py", *common, "--steps", "2", "--out", tmp_path / "run")
    evaluate = ["evaluate.py", "--ckpt", tmp_path / "run" / "best.pt", "--data-dir", DATA_DIR, "--device", "cuda",
                "--limit", "8", "--edits-per-batch", "8", "--cache-dir", tmp_path / "cache"]
    run(*evaluate, "--out", tmp_path / "a.json")
    again = run(*evaluate, "--out", tmp_path / "b.json")
    assert int(re.search(r"(\d+) texts' lower-block states", again.stdout).group(1)) > 8   # every text of the 8 records
    a, b = (json.load(open(tmp_path / f"{x}.json"))["batches"][0]["results"] for x in "ab")
    assert a == b


def editor_for(model):
    names = edit_module_names(model)
    torch.manual_seed(0)
    editor = IBKE({n: weight_shape(model.get_submodule(n)) for n in names},
                  EditorConfig(d_m=32, latent_len=3, latent_dim=16, heads=2)).eval()   # z = μ: deterministic
    perturb_zero_init(editor)
    return names, editor


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cpu_and_cuda_give_the_same_edit_and_logits(kind, gpt2_tokenizer):
    records = load("counterfact", DATA_DIR)["eval"][:3]
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny(kind, init=0.2)
        model.resize_token_embeddings(len(gpt2_tokenizer))
        model.requires_grad_(False).to(device)
        names, editor = editor_for(model)
        runner = Runner(model, gpt2_tokenizer, names, cache=False)
        metrics, _, deltas = measure(runner, ibke_editor(editor.to(device)), records)
        results[device] = ({n: dense(d).cpu() for n, d in deltas.items()}, metrics)
    width, depth = getattr(model.config, "intermediate_size",
                           None) or 4 * model.config.hidden_size, model.config.num_hidden_layers
    for n, delta in results["cpu"][0].items():         # the same sums, in other orders on another device
        torch.testing.assert_close(results["cuda"][0][n], delta, rtol=0,
                                   atol=reorder_rtol(width, 2 * depth) * delta.abs().max().item())
    assert results["cuda"][1] == results["cpu"][1]     # per-record metrics (argmax agreements) the same


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "smollm2-135m"])
def test_warm_training_step_never_waits_for_the_gpu(kind, dtype, gpt2_tokenizer):
    if kind == "smollm2-135m":
        model, tokenizer = load_model(kind, str(dtype).split(".")[1], "cuda")
    else:
        model, tokenizer = tiny(kind, init=0.2), gpt2_tokenizer
        model.resize_token_embeddings(len(tokenizer))
        model.requires_grad_(False).to("cuda", dtype)
    names, editor = editor_for(model)
    editor.to("cuda").train()
    optimizer = torch.optim.Adam(editor.parameters(), lr=1e-4, fused=True)
    records = load("counterfact", DATA_DIR)["train"][:16]
    runner = Runner(model, tokenizer, names, cache=True)

    def step():
        loss, parts = train_step(runner, editor, records[:8], records[8:16], LossWeights())
        update(editor, optimizer, loss, parts, clip=1.0)
        return parts
    step()                                             # cold: fills the caches (may wait: new texts, new shapes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        parts = step()                                 # warm: any host-device synchronisation raises
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(parts["loss"]).item()


def test_dtype_auto_trains_in_what_the_gpu_computes_natively(tiny_folders, tmp_path):
    run("train.py", "--model", tiny_folders["llama"], "--data-dir", DATA_DIR, "--device", "cuda", *TINY_EDITOR,
        "--steps", "1", "--val-every", "1", "--val-size", "2", "--batch-size", "2", "--out", tmp_path / "run")
    native = "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float32"
    assert torch.load(tmp_path / "run" / "latest.pt", weights_only=False)["config"]["dtype"] == native


@pytest.mark.slow
@pytest.mark.parametrize("aggregate", ["sum", "cancel"])
def test_resumed_run_matches_an_uninterrupted_one_on_cuda(tiny_folders, aggregate, tmp_path):
    """2 + 2 steps against 4 (cancel: --chunk 2 of 4 edits): the same draws exactly, the same update up
    to rounding (the bound of tests/test_pipeline's CPU test, 1e-2 of the update's norm: CUDA's atomic
    adds reorder sums as the cache refill does there)."""
    common = ["--model", tiny_folders["gpt2"], "--data-dir", DATA_DIR, "--device", "cuda", "--dtype", "float32",
              *TINY_EDITOR,
              "--val-every", "2", "--val-size", "4", "--batch-size", "4", "--eta-init", "1e-2", "--aggregate",
              aggregate,
              *(["--chunk", "2"] if aggregate == "cancel" else [])]
    run("train.py", *common, "--steps", "2", "--out", tmp_path / "a")
    start = torch.load(tmp_path / "a" / "latest.pt", weights_only=False)
    run("train.py", "--resume", "--steps", "4", "--out", tmp_path / "a")
    run("train.py", *common, "--steps", "4", "--out", tmp_path / "b")
    resumed, straight = (torch.load(tmp_path / d / "latest.pt", weights_only=False) for d in "ab")
    assert resumed["step"] == straight["step"] == 4 and resumed["sampler"] == straight["sampler"]
    assert torch.equal(resumed["cuda_rng"], straight["cuda_rng"])       # the same latent samples on the GPU
    floats = [k for k in start["hypernet"] if start["hypernet"][k].is_floating_point()]
    moved = torch.cat([(straight["hypernet"][k] - start["hypernet"][k]).flatten() for k in floats])
    apart = torch.cat([(resumed["hypernet"][k] - straight["hypernet"][k]).flatten() for k in floats])
    assert moved.norm() > 0 and apart.norm() <= 1e-2 * moved.norm(), (apart.norm() / moved.norm()).item()


@pytest.mark.parametrize("bad", [float("nan"), 2 * DIVERGED])
def test_a_nonfinite_or_diverged_step_is_skipped_on_the_gpu(bad):
    """update() hands fused Adam found_inf instead of reading the loss on the host: the parameters and
    Adam's moments stay as they were, and the step never waits for the device."""
    layer = torch.nn.Linear(4, 4, device="cuda")
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-1, fused=True)
    x = torch.randn(3, 4, device="cuda")
    update(layer, optimizer, layer(x).square().mean(), {"loss": torch.tensor(1.0, device="cuda")}, clip=1.0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    moments = [optimizer.state[p]["exp_avg"].clone() for p in layer.parameters()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = layer(x).square().mean() * (bad if bad != bad else 1.0)      # nan: nan gradients too
        update(layer, optimizer, loss, {"loss": torch.full((), bad, device="cuda")}, clip=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, m in zip(layer.parameters(), moments):
        assert torch.equal(optimizer.state[p]["exp_avg"], m)


def test_edit_time_starts_after_the_batchs_lower_blocks(tiny_setup_cuda, monkeypatch):
    """measure() waits for the queued lower-block passes of the first batch before it starts the clock,
    and for the edit before it stops it, on the runner's device (not the current one)."""
    import metrics
    model, tokenizer, names, editor = tiny_setup_cuda
    events = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(metrics.torch.cuda, "synchronize",
                        lambda device=None: events.append(("sync", device)) or real(device))
    edit = ibke_editor(editor)
    measure(Runner(model, tokenizer, names, cache=False), lambda *a: events.append("edit") or edit(*a),
            load("counterfact", DATA_DIR)["eval"][:2])
    assert events[:3] == [("sync", model.device), "edit", ("sync", model.device)], events


def test_evaluation_keeps_no_optimizer_state_on_the_gpu(tiny_folders, tmp_path):
    """Editor.load puts the model and the hypernetwork on the GPU, not the checkpoint's Adam moments."""
    from editor import Editor
    run("train.py", "--model", tiny_folders["llama"], "--data-dir", DATA_DIR, "--device", "cuda", "--dtype", "float32",
        "--d-m", "256", "--latent-dim", "64", "--steps", "1", "--val-every", "1", "--val-size", "2", "--batch-size",
        "2",
        "--out", tmp_path / "run")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    loaded = Editor.load(str(tmp_path / "run" / "best.pt"), "cuda")
    model, hypernet, ckpt = loaded.model, loaded.hypernet, loaded.ckpt
    held = sum(t.numel() * t.element_size() for m in (model, hypernet) for t in [*m.parameters(), *m.buffers()])
    assert torch.cuda.memory_allocated() - before <= held + 2 ** 20       # + 1 MiB: allocator rounding
    assert "optimizer" not in ckpt


@pytest.fixture(scope="module")
def tiny_setup_cuda(gpt2_tokenizer):
    model = tiny("gpt2", init=0.2)
    model.resize_token_embeddings(len(gpt2_tokenizer))
    model.requires_grad_(False).to("cuda")
    names, editor = editor_for(model)
    return model, gpt2_tokenizer, names, editor.to("cuda")


def test_lifelong_peers_and_edit_py_on_cuda(trained, tmp_path, device="cuda"):
    """What came after the first GPU run, end to end on the GPU: key.py learn, evaluate.py --sequential
    memory and merge, MQuAKE through a memory, edit.py with --memory and with --save, and the peers
    (ROME; MEMIT with C cached by a CPU run, then read onto the GPU; AlphaEdit sequential)."""
    ckpt, on = trained[0] / "b" / "best.pt", ["--device", device]
    run("key.py", "learn", "--ckpt", ckpt, *on, "--data-dir", DATA_DIR, "--layer", "1", "--dim", "16",
        "--train-records", "64", "--val-records", "16", "--steps", "20", "--out", tmp_path / "key.pt")
    common = ["--ckpt", ckpt, *on, "--data-dir", DATA_DIR, "--limit", "6", "--edits-per-batch", "2"]
    for protocol, flags in (("memory", ["--memory", tmp_path / "m.mem", "--key", tmp_path / "key.pt", "--generate"]),
                            ("merge", [])):
        run("evaluate.py", *common, "--sequential", protocol, *flags, "--out", tmp_path / f"{protocol}.json")
        assert json.load(open(tmp_path / f"{protocol}.json"))["summary"]["n"] == 6
    run("evaluate.py", "--ckpt", ckpt, *on, "--data-dir", DATA_DIR, "--data", "mquake", "--limit", "2",
        "--sequential", "memory", "--memory", tmp_path / "q.mem", "--key", tmp_path / "key.pt", "--out",
        tmp_path / "mq.json")
    assert len(json.load(open(tmp_path / "mq.json"))["batches"][0]["MH"]) == 2
    out = run("edit.py", "--ckpt", ckpt, *on, "The Eiffel Tower is in", "Rome", "--memory", tmp_path / "u.mem",
              "--key", tmp_path / "key.pt", "--ask", "The Louvre is in")
    assert "(1 in all)" in out.stdout and "[ask] The Louvre is in" in out.stdout
    run("edit.py", "--ckpt", ckpt, *on, "The Eiffel Tower is in", "Rome", "--save", tmp_path / "edited")
    assert (tmp_path / "edited" / "edits.json").exists()
    peers = ["--ckpt", ckpt, "--data-dir", DATA_DIR, "--limit", "2", "--cov-tokens", "500"]
    run("evaluate.py", *peers, "--method", "memit", "--peer-layers", "1,2", "--device", "cpu", "--out",
        tmp_path / "memit_cpu.json")                                         # C cached beside the checkpoint
    for method, flags in (("memit", ["--peer-layers", "1,2"]), ("rome", ["--peer-layers", "2"]),
                          ("alphaedit", ["--peer-layers", "1,2", "--sequential", "merge"])):
        out = run("evaluate.py", *peers, *on, "--method", method, *flags, "--out", tmp_path / f"{method}.json")
        assert 0 <= json.load(open(tmp_path / f"{method}.json"))["summary"]["ES"] <= 1
    assert "key covariance" not in out.stdout                                # C read, not computed again

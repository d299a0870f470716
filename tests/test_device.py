"""Device placement, checked on a CPU-only machine: a tensor made without a device lands on the CPU,
which here is also the model's device, so nothing fails; on a GPU the same line fails (evaluate.py
once indexed a device tensor with `torch.tensor(loc)` and every GPU run died at its first
validation). HostTensors tags every tensor a factory makes without `device=` as host-made, and fails
any op where a host-made tensor meets one of the model's tensors without having been moved (`.to` a
device, runner.to_device); `.cpu()` makes a host tensor, a `.to` of dtype alone keeps where it is;
host-made tensors may meet each other (host-side bookkeeping) and 0-d ones anything (a CPU scalar may
join a CUDA op). HostTensors(strict=True) also fails every blocking move of a host-made tensor, 0-d
ones too: on a GPU, `.to("cuda")` of pageable memory waits for the device."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from conftest import tiny
from data import load
from editor import ft_editor, ibke_editor, no_editor
from metrics import measure, multihop
from hooks import functional_edit
from hypernet import IBKE, EditorConfig
from losses import LossWeights
from model import edit_module_names, native_dtype, weight_shape
from runner import Runner
from train import train_step, update

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.eye, torch.linspace, torch.from_numpy}


class HostTensors(TorchFunctionMode):
    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t) and t.dim() > 0]
        host = [getattr(t, "_host_made", False) for t in tensors]
        moving = func in (torch.Tensor.cuda, torch.Tensor.pin_memory) or (func is torch.Tensor.to and any(
            isinstance(a, (torch.device, str, torch.Tensor)) for a in (*args[1:], kwargs.get("device"))))
        copied = moving and func is not torch.Tensor.pin_memory and getattr(args[0], "_host_made", False)
        if self.strict and copied and not kwargs.get("non_blocking", False):
            raise AssertionError(f"{func.__name__}: a blocking copy of a tensor made without a device "
                                 f"(shape {tuple(args[0].shape)}); on a GPU the host waits for it")
        if any(host) and not all(host) and not moving:
            raise AssertionError(f"{getattr(func, '__name__', func)}: a tensor made without a device meets the "
                                 f"model's tensors; on a GPU they would be on different devices")
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu and out is args[0]:
            out = out.clone()                  # on a GPU .cpu() copies; here it is the model's own tensor
        made_here = func in FACTORIES and "device" not in kwargs or func is torch.Tensor.cpu
        if made_here or (tensors and all(host) and not moving):             # host in, host out
            for t in tree_flatten(out)[0]:
                if torch.is_tensor(t):
                    t._host_made = True
        elif moving and torch.is_tensor(out):                                # moved: the model's device now
            out._host_made = False
        return out


def test_the_check_catches_a_host_index_on_device_tensors():
    values = torch.randn(5, 3, device="cpu")                                 # the model's device
    with HostTensors(), pytest.raises(AssertionError, match="made without a device"):
        values[torch.tensor([0, 2])]
    with HostTensors():
        values[torch.tensor([0, 2]).to(values.device)]                       # moved: fine
        values[torch.tensor([0, 2], device=values.device)]                   # made there: fine
        torch.tensor([1, 2]) + torch.tensor([3, 4])                           # host bookkeeping: fine


@pytest.fixture(scope="module")
def tiny_setup(gpt2_tokenizer):
    model = tiny("llama", init=0.2)
    model.resize_token_embeddings(len(gpt2_tokenizer))
    model.requires_grad_(False)
    names = edit_module_names(model)
    editor = IBKE({n: weight_shape(model.get_submodule(n)) for n in names},
                  EditorConfig(d_m=32, latent_len=2, latent_dim=16, heads=2))
    return model, gpt2_tokenizer, names, editor


def test_training_step_makes_every_tensor_on_the_models_device(tiny_setup, data_dir):
    model, tokenizer, names, editor = tiny_setup
    records = load("counterfact", data_dir)["train"][:8]
    runner = Runner(model, tokenizer, names, cache=True)
    optimizer = torch.optim.Adam(editor.parameters(), lr=1e-4, fused=True)
    editor.train()
    with HostTensors():
        for _ in range(2):                                                   # cold, then warm (from the caches)
            loss, parts = train_step(runner, editor, records[:3], records[3:6], LossWeights())
            update(editor, optimizer, loss, parts, clip=1.0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_warm_training_step_copies_nothing_to_the_device_blocking(kind, gpt2_tokenizer, data_dir):
    """GPT-2's upper blocks once got their position embeddings as a 0-d host tensor that transformers
    moves with .to(device): a blocking copy, 3-5 times a warm step, on CUDA only."""
    model = tiny(kind, init=0.2)
    model.resize_token_embeddings(len(gpt2_tokenizer))
    model.requires_grad_(False)
    names = edit_module_names(model)
    editor = IBKE({n: weight_shape(model.get_submodule(n)) for n in names},
                  EditorConfig(d_m=32, latent_len=2, latent_dim=16, heads=2))
    records = load("counterfact", data_dir)["train"][:8]
    runner = Runner(model, gpt2_tokenizer, names, cache=True)
    optimizer = torch.optim.Adam(editor.parameters(), lr=1e-4, fused=True)
    editor.train()
    for strict in (False, True):                                             # cold, then warm
        with HostTensors(strict=strict):
            loss, parts = train_step(runner, editor, records[:3], records[3:6], LossWeights())
            update(editor, optimizer, loss, parts, clip=1.0)


def test_evaluation_makes_every_tensor_on_the_models_device(tiny_setup, data_dir):
    model, tokenizer, names, editor = tiny_setup
    editor.eval()
    records = load("counterfact", data_dir)["eval"][:4]
    cases = load("mquake", data_dir)["eval"]
    case = [r for r in cases if r.case_id == cases[0].case_id]
    with HostTensors():
        for method in (ibke_editor(editor), ft_editor(names, steps=2), no_editor):
            for n in (1, 2):
                runner = Runner(model, tokenizer, names, cache=False)
                measure(runner, method, records[:n])
        runner = Runner(model, tokenizer, names, cache=False)
        deltas = measure(runner, ibke_editor(editor), case)[2]
        multihop(runner, functional_edit(model, deltas), case, max_new_tokens=2)


def test_editor_memory_and_peers_make_every_tensor_on_the_models_device(tiny_setup, data_dir, tmp_path):
    """The paths a GPU user runs besides training and evaluation: the editor object (edit, applied,
    generate, P(target), save), the edit memory (add, route, a routed pass, serving a generation), the
    peers (covariance, ROME, MEMIT, AlphaEdit). The memory's key, keys and factors live on the host by
    design (routing is decided there), so the key is host-made here as learn_key makes it."""
    from baselines import covariance, down_projections, memit_editor, null_projector, rome_editor, texts_of
    from editor import Editor, Fact
    from key import Key
    from memory import EditMemory
    model, tokenizer, names, hypernet = tiny_setup
    hypernet.eval()
    (tmp_path / "tiny.pt").write_bytes(b"")                                  # edits.json names its sha256
    editor = Editor(model, tokenizer, hypernet, {"model": "tiny", "config": {}, "step": 0}, str(tmp_path / "tiny.pt"))
    facts = [Fact("The Eiffel Tower is in", "Rome"), Fact("The Louvre is in", "Berlin", subject="Louvre")]
    records = load("counterfact", data_dir)
    with HostTensors():
        deltas = editor.edit(facts)
        with editor.applied(deltas):
            editor.generate([f.prompt for f in facts], max_new_tokens=2)
        editor.probability([facts[0].prompt], [facts[0].target], edited=lambda prompts: editor.applied(deltas))
        editor.save(str(tmp_path / "edited"), deltas, facts)
        key = Key(model.config.hidden_size, layer=1, learned=False)
        key.threshold = -1.0                                                 # every query routed: the routed path runs
        memory = EditMemory(editor, key)
        memory.add(facts)
        editor.probability([f.prompt for f in facts], [f.target for f in facts], edited=memory.routed)
        with memory.serving():
            editor.generate([facts[1].prompt, "Paris is"], max_new_tokens=2)
        peers = down_projections(model, [2, 3])
        covs = covariance(model, tokenizer, peers, texts_of(records["train"][:8]), tokens=200)
        runner = Runner(model, tokenizer, peers, cache=False)
        edits = records["eval"][:2]
        subjects = {r.prompt: r.subject for r in edits}
        projectors = {n: null_projector(covs[n], 0.5) for n in peers}
        for method in (rome_editor(peers[-1], covs[peers[-1]], subjects, steps=2),
                       memit_editor(peers, covs, subjects, steps=2),
                       memit_editor(peers, covs, subjects, projectors=projectors, kept={}, steps=2)):
            measure(runner, method, edits)


def test_warm_training_step_reads_nothing_off_the_device(tiny_setup, data_dir):
    """On a GPU every value read (.item(), .tolist(), bool of a tensor), nonzero and boolean-mask
    index makes the host wait; a warm step has none (bench.HostSyncs counts them on any device)."""
    from bench import HostSyncs
    model, tokenizer, names, editor = tiny_setup
    records = load("counterfact", data_dir)["train"][:16]
    runner = Runner(model, tokenizer, names, cache=True)
    optimizer = torch.optim.Adam(editor.parameters(), lr=1e-4, fused=True)
    editor.train()
    for counting in (False, True):                                            # cold (fills the caches), then warm
        with HostSyncs() as syncs:
            loss, parts = train_step(runner, editor, records[:4], records[8:12], LossWeights())
            update(editor, optimizer, loss, parts, clip=1.0)
    assert dict(syncs.calls) == {}


def test_dtype_auto_is_bfloat16_only_where_the_device_computes_it_natively(monkeypatch):
    """--dtype auto: float32 on a CPU without AVX512-BF16 or AMX (emulated bfloat16 is commonly slower), bfloat16
    with either; on CUDA, compute capability 8 or more of the device asked for (not the current one; V100
    and T4 emulate bfloat16, which torch.cuda.is_bf16_supported() counts)."""
    for avx, amx, expected in [(False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert native_dtype("cpu") == expected, (avx, amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)   # counts emulation
    monkeypatch.setattr(torch.version, "hip", None)
    capability = {0: (8, 0), 1: (7, 0), 2: (7, 5)}                                   # A100, V100, T4; current device 0
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda d=None: capability[0 if d is None else torch.device(d).index or 0])
    for device, expected in [("cuda", "bfloat16"), ("cuda:0", "bfloat16"), ("cuda:1", "float32"),
                             ("cuda:2", "float32")]:
        assert native_dtype(device) == expected, device


def test_resume_restores_the_training_gpus_generator_only(monkeypatch, capsys):
    """A checkpoint once held one CUDA generator state per visible GPU and a resume restored them all:
    with fewer GPUs visible it raised. Now only the training device's is saved and restored, and an
    older list gives the training device's entry where it has one."""
    from checkpoint import restore_rng, rng_state
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[torch.device(device).index or 0])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state,
                        device="cuda": restored.update({torch.device(device).index or 0: state}))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every GPU's state restored"))
    saved = rng_state(torch.device("cuda:1"))
    assert torch.equal(saved["cuda_rng"], states[1])
    restore_rng(saved, torch.device("cuda:0"))                            # one GPU visible now: it takes the state
    assert torch.equal(restored.pop(0), states[1])
    old = {"torch_rng": torch.get_rng_state(), "cuda_rng": [states[0], states[1]]}   # two GPUs were visible
    restore_rng(old, torch.device("cuda:1"))
    assert list(restored) == [1] and torch.equal(restored.pop(1), states[1])
    restore_rng({**old, "cuda_rng": [states[0]]}, torch.device("cuda:1"))  # the list lacks it: a note, no error
    assert not restored and "no generator state for cuda:1" in capsys.readouterr().out
    restore_rng(old, torch.device("cpu"))                                   # a CPU run touches no GPU
    assert not restored
    assert rng_state(torch.device("cpu"))["cuda_rng"] is None

"""Device placement, checked on a CPU-only machine: a tensor made without a device lands on the CPU,
which here is also the model's device, so nothing fails; on a GPU the same line fails (evaluate.py
once indexed a device tensor with `torch.tensor(loc)` and every GPU run died at its first
validation). HostTensors tags every tensor a factory makes without `device=` as host-made, and fails
any op where a host-made tensor meets one of the model's tensors without having been moved (`.to`,
runner.to_device); host-made tensors may meet each other (host-side bookkeeping) and 0-d ones anything
(a CPU scalar may join a CUDA op)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from conftest import tiny
from data import load
from evaluate import ft_editor, ibke_editor, measure, multihop, no_editor
from hypernet import IBKE, EditorConfig
from losses import LossWeights
from model import edit_module_names, native_dtype, weight_shape
from runner import Runner
from train import train_step, update

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.eye, torch.linspace, torch.from_numpy}


class HostTensors(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t) and t.dim() > 0]
        host = [getattr(t, "_host_made", False) for t in tensors]
        moving = func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.pin_memory)
        if any(host) and not all(host) and not moving:
            raise AssertionError(f"{getattr(func, '__name__', func)}: a tensor made without a device meets the "
                                 f"model's tensors; on a GPU they would be on different devices")
        out = func(*args, **kwargs)
        made_here = func in FACTORIES and "device" not in kwargs
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
    editor = IBKE({n: weight_shape(model.get_submodule(n)) for n in names}, EditorConfig(d_m=32, latent_len=2, latent_dim=16, heads=2))
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
        multihop(runner, deltas, case, max_new_tokens=2)


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
    with either; on CUDA, what torch.cuda.is_bf16_supported() says."""
    for avx, amx, expected in [(False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert native_dtype("cpu") == expected, (avx, amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert native_dtype("cuda:0") == ("bfloat16" if supported else "float32")

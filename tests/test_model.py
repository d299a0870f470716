"""model.py: the edit-module table, name errors, and the real default model."""
import time

import pytest
import torch

import model as model_lib
from conftest import tiny
from model import ModelError, edit_module_names, load_model, meta_model, weight_shape


def test_default_edit_modules_per_architecture():
    assert edit_module_names(tiny("gpt2")) == [f"transformer.h.{i}.mlp.{m}" for i in (1, 2, 3) for m in ("c_fc", "c_proj")]
    assert edit_module_names(tiny("llama"), edit_layers=2) == [
        f"model.layers.{i}.mlp.{m}" for i in (2, 3) for m in ("up_proj", "down_proj")]
    gptj = meta_model("EleutherAI/gpt-j-6B")
    assert edit_module_names(gptj)[:2] == ["transformer.h.25.mlp.fc_in", "transformer.h.25.mlp.fc_out"]
    assert weight_shape(gptj.get_submodule("transformer.h.25.mlp.fc_in")) == (4096, 16384)
    xl = meta_model("gpt2-xl")
    assert weight_shape(xl.get_submodule("transformer.h.47.mlp.c_fc")) == (1600, 6400)   # Conv1D: (d_in, d_out)


def test_edit_modules_override_by_suffix_and_pattern():
    m = tiny("llama")
    assert edit_module_names(m, "mlp.gate_proj", edit_layers=1) == ["model.layers.3.mlp.gate_proj"]
    assert edit_module_names(m, r"layers\.[01]\.mlp\.down_proj") == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_unknown_module_and_architecture_errors_list_what_exists():
    with pytest.raises(ModelError, match="down_proj.*up_proj|mlp.down_proj"):
        edit_module_names(tiny("llama"), "mlp.fc_in")
    m = tiny("llama")
    m.config.model_type = "mamba"
    with pytest.raises(ModelError, match="known: gpt2, gptj, gpt_neox, llama"):
        edit_module_names(m)


def test_unknown_model_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="smollm2-135m"):
        load_model("no-such-org/no-such-model")


@pytest.mark.slow
def test_default_model_completes_paris_and_reloads_fast(smollm):
    model, tokenizer = smollm
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, -1:]) == " Paris"
    assert not any(p.requires_grad for p in model.parameters())
    t0 = time.time()
    again, _ = load_model("smollm2-135m")                                   # from the exported cache
    assert time.time() - t0 < 20
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert model_lib.model_path("smollm2-135m").startswith(model_lib.CACHE_DIR)

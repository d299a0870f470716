"""model.py: the edit-module table, name errors, and the real default model."""
import pytest
import torch

import model as model_lib
from conftest import reorder_rtol, tiny
from model import ModelError, edit_module_names, load_model, meta_model, weight_shape


def test_default_edit_modules_per_architecture():
    assert edit_module_names(tiny("gpt2")) == [f"transformer.h.{i}.mlp.{m}"
                                               for i in (1, 2, 3) for m in ("c_fc", "c_proj")]
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
    assert edit_module_names(m, r"layers\.[01]\.mlp\.down_proj",
                             edit_layers=0) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert edit_module_names(m, "mlp", edit_layers=1) == [f"model.layers.3.mlp.{p}"
                                                          for p in ("gate_proj", "up_proj", "down_proj")]
    for layers in (-1, 5):
        with pytest.raises(ModelError, match="has 4 blocks; give 1..4"):
            edit_module_names(m, edit_layers=layers)
    with pytest.raises(ModelError, match="only outside the last 3 blocks"):
        edit_module_names(m, r"layers\.0\.mlp\.down_proj")


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
    with pytest.raises(ModelError, match="could not load model 'not a name!'"):
        load_model("not a name!")                                          # malformed: no stack trace


@pytest.mark.slow
def test_default_model_completes_paris_and_reloads_from_the_cache(smollm):
    model, tokenizer = smollm
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, -1:]) == " Paris"
    assert not any(p.requires_grad for p in model.parameters())
    again, _ = load_model("smollm2-135m")                                   # from the exported cache (timed in README)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert model_lib.model_path("smollm2-135m").startswith(model_lib.CACHE_DIR)


@pytest.mark.slow
def test_the_loaded_models_head_takes_generates_strided_input_contiguous(smollm):
    """generate() hands the LM head hidden[:, -1:], a strided view that torch's CPU matmul runs as a
    batched GEMM, the head copied per row (18 s for 64 rows in bfloat16): load_model's pre-hook gives
    the head a contiguous copy."""
    model, _ = smollm
    head, seen = model.get_output_embeddings(), []
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    hidden = torch.randn(4, 5, model.config.hidden_size, dtype=model.dtype)
    try:
        head(hidden[:, -1:])
    finally:
        handle.remove()
    assert seen == [True]


def test_run_from_block_gives_the_full_models_logits(tiny_model):
    from runner import hidden_before, run_from_block
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    full = tiny_model(input_ids=ids, attention_mask=mask).logits
    for block in (0, 2, 3):
        hidden = hidden_before(tiny_model, block, ids, mask)                  # (B, T, C) entering block
        tail = tiny_model.get_output_embeddings()(run_from_block(tiny_model, block, hidden, mask))
        assert torch.equal(tail[mask.bool()], full[mask.bool()])              # bit for bit
    blocks = tiny_model.get_submodule("transformer.h" if hasattr(tiny_model, "transformer") else "model.layers")
    assert len(blocks) == 4                                                   # the full block list is back


@pytest.mark.slow
def test_runner_scored_logits_equal_full_model_on_real_model(smollm, data_dir):
    from data import encode, load
    from losses import scored
    from runner import Runner
    model, tokenizer = smollm
    records = load("counterfact", data_dir)["eval"][:4]
    prompts = [r.prompt for r in records] + [r.locality[0][0] for r in records]
    targets = [r.target for r in records] + [r.locality[0][1] for r in records]
    runner = Runner(model, tokenizer, edit_module_names(model))
    assert runner.block == 27
    first = runner.scored_logits(runner.batch(prompts, targets))
    again = runner.scored_logits(runner.batch(prompts[::-1], targets[::-1]))  # from the cache, other padding
    batch = encode(tokenizer, prompts, targets)
    with torch.no_grad():
        full = scored(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                      batch["labels"])
    # Same arithmetic in another order (rows grouped, padded and threaded differently): the FFN's
    # 1536-long sums dominate; 30 blocks from the embeddings, 3 from the same cached hidden states.
    # Observed on a 2-thread AMD EPYC: 1.7e-5 between cached rows (≈ 5 eps · max|logit|).
    scale = full[0].abs().max().item()                                         # ≈ 27 for these prompts
    whole, cached = (reorder_rtol(model.config.intermediate_size, depth) * scale for depth in (30, 3))
    torch.testing.assert_close(first[0], full[0], rtol=0, atol=whole)
    assert torch.equal(first[1], full[1]) and torch.equal(first[2], full[2])
    assert torch.equal(first[0].argmax(-1), full[0].argmax(-1))
    B = len(prompts)
    for _ in range(2):                                   # computed, then from the per-text cache
        torch.testing.assert_close(runner.frozen_logits(runner.batch(prompts, targets)), first[0], rtol=0, atol=cached)
    for b in range(B):                                   # row b of the first batch is row B-1-b of the second
        torch.testing.assert_close(again[0][again[2] == B - 1 - b], first[0][first[2] == b], rtol=0, atol=cached)

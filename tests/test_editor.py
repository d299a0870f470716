"""hooks.py, hypernet.py, losses.py: the mathematics of METHOD.md §3 against reference computations."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from conftest import SMALL, decomposed, perturb_zero_init, random_batch, reorder_rtol, tiny
from data import encode, load
from hooks import apply_delta, functional_edit, grad_decomposition, restore
from hypernet import IBKE, EditorConfig
from losses import LossWeights, answer_nll, gaussian_kl, ibke_loss, locality_kl, scored
from model import contiguous_input, edit_module_names, weight_shape

def autograd_weight_grads(model, names, batch):
    """Reference: ∇_W L_E by autograd, in the (d_in, d_out) convention."""
    weights = [model.get_submodule(n).weight.requires_grad_(True) for n in names]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = answer_nll(*scored(logits, batch["labels"]), batch["labels"].shape[0]).sum()
    grads = torch.autograd.grad(loss, weights)
    for w in weights:
        w.requires_grad_(False)
    return {n: g if isinstance(model.get_submodule(n), Conv1D) else g.T for n, g in zip(names, grads)}


def no_hooks_left(model):
    """No hook but load_model's own, which makes the LM head's input contiguous."""
    return all(not m._forward_hooks and not m._backward_hooks
               and all(h is contiguous_input for h in m._forward_pre_hooks.values()) for m in model.modules())


# Hooks and autograd reach Σ_i h_iᵀ u_i from the same u, summing the 27 tokens in another order
# (≈ sqrt(27)·eps of the largest entry); 1e-10 and 1e-4 are ≥ 1e4x that in float64 and float32.
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_decomposition_sums_to_autograd_weight_gradient(tiny_model, dtype, rtol):
    model = tiny_model.to(dtype)
    names = edit_module_names(model, edit_layers=2)
    batch = random_batch()
    decomposition, mask = grad_decomposition(model, names, batch)
    expected = autograd_weight_grads(model, names, batch)
    for n in names:
        h, u = decomposition[n]
        ours = torch.einsum("btd,bte->de", h, u)                       # Σ_i h_iᵀ u_i
        scale = expected[n].abs().max()
        assert scale > 0
        torch.testing.assert_close(ours, expected[n], rtol=rtol, atol=rtol * scale)
    assert mask.tolist() == batch["attention_mask"].bool().tolist()
    assert no_hooks_left(model)


def test_answer_tokens_only_masks_prompt(tiny_model):
    names = edit_module_names(tiny_model, edit_layers=1)
    batch = random_batch()
    decomposition, mask = grad_decomposition(tiny_model, names, batch, tokens="answer")
    assert mask.sum(1).tolist() == [2, 1, 3]                            # one per answer token
    assert mask[0, 4:6].all() and not mask[0, 6] and not mask[0, :4].any()  # positions predicting them
    h, u = decomposition[names[0]]
    assert (h[~mask] == 0).all() and (u[~mask] == 0).all() and (u[mask] != 0).any()


def random_deltas(model, names, scale=0.1):
    g = torch.Generator().manual_seed(1)
    return {n: scale * torch.randn(*weight_shape(model.get_submodule(n)), generator=g) for n in names}


def test_apply_then_restore_is_bit_exact(tiny_model):
    names = edit_module_names(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    batch = random_batch()
    logits_before = tiny_model(input_ids=batch["input_ids"]).logits
    originals = apply_delta(tiny_model, random_deltas(tiny_model, names))
    assert not torch.equal(tiny_model.get_submodule(names[0]).weight, before[names[0] + ".weight"])
    assert not torch.allclose(tiny_model(input_ids=batch["input_ids"]).logits, logits_before)
    restore(tiny_model, originals)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)         # bit for bit
    originals = apply_delta(tiny_model, random_deltas(tiny_model, names, scale=1e3))
    restore(tiny_model, originals)
    assert all(torch.equal(before[k], tiny_model.state_dict()[k]) for k in before)
    assert no_hooks_left(tiny_model)


def test_functional_edit_matches_in_place_and_only_delta_gets_gradient(tiny_model):
    names = edit_module_names(tiny_model)
    batch = random_batch()
    deltas = random_deltas(tiny_model, names)
    originals = apply_delta(tiny_model, deltas)
    in_place = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    restore(tiny_model, originals)
    deltas = {n: d.requires_grad_() for n, d in deltas.items()}
    with functional_edit(tiny_model, deltas):
        hooked = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # x(W + ΔW) against xW + xΔW: one rounding more or less per edited product, through 4 blocks
    # whose longest sums are the FFN's (128 wide in the tiny GPT-2)
    torch.testing.assert_close(hooked, in_place, rtol=0, atol=reorder_rtol(128, 4) * in_place.abs().max().item())
    hooked.sum().backward()
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in deltas.values())
    assert all(p.grad is None for p in tiny_model.parameters())
    assert no_hooks_left(tiny_model)


def test_identity_initialisation_gives_normalised_gradient_step():
    model, names, shapes, decomposition, mask = decomposed()
    editor = IBKE(shapes, SMALL).train()
    deltas, _ = editor(decomposition, mask)
    for key, group in editor.groups.items():
        net = editor.editors[key]
        h = torch.stack([decomposition[n][0] for n in group])
        u = torch.stack([decomposition[n][1] for n in group])
        x = torch.cat([h, u], -1)[:, mask]                              # (M, N, D) real tokens
        mean, std = x.mean(1, keepdim=True), x.std(1, unbiased=False, keepdim=True)  # what Welford must give
        h_hat, u_hat = ((torch.cat([h, u], -1) - mean[:, None]) / std[:, None]).split([net.d_in, net.d_out], -1)
        net.eval()                                                      # same stats, no second update
        h_tilde, u_tilde, s, _ = net.edit_vectors(h, u, mask)
        # Welford's float64 statistics against float32 ones here: float32 rounding of O(1) normalised
        # values after a 27-token mean and ~3 products of width ≤ 128: reorder_rtol(128, 3) ≈ 2e-5
        torch.testing.assert_close(h_tilde, h_hat, rtol=1e-4, atol=1e-4)   # h̃ = ĥ, ũ = û
        torch.testing.assert_close(u_tilde, u_hat, rtol=1e-4, atol=1e-4)
        assert (s == 0.5).all()                                         # every token the same scale
        for m, name in enumerate(group):
            lengths = mask.sum(1)
            expected = -SMALL.eta_init * 0.5 * sum(
                h_hat[m, e, mask[e]].T @ u_hat[m, e, mask[e]] / lengths[e] for e in range(mask.shape[0]))
            torch.testing.assert_close(deltas[name], expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
        net.train()


def test_no_scale_holds_the_start_scale_and_no_ib_is_deterministic():
    _, _, shapes, decomposition, mask = decomposed()
    for cfg_kw in ({"token_scale": False}, {"ib": False}, {}):
        editor = IBKE(shapes, EditorConfig(**{**SMALL.__dict__, **cfg_kw})).train()
        perturb_zero_init(editor)
        net, group = next(iter(editor.editors.values())), next(iter(editor.groups.values()))
        h = torch.stack([decomposition[n][0] for n in group])
        u = torch.stack([decomposition[n][1] for n in group])
        (h1, _, s, kl), (h2, _, _, kl2) = net.edit_vectors(h, u, mask), net.edit_vectors(h, u, mask)
        if cfg_kw == {"token_scale": False}:
            assert (s == 0.5).all()                                      # σ(0): the scale's start value
        elif cfg_kw == {"ib": False}:
            assert torch.equal(h1, h2) and (kl == 0).all() and (kl2 == 0).all()   # z = μ, no KL
        else:
            assert not torch.equal(h1, h2) and (kl > 0).all()           # z sampled while training
            net.eval()
            assert torch.equal(net.edit_vectors(h, u, mask)[0], net.edit_vectors(h, u, mask)[0])  # z = μ at eval


def test_no_scale_starts_with_the_same_update_as_the_scale():
    """A clean ablation: untrained, s ≡ 1/2 gives exactly the default's ΔW (its scale starts at σ(0))."""
    _, _, shapes, decomposition, mask = decomposed()
    deltas = []
    for scale in (True, False):
        torch.manual_seed(0)
        editor = IBKE(shapes, EditorConfig(**{**SMALL.__dict__, "token_scale": scale})).eval()
        deltas.append(editor(decomposition, mask)[0])
    for name in deltas[0]:
        assert deltas[0][name].abs().max() > 0 and torch.equal(deltas[0][name], deltas[1][name])


def test_itm_kl_closed_form():
    assert gaussian_kl(torch.zeros(3, 4, 5), torch.zeros(3, 4, 5)).abs().max() == 0
    mu, logvar = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                                  torch.distributions.Normal(0.0, 1.0)).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), reference)


def test_locality_kl_and_answer_nll_on_hand_made_logits():
    logits = torch.randn(6, 11)
    assert locality_kl(logits, logits).abs() < 1e-6
    other = torch.randn(6, 11)
    reference = F.kl_div(F.log_softmax(other, -1), F.log_softmax(logits, -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(locality_kl(logits, other), reference)
    # two sequences: tokens 0-1 belong to sequence 0, tokens 2-5 to sequence 1
    targets, rows = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 0, 1, 1, 1, 1])
    nll = F.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(answer_nll(logits, targets, rows, 2), torch.stack([nll[:2].mean(), nll[2:].mean()]))
    # scored(): position t predicts token t + 1
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    full = torch.randn(2, 4, 11)
    picked, picked_targets, picked_rows = scored(full, labels)
    assert torch.equal(picked, torch.stack([full[0, 1], full[0, 2], full[1, 0]]))
    assert picked_targets.tolist() == [7, 8, 5] and picked_rows.tolist() == [0, 0, 1]


def test_total_loss_gradient_reaches_every_hypernet_parameter_and_no_base_parameter():
    model, names, shapes, decomposition, mask = decomposed("llama")
    editor = IBKE(shapes, SMALL).train()
    perturb_zero_init(editor)  # at exact init W_out = 0 blocks the path to the layers before it
    deltas, kl = editor(decomposition, mask)
    gen, loc = random_batch(seed=3), random_batch(seed=4)
    with torch.no_grad():
        pre = scored(model(input_ids=loc["input_ids"]).logits, loc["labels"])[0]
    with functional_edit(model, deltas):
        post_gen = scored(model(input_ids=gen["input_ids"]).logits, gen["labels"])
        post_loc = scored(model(input_ids=loc["input_ids"]).logits, loc["labels"])[0]
    gen_nll = answer_nll(*post_gen, 3).mean()
    loss, parts = ibke_loss(gen_nll, gen_nll, locality_kl(pre, post_loc), kl, LossWeights())
    loss.backward()
    assert set(parts) == {"loss", "edit", "gen", "loc", "itm"} and parts["loc"] > 0
    missing = [n for n, p in editor.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_decomposition_on_real_default_model(smollm, data_dir):
    model, tokenizer = smollm
    names = edit_module_names(model)
    records = load("counterfact", data_dir)["eval"][:3]
    batch = encode(tokenizer, [r.prompt for r in records], [r.target for r in records])
    decomposition, _ = grad_decomposition(model, names, batch)
    expected = autograd_weight_grads(model, names, batch)
    for n in names:
        ours = torch.einsum("btd,bte->de", *decomposition[n])
        # full-model autograd against hooks: the 3 edited blocks' backward in another order,
        # reorder_rtol(1536, 6) ≈ 1.1e-4 of the largest entry; 1e-3 leaves 9x
        torch.testing.assert_close(ours, expected[n], rtol=1e-3, atol=1e-3 * expected[n].abs().max())
    assert no_hooks_left(model)


def test_running_norm_merges_batches_exactly():
    from hypernet import RunningNorm
    norm = RunningNorm(2, 5).train()
    a, b = torch.randn(2, 3, 4, 5) * 3 + 1, torch.randn(2, 2, 6, 5) - 2
    mask_a, mask_b = torch.rand(3, 4) > 0.3, torch.rand(2, 6) > 0.3
    norm.update(a, mask_a)
    norm.update(b, mask_b)
    union = torch.cat([a[:, mask_a], b[:, mask_b]], 1).double()         # (M, N, D)
    torch.testing.assert_close(norm.mean, union.mean(1))
    torch.testing.assert_close(norm.m2 / norm.count, union.var(1, unbiased=False))
    assert norm.count[0].item() == mask_a.sum() + mask_b.sum()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bf16_evaluation_applies_the_trained_edit(kind):
    """In bfloat16, evaluation (dense ΔW, functional_edit) runs the edit training ran (factors A, B,
    functional_edit); writing ΔW into the weights (apply_delta) agrees only to bf16's rounding of W."""
    from hooks import dense
    model = tiny(kind, init=0.2).to(torch.bfloat16)
    names = edit_module_names(model)
    batch = random_batch()
    g = torch.Generator().manual_seed(1)
    factors = {}
    for n in names:                                       # rank-12 ΔW, |ΔW| ≈ 0.8% of |W| as on SmolLM2
        d_in, d_out = weight_shape(model.get_submodule(n))
        A, B = torch.randn(12, d_in, generator=g), torch.randn(12, d_out, generator=g)
        factors[n] = (A * 0.008 * model.get_submodule(n).weight.float().abs().mean() / (A.T @ B).abs().mean(), B)
    mask = batch["attention_mask"].bool()

    def logits(edit):
        with torch.no_grad(), edit:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask].float()
    trained = logits(functional_edit(model, factors))
    evaluated = logits(functional_edit(model, {n: dense(f) for n, f in factors.items()}))
    originals = apply_delta(model, factors)
    in_place = logits(torch.no_grad())
    restore(model, originals)
    assert not torch.equal(trained, logits(torch.no_grad()))                 # the edit does change the logits
    u, scale = 2.0 ** -8, trained.abs().max().item()                         # bf16 unit roundoff; max |logit|
    # Both add x ΔW in float32 to the module's output and round once to bf16; the dense and factored
    # products differ in float32 rounding only, which can move the bf16 sum by one ulp where it sits
    # on a rounding boundary: below u · max|logit| at the logits (observed: bit-identical).
    torch.testing.assert_close(evaluated, trained, rtol=0, atol=u * scale)
    # W + ΔW rounded to bf16 errs by up to u|W| in every entry, like one more rounding of each edited
    # product, through the model's 4 blocks (observed ≈ 0.03, as large as the edit's own effect).
    torch.testing.assert_close(in_place, trained, rtol=0, atol=4 * 2 * u * scale)


def test_carry_over_keeps_each_module_and_starts_new_ones_from_the_nearest():
    """A second phase editing more blocks (train.py --resume CKPT --edit-layers K): a module edited before
    gets the same ΔW as from the old editor; a new one takes the nearest edited block's embedding and η,
    with empty statistics; the shared weights are the old ones."""
    model = tiny("gpt2")
    names = edit_module_names(model, None, 4)                               # blocks 0-3
    decomposition, mask = grad_decomposition(model, names, random_batch(seed=3))
    shapes = {n: weight_shape(model.get_submodule(n)) for n in names}
    old_shapes = {n: s for n, s in shapes.items() if ".2." in n or ".3." in n}
    old = IBKE(old_shapes, SMALL).train()
    perturb_zero_init(old)
    g = torch.Generator().manual_seed(4)
    for net in old.editors.values():                                        # per-module values that differ
        net.module_emb.data = torch.randn(net.module_emb.shape, generator=g)
        net.log_eta.data = torch.randn(net.log_eta.shape, generator=g)
    old({n: decomposition[n] for n in old_shapes}, mask)                    # statistics from one batch
    old.eval()
    new = IBKE(shapes, SMALL).eval()
    added = new.carry_over(old.state_dict(), old_shapes)
    assert sorted(added) == sorted(n for n in names if n not in old_shapes)
    before, _ = old({n: decomposition[n] for n in old_shapes}, mask)
    after, _ = new(decomposition, mask)
    # the same arithmetic for those modules, batched with 4 modules instead of 2: only the order of sums
    # in the batched products may differ; widths ≤ 128, ~6 stacked layers in the hypernetwork
    for n in old_shapes:
        torch.testing.assert_close(after[n], before[n], rtol=reorder_rtol(128, 6),
                                   atol=reorder_rtol(128, 6) * before[n].abs().max().item())
    for key, group in new.groups.items():
        was, net, old_net = old.groups[key], new.editors[key], old.editors[key]
        for m, n in enumerate(group):
            # blocks 0, 1: nearest is 2
            src = was.index(n) if n in was else was.index(next(o for o in was if ".2." in o))
            assert torch.equal(net.module_emb[m],
                               old_net.module_emb[src]) and torch.equal(net.log_eta[m], old_net.log_eta[src])
            assert (net.norm.count[m] == 0).item() == (n not in was)
        assert torch.equal(net.proj.weight, old_net.proj.weight) and torch.equal(net.queries, old_net.queries)
    # across aggregations: a cancel editor's λ is dropped by a sum editor; a sum editor's λ starts at --ridge-init
    cancel = dataclasses.replace(SMALL, aggregate="cancel", ridge_init=3.0)
    IBKE(shapes, SMALL).carry_over(IBKE(old_shapes, cancel).state_dict(), old_shapes)
    wide = IBKE(shapes, cancel)
    wide.carry_over(old.state_dict(), old_shapes)
    assert all(torch.equal(net.log_lambda,
                           torch.full_like(net.log_lambda, math.log(3.0))) for net in wide.editors.values())

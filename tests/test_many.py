"""Many edits at once (issue #11): the ridge solve of hypernet.py against float64 least squares, its
limits and symmetries, and evaluation in passes."""
import math
import random

import pytest
import torch

from conftest import SMALL, decomposed, perturb_zero_init, reorder_rtol, tiny
from data import load
from editor import ibke_editor
from metrics import generation, measure, measure_apart
from hooks import dense, functional_edit
from hypernet import IBKE, EditorConfig, ridge
from model import edit_module_names, weight_shape
from runner import Runner
from draws import draw_n

EPS32 = torch.finfo(torch.float32).eps


def keys_and_values(M=2, N=12, d_in=16, d_out=5, padding=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    K, V = torch.randn(M, N, d_in, generator=g), torch.randn(M, N, d_out, generator=g)
    K[:, N - padding:], V[:, N - padding:] = 0, 0                        # padding rows are zero
    return K, V, torch.tensor(N - padding)


@pytest.mark.parametrize("own", [False, True])                          # "ridge" and "cancel"
@pytest.mark.parametrize("N, d_in", [(12, 16), (40, 16)])               # the N × N form and the d_in × d_in one
def test_ridge_is_the_float64_least_squares_solution(N, d_in, own):
    K, V, n_tokens = keys_and_values(N=N, d_in=d_in)
    O = torch.randn(V.shape, generator=torch.Generator().manual_seed(1)) * (V != 0) if own else None
    lam = torch.tensor([0.1, 3.0])
    A, B = ridge(K, V, lam, n_tokens, O)
    delta = B if A is None else A.transpose(1, 2) @ B
    for m in range(2):
        # min |K ΔW − Y|² + λ c |ΔW|², c = mean |k|² over the tokens, Y = (1 + λ) c V ("ridge") or
        # own + λ c V ("cancel"): lstsq on [K; √(λc) I]
        k, v = K[m].double(), V[m].double()
        c = (k ** 2).sum() / n_tokens
        y = (1 + lam[m]) * c * v if O is None else O[m].double() + lam[m] * c * v
        stacked = torch.cat([k, (lam[m] * c).sqrt() * torch.eye(d_in, dtype=torch.float64)])
        target = torch.cat([y, torch.zeros(d_in, v.shape[1], dtype=torch.float64)])
        reference = torch.linalg.lstsq(stacked, target).solution
        # float64 throughout, then one rounding to float32 (½ ulp); the N × N form adds one float32
        # product KᵀB over N tokens (reorder_rtol of its N terms, against the sum of their sizes)
        bound = EPS32 * reference.abs() + (0 if A is None else reorder_rtol(N, 1) * (K[m].abs().T @ B[m].abs()))
        assert ((delta[m].double() - reference).abs() <= bound.double() + 1e-12).all()


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize("N, d_in", [(12, 16), (40, 16)])
def test_ridge_of_all_zero_keys_is_no_update(N, d_in, own):
    """A module whose keys are all zero (a model broken by earlier merges: its gradients vanished) gets
    ΔW = 0, exactly, and the others their update; the Gram matrix was 0 and Cholesky raised."""
    K, V, n_tokens = keys_and_values(N=N, d_in=d_in)
    K[1] = 0
    O = torch.zeros_like(V) if own else None                                   # own: K_e K_eᵀ V_e = 0 too
    A, B = ridge(K, V, torch.tensor([0.1, 3.0]), n_tokens, O)
    delta = B if A is None else A.transpose(1, 2) @ B
    assert torch.isfinite(delta).all() and (delta[1] == 0).all() and (delta[0] != 0).any()


def rounding(delta, N: int) -> torch.Tensor:
    """How far a ΔW may move when its float32 arithmetic is reordered: the factored AᵀB sums N terms
    (reorder_rtol of them, against the sum of their sizes); a dense one was solved in float64 and
    rounded once (½ ulp each way: one ulp in all)."""
    if isinstance(delta, tuple):
        return reorder_rtol(N, 1) * (delta[0].abs().T @ delta[1].abs())
    return 2 * EPS32 * delta.abs()


def small_editor(shapes, aggregate: str, lam: float) -> IBKE:
    """The same small editor (seed 0, zero-initialised layers perturbed) with another aggregation / λ."""
    torch.manual_seed(0)
    net = IBKE(shapes, EditorConfig(**{**SMALL.__dict__, "aggregate": aggregate, "ridge_init": lam})).eval()
    perturb_zero_init(net)
    return net


def test_ridge_with_large_lambda_is_the_sum_and_order_does_not_matter():
    """Through the whole editor: λ → ∞ gives the sum form's ΔW ("ridge" and "cancel"); permuting the
    edits leaves ΔW alone."""
    _, _, shapes, decomposition, mask = decomposed()
    N = int(mask.sum())
    editors = {(a, lam): small_editor(shapes, a, lam) for a, lam in
               (("sum", 1.0), ("ridge", 1e12), ("ridge", 0.1), ("cancel", 1e12), ("cancel", 0.1))}
    sums = editors["sum", 1.0](decomposition, mask, factored=True)[0]
    for name, d in [*editors["ridge", 1e12](decomposition, mask, factored=True)[0].items(),
                    *editors["cancel", 1e12](decomposition, mask, factored=True)[0].items()]:
        # ΔW = (1 + 1/λ) Kᵀ (I + KKᵀ/(λc))⁻¹ V: off the sum KᵀV by (1 + |KKᵀ|/c)/λ ≤ (1 + N²)/λ of its
        # terms' size (|k|² ≤ N c); each side's float32 rounding on top
        terms = sums[name][0].abs().T @ sums[name][1].abs()
        diff = (dense(d) - dense(sums[name])).abs()
        assert (diff <= (1 + N ** 2) / 1e12 * terms + rounding(sums[name], N) + rounding(d, N)).all()
    order = torch.tensor([2, 0, 1])
    permuted = {n: (h[order], u[order]) for n, (h, u) in decomposition.items()}
    for editor in editors.values():
        before, after = editor(decomposition, mask, factored=True)[0], editor(permuted, mask[order], factored=True)[0]
        for name in before:
            diff = (dense(after[name]) - dense(before[name])).abs()
            assert (diff <= rounding(before[name], N) + rounding(after[name], N)).all()


def test_cancel_is_the_sum_for_a_single_edit():
    """"cancel" leaves a lone edit's update alone at any λ: with no other edit there is no cross-talk,
    and the solve returns the sum KᵀV (then one edit among three moves it: it is not the sum)."""
    _, _, shapes, decomposition, mask = decomposed()
    lam = 0.1
    editors = {a: small_editor(shapes, a, lam) for a in ("sum", "cancel")}
    for edits in ([0], [0, 1, 2]):
        part = {n: (h[edits], u[edits]) for n, (h, u) in decomposition.items()}
        N = int(mask[edits].sum())
        sums = editors["sum"](part, mask[edits], factored=True)[0]
        for name, d in editors["cancel"](part, mask[edits], factored=True)[0].items():
            # ΔW = Kᵀ (G + λcI)⁻¹ (own + λcV), solved in float64 (error ~1e-13), with own = K_e K_eᵀ V_e
            # formed in float32 (hypernet.keys_and_values): its rounding reaches B through (G + λcI)⁻¹, of
            # norm ≤ 1/(λc), and ΔW through Kᵀ, column by column (Cauchy-Schwarz); |K||K|ᵀ over all the
            # edits' tokens bounds the per-edit blocks. Then each side's float32 rounding. (One edit: under
            # 0.004 of the whole on an Intel Xeon, where the rounding terms alone were 1.4× too tight;
            # three edits: over 10³ times it.)
            K, V = d[0].double(), sums[name][1][mask[edits].flatten()].double()        # real tokens (N, ·)
            own = (reorder_rtol(K.shape[1], 1) + reorder_rtol(N, 1)) * (K.abs() @ K.abs().T) @ V.abs()
            c = (K ** 2).sum() / N
            solved = (K.norm(dim=0)[:, None] * own.norm(dim=0)[None, :] / (lam * c)).float()
            close = ((dense(d) - dense(sums[name])).abs() <= rounding(sums[name], N) + rounding(d, N) + solved).all()
            assert close if len(edits) == 1 else not close


def test_measure_in_passes_gives_the_same_numbers(gpt2_tokenizer, data_dir):
    """Scoring the rows a few at a time (as for 1,024 edits) changes nothing: the same rows, in other
    batches (argmax and NLL comparisons: discrete, and no tie within float32 rounding in a random model)."""
    model = tiny("gpt2", init=0.2)
    model.resize_token_embeddings(len(gpt2_tokenizer))
    model.requires_grad_(False)
    names = edit_module_names(model)
    editor = IBKE({n: weight_shape(model.get_submodule(n)) for n in names},
                  EditorConfig(**{**SMALL.__dict__, "aggregate": "ridge"})).eval()
    perturb_zero_init(editor)
    records = load("counterfact", data_dir)["train"][:4]
    runner = Runner(model, gpt2_tokenizer, names, cache=False)
    whole = measure(runner, ibke_editor(editor), records)[0]
    in_passes = measure(runner, ibke_editor(editor), records, rows_per_pass=3)[0]   # passes of 4 (the edits), 3, 3, …
    assert in_passes == whole and len(whole) == 4 and all("LS" in r and "NS_p" in r for r in whole)


def test_single_edits_apart_give_the_numbers_of_one_at_a_time(gpt2_tokenizer, data_dir):
    """evaluate.py at n = 1: records edited alone but scored together, each update routed to its own
    rows (metrics.measure_apart), score as one measure() per record, teacher-forced and generating; for
    the hypernetwork's factored updates and for a dense ΔW (factored by its SVD). Discrete comparisons,
    no tie within float32 rounding in a random model."""
    model = tiny("gpt2", init=0.2)
    model.resize_token_embeddings(len(gpt2_tokenizer))
    model.requires_grad_(False)
    names = edit_module_names(model)
    editor = IBKE({n: weight_shape(model.get_submodule(n)) for n in names}, SMALL).eval()
    perturb_zero_init(editor)

    def dense_editor(runner, batch):                 # a rank-2 ΔW drawn from the edit's tokens
        g = torch.Generator().manual_seed(int(batch["input_ids"].sum()))
        shapes = {n: weight_shape(model.get_submodule(n)) for n in names}
        return {n: torch.randn(d_in, 2, generator=g) @ torch.randn(2, d_out, generator=g) / 20
                for n, (d_in, d_out) in shapes.items()}
    records = load("counterfact", data_dir)["train"][:3]
    runner = Runner(model, gpt2_tokenizer, names, cache=False)
    for edit in (ibke_editor(editor), dense_editor):
        one = [measure(runner, edit, [r]) for r in records]
        results, _, apart = measure_apart(runner, edit, records)
        assert results == [r for line in one for r in line[0]] and len(results) == 3
        each = [g for r, line in zip(records, one)
                for g in generation(runner, lambda _: functional_edit(model, line[2]), [r], fluent=8)]
        assert generation(runner, lambda owners: apart(None, owners), records, fluent=8) == each


def test_draw_n_shares_and_stream():
    """draws.draw_n: log-uniform n has P(n) = log((n+1)/n) / log(most+1); --p-single adds lone edits;
    p_single 0 draws exactly the stream of before (no extra draw). Counts over 20,000 draws: a share's
    standard error is at most sqrt(0.25 / 20000) = 0.0035, so 0.02 is over 5 of them."""
    for p_single, most in [(0.0, 256), (0.5, 256), (0.0, 8)]:
        rng = random.Random(0)
        ns = [draw_n(rng, most, "log", p_single) for _ in range(20000)]
        p1 = math.log(2) / math.log(most + 1)
        assert ns.count(1) / len(ns) == pytest.approx(p_single + (1 - p_single) * p1, abs=0.02)
        assert min(ns) == 1 and max(ns) == most
    rng, old = random.Random(3), random.Random(3)
    assert [draw_n(rng, 8, "uniform") for _ in range(50)] == [old.randint(1, 8) for _ in range(50)]
    assert all(draw_n(rng, 8, "uniform", 1.0) == 1 for _ in range(50))


@pytest.mark.parametrize("ib", [False, True])
def test_encoding_in_chunks_gives_the_same_update_gradient_and_statistics(ib, monkeypatch):
    """--chunk's memory bound in training mode: encoding 2 edits at a time (then the third alone), each
    chunk's activations recomputed in the backward, gives the update, the gradient and the running
    statistics (merged chunk by chunk) of the reference: all three edits at once without IB noise (the
    noise is drawn per chunk, so with it the reference is the same chunks with their activations kept,
    i.e. the recomputation must redraw the same noise)."""
    _, _, shapes, decomposition, mask = decomposed()
    gen = torch.Generator().manual_seed(3)

    def run(chunk):
        torch.manual_seed(0)
        net = IBKE(shapes, EditorConfig(**{**SMALL.__dict__, "aggregate": "cancel", "ib": ib})).train()
        perturb_zero_init(net)
        gen.manual_seed(3)
        deltas, kl = net(decomposition, mask, chunk=chunk)
        # every entry of ΔW weighted
        loss = sum((d * torch.randn(d.shape, generator=gen)).sum() for d in deltas.values()) + kl
        grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
        return deltas, torch.cat([g.flatten() for g in grads if g is not None]), dict(net.named_buffers())

    if ib:
        monkeypatch.setattr("hypernet.checkpoint", lambda f, *a, use_reentrant: f(*a))   # activations kept
        ref_deltas, ref_grad, ref_stats = run(2)
        monkeypatch.undo()
    else:
        ref_deltas, ref_grad, ref_stats = run(0)
    deltas, grad, stats = run(2)
    # the same sums in other row groupings (matrix products over 1 or 3 edits' rows) through the
    # hypernetwork's ~8 layers of width ≤ 128, forward and back: reorder_rtol(128, 16) of the magnitude
    rtol = reorder_rtol(128, 16)
    for name in ref_deltas:
        assert (deltas[name] - ref_deltas[name]).abs().max() <= rtol * ref_deltas[name].abs().max()
    assert (grad - ref_grad).norm() <= rtol * ref_grad.norm(), ((grad - ref_grad).norm() / ref_grad.norm()).item()
    for name, buffer in ref_stats.items():     # the batch's statistics, merged a chunk at a time (Chan):
        # float64 sums over its N tokens in another order, two merges deep, of the buffer's magnitude
        # (a mean near 0 carries the rounding of its larger terms)
        tol = reorder_rtol(int(mask.sum()), 2, torch.float64) * buffer.abs().max()
        assert ((stats[name] - buffer).abs() <= tol).all(), name

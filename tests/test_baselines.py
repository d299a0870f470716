"""baselines.py: ROME's, MEMIT's and AlphaEdit's updates solve their equations; keys sit at the
subject's last token; the peers make the real model give the new answer; C's cache reads on any device."""
import os

import pytest
import torch

from baselines import (cached_covariance, down_projections, memit_editor, memit_update, null_projector, rome_editor,
                       rome_update, scaled_cholesky, subject_positions)
from conftest import DATA_DIR
from data import load, tokenize
from hooks import dense
from runner import Runner


def random_keys(n, d, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n, rank or d, generator=g, dtype=torch.float64)
    return K if rank is None else K @ torch.randn(rank, d, generator=g, dtype=torch.float64)


def test_rome_update_maps_the_key_to_the_target():
    """k ΔW = δ: ΔW = C⁻¹k δᵀ / (kᵀC⁻¹k), solved in float64 and rounded once to float32 (relative
    error ~1e-7 per entry; 1e-5 leaves room for d_in = 64 products)."""
    K0 = random_keys(500, 64, seed=1)
    C = K0.T @ K0 / 500
    k, delta = random_keys(1, 64, seed=2)[0].float(), random_keys(1, 32, seed=3)[0].float()
    update = dense(rome_update(C, k, delta))
    assert update.shape == (64, 32)
    torch.testing.assert_close(k @ update, delta, rtol=1e-5, atol=1e-5)
    assert torch.linalg.matrix_rank(update) == 1


def test_memit_update_solves_its_normal_equation():
    """(λC + KᵀK) ΔW = KᵀR, and with λ → 0 (n < d_in) the edited keys map to their values: K ΔW = R."""
    K0 = random_keys(500, 48, seed=1)
    C = K0.T @ K0 / 500
    K, R = random_keys(6, 48, seed=2).float(), random_keys(6, 16, seed=3).float()
    for lam in (10.0, 1e-9):
        update = dense(memit_update(C, K, R, lam)).double()
        torch.testing.assert_close((lam * C + K.double().T @ K.double()) @ update, K.double().T @ R.double(),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K @ update.float(), R, rtol=1e-4, atol=1e-4)
    lam = 10.0                                           # the n × n (Woodbury) form: the same ΔW, to float32
    woodbury = dense(memit_update(C, K, R, lam, chol=scaled_cholesky(C, lam)))
    torch.testing.assert_close(woodbury, dense(memit_update(C, K, R, lam)), rtol=1e-5, atol=1e-6)
    assert scaled_cholesky(C[:, :1] @ C[:1], 1.0) is None                              # rank 1: not positive definite


def test_alphaedit_update_leaves_preserved_keys_unchanged():
    """Preserved keys span 24 of 48 dimensions; P projects onto C's other 24 (eigenvalues ~1e-12 of the
    largest, below τ = 1e-6): K_p ΔW ≈ 0, float rounding of entries ~1 (1e-5), while the edited keys
    (in general position) still move towards their values."""
    K0 = random_keys(500, 48, seed=1, rank=24)
    C = K0.T @ K0 / 500
    P = null_projector(C, 1e-6)
    assert round(float(torch.trace(P))) == 24
    K, R = random_keys(4, 48, seed=2).float(), random_keys(4, 16, seed=3).float()
    update = dense(memit_update(C, K, R, 1.0, P, mu=1e-3))
    assert (K0[:50].float() @ update).abs().max() < 1e-5 * (K @ update).abs().max()
    assert (K @ update - R).norm() < 0.5 * R.norm()
    plain = dense(memit_update(C, K, R, 1.0, torch.eye(48, dtype=C.dtype), mu=1e-3))   # P = I: the preserved keys move
    assert (K0[:50].float() @ plain).abs().max() > 0.1
    full = dense(memit_update(C, K, R, 1.0, P, mu=1e-3, earlier=torch.zeros(48, 48, dtype=C.dtype)))
    torch.testing.assert_close(update, full, rtol=1e-4, atol=1e-5)   # the n × n form (no earlier) is the same ΔW


def test_alphaedit_sequential_keeps_earlier_batches_values():
    """--sequential merge: with the earlier batches' K_pᵀK_p in the solve, their keys (here in P's null
    space, where the new update is free to move) are moved 10× less than without it, and the new keys
    still reach their values. 4 + 4 keys in 24 free dimensions: both can hold (μ small)."""
    K0 = random_keys(500, 48, seed=1, rank=24)
    C = K0.T @ K0 / 500
    P = null_projector(C, 1e-6)
    Kp = (random_keys(4, 48, seed=4) @ P).float()
    K, R = random_keys(4, 48, seed=2).float(), random_keys(4, 16, seed=3).float()
    alone = dense(memit_update(C, K, R, 1.0, P, mu=1e-3))
    kept = dense(memit_update(C, K, R, 1.0, P, mu=1e-3, earlier=Kp.double().T @ Kp.double()))
    assert (Kp @ kept).norm() < 0.1 * (Kp @ alone).norm()
    assert (K @ kept - R).norm() < 0.5 * R.norm()


def test_subject_positions_point_at_the_subjects_last_token(gpt2_tokenizer):
    tok = gpt2_tokenizer
    prompt = "Danielle Darrieux's mother tongue is"
    rows = [(prompt, "English"), ("The capital of France is", "Paris")]
    ids = tokenize(tok, [p for p, _ in rows], [t for _, t in rows])
    batch = {"keys": rows, "starts": [s for _, s in ids]}
    pos = subject_positions(tok, batch, {prompt: "Danielle Darrieux"})
    assert tok.decode(ids[0][0][:pos[0] + 1]).endswith("Danielle Darrieux")
    assert tok.decode(ids[0][0][pos[0] + 1]) == "'s"
    assert pos[1] == ids[1][1] - 1                                        # no subject: the prompt's last token


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_peers_edit_the_real_model(smollm, method):
    """On SmolLM2 at mid depth, each peer makes the model give the new answer (ES well above the
    unedited model's, below 0.3 on these records) and leaves most neighbours alone."""
    from editor import no_editor
    from metrics import measure, summarise
    model, tokenizer = smollm
    records = load("counterfact", DATA_DIR, split="eval")["eval"][:4]
    train = load("counterfact", DATA_DIR, split="train")["train"][:300]
    names = down_projections(model, [6] if method == "rome" else [4, 5, 6, 7, 8])
    covs = cached_covariance(None, model, tokenizer, names, train, 5000)
    subjects = {r.prompt: r.subject for r in records}
    editor = {"rome": lambda: rome_editor(names[0], covs[names[0]], subjects),
              "memit": lambda: memit_editor(names, covs, subjects, lam=1000),
              "alphaedit": lambda: memit_editor(names, covs, subjects, projectors={
                  n: null_projector(covs[n], 1e-2) for n in names})}[method]()
    runner = Runner(model, tokenizer, names, cache=False)
    scores = {name: summarise([r for record in records for r in measure(runner, e, [record])[0]])
              for name, e in (("none", no_editor), (method, editor))}
    assert scores["none"]["ES"] < 0.3 and scores[method]["ES"] > scores["none"]["ES"] + 0.5, scores
    assert scores[method]["LS"] > 0.7, scores


def test_the_covariance_cache_is_read_on_any_device_and_rebuilt_when_damaged(tmp_path, monkeypatch, capsys,
                                                                            gpt2_tokenizer):
    """C is cached beside --ckpt and read by later runs, on whatever device they use: written by a GPU run
    it once held CUDA tensors (a CPU run raised at torch.load), and a GPU run got a CPU run's C on the
    host (its solves met the keys on two devices). Now written on the host and read onto the model's
    device; a file cut short is moved aside and C computed afresh."""
    from conftest import tiny
    model = tiny("gpt2")
    model.resize_token_embeddings(len(gpt2_tokenizer))
    names = down_projections(model, [1, 2])
    train = load("counterfact", DATA_DIR, split="train")["train"][:20]
    path = str(tmp_path / "cov.pt")
    fresh = cached_covariance(path, model, gpt2_tokenizer, names, train, 300)
    saved, _ = torch.load(path), capsys.readouterr()
    with monkeypatch.context() as m:                            # the same file as a GPU run would write it
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(saved, path)
    again = cached_covariance(path, model, gpt2_tokenizer, names, train, 300)
    assert all(torch.equal(again[n], fresh[n]) and again[n].device == model.device for n in names)
    assert "key covariance" not in capsys.readouterr().out     # read, not computed
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])               # cut short
    rebuilt = cached_covariance(path, model, gpt2_tokenizer, names, train, 300)
    assert all(torch.equal(rebuilt[n], fresh[n]) for n in names)
    assert "could not be read" in capsys.readouterr().out and os.path.exists(path + ".damaged")
    assert all(torch.equal(torch.load(path)[n], fresh[n]) for n in names)

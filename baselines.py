"""
The locate-then-edit peers (METHOD.md §4): ROME, MEMIT and AlphaEdit, training-free, each writing
the down-projection of chosen blocks. evaluate.py --method rome|memit|alphaedit runs them in the
same harness, on the same records, as IBKE.

    python baselines.py --method memit                    # C of its blocks (cached), its spectrum
    python evaluate.py --ckpt out/ibke/best.pt --method memit --limit 1000
    python evaluate.py --ckpt out/ibke/best.pt --method rome --peer-layers 27

For the down-projection y = x W of block l (W d_in × d_out) and edits e = 1..n:
  key      k_e   the module's input at the last token of e's subject in its prompt (the prompt's
                 last token where the subject is not in it); no random prefixes (ROME's average)
  target   δ_e   a shift of the residual stream after the last edited block at that token, found
                 by Adam (25 steps, lr 0.5) on the new answer's NLL + 0.5 |δ|² / |h|², |δ| ≤ 0.75 |h|
                 (MEMIT's compute_z; ROME's essence KL is left out)
  ROME     one block; per edit, on the model with the earlier edits applied:
           ΔW = C⁻¹k δᵀ / (kᵀC⁻¹k)                  (k ΔW = δ, the least change in C's norm)
  MEMIT    blocks l_1 < … < l_L, bottom up, each on the model with the lower updates applied:
           R = (z − h_now) / (blocks left), ΔW_l = (λC + KᵀK)⁻¹ KᵀR     (z = h + δ at the top)
  AlphaEdit  MEMIT's schedule with ΔW_l = (P KᵀK + μI)⁻¹ P KᵀR, P the projector onto C's
           eigenvectors of eigenvalue below τ × the largest: preserved keys k₀ (C's span) get k₀ΔW ≈ 0;
           in the sequential protocol (--sequential merge) ΔW_l = (P (KᵀK + K_pᵀK_p) + μI)⁻¹ P KᵀR,
           K_p the keys of every earlier batch at that block, so that they keep their new values
C = E[kkᵀ], the keys' second moment over the tokens of the train split's texts (the records' edit,
rephrase and neighbourhood prompts with their answers; --cov-tokens of them), cached beside --ckpt.
K (n, d_in), R (n, d_out), δ (n, d_model).
"""
import argparse
import os
from typing import Callable

import torch

from checkpoint import atomic_save
from data import EditRequest
from hooks import forward_hooks, functional_edit
from losses import answer_nll
from model import EDIT_TABLE, block_index, blocks_path
from runner import Runner, take

PEERS = ("rome", "memit", "alphaedit")


# -----------------------------------------------------------------------------
# keys, targets, covariance

def subject_positions(tokenizer, batch: dict, subjects: dict[str, str]) -> list[int]:
    """Per row of a Runner batch, the position of its subject's last token (data.tokenize's layout: an
    optional BOS, then the prompt); the prompt's last token where the subject is unknown or absent."""
    out = []
    for (prompt, _), start in zip(batch["keys"], batch["starts"]):
        subject = subjects.get(prompt, "")
        if not subject or subject not in prompt:
            out.append(start - 1)
            continue
        end = prompt.index(subject) + len(subject)
        whole = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        head = len(tokenizer(prompt[:end], add_special_tokens=False)["input_ids"])
        out.append(max(0, start - 1 - (whole - head)))                  # counted back from the prompt's end
    return out


def read_at(runner: Runner, batch: dict, pos: list[int], names: list[str], top: str,
            shift: torch.Tensor | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One pass of `batch` (inside any edit the caller applied): the inputs of `names` at `pos`
    ({name: (n, d_in)}), the residual stream after block `top` at `pos` (n, d_model), and the answer
    NLL per row (n,), with `shift` added to that residual stream at `pos` (None: nothing)."""
    rows = torch.arange(len(pos), device=runner.device)
    at = torch.tensor(pos, device=runner.device)
    keys, seen = {}, {}

    def key_hook(name):
        def hook(module, inputs, output):
            keys[name] = inputs[0][rows, at].float()
        return hook

    def top_hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output          # (B, T, d_model)
        if shift is not None:
            hidden = hidden.index_put((rows, at), hidden[rows, at] + shift.to(hidden.dtype))
        seen["h"] = hidden[rows, at].float()
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    block = f"{blocks_path(runner.model)}.{block_index(runner.model, top)}"
    with forward_hooks(runner.model, {n: key_hook(n) for n in names} | {block: top_hook}):
        logits, targets, scored_rows = runner.scored_logits(batch, split=False)
    return keys, seen["h"], answer_nll(logits, targets, scored_rows, len(pos))


def target_shift(runner: Runner, batch: dict, pos: list[int], top: str, steps: int = 25, lr: float = 0.5,
                 decay: float = 0.5, clamp: float = 0.75, enough: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's z: the shift δ (n, d_model) of the residual stream after block `top` at `pos` that makes
    each row's answer likely (Adam stops early once every row's answer NLL per token is below
    `enough`, as MEMIT's 5e-2), and that stream as it is, h (n, d_model)."""
    with torch.no_grad():
        h = read_at(runner, batch, pos, [], top)[1]
    delta = torch.zeros_like(h, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    size = h.norm(dim=1, keepdim=True)                                     # (n, 1)
    for _ in range(steps):
        with torch.enable_grad():
            nll = read_at(runner, batch, pos, [], top, shift=delta)[2]
            if nll.max() < enough:
                break
            loss = nll.sum() + decay * ((delta.norm(dim=1) / size[:, 0]) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():                                              # |δ| ≤ clamp |h|
            delta.mul_((clamp * size / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1))
    return delta.detach(), h


class _Done(Exception):
    pass


def texts_of(records: list[EditRequest]) -> list[str]:
    """The records' edit, rephrase and neighbourhood prompts with their answers, each text once."""
    pairs = [(r.prompt, r.target) for r in records] + [p for r in records for p in r.generality + r.locality]
    return list(dict.fromkeys(f"{q} {a}" for q, a in pairs))


@torch.no_grad()
def covariance(model, tokenizer, names: list[str], texts: list[str], tokens: int = 100_000,
               batch_size: int = 32) -> dict[str, torch.Tensor]:
    """C = E[kkᵀ] of each module's input over the tokens of `texts` (in order, until `tokens`):
    {name: (d_in, d_in) float64}. The blocks above the highest module are not run."""
    sums, count, mask = {}, 0, {}
    top = max(names, key=lambda n: block_index(model, n))

    def hook(name):
        def add(module, inputs, output):
            k = inputs[0][mask["m"]].float()                               # (tokens, d_in)
            sums[name] = sums.get(name, 0) + (k.T @ k).double()            # a batch in float32, the sum in float64
            if name == top:
                raise _Done
        return add

    with forward_hooks(model, {n: hook(n) for n in names}):
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True).to(model.device)
            mask["m"] = enc["attention_mask"].bool()
            try:
                model(**enc, use_cache=False)
            except _Done:
                pass
            count += int(mask["m"].sum())
            if count >= tokens:
                break
    return {n: s / count for n, s in sums.items()} | {"tokens": count}


def cached_covariance(path: str | None, model, tokenizer, names: list[str], records: list[EditRequest],
                      tokens: int) -> dict[str, torch.Tensor]:
    """covariance() of the train records' texts, from `path` if it holds these modules' at this many
    tokens, else computed and written there (atomically, on the host: a file any device reads; None: not
    kept). A file that cannot be read is moved aside to path.damaged and C computed afresh."""
    if path and os.path.exists(path):
        try:
            saved = torch.load(path, map_location=model.device)
        except Exception as err:                          # cut short, not a covariance file: a cache, rebuilt
            os.replace(path, path + ".damaged")
            print(f"note: {path} could not be read ({type(err).__name__}); moved to {path}.damaged")
            saved = {}
        if isinstance(saved, dict) and saved.get("asked") == tokens and all(n in saved for n in names):
            return saved
    print(f"key covariance of {len(names)} modules over {tokens} tokens of the train split -> {path}")
    cov = covariance(model, tokenizer, names, texts_of(records), tokens) | {"asked": tokens}
    if not path:
        return cov
    atomic_save({k: v.cpu() if torch.is_tensor(v) else v for k, v in cov.items()}, path)
    return cov


# -----------------------------------------------------------------------------
# the editors: (runner, batch of the edit rows) -> {module: ΔW as factors (a (n, d_in), b (n, d_out))}

def rome_update(C: torch.Tensor, k: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = C⁻¹k δᵀ / (kᵀC⁻¹k), with k ΔW = δ: k (d_in,), δ (d_out,) -> its factors a (1, d_in), b (1, d_out)."""
    u = torch.linalg.solve(C, k.double())
    return (u / (k.double() @ u)).float()[None], delta.float()[None]


def memit_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, lam: float, P: torch.Tensor | None = None,
                 mu: float = 10.0, earlier: torch.Tensor | None = None,
                 chol: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT: ΔW = (λC + KᵀK)⁻¹ KᵀR; AlphaEdit (P given): (P (KᵀK + earlier) + μI)⁻¹ P KᵀR, earlier =
    K_pᵀK_p of the edits kept before (sequential; else 0). K (n, d_in), R (n, d_out) -> ΔW's factors
    a (n, d_in), b = R (n, d_out), ΔW = aᵀb. Solved n × n where that is exact: with chol, L of λC = LLᵀ
    (made once per module), (λC + KᵀK)⁻¹Kᵀ = (λC)⁻¹Kᵀ (I + K(λC)⁻¹Kᵀ)⁻¹ (Woodbury); without earlier,
    (P KᵀK + μI)⁻¹ P Kᵀ = P Kᵀ (μI + K P Kᵀ)⁻¹ (push-through). The n × n matrices are symmetric."""
    K = K.double()
    eye = torch.eye(len(K), dtype=K.dtype, device=K.device)                          # (n, n)
    if P is None and chol is not None:
        AK = torch.cholesky_solve(K.T, chol)                                         # (d_in, n) = (λC)⁻¹Kᵀ
        return torch.linalg.solve(eye + K @ AK, AK.T).float(), R.float()
    if P is None:
        return torch.linalg.solve(lam * C + K.T @ K, K.T).T.float(), R.float()
    if earlier is None:
        PK = P @ K.T                                                                 # (d_in, n)
        return torch.linalg.solve(mu * eye + K @ PK, PK.T).float(), R.float()
    big = torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    return torch.linalg.solve(P @ (K.T @ K + earlier) + mu * big, P @ K.T).T.float(), R.float()


def scaled_cholesky(C: torch.Tensor, lam: float) -> torch.Tensor | None:
    """L with λC = LLᵀ, for memit_update's Woodbury form; None where λC is not positive definite."""
    L, info = torch.linalg.cholesky_ex(lam * C)
    return L if info == 0 else None


def null_projector(C: torch.Tensor, tau: float) -> torch.Tensor:
    """AlphaEdit's P: onto the eigenvectors of C whose eigenvalue is below tau × the largest."""
    values, vectors = torch.linalg.eigh(C)
    small = vectors[:, values < tau * values.max()]
    return small @ small.T


def rome_editor(name: str, C: torch.Tensor, subjects: dict[str, str], **shift_args):
    def edit(runner: Runner, batch: dict) -> dict[str, torch.Tensor]:
        pos = subject_positions(runner.tokenizer, batch, subjects)
        total = None
        for e in range(len(pos)):                      # one edit after another, each on the edited model
            row = take(batch, [e])
            with functional_edit(runner.model, {name: total} if total is not None else {}):
                delta, _ = target_shift(runner, row, pos[e:e + 1], name, **shift_args)
                with torch.no_grad():
                    k = read_at(runner, row, pos[e:e + 1], [name], name)[0][name][0]
            update = rome_update(C, k, delta[0])
            total = update if total is None else tuple(torch.cat(f) for f in zip(total, update))
        return {name: total}
    return edit


def memit_editor(names: list[str], covs: dict[str, torch.Tensor], subjects: dict[str, str], lam: float = 15000.0,
                 projectors: dict[str, torch.Tensor] | None = None, mu: float = 10.0, kept: dict | None = None,
                 **shift_args):
    """MEMIT over `names` (bottom to top); with `projectors` ({name: P}), AlphaEdit; with `kept` (a dict,
    the sequential protocol: every batch's edit stays), AlphaEdit adds there each batch's KᵀK per block
    and keeps the earlier batches' keys where they are."""
    chol = {n: scaled_cholesky(covs[n], lam) for n in names} if not projectors else {}

    def edit(runner: Runner, batch: dict) -> dict[str, torch.Tensor]:
        pos = subject_positions(runner.tokenizer, batch, subjects)
        delta, h = target_shift(runner, batch, pos, names[-1], **shift_args)
        z, deltas = h + delta, {}
        for i, name in enumerate(names):
            with functional_edit(runner.model, deltas), torch.no_grad():
                keys, now, _ = read_at(runner, batch, pos, [name], names[-1])
            R = (z - now) / (len(names) - i)                                # this block's share of what is left
            P = projectors[name] if projectors else None
            earlier = kept.get(name) if kept is not None else None
            deltas[name] = memit_update(covs[name], keys[name], R, lam, P, mu, earlier, chol.get(name))
            if kept is not None:
                gram = keys[name].double().T @ keys[name].double()
                kept[name] = gram if earlier is None else earlier + gram
        return deltas
    return edit


def down_projections(model, layers: list[int]) -> list[str]:
    """The down-projection (the FFN's second matrix) of each block in `layers`."""
    second = EDIT_TABLE[model.config.model_type][1][1]
    return [f"{blocks_path(model)}.{l}.{second}" for l in layers]


# -----------------------------------------------------------------------------
# evaluate.py's --method rome|memit|alphaedit

LAYERS = {"rome": [6], "memit": [4, 5, 6, 7, 8], "alphaedit": [4, 5, 6, 7, 8]}   # the papers' depths, scaled


def add_peer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peer-layers", default=None,
                        help="rome, memit, alphaedit: comma-separated blocks whose down-projection is written "
                             "(default: rome 6; memit, alphaedit 4,5,6,7,8: ROME's and MEMIT's depths in GPT-J, "
                             "scaled to the model's blocks)")
    parser.add_argument("--peer-lambda", type=float, default=1000.0,
                        help="memit: λ, the weight of the preserved keys' second moment C against the edits' keys")
    parser.add_argument("--peer-mu", type=float, default=10.0, help="alphaedit: μ, the ridge on the update")
    parser.add_argument("--peer-tau", type=float, default=1e-2,
                        help="alphaedit: the null space of C is its eigenvectors of eigenvalue below τ × the largest")
    parser.add_argument("--cov-tokens", type=int, default=100_000,
                        help="rome, memit, alphaedit: tokens of the train split's texts C is estimated on (cached "
                             "beside --ckpt)")


def peer_problems(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """evaluate.py's flag rules for the peers: (ok, problem)."""
    layers = (args.peer_layers or "0").replace(",", "").replace(" ", "")
    return [(layers.isdigit(), f"--peer-layers {args.peer_layers}: give block numbers separated by commas (4,5,6)"),
            (0 < args.peer_lambda < 3.4e38, f"--peer-lambda {args.peer_lambda}: give a positive number"),
            (0 < args.peer_mu < 3.4e38, f"--peer-mu {args.peer_mu}: give a positive number"),
            (0 < args.peer_tau < 1, f"--peer-tau {args.peer_tau}: give a fraction of the largest eigenvalue, 0 to 1"),
            (args.cov_tokens >= 1, f"--cov-tokens {args.cov_tokens}: give at least 1")]


def peer_covariances(args: argparse.Namespace, model, tokenizer, model_name: str, data_name: str,
                     train: list[EditRequest]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """--method rome|memit|alphaedit, --peer-layers -> (the modules it writes, bottom to top; their C), C cached beside
    --ckpt. ValueError: a block the model does not have, or no train split."""
    layers = sorted({int(x) for x in args.peer_layers.split(",")}) if args.peer_layers else LAYERS[args.method]
    blocks = len(model.get_submodule(blocks_path(model)))
    if max(layers) >= blocks or args.method == "rome" and len(layers) != 1:
        raise ValueError(f"--peer-layers {args.peer_layers}: give " + ("one block" if args.method == "rome" else
                         "blocks") + f" of the model's 0 to {blocks - 1}")
    if not train:
        raise ValueError(f"{data_name} has no train split to estimate the key covariance C on; edit with the "
                         f"peers on counterfact or zsre")
    names = down_projections(model, layers)
    folder = os.path.dirname(os.path.abspath(args.ckpt))
    tag = f"{os.path.basename(model_name.rstrip('/'))}-{data_name}-{'-'.join(map(str, layers))}"
    return names, cached_covariance(os.path.join(folder, f"cov-{tag}-{args.cov_tokens}.pt"), model, tokenizer,
                                    names, train, args.cov_tokens)


def peer_editor(args: argparse.Namespace, names: list[str], covs: dict[str, torch.Tensor],
                records: list[EditRequest]) -> Callable:
    """--method rome|memit|alphaedit -> the edit function, for `records` (their subjects)."""
    subjects = {r.prompt: r.subject for r in records}
    if args.method == "rome":
        return rome_editor(names[0], covs[names[0]], subjects)
    projectors = {n: null_projector(covs[n], args.peer_tau) for n in names} if args.method == "alphaedit" else None
    kept = {} if args.method == "alphaedit" and args.sequential == "merge" else None
    return memit_editor(names, covs, subjects, args.peer_lambda, projectors, args.peer_mu, kept)


if __name__ == "__main__":
    from checkpoint import CheckpointError
    from data import DataError, load
    from editor import Editor
    from model import ModelError
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out/ibke/best.pt", help="a checkpoint of train.py: its model and data")
    parser.add_argument("--method", default="memit", choices=PEERS, help="whose blocks")
    parser.add_argument("--data-dir", default="data", help="folder holding the benchmark files")
    add_peer_args(parser)
    args = parser.parse_args()
    problems = [p for ok, p in peer_problems(args) if not ok]
    if problems:
        raise SystemExit(f"error: {problems[0]}")
    try:
        loaded = Editor.load(args.ckpt)
        data = loaded.ckpt["config"]["data"]
        names, covs = peer_covariances(args, loaded.model, loaded.tokenizer, loaded.ckpt["model"], data,
                                       load(data, args.data_dir, split="train").get("train", []))
    except (CheckpointError, DataError, ModelError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    for name in names:                                   # C's spectrum: what AlphaEdit's τ keeps as null space
        values = torch.linalg.eigvalsh(covs[name])
        null = int((values < args.peer_tau * values.max()).sum())
        print(f"{name}: C over {covs['tokens']} tokens, eigenvalues {values.min():.3g} … {values.max():.3g} "
              f"(median {values.median():.3g}); AlphaEdit's null space at τ = {args.peer_tau:g}: {null} of "
              f"{len(values)}")

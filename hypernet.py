"""
The IBKE hypernetwork (METHOD.md §3): gradient decomposition (h, u) -> weight update ΔW.

    python hypernet.py                        # parameter counts for the default model
    python hypernet.py --model gpt2-xl        # ... for gpt2-xl, built on the meta device (no download)

Per edited module m, with weights shared by all modules of the same shape (d_in, d_out):
  1. normalise   x_i = [(h_i − μ_h)/σ_h ; (u_i − μ_u)/σ_u]    running Welford statistics
  2. project     t_i = W_in x_i + b_in + emb_m
  3. encode φ1   A_e = CrossAttn(P, T_e, T_e); z_e = μ_e + σ_e ⊙ ε  (ITM: KL to N(0, I))
  4. decode φ2   r_i = CrossAttn(t_i, z_e, z_e) + MLP;  [h̃_i; ũ_i] = x_i + W_out r_i;  s_i = σ(w_s·r_i + b_s)
  5. update      ΔW_m = −η_m Σ_e (1/|e|) Σ_{i∈e} s_i h̃_iᵀ ũ_i         (--aggregate sum; METHOD.md §3)
                 or the ridge solve over all edits' tokens                  (--aggregate ridge; MALMEN)
                 or the sum with the edits' cross-talk solved away          (--aggregate cancel; = sum at n = 1)
MEND is the configuration with no latent (latent_len 0: step 3 and the decoder's attention left out,
r_i = t_i + MLP(t_i), each token on its own), no IB and no token scale (`--latent-len 0 --no-ib
--no-scale`); MALMEN is MEND with `--aggregate ridge` (METHOD.md §3).
Dimension letters: M modules of one shape, E edits, T tokens, N = E·T, D = d_in + d_out, C = d_m,
L = l_m (latent length), Z = latent dim.
"""
import argparse
import math
import re
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from losses import gaussian_kl


@dataclass
class EditorConfig:
    d_m: int = 512            # width of the hypernetwork (the paper's: 1920, PAPER_SIZE)
    latent_len: int = 10      # l_m, number of learnable queries / latent vectors per edit (0: none, MEND)
    latent_dim: int = 512     # Z, width of each latent vector (the paper's: = d_m)
    heads: int = 8            # attention heads in encoder and decoder
    ib: bool = True           # False: deterministic latent z = μ and no KL (--no-ib)
    token_scale: bool = True  # False: s_i ≡ 1/2, the scale's start value (--no-scale)
    eta_init: float = 1e-2    # initial step size η_m (DAFNet's 1e-4 edits nothing after our normalisation)
    aggregate: str = "sum"    # how a batch's edits combine: "sum", a "ridge" solve or "cancel" (step 5)
    ridge_init: float = 0.1   # initial λ_m of the ridge solve (relative: λ → ∞ the sum, λ → 0 interpolation)


PAPER_SIZE = {"d_m": 1920, "latent_dim": 1920}   # the paper's hypernetwork (bench.py sizes it for GPT-2 XL)


class RunningNorm(nn.Module):
    """Per-module running mean / std of x (Welford, merged batch-wise by Chan's formula).
    Updated only in training mode; the buffers are saved with the hypernetwork."""

    def __init__(self, n_modules: int, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(n_modules, 1, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_modules, dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(n_modules, dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """x (M, E, T, D), mask (E, T): merge the statistics of the unmasked tokens (masked sums: the
        token count stays on the device)."""
        w = mask.flatten().double()[None, :, None]                # (1, N, 1)
        x = x.flatten(1, 2).double()                              # (M, N, D)
        n = w.sum()
        batch_mean = (x * w).sum(1) / n
        batch_m2 = ((x - batch_mean[:, None]) ** 2 * w).sum(1)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta ** 2 * self.count * n / total
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = (self.m2 / self.count.clamp_min(1)).sqrt()
        std = torch.where(self.count > 0, std.clamp_min(1e-8), torch.ones_like(std))  # untrained: identity
        return (x - self.mean[:, None, None].to(x.dtype)) / std[:, None, None].to(x.dtype)


class ShapeEditor(nn.Module):
    """Steps 1-5 for the M modules that share one weight shape (d_in, d_out)."""

    def __init__(self, d_in: int, d_out: int, n_modules: int, cfg: EditorConfig):
        super().__init__()
        self.d_in, self.d_out, self.cfg = d_in, d_out, cfg
        D, C, Z = d_in + d_out, cfg.d_m, cfg.latent_dim
        self.norm = RunningNorm(n_modules, D)
        self.proj = nn.Linear(D, C)
        self.module_emb = nn.Parameter(torch.zeros(n_modules, C))
        if cfg.latent_len:                                   # steps 3 and 4's attention (none: MEND)
            self.queries = nn.Parameter(torch.randn(cfg.latent_len, C) * C ** -0.5)
            self.enc_norm = nn.LayerNorm(C)
            self.enc_attn = nn.MultiheadAttention(C, cfg.heads, batch_first=True)
            self.to_mu = nn.Linear(C, Z)
            self.to_logvar = nn.Linear(C, Z)
            self.dec_norm = nn.LayerNorm(C)
            self.dec_attn = nn.MultiheadAttention(C, cfg.heads, kdim=Z, vdim=Z, batch_first=True)
            nn.init.zeros_(self.to_logvar.weight)            # σ = 1 at the start
            nn.init.zeros_(self.to_logvar.bias)
        self.mlp = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, C), nn.GELU(), nn.Linear(C, C))
        self.out = nn.Linear(C, D)
        self.scale = nn.Linear(C, 1)
        self.log_eta = nn.Parameter(torch.full((n_modules,), math.log(cfg.eta_init)))
        if cfg.aggregate in ("ridge", "cancel"):
            self.log_lambda = nn.Parameter(torch.full((n_modules,), math.log(cfg.ridge_init)))
        for layer in (self.out, self.scale):                  # identity start: h̃ = ĥ, ũ = û, equal s
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def edit_vectors(self, h: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Steps 1-4 (the statistics of step 1 as they stand: forward updates them). h (M, E, T, d_in),
        u (M, E, T, d_out), mask (E, T) bool -> h̃ (M, E, T, d_in), ũ (M, E, T, d_out), token scale s
        (M, E, T), ITM KL per edit (E,)."""
        M, E, T, _ = h.shape
        x = self.norm(torch.cat([h, u], -1))                                   # IBKE §3 step 1 (M, E, T, D)
        t = self.proj(x) + self.module_emb[:, None, None]                      # step 2 (M, E, T, C)
        t = t.flatten(0, 1)                                                    # (M·E, T, C)
        r, kl = t, t.new_zeros(E)                                              # no latent (MEND): no ITM
        if self.cfg.latent_len:
            padding = ~mask.repeat(M, 1)                                       # (M·E, T)
            kv = self.enc_norm(t)
            queries = self.queries.expand(M * E, -1, -1)                       # (M·E, L, C)
            A = self.enc_attn(queries, kv, kv, key_padding_mask=padding, need_weights=False)[0]  # step 3, φ1
            mu, logvar = self.to_mu(A), self.to_logvar(A)                      # (M·E, L, Z)
            if self.cfg.ib and self.training:
                z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)           # reparameterisation
            else:
                z = mu                                                         # evaluation (or --no-ib)
            if self.cfg.ib:
                kl = gaussian_kl(mu, logvar).view(M, E).mean(0)                # ITM (E,)
            r = t + self.dec_attn(self.dec_norm(t), z, z, need_weights=False)[0]   # step 4, φ2 (M·E, T, C)
        r = r + self.mlp(r)
        x_tilde = x + self.out(r).view(M, E, T, -1)                            # gated residual
        h_tilde, u_tilde = x_tilde.split([self.d_in, self.d_out], -1)
        if self.cfg.token_scale:
            s = torch.sigmoid(self.scale(r)).view(M, E, T)                     # token scale
        else:  # the scale's start value σ(0) = 1/2, held: the same first update as with the scale (a clean ablation)
            s = x.new_full((M, E, T), 0.5)
        return h_tilde, u_tilde, s, kl

    def keys_and_values(self, h: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Steps 1-4, then step 5's per-edit part: keys k_i = √w_i h̃_i, value shifts v_i = −η_m √w_i ũ_i,
        w_i = s_i / |e| -> K (M, N, d_in), V (M, N, d_out); "cancel": each token's change under its own
        edit's sum update, K_e K_eᵀ V_e (M, N, d_out), else None; ITM KL per edit (E,). "sum": N = E·T
        (padding rows are zero; no host wait), else N = the mask's real tokens (one host wait)."""
        h_tilde, u_tilde, s, kl = self.edit_vectors(h, u, mask)
        root_w = s.sqrt() * mask / mask.sum(1, keepdim=True).clamp_min(1).sqrt()   # √(s_i / |e|)  (M, E, T)
        K = h_tilde * root_w[..., None]                                        # (M, E, T, d_in)
        V = -self.log_eta.exp()[:, None, None, None] * (u_tilde * root_w[..., None])   # (M, E, T, d_out)
        if self.cfg.aggregate == "sum":
            return K.flatten(1, 2), V.flatten(1, 2), None, kl
        own = (K @ K.transpose(2, 3)) @ V if self.cfg.aggregate == "cancel" else None   # K_e K_eᵀ V_e  (M, E, T, d_out)
        keep = mask.flatten().nonzero().squeeze(1)                             # the solve sees real tokens only
        return (*(None if x is None else x.flatten(1, 2)[:, keep] for x in (K, V, own)), kl)

    def forward(self, h: torch.Tensor, u: torch.Tensor, mask: torch.Tensor,
                chunk: int = 0) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Step 5 for all E edits, with K (M, N, d_in), V (M, N, d_out) as keys_and_values gives them.
        "sum": ΔW_m = KᵀV = −η_m Σ_e (1/|e|) Σ_{i∈e} s_i h̃_iᵀ ũ_i, returned as
        its factors. "ridge", "cancel": see ridge(). chunk: steps 1-4 for that many edits at a time (0:
        all), with autograd recomputing each chunk's activations in the backward (and its IB noise: the
        RNG state is kept), so that the keys and values grow with n, not the hypernetwork's activations.
        -> (A (M, N, d_in), B (M, N, d_out)) with ΔW = AᵀB, or (None, ΔW (M, d_in, d_out)); KL (E,)."""
        E = h.shape[1]
        step = chunk if chunk and E > chunk else E
        if self.training:                                                      # step 1's statistics, merged
            for i in range(0, E, step):                                        # a chunk at a time (Chan)
                self.norm.update(torch.cat([h[:, i:i + step], u[:, i:i + step]], -1), mask[i:i + step])
        run = partial(checkpoint, self.keys_and_values, use_reentrant=False) if step < E and torch.is_grad_enabled() \
            else self.keys_and_values
        parts = [run(h[:, i:i + step], u[:, i:i + step], mask[i:i + step]) for i in range(0, E, step)]
        K, V, own = (None if p[0] is None else p[0] if len(p) == 1 else torch.cat(p, 1) for p in list(zip(*parts))[:3])
        kl = torch.cat([p[3] for p in parts])
        if self.cfg.aggregate == "sum":
            return K, V, kl
        return (*ridge(K, V, self.log_lambda.exp(), mask.sum(), own), kl)


def ridge(K: torch.Tensor, V: torch.Tensor, lam: torch.Tensor, n_tokens: torch.Tensor,
          own: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The edits of a batch as one least-squares update (METHOD.md §6: MALMEN's normal equation, with
    IBKE's keys and value shifts): ΔW = (1 + λ) c (KᵀK + λ c I)⁻¹ KᵀV, c = mean_i |k_i|². This is §6's
    (KᵀK + e^λ I)⁻¹ KᵀV with its ridge measured in units of the keys' size (e^λ = λc, so λ means the
    same for any model) and the gain (1 + λ) c made explicit, so the update keeps the sum's size at
    every λ instead of shrinking as e^{−λ}. It solves min Σ_i |k_i ΔW − (1 + λ) c v_i|² + λ c |ΔW|²:
    λ → ∞ gives the sum KᵀV; λ → 0 makes each key's change c v_i, its own (the sum adds every other
    key's k_j·k_i v_j).
    own (M, N, d_out), "cancel": each key's change under its own edit's sum update, K_e K_eᵀ V_e, as
    the target instead of c v_i: min Σ_i |k_i ΔW − own_i − λc v_i|² + λc |ΔW|², i.e. ΔW = KᵀV − Kᵀ(KKᵀ +
    λcI)⁻¹ O V with O the Gram's blocks between different edits. One edit (O = 0) gets the sum exactly,
    for every λ; many get the sum with the other edits' cross-talk at their tokens cancelled.
    K (M, N, d_in), V (M, N, d_out), λ (M,), n_tokens: the N tokens that are not padding (padding
    rows of K and V are zero). Solved in float64 by Cholesky, with Y the target above: the N × N
    (Woodbury) form ΔW = Kᵀ [(KKᵀ + λ c I)⁻¹ Y], kept as factors, when N ≤ d_in; else the d_in × d_in one.
    -> (K, B) with ΔW = KᵀB, or (None, ΔW (M, d_in, d_out))."""
    M, N, d_in = K.shape
    K64, V64 = K.double(), V.double()
    # mean |k_i|² (M,); floored so that a module whose keys are all zero (a model broken by earlier merges,
    # its gradients vanished) gets a defined solve, and ΔW = KᵀB = 0
    c = ((K64 ** 2).sum((1, 2)) / n_tokens.clamp_min(1)).clamp_min(1e-30)
    lam = lam.double().clamp_min(1e-6)          # a learned λ near 0 must not make padding rows singular
    ridge_term = (lam * c)[:, None, None]
    if own is None:
        target = (1 + lam)[:, None, None] * c[:, None, None] * V64             # Y = (1 + λ) c V  (M, N, d_out)
    else:
        target = own.double() + ridge_term * V64                              # Y = own + λ c V
    if N <= d_in:
        gram = K64 @ K64.transpose(1, 2) + ridge_term * torch.eye(N, dtype=K64.dtype, device=K.device)   # (M, N, N)
        B = torch.cholesky_solve(target, torch.linalg.cholesky(gram))                                # (M, N, d_out)
        return K, B.to(V.dtype)
    # (M, d_in, d_in)
    gram = K64.transpose(1, 2) @ K64 + ridge_term * torch.eye(d_in, dtype=K64.dtype, device=K.device)
    delta = torch.cholesky_solve(K64.transpose(1, 2) @ target, torch.linalg.cholesky(gram))       # (M, d_in, d_out)
    return None, delta.to(V.dtype)


def groups_of(shapes: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """"d_inxd_out" -> the modules of that weight shape, in order."""
    groups = {}
    for name, (d_in, d_out) in shapes.items():
        groups.setdefault(f"{d_in}x{d_out}", []).append(name)
    return groups


class IBKE(nn.Module):
    """One ShapeEditor per distinct weight shape; maps {module: (h, u)} to {module: ΔW}."""

    def __init__(self, shapes: dict[str, tuple[int, int]], cfg: EditorConfig):
        super().__init__()
        self.cfg, self.shapes = cfg, dict(shapes)
        self.groups = groups_of(shapes)
        self.editors = nn.ModuleDict({key: ShapeEditor(*shapes[names[0]], len(names), cfg)
                                      for key, names in self.groups.items()})

    def forward(self, decomposition: dict[str, tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                factored: bool | None = False, chunk: int = 0):
        """{name: (h (E, T, d_in), u (E, T, d_out))}, mask (E, T) -> ({name: ΔW (d_in, d_out)}, ITM KL ()).
        factored: give each ΔW as its factors (A (N, d_in), B (N, d_out)), ΔW = AᵀB, never forming it:
        x ΔW = (x Aᵀ) B costs N (d_in + d_out) against d_in d_out a token, less for the N ≈ 100 tokens
        of a training step. None: factors where they cost less (N (d_in + d_out) < d_in d_out). The
        ridge's d_in × d_in form (N > d_in) is always dense. chunk: edits encoded at a time (ShapeEditor)."""
        deltas, kls = {}, []
        for key, names in self.groups.items():
            h = torch.stack([decomposition[n][0] for n in names]).float()     # (M, E, T, d_in)
            u = torch.stack([decomposition[n][1] for n in names]).float()     # (M, E, T, d_out)
            A, B, kl = self.editors[key](h, u, mask, chunk)                    # (M, N, d_in), (M, N, d_out)
            if A is None:                                                      # the ridge's dense form
                deltas.update(zip(names, B))
            else:
                N, d_in, d_out = A.shape[1], A.shape[2], B.shape[2]
                as_factors = factored if factored is not None else N * (d_in + d_out) < d_in * d_out
                deltas.update(zip(names, zip(A, B) if as_factors else A.transpose(1, 2) @ B))
            kls.append(kl)
        return deltas, torch.stack(kls).mean()                                 # KL: mean over groups and edits

    PER_MODULE = ("module_emb", "log_eta", "log_lambda", "norm.count", "norm.mean", "norm.m2")

    def carry_over(self, state: dict, shapes: dict[str, tuple[int, int]]) -> list[str]:
        """Load a trained hypernetwork's state that edited `shapes` (a second phase may edit other modules,
        or another aggregate). Shared weights come per weight shape; a module it edited keeps its own
        embedding, η, λ and statistics; a new one starts from the nearest edited block's embedding, η and
        λ, with empty statistics (filled from its first training step). A λ it lacks stays at --ridge-init.
        -> the modules that are new."""
        old = groups_of(shapes)
        block = lambda name: int(re.findall(r"\.(\d+)\.", name)[-1])       # its block's index
        added = []
        for key, names in self.groups.items():
            if key not in old:                                           # a new shape: as initialised
                added += names
                continue
            prefix, was = f"editors.{key}.", old[key]
            mine = self.editors[key].state_dict()
            near = [was.index(n) if n in was else min(range(len(was)), key=lambda j: abs(block(was[j]) - block(n)))
                    for n in names]
            for k in mine:                                               # λ: only where both solve
                if prefix + k in state:
                    mine[k] = state[prefix + k][near].clone() if k in self.PER_MODULE else state[prefix + k]
            fresh = [i for i, n in enumerate(names) if n not in was]
            for k in ("norm.count", "norm.mean", "norm.m2"):
                mine[k][fresh] = 0
            self.editors[key].load_state_dict(mine)
            added += [names[i] for i in fresh]
        return added


if __name__ == "__main__":
    from model import ModelError, add_model_args, edit_module_names, meta_model, weight_shape
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)                               # the model whose edited modules size the hypernetwork
    parser.add_argument("--d-m", type=int, default=EditorConfig.d_m, help="hypernetwork width d_m")
    parser.add_argument("--latent-len", type=int, default=EditorConfig.latent_len, help="l_m")
    parser.add_argument("--latent-dim", type=int, default=EditorConfig.latent_dim, help="latent width Z")
    args = parser.parse_args()
    try:
        model = meta_model(args.model)
        names = edit_module_names(model, args.edit_modules, args.edit_layers)
    except ModelError as err:
        raise SystemExit(f"error: {err}")
    cfg = EditorConfig(d_m=args.d_m, latent_len=args.latent_len, latent_dim=args.latent_dim)
    shapes = {n: weight_shape(model.get_submodule(n)) for n in names}
    with torch.device("meta"):
        editor = IBKE(shapes, cfg)
    print(f"{args.model}: {len(names)} edited modules, {len(editor.groups)} weight shapes, config {asdict(cfg)}")
    for key, group in editor.groups.items():
        n = sum(p.numel() for p in editor.editors[key].parameters())
        print(f"  shape {key}: {len(group)} modules share {n / 1e6:.1f}M parameters  ({', '.join(group)})")
    print(f"  total: {sum(p.numel() for p in editor.parameters()) / 1e6:.1f}M hypernetwork parameters "
          f"(base model edited: {sum(shapes[n][0] * shapes[n][1] for n in names) / 1e6:.1f}M weights)")

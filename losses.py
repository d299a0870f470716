"""
The tripartite objective of IBKE (METHOD.md §2-§3):

    L = c_edit·NLL(o_e | q_e) + c_gen·NLL(o_g | q_g)       SG, sufficiency for generality
      + c_loc·KL(p_θ(·|q_l) || p_θ̂(·|q_l))                IL, independence for locality
      + β·mean_e KL(N(μ_e, σ²_e) || N(0, I))               ITM, information transfer minimisation
      + c_after·KL(p_θ(·|q_e o_e c) || p_θ̂(·|q_e o_e c))    IL after the answer (ours; 0 in the paper's)

The last term is not the paper's: c is the unedited model's own continuation of the edit prompt and
its new answer, so the edited model, having given the answer, should go on as the unedited one does
(train.py --c-after; METHOD.md §8).

All terms are taken only at scored positions: the positions whose next token is an answer token
(labels != -100 one step later). `scored` turns full logits into that compact form, so a forward
pass that computes the LM head only there (see train.py) feeds the same functions.

    python -m pytest tests/test_editor.py -k loss
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) labels -> (rows, cols) of the N positions whose next token is an answer token."""
    return (labels[:, 1:] != -100).nonzero(as_tuple=True)   # position t predicts token t + 1


def scored(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, V) logits, (B, T) labels -> logits (N, V), targets (N,), rows (N,) at scored positions."""
    rows, cols = scored_positions(labels)
    return logits[rows, cols], labels[rows, cols + 1], rows


def answer_nll(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(N, V), (N,), (N,) -> (n_rows,): each sequence's mean NLL over its answer tokens (SG)."""
    nll = F.cross_entropy(logits.float(), targets, reduction="none")                     # (N,)
    total = torch.zeros(n_rows, dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    count = torch.zeros(n_rows, dtype=nll.dtype, device=nll.device).index_add(0, rows, torch.ones_like(nll))
    return total / count.clamp_min(1)


def locality_kl(pre_logits: torch.Tensor, post_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_pre || p_post), mean over scored locality positions (IL). (N, V), (N, V) -> ()."""
    pre, post = F.log_softmax(pre_logits.float(), -1), F.log_softmax(post_logits.float(), -1)
    return (pre.exp() * (pre - post)).sum(-1).mean()


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """ITM: KL(N(μ, σ²) || N(0, I)) averaged over all but the first dim. (E, L, Z) -> (E,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).flatten(1).mean(1)


@dataclass
class LossWeights:
    c_edit: float = 1.0   # SG, edit prompt
    c_gen: float = 1.0    # SG, generality prompts
    c_loc: float = 1.0    # IL
    beta: float = 0.1     # ITM
    c_after: float = 0.0  # IL after the answer (ours)


def ibke_loss(edit_nll: torch.Tensor, gen_nll: torch.Tensor, loc_kl: torch.Tensor, itm_kl: torch.Tensor,
              w: LossWeights, after_kl: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of METHOD.md §3 (each input already averaged over the batch): the loss train.py
    differentiates (its SG and IL terms into ΔW, then ITM directly), and its parts as detached 0-d
    tensors (reading them waits for the device, so the caller reads them when it logs)."""
    total = w.c_edit * edit_nll + w.c_gen * gen_nll + w.c_loc * loc_kl + w.beta * itm_kl
    parts = {"loss": total, "edit": edit_nll, "gen": gen_nll, "loc": loc_kl, "itm": itm_kl}
    if after_kl is not None:
        parts["loss"] = total = total + w.c_after * after_kl
        parts["after"] = after_kl
    return total, {k: v.detach() for k, v in parts.items()}

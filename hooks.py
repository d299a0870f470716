"""
Hooks into the frozen base model (METHOD.md §3): read the gradient decomposition of the
edited FFN matrices, and write an edit into them.

    python -m pytest tests/test_editor.py -k "decomposition or restore or functional"

For a module y = x W (W is d_in × d_out; GPT-2's Conv1D stores W, nn.Linear stores Wᵀ) and the
edit loss L_E, the weight gradient is a sum over tokens of outer products:
    ∇_W L_E = Σ_i h_iᵀ u_i,   h_i = the module's input at token i,  u_i = ∂L_E/∂y_i.
One forward and one backward of the edit batch give every h_i and u_i; the hypernetwork reads them.
Shapes: B edit sequences (one per edit request, so the row is the token's edit index), T tokens.
"""
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from losses import answer_nll, scored
from runner import to_device


@contextmanager
def forward_hooks(model: nn.Module, hooks: dict[str, Callable]) -> Iterator[None]:
    """`with forward_hooks(model, {module name: hook}):` the hooks registered, and removed after."""
    handles = [model.get_submodule(name).register_forward_hook(hook) for name, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(model: nn.Module, names: list[str]) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Record h (input) and, after backward, u (output gradient) of each named module.

    The base model has no trainable parameters, so the lowest edited module's output is made a
    leaf that requires grad: the graph starts there, and backward never runs below it.
    """
    store = {name: {} for name in names}

    def hook(name: str):
        def forward_hook(module, inputs, output):
            store[name]["h"] = inputs[0].detach()                                  # (B, T, d_in)
            if not output.requires_grad:
                output = output.detach().requires_grad_()
            output.register_hook(lambda grad: store[name].__setitem__("u", grad.detach()))  # (B, T, d_out)
            return output
        return forward_hook

    with forward_hooks(model, {name: hook(name) for name in names}):
        yield store


def grad_decomposition(model: nn.Module, names: list[str], batch: dict[str, torch.Tensor], tokens: str = "all",
                       forward: Callable[[dict], tuple] | None = None):
    """One forward + backward of the edit batch: ({name: (h, u)}, token mask (B, T) bool).

    Loss L_E = Σ_e mean over e's answer tokens of −log p(o_e | q_e)   (METHOD.md §3).
    tokens: "all" keeps every non-padding token; "answer" only the scored ones (those whose next
    token is an answer token). h and u are zero outside the mask.
    forward: batch -> scored logits (N, V), targets (N,), rows (N,) (see losses.scored); default the
    full model. runner.Runner.scored_logits is the fast one: it starts at the first edited block.
    """
    forward = forward or (lambda b: scored(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                           b["labels"]))
    labels = batch["labels"]
    with capture(model, names) as store, torch.enable_grad():
        logits, targets, rows = forward(batch)
        answer_nll(logits, targets, rows, labels.shape[0]).sum().backward()   # L_E
    if tokens == "all":
        mask = batch["attention_mask"].bool()
    elif tokens == "answer":
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
    else:
        raise ValueError(f"tokens must be 'all' or 'answer', not {tokens!r}")
    keep = mask[..., None]
    return {n: (store[n]["h"] * keep, store[n]["u"] * keep) for n in names}, mask


# -----------------------------------------------------------------------------
# applying an edit: ΔW is always (d_in, d_out), as in y = x W

@contextmanager
def functional_edit(model: nn.Module, deltas: dict) -> Iterator[nn.Module]:
    """`with functional_edit(model, deltas): ...` runs the edited model, y = x W + x ΔW at each edited
    module, as forward hooks. Training and evaluation both apply an edit this way, so evaluation runs
    exactly the edit that was trained, in any dtype: x ΔW is computed in float32 and the sum rounded
    once to the module's dtype (a bf16 weight could not hold an update ~1% of its size: W + ΔW in
    bf16 loses about half of ΔW's entries). W is never written; gradients flow into ΔW.
    A ΔW is a (d_in, d_out) tensor or its factors (A (K, d_in), B (K, d_out)): x ΔW = (x Aᵀ) B."""
    def hook(delta):
        def add(module, inputs, output):                                             # (B, T, d_out)
            dtype = torch.promote_types(output.dtype, torch.float32)                   # float32 at least
            x = inputs[0].to(dtype)
            if isinstance(delta, tuple):                                             # factored: x ΔW = (x Aᵀ) B
                change = (x @ delta[0].T.to(dtype)) @ delta[1].to(dtype)
            else:
                change = x @ delta.to(dtype)
            return (output.to(dtype) + change).to(output.dtype)
        return add

    with forward_hooks(model, {name: hook(delta) for name, delta in deltas.items()}):
        yield model


class Routing:
    """Which rows of the pass now running take which of E updates, stored as factors in `store`:
    routes (B,) long, −1 for none. store.factors(ids (R,)) -> groups of updates of one rank, [(at (G,),
    {module: (a (G, r, d_in), b (G, r, d_out))})], `at` their places in ids; any dtype and device.
    select() sets a pass's rows (rows (R,)); `groups` gathers their factors, float32, on `device`, once."""

    def __init__(self, store, routes: torch.Tensor, device: torch.device):
        self.store, self.routes, self.device = store, routes.cpu(), device
        self.select(None)

    def select(self, rows: list[int] | None) -> None:
        """The pass runs these rows of the routed batch (None: all of them, in order)."""
        routes = self.routes if rows is None else self.routes[rows]
        at = torch.nonzero(routes >= 0)[:, 0]
        self.ids, self.rows, self._groups = routes[at], to_device(at, self.device), None

    @property
    def groups(self) -> list[tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
        if self._groups is None:                  # at the pass's first edited module: a runner selects first
            f32 = lambda x: x.to(self.device, torch.float32)
            self._groups = [(to_device(at, self.device), {n: (f32(a), f32(b)) for n, (a, b) in f.items()})
                            for at, f in self.store.factors(self.ids)]
        return self._groups


@contextmanager
def routed_edit(model: nn.Module, names: list[str], routing: Callable[[], Routing]) -> Iterator[nn.Module]:
    """`with routed_edit(model, names, routing):` each routed row of a pass runs with its own update,
    y_i = x_i W + (x_i aᵀ) b at each named module, in float32, rounded once; the other rows untouched
    (bit for bit). routing() -> the Routing of the pass now running."""
    def hook(name):
        def add(module, inputs, output):                                         # (B, T, d_out)
            rows = routing().rows
            if len(rows) == 0:
                return output
            x, y = inputs[0][rows].float(), output[rows].float()                 # (R, T, d_in), (R, T, d_out)
            for at, factors in routing().groups:
                a, b = factors[name]                                             # (G, r, d_in), (G, r, d_out)
                y[at] += (x[at] @ a.transpose(1, 2)) @ b                         # (G, T, d_out)
            return output.index_copy(0, rows, y.to(output.dtype))
        return add

    with forward_hooks(model, {name: hook(name) for name in names}):
        yield model


@contextmanager
def routed(model: nn.Module, store, routes: torch.Tensor) -> Iterator[Routing]:
    """`with routed(model, store, routes) as rows:` row i of a pass runs with update routes[i] of `store`
    (Routing's), or untouched at −1. A pass over only some of the rows (runner.Runner's length groups)
    says which first: rows.select(list)."""
    routing = Routing(store, routes, model.device)
    with routed_edit(model, list(store.a), lambda: routing):
        yield routing


def factors(delta) -> tuple[torch.Tensor, torch.Tensor]:
    """A ΔW as factors (a (r, d_in), b (r, d_out)), ΔW = aᵀb: factors as given; a (d_in, d_out) tensor
    by its SVD, cut where the singular values fall below 1e-7 of the largest (its rank, to float32)."""
    if isinstance(delta, tuple):
        return delta
    u, s, vh = torch.linalg.svd(delta.detach().double(), full_matrices=False)
    r = max(1, int((s > s[0] * 1e-7).sum()))
    return (u[:, :r] * s[:r]).T.float(), vh[:r].float()


def dense(delta) -> torch.Tensor:
    """A ΔW given as a (d_in, d_out) tensor or as its factors (A, B), as the (d_in, d_out) tensor AᵀB."""
    return delta[0].T @ delta[1] if isinstance(delta, tuple) else delta


def _weight_delta(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    return delta if isinstance(module, Conv1D) else delta.T  # nn.Linear stores Wᵀ (METHOD.md §3 step 6)


@torch.no_grad()
def apply_delta(model: nn.Module, deltas: dict) -> dict[str, torch.Tensor]:
    """W ← W + ΔW in place, to keep an edit for good (W + ΔW in float32, rounded once to W's dtype;
    in bf16 that rounding loses part of a small ΔW, see functional_edit). Dense ΔW or factors.
    Returns the original weights of the touched modules, for restore."""
    originals = {}
    for name, delta in deltas.items():
        module = model.get_submodule(name)
        originals[name] = module.weight.detach().clone()
        module.weight.copy_(module.weight.float() + _weight_delta(module, dense(delta).float()))
    return originals


@torch.no_grad()
def merge(model: nn.Module, deltas: dict, master: dict[str, torch.Tensor]) -> None:
    """One more edit written for good, as sequential editing keeps them: W ← W + ΔW summed in float32
    in `master` ({name: W}, float32, filled on first use; the model's own weights are its rounding), so
    that thousands of small updates do not each lose their low bits to a bf16 weight."""
    for name, delta in deltas.items():
        module = model.get_submodule(name)
        if name not in master:
            master[name] = module.weight.detach().float().clone()
        master[name] += _weight_delta(module, dense(delta).float())
        module.weight.copy_(master[name])


@torch.no_grad()
def restore(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put the saved weights back, bit for bit (W + ΔW − ΔW would not be exact in floating point)."""
    for name, weight in originals.items():
        model.get_submodule(name).weight.copy_(weight)

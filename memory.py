"""
The edit memory, for lifelong editing (the paper's future work: "retrieval mechanisms for lifelong
editing", with low-rank updates). Each fact, when it arrives, goes through the trained editor once, alone,
and is stored as a retrieval key and its update at rank r. A query runs the model with the update of
the one stored fact it concerns, per row of a batch; a row that concerns none runs the original model
untouched. Adding a fact never re-edits the others, and the weights are never written.

    python memory.py key --ckpt out/ibke/best.pt                 # learn the key -> out/ibke/key.pt (~1 min on 2 cores)
    python evaluate.py --ckpt out/ibke/best.pt --sequential memory --limit 10000 --memory out/ibke/cf.mem
                                                                  # 10,000 edits stored in 15 min, measured in 20
    python edit.py --ckpt out/ibke/best.pt "The Eiffel Tower is in" "Rome" --memory my.mem   # your facts, kept
    python memory.py show out/ibke/cf.mem                         # what a memory holds
    python memory.py routing --ckpt out/ibke/best.pt              # the key among 1,000 and 10,000 edits (20 s)

Routing reads the query's text alone (the prompt: a question without its answer), never a record's
fields. Its key is computed from the hidden states entering block `layer` over the prompt's tokens:
    f(q) = mean_t x_t                             (C,)   the prompt's states, averaged over its tokens
    k(q) = normalise(W (f(q) − μ) / σ)            (k,)   μ, σ: the train prompts'; W learned (or identity)
A query goes to argmax_e k(q)·k_e when that cosine is ≥ τ, else to no edit. W is trained on the train
split only, contrastively: a prompt and its rephrase together, apart from the other prompts of the
batch and from the neighbours (same relation and answer, another subject) that must not be edited.
τ is chosen on validation records (the evaluation split's first --val-records) as the one that
maximises the balanced accuracy of routing: rephrases to their own edit, neighbours to none.

An edit's update is a sum of rank-one terms, one per token (IBKE.md §3 step 5); stored at rank r it is
the best rank-r approximation of ΔW (by SVD), as factors a (r, d_in), b (r, d_out) in float16.
"""
import argparse
import datetime
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import atomic_save
from data import pad, tokenize
from editor import as_fact, sha256
from hooks import grad_decomposition
from model import blocks_path
from runner import hidden_before, to_device

FORMAT = "ibke-memory-1"


class MemoryFileError(ValueError):
    """A memory file that cannot be used: missing, unreadable, or built for another model or editor."""


# -----------------------------------------------------------------------------
# the key: prompt -> unit vector

def pooled(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """f(q): the states x (B, T, C) averaged over each row's real tokens (mask (B, T)) -> (B, C)."""
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


@torch.no_grad()
def prompt_features(model: nn.Module, tokenizer, prompts: list[str], layer: int, batch_size: int = 64,
                    progress: bool = False) -> torch.Tensor:
    """f(q) for each prompt: the mean of the states entering block `layer` over its tokens (N, C) float32, host."""
    rows = tokenize(tokenizer, prompts, [""] * len(prompts))                 # the prompt alone, as a query
    out = torch.zeros(len(prompts), model.config.hidden_size)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for s in tqdm(range(0, len(order), batch_size), desc="keys", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        part = pad([rows[i] for i in idx], tokenizer.pad_token_id)
        mask = to_device(part["attention_mask"], model.device)
        x = hidden_before(model, layer, to_device(part["input_ids"], model.device), mask).float()   # (b, T, C)
        out[idx] = pooled(x, mask).cpu()
    return out


class Key(nn.Module):
    """f(q) (N, C) -> k(q) (N, k): standardised, projected (a learned W, or none: identity), unit length."""

    def __init__(self, width: int, layer: int, dim: int = 256, learned: bool = True):
        super().__init__()
        self.layer, self.threshold = layer, 1.0
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.proj = nn.Linear(width, dim) if learned else None

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        x = (f - self.mean) / self.std
        return F.normalize(self.proj(x) if self.proj is not None else x, dim=-1)

    def config(self) -> dict:
        return {"width": self.mean.shape[0], "layer": self.layer, "learned": self.proj is not None,
                "dim": self.proj.out_features if self.proj is not None else self.mean.shape[0]}

    @classmethod
    def rebuild(cls, saved: dict) -> "Key":
        c = saved["config"]
        key = cls(c["width"], c["layer"], c["dim"], c["learned"])
        key.load_state_dict(saved["state"])
        key.threshold = saved["threshold"]
        return key

    def saved(self) -> dict:
        return {"config": self.config(), "state": self.state_dict(), "threshold": self.threshold}


def train_key(key: Key, prompts: torch.Tensor, rephrases: torch.Tensor, neighbours: torch.Tensor,
              steps: int = 1500, batch: int = 256, lr: float = 1e-3, tau: float = 0.1, seed: int = 0) -> list[float]:
    """Contrastive training of W on train-split features (N, C) each, row i of all three from one record:
    InfoNCE both ways between prompt and rephrase, the batch's other prompts (rephrases) and all its
    neighbours as negatives, temperature tau. Sets μ, σ from the prompts. -> the losses."""
    key.mean.copy_(prompts.mean(0))
    key.std.copy_(prompts.std(0) + 1e-3)
    if key.proj is None:
        return []
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    key.proj.reset_parameters()
    opt = torch.optim.Adam(key.proj.parameters(), lr=lr)
    losses, target = [], torch.arange(batch)
    for _ in tqdm(range(steps), desc="key", leave=False):
        i = torch.randint(0, len(prompts), (batch,), generator=g)
        p, r, n = key(prompts[i]), key(rephrases[i]), key(neighbours[i])        # (b, k) each
        loss = (F.cross_entropy(torch.cat([r @ p.T, r @ n.T], 1) / tau, target)
                + F.cross_entropy(torch.cat([p @ r.T, p @ n.T], 1) / tau, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def routing_scores(key: Key, prompts: torch.Tensor, rephrases: torch.Tensor, neighbours: torch.Tensor,
                   threshold: float | None = None) -> dict:
    """Route record i's rephrase and neighbour (i < M) through a memory of the prompts' keys (N ≥ M
    edits): the rephrase should find edit i, the neighbour none. Chooses τ when threshold is None."""
    kp, kr, kn = key(prompts), key(rephrases), key(neighbours)
    sr, sn = kr @ kp.T, (kn @ kp.T).max(1).values                            # (M, N), (M,)
    best, right = sr.max(1), sr.argmax(1) == torch.arange(len(kr))
    if threshold is None:                                                     # balanced accuracy, over a grid
        grid = torch.linspace(-1, 1, 801)
        bal = torch.stack([((right & (best.values >= t)).float().mean() + (sn < t).float().mean()) / 2 for t in grid])
        threshold = grid[bal.argmax()].item()
    return {"top1": right.float().mean().item(), "routed": (right & (best.values >= threshold)).float().mean().item(),
            "rejected": (sn < threshold).float().mean().item(), "threshold": threshold}


# -----------------------------------------------------------------------------
# compact updates

def low_rank(delta, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW (d_in, d_out) or its factors (A (N, d_in), B (N, d_out)) -> its best rank-`rank` approximation
    as a (rank, d_in), b (rank, d_out), ΔW_r = aᵀb, each factor carrying √σ (zero rows past ΔW's rank).
    From factors: ΔW = Aᵀ B = Q_a (R_a R_bᵀ) Q_bᵀ, and the SVD of the small N × N core."""
    if isinstance(delta, tuple):
        qa, ra = torch.linalg.qr(delta[0].double().T)                           # (d_in, N), (N, N)
        qb, rb = torch.linalg.qr(delta[1].double().T)                           # (d_out, N), (N, N)
        u, s, vh = torch.linalg.svd(ra @ rb.T)
        u, vh = qa @ u, vh @ qb.T                                               # (d_in, N), (N, d_out)
    else:
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, len(s))
    a = torch.zeros(rank, u.shape[0], dtype=torch.float64)
    b = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    a[:k], b[:k] = (u[:, :k] * s[:k].sqrt()).T, vh[:k] * s[:k, None].sqrt()
    return a.float(), b.float()


# -----------------------------------------------------------------------------
# the memory

class Routing:
    """Which rows of the pass now running take which stored edit: rows (R,) and their factors
    {module: (a (R, r, d_in), b (R, r, d_out))}, float32, on the model's device."""

    def __init__(self, memory: "EditMemory", routes: torch.Tensor):
        self.memory, self.routes, self.device = memory, routes.cpu(), memory.editor.model.device
        self.select(None)

    def select(self, rows: list[int] | None) -> None:
        """The pass runs these rows of the routed batch (None: all of them, in order)."""
        routes = self.routes if rows is None else self.routes[rows]
        at = torch.nonzero(routes >= 0)[:, 0]
        ids, m = routes[at], self.memory
        self.rows = to_device(at, self.device)
        self.factors = {n: (m.a[n][ids].to(self.device, torch.float32), m.b[n][ids].to(self.device, torch.float32))
                        for n in m.a}


class EditMemory:
    """Keys (N, k) and, per edited module, factors a (N, r, d_in), b (N, r, d_out), grown by doubling;
    the facts as dicts. `editor` (editor.Editor) makes the edits and runs the model."""

    def __init__(self, editor, key: Key, rank: int = 3, dtype: torch.dtype = torch.float16):
        self.editor, self.key, self.rank, self.dtype = editor, key, rank, dtype
        self.n, self.facts = 0, []
        self.keys = torch.zeros(0, key.config()["dim"])
        self.a = {m: torch.zeros(0, rank, s[0], dtype=dtype) for m, s in editor.hypernet.shapes.items()}
        self.b = {m: torch.zeros(0, rank, s[1], dtype=dtype) for m, s in editor.hypernet.shapes.items()}

    def __len__(self) -> int:
        return self.n

    def bytes_per_edit(self) -> int:
        return (self.keys.shape[1] * self.keys.element_size()
                + sum(x.shape[1] * x.shape[2] * x.element_size() for d in (self.a, self.b) for x in d.values()))

    def keys_of(self, prompts: list[str]) -> torch.Tensor:
        f = prompt_features(self.editor.model, self.editor.tokenizer, prompts, self.key.layer)
        with torch.no_grad():
            return self.key(f)                                                   # (N, k)

    def _grow(self, more: int) -> None:
        if self.n + more <= len(self.keys):
            return
        cap = max(2 * len(self.keys), self.n + more, 64)
        def grown(x):
            y = x.new_zeros(cap, *x.shape[1:])
            y[:self.n] = x[:self.n]
            return y
        self.keys = grown(self.keys)
        self.a = {m: grown(x) for m, x in self.a.items()}
        self.b = {m: grown(x) for m, x in self.b.items()}

    def add(self, facts) -> None:
        """Edit each fact alone (one forward and backward for all of them, the hypernetwork per fact) and
        store its key and rank-r update."""
        facts = [as_fact(f) for f in facts]
        editor = self.editor
        runner = editor.runner()
        batch = runner.batch([f.prompt for f in facts], [f.target for f in facts])
        tokens = editor.ckpt["config"].get("tokens", "all")
        decomposition, mask = grad_decomposition(editor.model, editor.names, batch, tokens,
                                                 forward=lambda b: runner.scored_logits(b, split=False))
        keys = self.keys_of([f.prompt for f in facts])
        self._grow(len(facts))
        for e in range(len(facts)):
            one = {m: (h[e:e + 1], u[e:e + 1]) for m, (h, u) in decomposition.items()}
            with torch.no_grad():
                deltas = editor.hypernet(one, mask[e:e + 1], factored=True)[0]
            for m, d in deltas.items():
                a, b = low_rank(tuple(x.cpu() for x in d), self.rank)
                self.a[m][self.n], self.b[m][self.n] = a.to(self.dtype), b.to(self.dtype)
            self.keys[self.n] = keys[e]
            self.facts.append(vars(facts[e]))
            self.n += 1

    @torch.no_grad()
    def route(self, prompts: list[str]) -> torch.Tensor:
        """The stored edit each prompt concerns, or −1 (N,) long."""
        return self.routes_of(prompt_features(self.editor.model, self.editor.tokenizer, prompts, self.key.layer))

    @torch.no_grad()
    def routes_of(self, f: torch.Tensor) -> torch.Tensor:
        """f(q) (N, C) -> the stored edit of the best key at cosine ≥ τ, or −1 (N,) long."""
        if self.n == 0:
            return torch.full((len(f),), -1)
        best = (self.key(f) @ self.keys[:self.n].T).max(1)                      # over (N, n)
        return torch.where(best.values >= self.key.threshold, best.indices, -1)

    @contextmanager
    def applied(self, routes: torch.Tensor):
        """`with memory.applied(routes) as rows:` row i of a pass runs with stored edit routes[i] (or
        untouched at −1): y_i = x_i W + (x_i aᵀ) b at each edited module, in float32, rounded once. A pass
        over only some of the rows (runner.Runner's length groups) says which first: rows.select(list)."""
        routing = Routing(self, routes)
        with self._hooks(lambda: routing):
            yield routing

    @contextmanager
    def _hooks(self, routing):
        """The edited modules add their routed rows' updates; routing() -> the Routing of the pass."""
        def hook(name):
            def add(module, inputs, output):                                     # (B, T, d_out)
                rows = routing().rows
                if len(rows) == 0:
                    return output
                a, b = routing().factors[name]                                   # (R, r, d_in), (R, r, d_out)
                x = inputs[0][rows].float()                                      # (R, T, d_in)
                change = (x @ a.transpose(1, 2)) @ b                             # (R, T, d_out)
                return output.index_copy(0, rows, (output[rows].float() + change).to(output.dtype))
            return add

        handles = [self.editor.model.get_submodule(m).register_forward_hook(hook(m)) for m in self.a]
        try:
            with torch.no_grad():
                yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def serving(self):
        """`with memory.serving():` every call of the model routes itself: the pass over a prompt (more than
        one new token) reads its key off the states entering block `layer`, inside that same forward, and
        its rows take their edits from there up; a generation step (one new token) keeps its prompt's.
        Rows are the non-padding tokens of the attention mask (left or right padding)."""
        model, seen = self.editor.model, {}

        def read_mask(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            seen["mask"] = mask if mask is not None and mask.dim() == 2 else torch.ones_like(ids)

        def route(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).float()            # (B, T, C)
            if x.shape[1] == 1 and "routing" in seen:
                return                                                           # a generation step
            mask = seen["mask"][:, -x.shape[1]:].to(x.dtype)                      # (B, T)
            seen["routing"].routes = self.routes_of(pooled(x, mask).cpu())        # f(q) (B, C) -> (B,)
            seen["routing"].select(None)

        seen["routing"] = Routing(self, torch.full((0,), -1))
        block = model.get_submodule(blocks_path(model))[self.key.layer]
        handles = [model.register_forward_pre_hook(read_mask, with_kwargs=True),
                   block.register_forward_pre_hook(route, with_kwargs=True)]
        try:
            with self._hooks(lambda: seen["routing"]):
                yield self
        finally:
            for h in handles:
                h.remove()

    def truncate(self, rank: int) -> None:
        """Keep the first `rank` terms of every stored update: its best rank-`rank` approximation (the factors
        are ordered by singular value; memory.low_rank). For a rank curve from one full-rank memory."""
        self.rank = min(rank, self.rank)
        self.a = {m: x[:, :self.rank] for m, x in self.a.items()}
        self.b = {m: x[:, :self.rank] for m, x in self.b.items()}

    # -- the file --------------------------------------------------------------

    def state(self) -> dict:
        return {"format": FORMAT, "model": self.editor.ckpt["model"], "editor_sha256": sha256(self.editor.path),
                "key": self.key.saved(), "rank": self.rank, "dtype": str(self.dtype).split(".")[-1], "n": self.n,
                "keys": self.keys[:self.n].clone(), "a": {m: x[:self.n].clone() for m, x in self.a.items()},
                "b": {m: x[:self.n].clone() for m, x in self.b.items()}, "facts": self.facts[:self.n],
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def save(self, path: str) -> None:
        """Atomically (a reader sees the old file or the new one)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_save(self.state(), path)

    @classmethod
    def load(cls, path: str, editor) -> "EditMemory":
        """A saved memory, for this editor and model, or MemoryFileError in one line."""
        s = read_file(path)
        if s["model"] != editor.ckpt["model"]:
            raise MemoryFileError(f"memory {path} holds edits of model {s['model']}, not {editor.ckpt['model']}; "
                                  f"give another --memory file")
        if s["editor_sha256"] != sha256(editor.path):
            raise MemoryFileError(f"memory {path} was built with another editor checkpoint "
                                  f"(sha256 {s['editor_sha256'][:12]}…) than {editor.path}; "
                                  f"give that checkpoint, or another --memory file")
        memory = cls(editor, Key.rebuild(s["key"]), s["rank"], getattr(torch, s["dtype"]))
        memory.n, memory.facts, memory.keys = s["n"], s["facts"], s["keys"]
        memory.a, memory.b = s["a"], s["b"]
        return memory


def read_file(path: str) -> dict:
    """A memory file's dict (any model, any editor), or MemoryFileError in one line."""
    if not os.path.isfile(path):
        raise MemoryFileError(f"no memory file at {path}")
    try:
        s = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise MemoryFileError(f"not a memory file of this project: {path} ({type(err).__name__})") from None
    if not isinstance(s, dict) or s.get("format") != FORMAT:
        raise MemoryFileError(f"not a memory file of this project: {path}")
    return s


def key_file(ckpt: str, key: str | None = None) -> str:
    """Where the routing key is: `key` (--key) if given, else key.pt beside the editor checkpoint."""
    return key or os.path.join(os.path.dirname(ckpt), "key.pt")


def load_key(ckpt: str, key: str | None = None) -> Key:
    """The routing key of key_file(ckpt, key), or MemoryFileError in one line."""
    path = key_file(ckpt, key)
    if not os.path.isfile(path):
        raise MemoryFileError(f"no key at {path}; learn one with `python memory.py key --ckpt {ckpt}` or give --key")
    return Key.rebuild(torch.load(path, weights_only=False))


# -----------------------------------------------------------------------------

def triples(records) -> tuple[list[str], list[str], list[str]]:
    """(prompts, rephrases, neighbours) of the records that have a rephrase and a locality prompt."""
    kept = [r for r in records if r.generality and r.locality]
    return [r.prompt for r in kept], [r.generality[0][0] for r in kept], [r.locality[0][0] for r in kept]


def learn_key(args: argparse.Namespace) -> None:
    from data import load
    from editor import Editor
    editor = Editor.load(args.ckpt, args.device, dtype=args.dtype)
    splits = load(args.data or editor.ckpt["config"]["data"], args.data_dir)
    model, tok = editor.model, editor.tokenizer
    features = lambda records: [prompt_features(model, tok, x, args.layer, progress=True) for x in triples(records)]
    train, val = features(splits["train"][:args.train_records]), features(splits["eval"][:args.val_records])
    key = Key(model.config.hidden_size, args.layer, args.dim, learned=not args.untrained)
    losses = train_key(key, *train, steps=args.steps, seed=args.seed)
    if losses:
        print(f"key: {args.steps} steps, loss {losses[0]:.3f} -> {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    key.eval()
    s = routing_scores(key, *val)
    key.threshold = s["threshold"]
    print(f"routing among {len(val[0])} edits (eval records 0-{args.val_records - 1}): rephrase top-1 {s['top1']:.3f}, "
          f"routed {s['routed']:.3f}, neighbours rejected {s['rejected']:.3f} at τ = {s['threshold']:.3f}")
    out = args.out or key_file(args.ckpt)
    atomic_save(key.saved() | {"routing": s, "args": vars(args)}, out)
    print(f"wrote {out}")


def routing(args: argparse.Namespace) -> None:
    """The key at scale: eval records 0..M-1's rephrases and neighbours routed among the first N prompts'
    keys (their own edits among them), at the key's τ."""
    from data import load
    from editor import Editor
    key = load_key(args.ckpt, args.key)
    editor = Editor.load(args.ckpt, args.device, dtype=args.dtype)
    prompts, rephrases, neighbours = triples(load(args.data or editor.ckpt["config"]["data"], args.data_dir)["eval"])
    features = lambda texts: prompt_features(editor.model, editor.tokenizer, texts, key.layer, progress=True)
    p, r, n = features(prompts[:args.stored]), features(rephrases[:args.queries]), features(neighbours[:args.queries])
    for stored in sorted({args.queries, len(p)}):
        s = routing_scores(key, p[:stored], r, n, threshold=key.threshold)
        print(f"records 0-{len(r) - 1} among {stored} stored edits: rephrase top-1 {s['top1']:.3f}, "
              f"routed {s['routed']:.3f}, neighbours rejected {s['rejected']:.3f} at τ = {s['threshold']:.3f}")


def show(args: argparse.Namespace) -> None:
    s = read_file(args.file)
    size = os.path.getsize(args.file)
    print(f"{args.file}: {s['n']} edits of {s['model']} (editor sha256 {s['editor_sha256'][:12]}…), rank {s['rank']} "
          f"in {s['dtype']}, key {s['key']['config']} τ {s['key']['threshold']:.3f}, {size / 2 ** 20:.1f} MiB "
          f"({size / max(s['n'], 1) / 1000:.1f} kB per edit), written {s['date']}")
    for f in s["facts"][:5]:
        print(f"  {f['prompt']!r} -> {f['target']!r}")


if __name__ == "__main__":
    from model import add_device_args
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("key", help="learn the routing key on the train split; choose τ on the first eval records")
    k.add_argument("--ckpt", required=True,
                   help="the editor the memory will hold edits of (its model computes the keys)")
    k.add_argument("--data", default=None, help="benchmark (default: the one the editor was trained on)")
    k.add_argument("--data-dir", default="data", help="folder holding the benchmark files")
    k.add_argument("--layer", type=int, default=4,
                   help="the key reads the states entering this block (README: 4 of SmolLM2's 30 routes best)")
    k.add_argument("--dim", type=int, default=256, help="width k of a learned key")
    k.add_argument("--untrained", action="store_true", help="no projection: the standardised features themselves")
    k.add_argument("--train-records", type=int, default=4000, help="train-split records the key learns from")
    k.add_argument("--val-records", type=int, default=1000, help="the first N eval records choose τ")
    k.add_argument("--steps", type=int, default=1500, help="Adam steps of the contrastive loss")
    k.add_argument("--seed", type=int, default=0, help="the key's initialisation and batches")
    k.add_argument("--out", default=None, help="where the key goes (default: key.pt beside --ckpt)")
    add_device_args(k, dtype_default=None)
    r = sub.add_parser("routing", help="the key at scale: records 0..M-1 routed among N stored edits")
    r.add_argument("--ckpt", required=True, help="the editor (its model computes the keys)")
    r.add_argument("--key", default=None, help="the key (default: key.pt beside --ckpt)")
    r.add_argument("--data", default=None, help="benchmark (default: the one the editor was trained on)")
    r.add_argument("--data-dir", default="data", help="folder holding the benchmark files")
    r.add_argument("--stored", type=int, default=10000, help="N: the first N eval prompts are stored edits")
    r.add_argument("--queries", type=int, default=1000,
                   help="M: the first M records' rephrases and neighbours are routed")
    add_device_args(r, dtype_default=None)
    v = sub.add_parser("show", help="what a memory file holds")
    v.add_argument("file", help="a memory file (evaluate.py --sequential memory --memory FILE, edit.py --memory FILE)")
    args = parser.parse_args()
    from checkpoint import CheckpointError
    from data import DataError
    from model import ModelError
    try:
        {"key": learn_key, "routing": routing, "show": show}[args.command](args)
    except (CheckpointError, DataError, ModelError, MemoryFileError) as err:
        raise SystemExit(f"error: {err}")

"""
The edit memory, for lifelong editing (the paper's future work: "retrieval mechanisms for lifelong
editing", with low-rank updates). Each fact, when it arrives, goes through the trained editor once, alone,
and is stored as a retrieval key and its update at rank r. A query runs the model with the update of
the one stored fact it concerns, per row of a batch (generating, until the fact's answer is written);
a row that concerns none runs the original model untouched. Adding a fact never re-edits the others, and
the weights are never written.

    python key.py learn --ckpt out/ibke/best.pt                   # learn the key -> out/ibke/key.pt (~1 min on 2 cores)
    python evaluate.py --ckpt out/ibke/best.pt --sequential memory --limit 10000 --memory out/ibke/cf.mem
                                                                  # 10,000 edits stored in 15 min, measured in 20
    python edit.py --ckpt out/ibke/best.pt "The Eiffel Tower is in" "Rome" --subject "Eiffel Tower" --memory my.mem
    python memory.py show out/ibke/cf.mem                         # what a memory holds
    python key.py routing --ckpt out/ibke/best.pt                 # the key among 1,000 and 10,000 edits (20 s)

Routing (gate.py, key.py): an edit stored with its subject serves only a query that names the subject (the gate),
and then the query's key, from the model's states entering block 4, must match the edit's (cosine ≥ τ).

An edit's update is a sum of rank-one terms, one per token (METHOD.md §3 step 5); stored at rank r it is
the best rank-r approximation of ΔW (by SVD), as factors a (r, d_in), b (r, d_out) in float16.
"""
import argparse
import datetime
import os
from contextlib import contextmanager

import torch

from checkpoint import atomic_save
from editor import as_fact, sha256
from hooks import Routing, grad_decomposition, routed, routed_edit
from gate import Subjects, contains
from key import Key, MemoryFileError, pooled, prompt_features
from model import blocks_path

FORMAT = "ibke-memory-1"


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

class EditMemory:
    """Keys (N, k) and, per edited module, factors a (N, r, d_in), b (N, r, d_out), grown by doubling;
    the facts as dicts. `editor` (editor.Editor) makes the edits and runs the model."""

    def __init__(self, editor, key: Key, rank: int = 3, dtype: torch.dtype = torch.float16):
        blocks, width = len(editor.model.get_submodule(blocks_path(editor.model))), editor.model.config.hidden_size
        if key.config()["width"] != width or key.layer >= blocks:
            raise MemoryFileError(f"the key reads states of width {key.config()['width']} entering block {key.layer}; "
                                  f"this model has width {width} and {blocks} blocks: learn a key for this editor "
                                  f"(python key.py learn --ckpt {editor.path})")
        self.editor, self.key, self.rank, self.dtype = editor, key, rank, dtype
        self.n, self.facts, self.subjects = 0, [], Subjects()
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
        store its key and rank-r update. A fact without a subject is routed by the key alone; give it
        gate.guess_subject(prompt) for the gate (as edit.py does; within 0.001 F1 of given ones, README)."""
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
            self.subjects.add(facts[e].subject)
            self.n += 1

    @torch.no_grad()
    def route(self, prompts: list[str]) -> torch.Tensor:
        """The stored edit each prompt concerns, or −1 (N,) long."""
        f = prompt_features(self.editor.model, self.editor.tokenizer, prompts, self.key.layer)
        return self.routes_of(f, prompts)

    @torch.no_grad()
    def routes_of(self, f: torch.Tensor, texts: list[str] | None) -> torch.Tensor:
        """f(q) (B, C) and the queries' texts -> the candidate of the best key at cosine ≥ its τ, or −1
        (B,) long. Without texts (a model fed embeddings) or a gated τ (a key learned before the gate),
        the key alone decides, at τ."""
        if self.n == 0:
            return torch.full((len(f),), -1)
        sims = self.key(f) @ self.keys[:self.n].T                                 # (B, n)
        has = self.subjects.has_subject()[:self.n]                                # (n,)
        if texts is None or self.key.gated is None:
            passed = sims >= self.key.threshold
        else:
            passed = self.subjects.mask(texts) & (sims >= torch.where(has, self.key.gated, self.key.threshold))
        best = sims.masked_fill(~passed, -torch.inf).max(1)
        return torch.where(passed.any(1), best.indices, -1)

    def routed(self, prompts: list[str]):
        """`with memory.routed(prompts):` a pass over these prompts' rows runs each with its routed edit."""
        return self.applied(self.route(prompts))

    @contextmanager
    def applied(self, routes: torch.Tensor):
        """`with memory.applied(routes) as rows:` row i of a pass runs with stored edit routes[i] (or
        untouched at −1): y_i = x_i W + (x_i aᵀ) b at each edited module, in float32, rounded once. A pass
        over only some of the rows (runner.Runner's length groups) says which first: rows.select(list)."""
        with routed(self.editor.model, self, routes) as routing, torch.no_grad():
            yield routing

    @contextmanager
    def serving(self, release: bool = True):
        """`with memory.serving():` every call of the model routes itself: the pass over a prompt (no filled
        cache) reads its key off the states entering block `layer`, inside that same forward, and
        its rows take their edits from there up; a generation step (a pass given a filled cache) keeps its
        prompt's. Rows are the non-padding tokens of the attention mask (left or right padding). release: a
        row's edit steps aside from the generation step whose token completes its answer (the text generated
        since the edit went on names its target: gate.contains, gen_ES's test), and comes back from a token
        that names its subject again (the gate's rule; an edit stored without one stays aside): the original
        model goes on from the new answer, and a question asked again gets it again. Else the edit stays on
        for the whole continuation, which then repeats the answer."""
        model, tok, seen = self.editor.model, self.editor.tokenizer, {"step": False}

        def read_mask(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            seen["mask"] = mask if mask is not None and mask.dim() == 2 else torch.ones_like(ids)
            seen["ids"] = ids
            past = kwargs.get("past_key_values")                                  # a filled cache: a generation step
            seen["step"] = bool(past.get_seq_length() if hasattr(past, "get_seq_length") else past)
            routing = seen["routing"]
            if release and seen["step"] and ids is not None and (seen["edit"] >= 0).any():
                routes = routing.routes.clone()
                for i, new in enumerate(ids.tolist()):
                    seen["written"][i] += new
                    e = int(seen["edit"][i])
                    if e < 0:
                        continue
                    text = tok.decode(seen["written"][i])                         # since the edit went on or off
                    if routes[i] >= 0 and contains(text, self.facts[e]["target"]):
                        routes[i], seen["written"][i] = -1, []                   # from this token on
                    elif routes[i] < 0 and e in self.subjects.named(text):
                        routes[i], seen["written"][i] = e, []                    # its subject again: on, until answered
                if not torch.equal(routes, routing.routes):
                    routing.routes = routes
                    routing.select(None)

        def route(module, args, kwargs):
            if seen["step"]:
                return
            x = (args[0] if args else kwargs["hidden_states"]).float()            # (B, T, C)
            mask = seen["mask"][:, -x.shape[1]:].to(x.dtype)                      # (B, T)
            ids = seen["ids"]                                                     # the gate reads the words
            texts = None if ids is None else [tok.decode(i[m.bool()]) for i, m in
                                              zip(ids.cpu(), seen["mask"][:, -ids.shape[1]:].cpu())]
            seen["routing"].routes = self.routes_of(pooled(x, mask).cpu(), texts)  # f(q) (B, C) -> (B,)
            seen["routing"].select(None)
            seen["written"], seen["edit"] = [[] for _ in texts or x], seen["routing"].routes.clone()

        seen["routing"], seen["edit"] = Routing(self, torch.full((0,), -1), model.device), torch.full((0,), -1)
        block = model.get_submodule(blocks_path(model))[self.key.layer]
        handles = [model.register_forward_pre_hook(read_mask, with_kwargs=True),
                   block.register_forward_pre_hook(route, with_kwargs=True)]
        try:
            with routed_edit(model, list(self.a), lambda: seen["routing"]), torch.no_grad():
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
        memory.subjects = Subjects([f.get("subject", "") for f in s["facts"]])
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


# -----------------------------------------------------------------------------

def show(args: argparse.Namespace) -> None:
    s = read_file(args.file)
    size = os.path.getsize(args.file)
    print(f"{args.file}: {s['n']} edits of {s['model']} (editor sha256 {s['editor_sha256'][:12]}…), rank {s['rank']} "
          f"in {s['dtype']}, key {s['key']['config']} τ {s['key']['threshold']:.3f}, {size / 2 ** 20:.1f} MiB "
          f"({size / max(s['n'], 1) / 1000:.1f} kB per edit), written {s['date']}")
    subjects, gated = sum(bool(f["subject"]) for f in s["facts"]), s["key"]["gated"]
    print(f"{subjects} of {s['n']} stored with a subject, " + ("routed by the key alone: this key has no gate"
          if gated is None else f"gated (then the key at τ_gated {gated:.3f}); the others by the key alone at τ"))
    for f in s["facts"][:5]:
        print(f"  {f['prompt']!r} -> {f['target']!r}" + (f"  [{f['subject']}]" if f["subject"] else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("show", help="what a memory file holds")
    v.add_argument("file", help="a memory file (evaluate.py --sequential memory --memory FILE, edit.py --memory FILE)")
    args = parser.parse_args()
    try:
        show(args)
    except MemoryFileError as err:
        raise SystemExit(f"error: {err}")

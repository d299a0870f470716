"""
The edit memory, for lifelong editing (the paper's future work: "retrieval mechanisms for lifelong
editing", with low-rank updates). Each fact, when it arrives, goes through the trained editor once, alone,
and is stored as a retrieval key and its update at a low rank. A query runs the model with the update of
the one stored fact it concerns, per row of a batch (generating, until the fact's answer is written);
a row that concerns none runs the original model untouched. Adding a fact never re-edits the others, and
the weights are never written; a fact with the prompt of a stored one replaces it (the newest is served).

    python key.py learn --ckpt out/ibke/best.pt                   # learn the key -> out/ibke/key.pt (~1 min on 2 cores)
    python evaluate.py --ckpt out/ibke/best.pt --sequential memory --limit 10000 --memory out/ibke/cf.mem
                                                                  # 10,000 edits: ~25 min to store, 18 to measure
    python edit.py --ckpt out/ibke/best.pt "The Eiffel Tower is in" "Rome" --subject "Eiffel Tower" --memory my.mem
    python memory.py show out/ibke/cf.mem                         # what a memory holds
    python memory.py rekey out/ibke/cf.mem --ckpt out/ibke/best.pt --key K --out out/ibke/cf-K.mem
                                                                  # the same edits routed by another key (1 min)
    python key.py routing --ckpt out/ibke/best.pt                 # the key among 1,000 and 10,000 edits (20 s)

Routing (gate.py, key.py): an edit stored with its subject serves only a query that names the subject (the gate),
and then the query's key, from the model's states entering block 4, must match the edit's (cosine ≥ τ).

An edit's update is a sum of rank-one terms, one per token (METHOD.md §3 step 5); stored at rank r it is
the best rank-r approximation of ΔW (by SVD), as factors a (r, d_in), b (r, d_out) in float16. Its rank
(rank="auto") is the smallest of RANKS whose update still writes the fact as the complete one does: a
one-word answer mostly keeps 1 or 2 terms, a longer one 6 to 16 (README: Compact updates).
"""
import argparse
import datetime
import os
import sys
from contextlib import contextmanager

import torch

from checkpoint import atomic_save
from data import same_prompt
from editor import as_fact, sha256
from hooks import Routing, grad_decomposition, routed, routed_edit
from gate import Subjects, chat, contains
from key import Key, MemoryFileError, load_key, pooled, prompt_features
from metrics import Apart, per_row
from model import blocks_path
from runner import take

FORMAT = "ibke-memory-2"        # "ibke-memory-1" (one rank for all, a (N, r, d_in)) is read too

# rank="auto": a fact's update is kept at the smallest of RANKS that writes the fact as its complete
# update does (every answer token the complete one gets as the argmax, and a mean log P(answer) at most
# SLACK nats per token below it), else at the largest. Chosen on CounterFact records 0–999 and zsRE
# eval records 0–199, against one rank for all (README: Compact updates).
RANKS, SLACK = (1, 2, 3, 4, 6, 8, 12, 16), 0.1
# add(): facts edited in one pass. SmolLM2 on 2 cores: 54 ms a fact at 16, 50 at 32, 57 at 128, the
# peak growing ~20 MB a fact (3.8 GB at 128; 8.4 GB for 400 in one pass).
CHUNK = 16


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


def bytes_per_edit(keys: torch.Tensor, a: dict, b: dict, mean_rank: float) -> float:
    """An edit's key and its update's terms, in bytes (a live memory's or a file's arrays)."""
    term = sum(x.shape[1] * x.element_size() for d in (a, b) for x in d.values())
    return keys.shape[1] * keys.element_size() + mean_rank * term


def standing(prompts: list[str]) -> list[bool]:
    """Per prompt of facts given in order: no later one has the same prompt (else that one replaces it)."""
    last = {same_prompt(p): i for i, p in enumerate(prompts)}
    return [last[same_prompt(p)] == i for i, p in enumerate(prompts)]


def rank_or_auto(text: str) -> int | str:
    """--rank's value (argparse type): "auto", or a whole number (the scripts check it is at least 1)."""
    return text if text == "auto" else int(text)


@torch.no_grad()
def fitted_ranks(runner, batch: dict, complete: list[dict], kept: list[dict]) -> list[int]:
    """Per fact e (row e of `batch`, its prompt and answer), the smallest of RANKS at which kept[e]
    ({module: (a (16, d_in), b (16, d_out))}, as stored) writes it as complete[e] (the editor's
    update, factors) does; one pass over every fact's 1 + len(RANKS) versions, each on its own row."""
    L = 1 + len(RANKS)
    each = []
    for c, k in zip(complete, kept):
        each += [c] + [{m: (a[:r].to(c[m][0].device, torch.float32), b[:r].to(c[m][0].device, torch.float32))
                        for m, (a, b) in k.items()} for r in RANKS]
    rows = [e for e in range(len(complete)) for _ in range(L)]
    with routed(runner.model, Apart(runner.model, each), torch.arange(len(rows))) as routing:
        runner.on_part = routing.select
        try:
            logits, answer, at = runner.scored_logits(take(batch, rows))          # (N, V), (N,), (N,)
        finally:
            runner.on_part = None
    logp = torch.log_softmax(logits.float(), -1)
    acc = per_row((logp.argmax(-1) == answer).float(), at, len(rows)).view(-1, L).cpu()      # (F, L)
    mean = per_row(logp.gather(1, answer[:, None])[:, 0], at, len(rows)).view(-1, L).cpu()  # (F, L)
    fits = (acc[:, 1:] >= acc[:, :1]) & (mean[:, 1:] >= mean[:, :1] - SLACK)          # (F, len(RANKS))
    first = torch.where(fits.any(1), fits.int().argmax(1), len(RANKS) - 1)
    return [RANKS[i] for i in first.tolist()]


# -----------------------------------------------------------------------------
# the memory

class EditMemory:
    """Keys (N, k), each update's rank (N,) and where its terms start (N,), and per edited module the
    terms of all of them one after another, a (M, d_in), b (M, d_out); grown by doubling; the facts as
    dicts, and which are live (N,): a fact whose prompt a later fact has (a correction) is never served.
    `editor` (editor.Editor) makes the edits and runs the model. rank: "auto" (RANKS) or r."""

    def __init__(self, editor, key: Key, rank: int | str = "auto", dtype: torch.dtype = torch.float16):
        blocks, width = len(editor.model.get_submodule(blocks_path(editor.model))), editor.model.config.hidden_size
        if key.config()["width"] != width or key.layer >= blocks:
            raise MemoryFileError(f"the key reads states of width {key.config()['width']} entering block {key.layer}; "
                                  f"this model has width {width} and {blocks} blocks: learn a key for this editor "
                                  f"(python key.py learn --ckpt {editor.path})")
        self.editor, self.key, self.rank, self.dtype = editor, key, rank, dtype
        self.n, self.used, self.facts, self.subjects, self.newest = 0, 0, [], Subjects(), {}
        self.keys, self.live = torch.zeros(0, key.config()["dim"]), torch.zeros(0, dtype=torch.bool)
        self.ranks, self.start = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        self.a = {m: torch.zeros(0, s[0], dtype=dtype) for m, s in editor.hypernet.shapes.items()}
        self.b = {m: torch.zeros(0, s[1], dtype=dtype) for m, s in editor.hypernet.shapes.items()}

    def __len__(self) -> int:
        return self.n

    def mean_rank(self) -> float:
        return self.used / self.n if self.n else 0.0

    def bytes_per_edit(self) -> float:
        return bytes_per_edit(self.keys, self.a, self.b, self.mean_rank())

    def factors(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
        """Stored updates ids (R,), grouped by rank (hooks.Routing): [(at (G,), {module: (a (G, r, d_in),
        b (G, r, d_out))})], `at` their places in ids."""
        ranks, groups = self.ranks[ids], []
        for r in ranks.unique().tolist():
            at = torch.nonzero(ranks == r)[:, 0]
            terms = self.start[ids[at], None] + torch.arange(r)                            # (G, r)
            groups.append((at, {m: (self.a[m][terms], self.b[m][terms]) for m in self.a}))
        return groups

    def keys_of(self, prompts: list[str], progress: bool = False) -> torch.Tensor:
        f = prompt_features(self.editor.model, self.editor.tokenizer, prompts, self.key.layer, progress=progress)
        with torch.no_grad():
            return self.key(f)                                                   # (N, k)

    def _grow(self, facts: int, terms: int) -> None:
        def grown(x, need):
            if need <= len(x):
                return x
            y = x.new_zeros(max(2 * len(x), need, 64), *x.shape[1:])
            y[:len(x)] = x
            return y
        self.keys, self.live, self.ranks, self.start = (grown(x, self.n + facts)
                                                        for x in (self.keys, self.live, self.ranks, self.start))
        self.a = {m: grown(x, self.used + terms) for m, x in self.a.items()}
        self.b = {m: grown(x, self.used + terms) for m, x in self.b.items()}

    def add(self, facts, chunk: int = CHUNK) -> None:
        """Edit each fact alone (one forward and backward for `chunk` facts at a time, the hypernetwork per
        fact) and store its key and low-rank update (rank "auto": one more pass, fitted_ranks). A fact
        without a subject is routed by the key alone; give it gate.guess_subject(prompt) for the gate (as
        edit.py does; within 0.001 F1 of given ones, README). A fact with a stored fact's prompt replaces it."""
        facts = [as_fact(f) for f in facts]
        for i in range(0, len(facts), chunk):
            self._add(facts[i:i + chunk])

    def _add(self, facts: list) -> None:
        editor = self.editor
        runner = editor.runner()
        batch = runner.batch([f.prompt for f in facts], [f.target for f in facts])
        tokens = editor.ckpt["config"].get("tokens", "all")
        decomposition, mask = grad_decomposition(editor.model, editor.names, batch, tokens,
                                                 forward=lambda b: runner.scored_logits(b, split=False))
        keys = self.keys_of([f.prompt for f in facts])
        with torch.no_grad():                   # {module: (A (N, d_in), B (N, d_out))} per fact, N its tokens
            complete = [editor.hypernet({m: (h[e:e + 1], u[e:e + 1]) for m, (h, u) in decomposition.items()},
                                        mask[e:e + 1], factored=True)[0] for e in range(len(facts))]
        auto = self.rank == "auto"
        most = RANKS[-1] if auto else self.rank
        kept = [{m: tuple(x.to(self.dtype) for x in low_rank(tuple(x.cpu() for x in d), most))
                 for m, d in deltas.items()} for deltas in complete]
        ranks = fitted_ranks(runner, batch, complete, kept) if auto else [self.rank] * len(facts)
        self._grow(len(facts), sum(ranks))
        for e, r in enumerate(ranks):
            for m, (a, b) in kept[e].items():
                self.a[m][self.used:self.used + r], self.b[m][self.used:self.used + r] = a[:r], b[:r]
            self.keys[self.n], self.ranks[self.n], self.start[self.n] = keys[e], r, self.used
            self._stored(vars(facts[e]))
            self.used += r

    def _stored(self, fact: dict) -> None:
        """Fact n is stored: it replaces the stored fact with the same prompt, if any (a fact corrected)."""
        prompt = same_prompt(fact["prompt"])
        if prompt in self.newest:
            self.live[self.newest[prompt]] = False
        self.newest[prompt], self.live[self.n] = self.n, True
        self.facts.append(fact)
        self.subjects.add(fact["subject"])
        self.n += 1

    def replaced(self) -> list[int]:
        """The stored facts a later one with the same prompt replaced: kept in the file, never served."""
        return torch.nonzero(~self.live[:self.n])[:, 0].tolist()

    @torch.no_grad()
    def route(self, prompts: list[str]) -> torch.Tensor:
        """The stored edit each prompt concerns, or −1 (N,) long."""
        tok = self.editor.tokenizer
        f = prompt_features(self.editor.model, tok, prompts, self.key.layer)
        return self.routes_of(f, [chat(tok).text(tok, p) for p in prompts])

    @torch.no_grad()
    def routes_of(self, f: torch.Tensor, texts: list[str] | None) -> torch.Tensor:
        """f(q) (B, C) and the queries' texts -> the candidate of the best key at cosine ≥ its τ (Key.passes),
        or −1 (B,) long."""
        if self.n == 0:
            return torch.full((len(f),), -1)
        sims = self.key(f) @ self.keys[:self.n].T                                 # (B, n)
        passed = self.key.passes(sims, self.subjects, texts) & self.live[:self.n]  # a replaced fact: never served
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
            ids = None if seen["ids"] is None else seen["ids"].cpu()             # both tests read its own words
            if ids is not None:
                mask = chat(tok).mask(ids, mask)
            texts = None if ids is None else [tok.decode(i[m.bool()]) for i, m in zip(ids, mask.cpu())]
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

    def largest_rank(self) -> int:
        return int(self.ranks[:self.n].max()) if self.n else 0

    def truncate(self, rank: int) -> None:
        """Keep at most the first `rank` terms of every stored update: its best rank-`rank` approximation (the
        factors are ordered by singular value; memory.low_rank). For a rank curve from one full-rank memory."""
        self.rank = rank if self.rank == "auto" else min(rank, self.rank)
        self.ranks = self.ranks.clamp(max=rank)

    # -- the file --------------------------------------------------------------

    def state(self) -> dict:
        """The file's dict: each update's terms one after another, in the order of the facts."""
        r = self.ranks[:self.n]
        terms = torch.repeat_interleave(self.start[:self.n] - (r.cumsum(0) - r), r) + torch.arange(int(r.sum()))
        return {"format": FORMAT, "model": self.editor.ckpt["model"], "editor_sha256": sha256(self.editor.path),
                "key": self.key.saved(), "rank": self.rank, "dtype": str(self.dtype).split(".")[-1], "n": self.n,
                "keys": self.keys[:self.n].clone(), "ranks": r.clone(), "a": {m: x[terms] for m, x in self.a.items()},
                "b": {m: x[terms] for m, x in self.b.items()}, "facts": self.facts[:self.n],
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
        memory.keys, memory.ranks, memory.live = s["keys"], s["ranks"], torch.zeros(s["n"], dtype=torch.bool)
        memory.start, memory.used = memory.ranks.cumsum(0) - memory.ranks, int(memory.ranks.sum())
        for fact in s["facts"]:
            memory._stored({"subject": "", **fact})
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
    if not isinstance(s, dict) or s.get("format") not in (FORMAT, "ibke-memory-1"):
        raise MemoryFileError(f"not a memory file of this project: {path}")
    if s["format"] == "ibke-memory-1":                    # every update at one rank: a (N, r, d_in)
        s["ranks"] = torch.full((s["n"],), s["rank"])
        s["a"], s["b"] = ({m: x.flatten(0, 1) for m, x in s[k].items()} for k in ("a", "b"))
    return s


# -----------------------------------------------------------------------------

def show(args: argparse.Namespace) -> None:
    s = read_file(args.file)
    size = os.path.getsize(args.file)
    r = s["ranks"].float()
    rank = (f"rank auto (mean {r.mean():.1f}, {int(r.min())}–{int(r.max())})" if s["rank"] == "auto" and s["n"]
            else f"rank {s['rank']}")
    per_edit = bytes_per_edit(s["keys"], s["a"], s["b"], r.mean().item() if s["n"] else 0.0)
    print(f"{args.file}: {s['n']} edits of {s['model']} (editor sha256 {s['editor_sha256'][:12]}…), {rank} "
          f"in {s['dtype']}, key {s['key']['config']} τ {s['key']['threshold']:.3f}, {size / 2 ** 20:.1f} MiB: "
          f"{per_edit / 1000:.1f} kB per edit (its key and update) and {(size - s['n'] * per_edit) / 2 ** 20:.1f} "
          f"MiB besides (the key network, the facts' text), written {s['date']}")
    stands = standing([f["prompt"] for f in s["facts"]])
    replaced = stands.count(False)
    if replaced:
        print(f"{replaced} of the {s['n']} replaced by a later fact with the same prompt (kept in the file, "
              f"never served)")
    subjects, gated = sum(bool(f["subject"]) for f in s["facts"]), s["key"]["gated"]
    print(f"{subjects} of {s['n']} stored with a subject, " + ("routed by the key alone: this key has no gate"
          if gated is None else f"gated (then the key at τ_gated {gated:.3f}); the others by the key alone at τ"))
    for f, r, stands in zip(s["facts"][:5], s["ranks"].tolist(), stands):
        print(f"  {f['prompt']!r} -> {f['target']!r}" + (f"  [{f['subject']}]" if f["subject"] else "") + f"  rank {r}"
              + ("" if stands else "  (replaced)"))


def rekey(args: argparse.Namespace) -> None:
    """The memory of args.file routed by another key: each fact's key computed anew from its prompt; the
    updates, ranks and facts as they are (no fact is edited again)."""
    from editor import Editor
    if os.path.exists(args.out):
        raise MemoryFileError(f"--out {args.out} exists; give a new file (the memory itself stays as it is)")
    editor = Editor.load(args.ckpt, args.device, dtype=args.dtype)
    memory = EditMemory.load(args.file, editor)
    key = load_key(args.ckpt, args.key)
    EditMemory(editor, key)                                              # the key fits this model, or one line
    memory.key = key
    memory.keys = memory.keys_of([f["prompt"] for f in memory.facts], progress=True)
    memory.save(args.out)
    print(f"wrote {args.out}: the {len(memory)} edits of {args.file}, routed by {args.key}")


if __name__ == "__main__":
    from model import add_device_args
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("show", help="what a memory file holds")
    v.add_argument("file", help="a memory file (evaluate.py --sequential memory --memory FILE, edit.py --memory FILE)")
    k = sub.add_parser("rekey", help="the same memory routed by another key (python key.py learn … --out KEY)")
    k.add_argument("file", help="the memory file (left as it is)")
    k.add_argument("--ckpt", required=True, help="the editor the memory was built with (its model computes the keys)")
    k.add_argument("--key", required=True, help="the new key file")
    k.add_argument("--out", required=True, help="the new memory file (a new path)")
    add_device_args(k, dtype_default=None)
    args = parser.parse_args()
    from checkpoint import CheckpointError
    from model import ModelError
    try:
        {"show": show, "rekey": rekey}[args.command](args)
        sys.stdout.flush()                                  # a closed pipe raises here, not at exit
    except (MemoryFileError, CheckpointError, ModelError) as err:
        raise SystemExit(f"error: {err}")
    except BrokenPipeError:                                 # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

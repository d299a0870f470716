"""
Routing for the edit memory (memory.py): which stored edit, if any, a query concerns. It reads the query's
text alone (the prompt: a question without its answer), never a record's fields, in two tests, the first
on its words, the second on the model's states:
  - the gate (gate.py): an edit stored with its subject is a candidate only for a query that names that
    subject among its words, as a name of its own; edits stored without a subject are candidates always.
  - the key, computed from the hidden states entering block `layer` over the prompt's tokens:
    f(q) = mean_t x_t                             (C,)   the prompt's states, averaged over its tokens
                                                         (its own: a chat's last user message, gate.Chat)
    k(q) = normalise(W (f(q) − μ) / σ)            (k,)   μ, σ: the train prompts'; W learned (or identity)
A query goes to the candidate e of the largest k(q)·k_e when that cosine is ≥ τ_gated (e has a subject)
or ≥ τ (it has none), else to no edit. W is trained on the train split only, contrastively: a prompt and
its rephrase together, apart from the other prompts of the batch and from the neighbours (same relation
and answer, another subject) that must not be edited (--hard: and from train texts that name its
subject but are about another, "Jill Ireland is native to" for Ireland; --other-relations: and from
its subject's questions in other relations, "Ireland is a member of" for "The official language of
Ireland is", other questions that concern no edit: RS). τ and τ_gated are chosen on
validation records (the evaluation split's first --val-records) as those that maximise the balanced
accuracy of routing (rephrases to their own edit, neighbours to none): τ among those records' edits,
τ_gated among them and train-split prompts up to --stored edits, the size the memory is built for.

    python key.py learn --ckpt out/ibke/best.pt       # the key -> out/ibke/key.pt (~1 min on 2 cores)
    python key.py learn --ckpt out/ibke/best.pt --untrained --out out/ibke/key-u4.pt   # no projection
    python key.py learn --ckpt out/ibke/best.pt --other-relations 4 --out out/ibke/key-or4.pt
    python key.py routing --ckpt out/ibke/best.pt     # records 0-999 among 1,000 and 10,000 edits (20 s)
"""
import argparse
import os
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import atomic_save
from data import chat_text, pad, relations, tokenize
from gate import Subjects, asks_another, chat, hard_negatives
from model import blocks_path
from runner import hidden_before, to_device


class MemoryFileError(ValueError):
    """A file of the memory (a memory file, its key) that cannot be used: missing, unreadable, or built for
    another model or editor."""


# -----------------------------------------------------------------------------
# the key: prompt -> unit vector

def pooled(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """f(q): the states x (B, T, C) averaged over each row's real tokens (mask (B, T)) -> (B, C)."""
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


@torch.no_grad()
def prompt_features(model: nn.Module, tokenizer, prompts: list[str], layer: int, batch_size: int = 64,
                    progress: bool = False) -> torch.Tensor:
    """f(q) for each prompt: the mean of the states entering block `layer` over its own words (gate.Chat: a
    chat's last user message, else every token) (N, C) float32, host."""
    rows = tokenize(tokenizer, prompts, [""] * len(prompts))                 # the prompt alone, as a query
    out = torch.zeros(len(prompts), model.config.hidden_size)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for s in tqdm(range(0, len(order), batch_size), desc="keys", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        part = pad([rows[i] for i in idx], tokenizer.pad_token_id)
        mask = to_device(part["attention_mask"], model.device)
        x = hidden_before(model, layer, to_device(part["input_ids"], model.device), mask).float()   # (b, T, C)
        out[idx] = pooled(x, chat(tokenizer).mask(part["input_ids"], mask)).cpu()
    return out


class Key(nn.Module):
    """f(q) (N, C) -> k(q) (N, k): standardised, projected (a learned W, or none: identity), unit length."""

    def __init__(self, width: int, layer: int, dim: int = 256, learned: bool = True):
        super().__init__()
        self.layer, self.threshold, self.gated = layer, 1.0, None     # τ, τ_gated (None: no gate)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.proj = nn.Linear(width, dim) if learned else None

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        x = (f - self.mean) / self.std
        return F.normalize(self.proj(x) if self.proj is not None else x, dim=-1)

    def passes(self, sims: torch.Tensor, subjects: Subjects, texts: list[str] | None) -> torch.Tensor:
        """Queries' cosines to n stored edits with these subjects (B, n) -> which edits each query may take
        (B, n) bool: one stored with a subject the query names at cosine ≥ τ_gated, one stored without at ≥
        τ. Without texts (a model fed embeddings) or a gated τ (a key learned before the gate), the key
        alone decides, at τ."""
        if texts is None or self.gated is None:
            return sims >= self.threshold
        return subjects.mask(texts) & (sims >= torch.where(subjects.has_subject(), self.gated, self.threshold))

    def config(self) -> dict:
        return {"width": self.mean.shape[0], "layer": self.layer, "learned": self.proj is not None,
                "dim": self.proj.out_features if self.proj is not None else self.mean.shape[0]}

    @classmethod
    def rebuild(cls, saved: dict) -> "Key":
        c = saved["config"]
        key = cls(c["width"], c["layer"], c["dim"], c["learned"])
        key.load_state_dict(saved["state"])
        key.threshold, key.gated = saved["threshold"], saved.get("gated")
        return key

    def saved(self) -> dict:
        return {"config": self.config(), "state": self.state_dict(), "threshold": self.threshold, "gated": self.gated}


def train_key(key: Key, prompts: torch.Tensor, rephrases: torch.Tensor, neighbours: torch.Tensor,
              steps: int = 1500, batch: int = 256, lr: float = 1e-3, tau: float = 0.1, seed: int = 0,
              hard: tuple[torch.Tensor, list[list[int]]] | None = None) -> list[float]:
    """Contrastive training of W on train-split features (N, C) each, row i of all three from one record:
    InfoNCE both ways between prompt and rephrase, the batch's other prompts (rephrases) and all its
    neighbours as negatives, temperature tau. hard: features (M, C) of texts that pass the gate of a
    record but concern another subject (hard_negatives()) and, per record, the rows of its own; one of
    each batch row's (its neighbour where it has none) is a negative too. Sets μ, σ from the prompts.
    -> the losses."""
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
        if hard is not None:                                  # one hard negative per row (its neighbour if none)
            texts, own = hard
            extra = [texts[own[j][int(torch.randint(len(own[j]), (1,), generator=g))]] if own[j] else neighbours[j]
                     for j in i.tolist()]
            n = torch.cat([n, key(torch.stack(extra))])                        # (2b, k)
        loss = (F.cross_entropy(torch.cat([r @ p.T, r @ n.T], 1) / tau, target)
                + F.cross_entropy(torch.cat([p @ r.T, p @ n.T], 1) / tau, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -----------------------------------------------------------------------------
# measured: records' rephrases and neighbours routed among stored prompts

@torch.no_grad()
def routing_scores(kp: torch.Tensor, kr: torch.Tensor, kn: torch.Tensor, gates: tuple | None = None,
                   threshold: float | None = None, unasked: torch.Tensor | None = None) -> dict:
    """Record i's rephrase and neighbour keys kr, kn (M, k) routed among N ≥ M stored edits' keys kp
    (N, k), edit i record i's own: the rephrase should find edit i, the neighbour none. gates: the
    (M, N) masks of the edits each rephrase, neighbour may take (None: all). Chooses τ when threshold is
    None, as the one of best balanced accuracy. unasked (M,) bool: the neighbours that ask no stored
    edit's question (asks_another), whose rejection is reported apart."""
    sr, sn = kr @ kp.T, kn @ kp.T                                             # (M, N) each
    if gates is not None:
        sr, sn = sr.masked_fill(~gates[0], -2), sn.masked_fill(~gates[1], -2)
    best, sn = sr.max(1), sn.max(1).values
    right = best.indices == torch.arange(len(kr))
    if threshold is None:                                                     # balanced accuracy, over a grid
        grid = torch.linspace(-1, 1, 801)
        bal = torch.stack([((right & (best.values >= t)).float().mean() + (sn < t).float().mean()) / 2 for t in grid])
        threshold = grid[bal.argmax()].item()
    out = {"top1": right.float().mean().item(), "routed": (right & (best.values >= threshold)).float().mean().item(),
           "rejected": (sn < threshold).float().mean().item(), "threshold": threshold}
    if unasked is not None:
        out["rejected_unasked"] = (sn < threshold)[unasked].float().mean().item()
    return out


def key_file(ckpt: str, key: str | None = None) -> str:
    """Where the routing key is: `key` (--key) if given, else key.pt beside the editor checkpoint."""
    return key or os.path.join(os.path.dirname(ckpt), "key.pt")


def load_key(ckpt: str, key: str | None = None) -> Key:
    """The routing key of key_file(ckpt, key), or MemoryFileError in one line."""
    path = key_file(ckpt, key)
    learn = f"learn one with `python key.py learn --ckpt {ckpt}`"
    if not os.path.isfile(path):
        raise MemoryFileError(f"no key at {path}; {learn} or give --key")
    try:
        return Key.rebuild(torch.load(path, map_location="cpu", weights_only=False))
    except Exception as err:                 # cut short, another kind of file or format
        raise MemoryFileError(f"not a key file of key.py: {path} ({type(err).__name__}); {learn}") from None


# -----------------------------------------------------------------------------

def other_relations(records, pool, per: int, seed: int = 0) -> tuple[list[str], list[list[int]]]:
    """Per record (of pool's), `per` questions of its subject in other relations: templates of pool's
    prompts (data.relations) that ask another relation than the record's, filled with its subject ("The
    official language of Lyon is" for "Lyon is a twin city of"). The key is to keep them apart from the
    record's prompt: another question of an edited subject concerns no edit (RS, metrics.py).
    -> (texts, per record the indices of its own), as hard_negatives gives them."""
    group, rng, texts, own = relations(pool), random.Random(seed), [], []
    for r in records:
        mine = group.get(r.relation)
        other = [t for t in group if group[t] != mine] if mine is not None and r.subject else []
        own.append(list(range(len(texts), len(texts) + per)) if other else [])
        texts += [t.replace("{}", r.subject) for t in rng.choices(other, k=per)] if other else []
    return texts, own


def usable(records) -> list:
    """The records that have a rephrase and a locality prompt: those the key learns from and is measured on."""
    return [r for r in records if r.generality and r.locality]


def triples(records) -> tuple[list[str], list[str], list[str], list[str]]:
    """(prompts, rephrases, neighbours, subjects) of the records that have a rephrase and a locality prompt."""
    kept = usable(records)
    return ([r.prompt for r in kept], [r.generality[0][0] for r in kept], [r.locality[0][0] for r in kept],
            [r.subject for r in kept])


def scores(key: Key, stored: tuple, queries: tuple, threshold: float | None = None, gated: bool = False,
           unasked: torch.Tensor | None = None) -> dict:
    """routing_scores of queries (f(rephrases), f(neighbours), their texts) among stored (f(prompts),
    subjects): the key alone at τ, or gated (the subject gate, then τ_gated)."""
    with torch.no_grad():
        kp, kr, kn = key(stored[0]), key(queries[0]), key(queries[1])
    gates = None
    if gated:
        subjects = Subjects(stored[1])
        gates = subjects.mask(queries[2]), subjects.mask(queries[3])
    return routing_scores(kp, kr, kn, gates, threshold, unasked)


def learn_key(args: argparse.Namespace) -> None:
    from data import load
    from editor import Editor
    editor = Editor.load(args.ckpt, args.device, dtype=args.dtype)
    blocks = len(editor.model.get_submodule(blocks_path(editor.model)))
    if not 0 <= args.layer < blocks:
        raise SystemExit(f"error: --layer {args.layer}: the key reads the states entering a block; "
                         f"give 0..{blocks - 1}")
    splits = load(args.data or editor.ckpt["config"]["data"], args.data_dir)
    features = lambda texts: prompt_features(editor.model, editor.tokenizer, texts, args.layer, progress=True)
    train, val = triples(splits["train"]), triples(splits["eval"][:args.val_records])
    more = max(args.stored - len(val[0]), 0)                        # train prompts stand in for the other edits
    if more > len(train[0]):
        raise SystemExit(f"error: --stored {args.stored} needs {more} train prompts beside the {len(val[0])} "
                         f"validation edits; the train split has {len(train[0])}")
    t = [features(x[:args.train_records]) for x in train[:3]]
    v = [features(x) for x in val[:3]]
    learned, sources = usable(splits["train"])[:args.train_records], []              # the records t holds
    if args.hard and not args.untrained:
        found, theirs = hard_negatives(learned, splits["train"])
        print(f"hard negatives: {len(found)} texts, {sum(map(len, theirs))} pairs with the {sum(map(bool, theirs))} "
              f"records whose gate they pass")
        sources.append((found, theirs))
    if args.other_relations and not args.untrained:
        found, theirs = other_relations(learned, splits["train"], args.other_relations, args.seed)
        print(f"other relations: {len(found)} questions of another relation asked of a record's subject")
        sources.append((found, theirs))
    texts, own = [], [[] for _ in learned]                                       # per record, its negatives' rows
    for found, theirs in sources:
        texts, own = texts + found, [a + [len(texts) + j for j in b] for a, b in zip(own, theirs)]
    hard = (features(texts), own) if texts else None
    key = Key(editor.model.config.hidden_size, args.layer, args.dim, learned=not args.untrained)
    losses = train_key(key, *t, steps=args.steps, seed=args.seed, hard=hard)
    if losses:
        print(f"key: {args.steps} steps, loss {losses[0]:.3f} -> {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    key.eval()
    queries = (v[1], v[2], val[1], val[2])
    s = scores(key, (v[0], val[3]), queries)
    key.threshold = s["threshold"]
    print(f"key alone, among {len(v[0])} edits (eval records 0-{args.val_records - 1}): "
          f"rephrase top-1 {s['top1']:.3f}, routed {s['routed']:.3f}, neighbours rejected {s['rejected']:.3f} "
          f"at τ = {s['threshold']:.3f}")
    fp = torch.cat([v[0], t[0][:more]] + ([features(train[0][len(t[0]):more])] if more > len(t[0]) else []))
    g = scores(key, (fp, val[3] + train[3][:more]), queries, gated=True)
    key.gated = g["threshold"]
    print(f"gated, among {len(fp)} edits (eval records 0-{args.val_records - 1}'s and {more} train prompts'): "
          f"rephrase top-1 {g['top1']:.3f}, routed {g['routed']:.3f}, neighbours rejected {g['rejected']:.3f} "
          f"at τ_gated = {g['threshold']:.3f}")
    out = args.out or key_file(args.ckpt)
    atomic_save(key.saved() | {"routing": s, "gated_routing": g, "args": vars(args)}, out)
    print(f"wrote {out}")


def routing(args: argparse.Namespace) -> None:
    """The key at scale: eval records 0..M-1's rephrases and neighbours routed among the first N prompts'
    edits (their own among them): the key alone at its τ, and gated at τ_gated."""
    from data import load
    from editor import Editor
    key = load_key(args.ckpt, args.key)
    editor = Editor.load(args.ckpt, args.device, dtype=args.dtype)
    records = load(args.data or editor.ckpt["config"]["data"], args.data_dir)["eval"]
    records = usable(records)
    prompts, rephrases, neighbours, subjects = triples(records[:args.stored])
    features = lambda texts: prompt_features(editor.model, editor.tokenizer, texts, key.layer, progress=True)
    p, r, n = features(prompts), features(rephrases[:args.queries]), features(neighbours[:args.queries])
    queries = (r, n, rephrases[:args.queries], neighbours[:args.queries])
    for stored in sorted({len(r), len(p)}):
        unasked = ~torch.tensor(asks_another(records[:stored])[:len(r)])
        for gated in ([False, True] if key.gated is not None else [False]):
            tau = key.gated if gated else key.threshold
            s = scores(key, (p[:stored], subjects[:stored]), queries, tau, gated, unasked)
            print(f"records 0-{len(r) - 1} among {stored} stored edits, {'gated' if gated else 'key alone'}: "
                  f"rephrase top-1 {s['top1']:.3f}, routed {s['routed']:.3f}, neighbours rejected {s['rejected']:.3f} "
                  f"({s['rejected_unasked']:.3f} of the {int(unasked.sum())} that ask no stored edit's question) "
                  f"at τ{'_gated' if gated else ''} = {s['threshold']:.3f}")
    tok = editor.tokenizer
    if getattr(tok, "chat_template", None) and key.gated is not None:     # as an instruct model is asked
        asked = [features([chat_text(tok, q) for q in texts]) for texts in queries[2:]]
        s = scores(key, (p, subjects), (*asked, *queries[2:]), key.gated, True, unasked)
        print(f"the same asked in the chat template, among {len(p)}, gated: rephrase top-1 {s['top1']:.3f}, "
              f"routed {s['routed']:.3f}, neighbours rejected {s['rejected']:.3f} ({s['rejected_unasked']:.3f} of "
              f"the {int(unasked.sum())})")
    others = [q for r in records[:args.stored] for q, _ in r.others]      # RS's questions: none concerns an edit
    if others and key.gated is not None:
        with torch.no_grad():
            passed = key.passes(key(features(others)) @ key(p).T, Subjects(subjects), others)   # (Q, N)
        print(f"the {len(others)} other questions of the {len(p)} edits' subjects (RS): "
              f"{passed.any(1).float().mean():.3f} routed to an edit")


if __name__ == "__main__":
    from model import add_device_args
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("learn", help="learn the routing key on the train split; choose τ on the first eval records")
    k.add_argument("--ckpt", required=True,
                   help="the editor the memory will hold edits of (its model computes the keys)")
    k.add_argument("--data", default=None, help="benchmark (default: the one the editor was trained on)")
    k.add_argument("--data-dir", default="data", help="folder holding the benchmark files")
    k.add_argument("--layer", type=int, default=4,
                   help="the key reads the states entering this block (README: 4 of SmolLM2's 30 routes best)")
    k.add_argument("--dim", type=int, default=256, help="width k of a learned key")
    k.add_argument("--untrained", action="store_true", help="no projection: the standardised features themselves")
    k.add_argument("--train-records", type=int, default=4000, help="train-split records the key learns from")
    k.add_argument("--val-records", type=int, default=1000, help="the first N eval records choose τ and τ_gated")
    k.add_argument("--stored", type=int, default=10000,
                   help="τ_gated is chosen among this many edits: the validation records' and train prompts'")
    k.add_argument("--steps", type=int, default=1500, help="Adam steps of the contrastive loss")
    k.add_argument("--seed", type=int, default=0, help="the key's initialisation and batches")
    k.add_argument("--hard", action="store_true",
                   help="add hard negatives: train texts that pass a record's gate but are about another subject "
                        "(key.hard_negatives)")
    k.add_argument("--other-relations", type=int, default=0, metavar="K",
                   help="add K negatives per record: questions of its subject in another relation "
                        "(key.other_relations; CounterFact, whose neighbours tell its relations apart)")
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
    args = parser.parse_args()
    sizes = ["stored", "queries"] if args.command == "routing" else ["dim", "train_records", "val_records", "steps"]
    for name in sizes:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(args, name)}: give at least 1")
    if args.command == "learn" and args.other_relations < 0:
        raise SystemExit(f"error: --other-relations {args.other_relations}: give 0 (none) or more")
    if args.command == "learn" and args.stored < args.val_records:
        raise SystemExit(f"error: --stored {args.stored}: give at least --val-records ({args.val_records}), whose "
                         f"edits are among those stored")
    from checkpoint import CheckpointError
    from data import DataError
    from model import ModelError
    try:
        {"learn": learn_key, "routing": routing}[args.command](args)
    except (CheckpointError, DataError, ModelError, MemoryFileError) as err:
        raise SystemExit(f"error: {err}")

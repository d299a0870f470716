"""
The metrics, one place: evaluate.py's protocols and train.py's validation score edits with them.
Token-level and teacher-forced (the EasyEdit / MALMEN convention), per record, then averaged:

  ES   fraction of o_e's tokens that are the argmax after the edit, given q_e
  GS   the same on the generality prompts q_g
  LS   fraction of the locality answer's positions whose post-edit argmax equals the pre-edit argmax
  F1   harmonic mean of ES, GS and LS (of the averages)
  RS   relation specificity: LS on other questions of the edited subject, with their true answers
       (CounterFact, its eval split: the train split's prompts about the subject, data.other_questions)
  EM   whole answer right (every token the argmax), on q_e and on q_g (GEM; MEND's convention)
  ES_p, PS_p, NS_p   CounterFact, ROME-style: 1[P(new) > P(old)] on q_e, on q_g, and
       1[P(true) > P(new)] on q_l (P = mean log-probability per answer token); S_p their harmonic mean
  MH   MQuAKE: all edits of a case applied, greedy answers to its 3 questions; solved if one of
       them contains the new answer or an alias as whole words
Free generation (evaluate.py --generate), greedy, per record, then averaged:
  gen_ES, gen_GS   the continuation of q_e (of each q_g), cut at the new answer's length in tokens
       plus 3, contains the new answer as whole words (case-insensitive; gate.contains)
  gen_LS   the continuation of each q_l, as long, equals the unedited model's token for token (both
       generated in the same batches, so that no edit gives exactly 1)
  gen_F1   harmonic mean of gen_ES, gen_GS and gen_LS
  fluency  ROME's generation entropy of 50 greedy tokens from q_e and each q_g after the edit: the
       mean of (2/3)·H_2 and (4/3)·H_3, H_n the entropy (bits) of the text's n-gram frequencies over
       its words (`ngram_entropy`); fluency_drop: the unedited model's on the same prompts minus it
  gen_new  those 50 tokens name the new answer, as gen_ES does, wherever they do: a reply that answers
       late (in a chat, after a sentence of its own) counts here and not in gen_ES
  gen_old  those 50 tokens name the old answer (records that have one), as gen_ES names the new: the
       text takes the edit back (the unedited model's rate: --method none)
  --chat   every prompt above asked as a user's message in the model's chat template, the reply read
       as far as the prompt's length in tokens more (it may say the question again before answering)

Prompts keep their last 128 tokens, answers their first 32 (data.MAX_ANSWER). METHOD.md §4.

    python -m pytest tests/test_metrics.py     # each metric on hand-made logits
"""
import contextlib
import hashlib
import json
import os
import re
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from data import EditRequest, chat_text
from gate import contains
from hooks import factors, functional_edit, routed
from losses import answer_nll
from rundir import write_json
from runner import Runner, index, take, to_device

METRICS = ["ES", "GS", "LS", "F1", "RS", "EM", "GEM", "ES_p", "PS_p", "NS_p", "S_p",
           "gen_ES", "gen_GS", "gen_LS", "gen_F1", "fluency", "fluency_drop", "gen_new", "gen_old"]
LOCAL = ("loc", "rs")      # rows scored against the unedited model's argmax, in passes of their own
AVERAGED = [m for m in METRICS if m not in ("F1", "S_p", "gen_F1")]      # per record; the rest: harmonic means


# -----------------------------------------------------------------------------
# per row and per record

def per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of per-position values within each row. (N,), (N,) -> (n_rows,), on their device."""
    total = torch.zeros(n_rows, device=values.device).index_add(0, rows, values.float())
    count = torch.zeros(n_rows, device=values.device).index_add(0, rows, torch.ones_like(values, dtype=torch.float))
    return total / count.clamp_min(1)


def harmonic(*xs: float) -> float:
    return 0.0 if min(xs) <= 0 else len(xs) / sum(1 / x for x in xs)


def score_rows(pre, post, n_rows: int) -> dict[str, torch.Tensor]:
    """Per row: token accuracy, agreement with the pre-edit argmax, mean NLL. post: a scored triple;
    pre: (argmax (P,), rows (P,)) at some rows' scored positions, row-major (the locality ones; None:
    none), whose agreement is then the only one computed."""
    logits, targets, rows = post
    pre_top, pre_rows = pre if pre is not None else (targets[:0], rows[:0])
    at = torch.isin(rows, pre_rows)                                  # pre's rows, in the same row-major order
    agree = logits[at].argmax(-1) == pre_top
    return {"acc": per_row(logits.argmax(-1) == targets, rows, n_rows),
            "agree": per_row(agree, rows[at], n_rows),
            "nll": answer_nll(logits.detach(), targets, rows, n_rows)}


def summarise(results: list[dict]) -> dict[str, float]:
    """Average per-record metrics; F1, S_p and gen_F1 are harmonic means of the averages."""
    out = {k: statistics.fmean(r[k] for r in results if k in r) for k in AVERAGED if any(k in r for r in results)}
    if {"ES", "GS", "LS"} <= out.keys():
        out["F1"] = harmonic(out["ES"], out["GS"], out["LS"])
    if {"gen_ES", "gen_GS", "gen_LS"} <= out.keys():
        out["gen_F1"] = harmonic(out["gen_ES"], out["gen_GS"], out["gen_LS"])
    if {"ES_p", "PS_p", "NS_p"} <= out.keys():
        out["S_p"] = harmonic(out["ES_p"], out["PS_p"], out["NS_p"])
    out["n"] = len(results)
    return out


# -----------------------------------------------------------------------------
# one batch of edits: edit, measure, restore

def rows_of(records: list[EditRequest]) -> tuple[list[str], list[str], list[tuple[str, int]]]:
    """All sequences a batch needs, as (prompt, answer) with (kind, record index): the edit rows
    first, the locality rows ("loc", then "rs": the subject's other questions) last (passes() scores
    them apart)."""
    prompts, targets, kinds = [], [], []

    def add(kind, i, prompt, target):
        prompts.append(prompt), targets.append(target), kinds.append((kind, i))
    for i, r in enumerate(records):                    # the edit rows first, in record order
        add("edit", i, r.prompt, r.target)
    for i, r in enumerate(records):
        for q, a in r.generality:
            add("gen", i, q, a)
        if r.old_target:                               # CounterFact probability scores
            add("edit_old", i, r.prompt, r.old_target)
            for q, _ in r.generality:
                add("gen_old", i, q, r.old_target)
            for q, a in r.locality:
                add("loc_new", i, q, r.target)
    for i, r in enumerate(records):
        for q, a in r.locality:
            add("loc", i, q, a)
    for i, r in enumerate(records):
        for q, a in r.others:
            add("rs", i, q, a)
    return prompts, targets, kinds


def passes(kinds: list[tuple[str, int]], n: int, rows_per_pass: int) -> list[tuple[int, int]]:
    """rows_of's rows as passes [a, b) of at most rows_per_pass (the first: the n edit rows and
    more). The locality rows run in passes of their own, so that the unedited model scores exactly
    the batch the edited one does: in bfloat16 another batch shape can flip an argmax near a tie,
    and no edit must give LS = 1 exactly."""
    loc = next((b for b, (kind, _) in enumerate(kinds) if kind in LOCAL), len(kinds))
    first = min(max(n, rows_per_pass), loc)            # n ≥ 1 edit rows come before any locality row
    bounds = [(0, first)] + [(a, min(a + rows_per_pass, loc)) for a in range(first, loc, rows_per_pass)]
    return bounds + [(a, min(a + rows_per_pass, len(kinds))) for a in range(loc, len(kinds), rows_per_pass)]


def timed(runner: Runner, work: Callable):
    """work() -> (its result, the seconds it took on runner's device)."""
    cuda = runner.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(runner.device)          # the batch's lower blocks are done before the clock starts
    start = time.perf_counter()
    out = work()
    if cuda:
        torch.cuda.synchronize(runner.device)          # the edit's time, not its launch
    return out, time.perf_counter() - start


def measure(runner: Runner, editor: Callable, records: list[EditRequest],
            rows_per_pass: int = 512) -> tuple[list[dict], float, dict]:
    """Apply the edits of `records` as one batch: per-record metrics, the seconds the edit took, the ΔW.
    The rows are scored rows_per_pass at a time (the edit rows in the first pass), so memory does not
    grow with the number of edits."""
    prompts, targets, kinds = rows_of(records)
    n = len(records)
    end = passes(kinds, n, rows_per_pass)[0][1]        # the first pass: the edit rows and more
    first = runner.batch(prompts[:end], targets[:end])
    deltas, seconds = timed(runner, lambda: editor(runner, take(first, slice(0, n))))
    results = score(runner, records, lambda *_: functional_edit(runner.model, deltas), rows_per_pass=rows_per_pass,
                    first=first)
    return results, seconds, deltas


class Apart:
    """Single edits of several records at once: record e's update, as factors (hooks.factors, padded with
    zero rows to one rank: they add exactly 0), applies to its own rows only (hooks.routed).
    apart(prompts, owners): the context a pass over rows of these records runs in."""

    def __init__(self, model, each: list[dict]):
        self.model, self.a, self.b = model, {}, {}
        for name in each[0]:
            fs = [factors(deltas[name]) for deltas in each]
            r = max(len(a) for a, _ in fs)
            self.a[name] = torch.stack([F.pad(a, (0, 0, 0, r - len(a))) for a, _ in fs])   # (E, r, d_in)
            self.b[name] = torch.stack([F.pad(b, (0, 0, 0, r - len(b))) for _, b in fs])   # (E, r, d_out)

    def __call__(self, prompts: list[str] | None, owners: list[int]):
        return routed(self.model, self, torch.tensor(owners))

    def factors(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
        """ids (R,) on the host -> one group (hooks.Routing): {module: (a (R, r, d_in), b (R, r, d_out))}."""
        on = to_device(ids, self.model.device)
        return [(torch.arange(len(ids)), {name: (self.a[name][on], self.b[name][on]) for name in self.a})]


def measure_apart(runner: Runner, editor: Callable, records: list[EditRequest],
                  rows_per_pass: int = 512) -> tuple[list[dict], float, Apart]:
    """n = 1 for each of `records`, scored together: each record is edited alone on the unedited model
    (the editor on its one edit row) and its update applies to its own rows only, so k records share
    one set of passes instead of k. The per-record metrics of k measure() calls (equal up to rounding
    in batches of another shape), the seconds the k edits took, and the routed updates."""
    prompts, targets, kinds = rows_of(records)
    n = len(records)
    end = passes(kinds, n, rows_per_pass)[0][1]
    first = runner.batch(prompts[:end], targets[:end])
    each, seconds = timed(runner, lambda: [editor(runner, take(first, slice(e, e + 1))) for e in range(n)])
    apart = Apart(runner.model, each)
    return score(runner, records, apart, rows_per_pass=rows_per_pass, first=first), seconds, apart


def score(runner: Runner, records: list[EditRequest], edited: Callable, reference: dict | None = None,
          rows_per_pass: int = 512, first: dict | None = None) -> list[dict]:
    """Per-record metrics of `records`' rows, each pass run inside `edited(its prompts, their records)`.
    LS compares with the pre-edit argmax at the locality rows: `reference` (the original model's in the
    same passes, from references()) or, without it, the model outside `edited` now, on the same pass.
    first: the first pass's batch, already built."""
    prompts, targets, kinds = rows_of(records)
    n = len(records)
    s = {"acc": [], "agree": [], "nll": []}            # per row; nll: mean NLL per answer token
    for a, b in passes(kinds, n, rows_per_pass):
        batch = first if a == 0 and first is not None else runner.batch(prompts[a:b], targets[a:b])
        loc = kinds[a][0] in LOCAL                      # a pass of locality rows only (passes())
        pre = None
        if loc and reference is not None:               # the original model's argmax, read before any edit
            pre = (torch.tensor([t for key in batch["keys"] for t in reference[a, key]], device=runner.device),
                   index([r for r, key in enumerate(batch["keys"]) for _ in reference[a, key]], runner.device))
        elif loc:
            with torch.no_grad():                      # pre-edit logits of this very batch
                pre_logits, _, pre_rows = runner.scored_logits(batch)
            pre = (pre_logits.argmax(-1), pre_rows)
        with edited(prompts[a:b], [i for _, i in kinds[a:b]]) as routing, torch.no_grad():
            runner.on_part = getattr(routing, "select", None)      # a memory routes per row
            try:
                post = runner.scored_logits(batch)
            finally:
                runner.on_part = None
        for k, v in score_rows(pre, post, b - a).items():                # one read per pass
            s[k] += v.tolist()
    return per_record(s["acc"], s["agree"], s["nll"], kinds, n)


def per_record(acc: list[float], agree: list[float], nll: list[float], kinds: list[tuple[str, int]],
               n: int) -> list[dict]:
    """Each record's metrics from its rows' (rows_of) token accuracy, agreement with the pre-edit argmax
    and mean NLL per answer token. The probability scores compare two rows of one prompt: P(a) > P(b)
    is NLL(a) < NLL(b), a strict inequality (a tie is no success)."""
    of = {}                                            # (kind, record) -> its rows
    for b, key in enumerate(kinds):
        of.setdefault(key, []).append(b)
    results = []
    for i in range(n):
        gen, locs, edit_old, gen_old, loc_new, rs = (of.get((k, i), [])
                                                     for k in ("gen", "loc", "edit_old", "gen_old", "loc_new", "rs"))
        r = {"ES": acc[i], "EM": float(acc[i] == 1)}
        if gen:
            r["GS"] = statistics.fmean(acc[b] for b in gen)
            r["GEM"] = statistics.fmean(float(acc[b] == 1) for b in gen)
        if locs:
            r["LS"] = statistics.fmean(agree[b] for b in locs)
        if rs:
            r["RS"] = statistics.fmean(agree[b] for b in rs)
        if edit_old:                                   # P(new) > P(old) on q_e
            r["ES_p"] = float(nll[i] < nll[edit_old[0]])
        if gen_old:
            r["PS_p"] = statistics.fmean(float(nll[a] < nll[b]) for a, b in zip(gen, gen_old))
        if loc_new:                                    # P(true) > P(new) on q_l
            r["NS_p"] = statistics.fmean(float(nll[a] < nll[b]) for a, b in zip(locs, loc_new))
        results.append(r)
    return results


@torch.no_grad()
def references(runner: Runner, records: list[EditRequest], rows_per_pass: int = 512) -> dict:
    """The unedited model's argmax at the scored positions of every locality row, {(pass start, (prompt,
    answer)): list}, computed in the very passes score() will run on `records`: a neighbour that several
    records share is scored in several passes, and in bfloat16 each pass has argmaxes of its own."""
    prompts, targets, kinds = rows_of(records)
    out = {}
    for a, b in passes(kinds, len(records), rows_per_pass):
        if kinds[a][0] not in LOCAL:
            continue
        batch = runner.batch(prompts[a:b], targets[a:b])
        logits, _, rows = runner.scored_logits(batch)
        top, rows = logits.argmax(-1).tolist(), rows.tolist()
        for r, key in enumerate(batch["keys"]):
            out[a, key] = [t for t, row in zip(top, rows) if row == r]
    return out

def multihop(runner: Runner, edited: contextlib.AbstractContextManager, records: list[EditRequest],
             max_new_tokens: int = 12) -> dict:
    """MQuAKE: inside `edited` (one case's deltas applied, or a memory serving), greedy answers to its questions."""
    model, tokenizer = runner.model, runner.tokenizer
    prompts = [f"Q: {q} A:" for q in records[0].questions]
    with edited:
        new_tokens = greedy(model, tokenizer, prompts, max_new_tokens)
    texts = [t.split("\n")[0].lower() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    solved = any(contains(t, a) for t in texts for a in records[0].answers)    # whole words: "ar" is not "are"
    return {"MH": float(solved), "answers": texts}


# -----------------------------------------------------------------------------
# free generation

@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation, as token ids (left-padded together; generation stops at
    max_new_tokens, at the model's last position, or at the end-of-text token, which is dropped with
    what follows)."""
    tokenizer.padding_side = "left"                     # generation continues from the right end
    ids = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    tokenizer.padding_side = "right"
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions:
        max_new_tokens = max(1, min(max_new_tokens, positions - ids["input_ids"].shape[1]))
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    rows = out[:, ids["input_ids"].shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    return [row[:row.index(eos)] if eos in row else row for row in rows]


def ngram_entropy(text: str) -> float:
    """ROME's fluency of one text: the mean of (2/3)·H_2 and (4/3)·H_3, H_n the entropy in bits of the
    frequencies of its word n-grams (words: runs of letters and digits, or one punctuation mark)."""
    words = re.findall(r"\w+|[^\w\s]", text)
    entropies = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        counts = torch.tensor([grams.count(g) for g in dict.fromkeys(grams)], dtype=torch.float64)
        p = counts / counts.sum() if len(counts) else counts
        entropies.append(weight * float(-(p * p.log2()).sum()))
    return sum(entropies) / 2


class Continuations:
    """The unedited model's greedy continuations, by prompt batch: they are the same for every editor run
    on the same records in the same batches, so a run takes those an earlier one kept in `path`
    (evaluate.py --cache-dir; the file named by the whole model's fingerprint) and adds its own."""
    def __init__(self, path: str | None = None):
        self.path, self.kept = path, {}
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    self.kept = json.load(f)
            except ValueError:                          # cut short: a cache, rebuilt
                os.replace(path, path + ".damaged")
                print(f"note: {path} could not be read; moved to {path}.damaged, the continuations are made afresh")
        self.new = 0

    @classmethod
    def kept_in(cls, folder: str | None, runner: Runner) -> "Continuations":
        """Those of runner's model kept in `folder` (--cache-dir); None: made for this run alone."""
        return cls(os.path.join(folder, f"continuations-{runner.fingerprint([runner.model])}.json") if folder else None)

    def __call__(self, model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        key = hashlib.sha1(json.dumps([prompts, max_new_tokens]).encode()).hexdigest()
        if key not in self.kept:
            self.kept[key], self.new = greedy(model, tokenizer, prompts, max_new_tokens), self.new + 1
        return self.kept[key]

    def save(self) -> None:
        """Add what this run made to `path` (atomically; a run writing at once may lose the other's)."""
        if self.path and self.new:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            on_disk = Continuations(self.path).kept
            write_json(self.path, on_disk | self.kept)
            self.new = 0


def generation(runner: Runner, edited: Callable, records: list[EditRequest], extra: int = 3, fluent: int = 50,
               unedited: Continuations | None = None, chat: bool = False) -> list[dict]:
    """Per record, the free-generation scores (the docstring's gen_ES, gen_GS, gen_LS, fluency): the
    unedited model's continuations first (from `unedited` where it has them), then the same prompts in
    the same batches inside `edited(their records)` (a context). chat: each prompt asked as a user's
    message in the chat template (data.chat_text); the reply is read as far as the prompt's length in
    tokens beyond the cap, room for it to say the question again before the answer."""
    model, tok, unedited = runner.model, runner.tokenizer, unedited or Continuations()
    asked = [(i, kind, q, r.target) for i, r in enumerate(records)
             for kind, q in [("gen_ES", r.prompt)] + [("gen_GS", g) for g, _ in r.generality]]
    kept = [(i, "gen_LS", q, a) for i, r in enumerate(records) for q, a in r.locality]
    length = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    cap = [length(" " + a) + extra + (length(q) if chat else 0) for _, _, q, a in asked + kept]
    n_new = max(cap, default=1)
    asked_texts, kept_texts = ([chat_text(tok, q) if chat else q for _, _, q, _ in pairs] for pairs in (asked, kept))
    pre_kept = unedited(model, tok, kept_texts, n_new) if kept else []
    pre_fluent = unedited(model, tok, asked_texts, fluent)
    with edited([i for i, *_ in asked]):
        post_asked = greedy(model, tok, asked_texts, n_new) if asked else []
        post_fluent = greedy(model, tok, asked_texts, fluent)
    with edited([i for i, *_ in kept]):
        post_kept = greedy(model, tok, kept_texts, n_new) if kept else []
    results = [{"gen_ES": [], "gen_GS": [], "gen_LS": [], "fluency": [], "fluency_pre": [], "gen_new": [],
                "gen_old": []} for _ in records]
    for j, ((i, kind, _, a), ids) in enumerate(zip(asked, post_asked)):
        fluent_text = tok.decode(post_fluent[j])
        results[i][kind].append(float(contains(tok.decode(ids[:cap[j]]), a)))
        results[i]["fluency"].append(ngram_entropy(fluent_text))
        results[i]["gen_new"].append(float(contains(fluent_text, a)))
        if records[i].old_target:
            results[i]["gen_old"].append(float(contains(fluent_text, records[i].old_target)))
        results[i]["fluency_pre"].append(ngram_entropy(tok.decode(pre_fluent[j])))
    for j, ((i, *_), pre, post) in enumerate(zip(kept, pre_kept, post_kept)):
        c = cap[len(asked) + j]
        results[i]["gen_LS"].append(float(pre[:c] == post[:c]))
    out = []
    for r in results:
        scores = {k: statistics.fmean(v) for k, v in r.items() if v}
        scores["fluency_drop"] = scores.pop("fluency_pre") - scores["fluency"]
        out.append(scores)
    return out


# -----------------------------------------------------------------------------
# the printed table

def table(rows: list[tuple[str, dict]]) -> str:
    cols = [c for c in METRICS + ["MH"] if any(c in r for _, r in rows)]
    lines = ["| run | " + " | ".join(cols) + " | ms/edit | peak MiB |", "|---" * (len(cols) + 3) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c in r else "" for c in cols)
                     + " | " + " | ".join(f"{r[c]:.0f}" if c in r else "" for c in ("ms_per_edit", "peak_mib")) + " |")
    return "\n".join(lines)


def peak_mib(device: torch.device | str) -> float:
    """Peak memory of this process so far, MiB: the device's allocations on CUDA, resident memory on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource                                          # POSIX only
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB

"""
The records one training step draws (train.py; METHOD.md §3): how many edits (draw_n), which edits
and, per edit, which other records join its locality term (draw: of the same relation, or with the
edit's old answer as their true one: --loc-from), and which of their prompts are asked in the chat
template (asked_in_chat: --chat, --chat-rows). All from one seeded random.Random, in that order;
train.py saves its state with each checkpoint, so a resumed run draws what the uninterrupted one
would.

    python -m pytest -q tests/test_many.py tests/test_data.py tests/test_pipeline.py -k "draw or chat"
"""
import math
import random
from dataclasses import replace

from data import EditRequest, chat_text

LOC_KEYS = {"relation": lambda r: r.relation,      # the edit's prompt with another subject
            "answer": lambda r: r.old_target,    # another subject whose true answer is the edit's old one
            "any": lambda r: None}


def draw(sampler: random.Random, records: list[EditRequest], n: int, extra: int, loc_from: str = "any",
         groups: dict | None = None) -> tuple[list[EditRequest], list[EditRequest]]:
    """n edits and, per edit, `extra` other records for the IL term: of the edit's group under
    LOC_KEYS[loc_from] (groups: key -> record indices) when it has enough, else any."""
    key = LOC_KEYS[loc_from]
    chosen = sampler.sample(range(len(records)), n)
    others = []
    for i in chosen:
        pool = [j for j in (groups or {}).get(key(records[i]), [])
                if j not in chosen and records[j].subject != records[i].subject]
        picks = sampler.sample(pool, min(extra, len(pool)))
        while len(picks) < extra:
            j = sampler.randrange(len(records))
            if j not in chosen and j not in picks:
                picks.append(j)
        others += picks
    return [records[i] for i in chosen], [records[j] for j in others]


def asked_in_chat(sampler: random.Random, tokenizer, share: float, batch: list[EditRequest],
                  others: list[EditRequest], locality: bool = True) -> tuple[list[EditRequest], list[EditRequest]]:
    """draw's records with each generality and (locality: also) locality prompt, with probability
    `share`, asked as a user's message in the chat template, the reply begun by saying the question
    again and the answer to follow: the shape an instruct model's replies take ("The mother tongue of
    Danielle Darrieux is" -> "The mother tongue of Danielle Darrieux is French."; train.py --chat).
    The edit prompt, which the hypernetwork reads, stays plain; so do the answers."""
    ask = lambda q: chat_text(tokenizer, q) + q if sampler.random() < share else q
    loc = ask if locality else lambda q: q
    return ([replace(r, generality=[(ask(q), a) for q, a in r.generality],
                     locality=[(loc(q), a) for q, a in r.locality]) for r in batch],
            [replace(o, prompt=loc(o.prompt)) for o in others])     # their prompts join the IL term


def draw_n(sampler: random.Random, most: int, how: str, p_single: float = 0.0) -> int:
    """A step's number of edits: 1 with probability p_single, else uniform on 1..most or log-uniform
    (P(n) ∝ log((n+1)/n)). p_single 0 draws nothing for it: a run's stream of draws is as before."""
    if p_single and sampler.random() < p_single:
        return 1
    if how == "uniform":
        return sampler.randint(1, most)
    return min(most, int(math.exp(sampler.uniform(0, math.log(most + 1)))))


def loc_groups(records: list[EditRequest], loc_from: str) -> dict:
    """key -> indices of the records sharing it, for draw (records without a key are in none)."""
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault(LOC_KEYS[loc_from](r), []).append(i)
    groups.pop(None, None)
    return groups

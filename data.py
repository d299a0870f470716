"""
Data: benchmark files -> edit requests -> token ids with teacher-forcing labels (METHOD.md §1, §4).
The records a training step draws from them: draws.py.

    python data.py --data counterfact --data-dir ../shared/data   # counts per split + one example
    python data.py --data zsre        # MEND's zsRE; downloads into data/ if missing
    python data.py --data mquake      # MQuAKE-hard (also: mquake-cf3k, mquake-t)
    python data.py --data uniedit     # UniEdit, from the Hugging Face hub

Every record becomes one EditRequest: the edit prompt q_e and new answer o_e, generality prompts
(q_g, o_g) and locality prompts (q_l, their answer), and the old answer where the data has one;
CounterFact's eval records also get other questions of their subject (RS: `other_questions`).
A MQuAKE case becomes one request per requested rewrite, all sharing the case's id and its
multi-hop questions, so that evaluation applies them as one batch.

Texts are cut for teacher forcing: a prompt keeps its last 128 tokens (with the answer), an answer
its first MAX_ANSWER = 32 (CounterFact's are 1-5, zsRE's up to ~15).

zsRE: MEND's splits (train ~163k records, the paper's training data; eval 19,086), downloaded if no
zsRE file is there; else a 1,000-record subset of the train file, 20% of it held out as eval by a
seeded shuffle (random.Random(0), the first len // 5). Files, downloads, field checks: datafiles.py.
"""
import argparse
import os
import random
from dataclasses import dataclass, field

import torch

from datafiles import DataError, ensure, ensure_uniedit, need, records_of, strings, text

MAX_ANSWER = 32  # tokens kept of an answer (see the docstring)
DATASETS = ["counterfact", "zsre", "mquake", "mquake-cf3k", "mquake-t", "uniedit"]


@dataclass
class EditRequest:
    prompt: str                                                      # q_e
    target: str                                                      # o_e, the new answer
    generality: list[tuple[str, str]] = field(default_factory=list)  # (q_g, o_g): rephrases
    locality: list[tuple[str, str]] = field(default_factory=list)    # (q_l, answer): unrelated
    old_target: str | None = None                                    # answer before the edit
    case_id: str = ""                                                # MQuAKE: edits of one case
    questions: list[str] = field(default_factory=list)               # MQuAKE: multi-hop questions
    answers: list[str] = field(default_factory=list)                 # MQuAKE: new answer + aliases
    subject: str = ""                                                # whom the fact is about, if known
    others: list[tuple[str, str]] = field(default_factory=list)      # (q_s, answer): other questions of it

    @property
    def relation(self) -> str | None:
        """The prompt with its subject as {}: records sharing it ask the same question of others."""
        return self.prompt.replace(self.subject, "{}") if self.subject and self.subject in self.prompt else None


def same_prompt(prompt: str) -> str:
    """What makes two prompts one question: the same words, as written, whatever the spacing."""
    return " ".join(prompt.split())


# -----------------------------------------------------------------------------
# one loader per benchmark: file -> list[EditRequest]

def read_counterfact(path: str) -> list[EditRequest | None]:
    def build(r, w, i):
        target = text(r, "target_new", w)
        return EditRequest(text(r, "prompt", w), target, [(text(r, "rephrase_prompt", w), target)],
                           [(text(r, "locality_prompt", w), text(r, "locality_ground_truth", w))],
                           old_target=text(r, "ground_truth", w, optional=True), case_id=str(r.get("case_id", i)),
                           subject=text(r, "subject", w, optional=True) or "")
    return records_of(path, build)


def read_zsre(path: str) -> list[EditRequest | None]:
    def build(r, w, i):
        target, answers = text(r, "alt", w), strings(r, "answers", w)
        return EditRequest(text(r, "src", w), target, [(text(r, "rephrase", w), target)],
                           [(text(r, "loc", w), text(r, "loc_ans", w))],
                           old_target=answers[0] if answers else None, case_id=str(i),
                           subject=text(r, "subject", w, optional=True) or "")
    return records_of(path, build)


def read_mquake(path: str) -> list[list[EditRequest] | None]:
    """Per case, its requests (one per requested rewrite); a case with an empty text is left out whole."""
    def build(case, w, i):
        case_id = str(case["case_id"] if isinstance(case, dict) and "case_id" in case else i)
        questions, answers = strings(case, "questions", w), [text(case, "new_answer", w)]
        answers += strings(case, "new_answer_alias", w)
        out = []
        for j, rw in enumerate(need(case, "requested_rewrite", w, list)):
            wj = f"{w} requested_rewrite[{j}]"
            target = text(need(rw, "target_new", wj, dict), "str", wj + ".target_new")
            subject, template = text(rw, "subject", wj), text(rw, "prompt", wj)
            try:
                prompt = template.format(subject) if "{}" in template else None
            except (IndexError, KeyError, ValueError):
                prompt = None
            if prompt is None:
                raise DataError(f"{wj}: field 'prompt' must be a template with one {{}} for the subject, "
                                f"not {template!r}")
            question = text(rw, "question", wj, optional=True)
            out.append(EditRequest(prompt, target, [(question, target)] if question else [], [],
                                   text(need(rw, "target_true", wj, dict), "str", wj + ".target_true"),
                                   case_id, questions, answers, subject))
        return out
    return records_of(path, build)


def read_uniedit(folder: str) -> list[EditRequest | None]:
    """One folder of UniEdit (train/ or test/): {discipline}.json, each {id: {edit, generality, locality}}."""
    out = []
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".json")):
        def build(item, w, i):
            key, r = item
            edit = need(r, "edit", w)
            pairs = {part: [(text(g, "prompt", f"{w} {part}"), text(g, "target", f"{w} {part}"))
                            for g in need(r, part, w).values()] for part in ("generality", "locality")}
            return EditRequest(text(edit, "prompt", w + " edit"), text(edit, "target", w + " edit"),
                               pairs["generality"], pairs["locality"], case_id=f"{name[:-5]}-{key}")
        out += records_of(os.path.join(folder, name), build)
    return out


def load_uniedit(data_dir: str) -> dict[str, list[EditRequest]]:
    root = ensure_uniedit(data_dir)
    return {"train": read_uniedit(os.path.join(root, "train")), "eval": read_uniedit(os.path.join(root, "test"))}


def load_zsre(data_dir: str) -> dict[str, list[EditRequest]]:
    full, subset, official_eval = (os.path.join(data_dir, "zsre", f) for f in
                                   ("zsre_mend_train.json", "zsre_mend_train-1k.json", "zsre_mend_eval.json"))
    if not (os.path.exists(full) or os.path.exists(subset)):   # nothing yet: MEND's splits, else the subset
        try:
            for rel in ("zsre/zsre_mend_train.json", "zsre/zsre_mend_eval.json"):   # the eval file only with the train
                ensure(data_dir, rel)
        except DataError as err:
            print(f"zsRE: MEND's {'eval' if os.path.exists(full) else 'train'} split is not downloadable "
                  f"({str(err).splitlines()[0]}); "
                  + ("20% of the train split is held out instead" if os.path.exists(full) else
                  f"using the 1,000-record subset. For the paper's data, put zsre_mend_train.json and "
                  f"zsre_mend_eval.json in {os.path.dirname(full)}/"))
            if not os.path.exists(full):
                ensure(data_dir, "zsre/zsre_mend_train-1k.json")
    train = read_zsre(full if os.path.exists(full) else subset)
    if os.path.exists(official_eval):
        return {"train": train, "eval": read_zsre(official_eval)}
    order = list(range(len(train)))
    random.Random(0).shuffle(order)  # the documented seeded split: 20% held out
    n_eval = len(train) // 5
    return {"train": [train[i] for i in sorted(order[n_eval:])], "eval": [train[i] for i in sorted(order[:n_eval])]}


def load(name: str, data_dir: str = "data", split: str | None = None) -> dict[str, list[EditRequest]]:
    """{split: [EditRequest]} for one benchmark; splits are 'train' and 'eval' (MQuAKE: 'eval' only).
    split: read (and download) only that one where the benchmark keeps it in its own file.
    Records with an empty prompt or answer are left out (with a note), after the split."""
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is a file; give the folder that holds (or receives) the benchmarks")
    splits = _load(name, data_dir, split)
    return {k: [r for r in v if r is not None] for k, v in splits.items()}


def _load(name: str, data_dir: str, split: str | None) -> dict[str, list]:
    if name == "counterfact":
        files = {"train": "counterfact/counterfact-train.json", "eval": "counterfact/counterfact-edit.json"}
        wanted = [split] if split in files else list(files)
        splits = {k: read_counterfact(path) for k, path in zip(wanted, ensure(data_dir, *(files[k] for k in wanted)))}
        train = os.path.join(data_dir, files["train"])
        if "eval" in splits and ("train" in splits or os.path.exists(train)):     # RS's questions: from train
            other_questions(splits["eval"], splits.get("train") or read_counterfact(train))
        elif "eval" in splits:
            print(f"note: no {train}: RS (other questions of an edited subject, from the train split) is not measured")
        return splits
    if name == "zsre":
        return load_zsre(data_dir)
    if name.startswith("mquake"):
        file = {"mquake": "MQuAKE-hard", "mquake-cf3k": "MQuAKE-CF-3k", "mquake-t": "MQuAKE-T"}.get(name)
        if file:
            cases = read_mquake(ensure(data_dir, f"mquake/{file}.json")[0])
            return {"eval": [r for case in cases if case for r in case]}
    if name == "uniedit":
        return load_uniedit(data_dir)
    raise DataError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")


def relations(records: list[EditRequest]) -> dict[str, int]:
    """Which of the records' prompt templates (EditRequest.relation) ask one question: CounterFact asks a
    record's neighbour in another template of the record's relation, so templates joined through the
    neighbours fall into its relations ("{} died in" with "{} passed away at", not with "{} worked in").
    -> template: its group's number."""
    parent = {t: t for t in sorted({r.relation for r in records} - {None})}
    def root(t):
        while parent[t] != t:
            t = parent[t]
        return t
    def fills(t, q):                                     # q is template t with some subject
        head, tail = t.split("{}", 1)
        return q.startswith(head) and q.endswith(tail) and len(q) > len(head) + len(tail)
    ends = {}                                            # a template's last 3 characters (or fewer, all after {})
    for t in parent:
        ends.setdefault(t.split("{}", 1)[1][-3:], []).append(t)
    for r in records:
        for q, _ in (r.locality if r.relation else []):
            fits = [t for n in range(4) for t in ends.get(q[len(q) - n:], []) if fills(t, q)]
            if fits:                                     # the neighbour's template: the longest that fits
                parent[root(max(fits, key=len))] = root(r.relation)
    roots = {}
    return {t: roots.setdefault(root(t), len(roots)) for t in parent}


def other_questions(records: list[EditRequest | None], pool: list[EditRequest | None]) -> None:
    """Fills each record's `others` (RS, metrics.py): the prompts of `pool` about its subject (the same
    name, case aside) that ask of it another relation than its own (`relations`), with their true
    answers, less any prompt one of these records asks."""
    known = [r for r in records + pool if r]
    relation, asked, of = relations(known), {same_prompt(r.prompt) for r in records if r}, {}
    for r in records:
        if r and r.relation:
            of.setdefault(r.subject.lower(), []).append(r)
    for q in pool:
        if not (q and q.relation and q.old_target) or same_prompt(q.prompt) in asked:
            continue
        for r in of.get(q.subject.lower(), []):
            if relation[r.relation] != relation[q.relation]:
                r.others.append((q.prompt, q.old_target))


def split_val(records: list[EditRequest], val_size: int, seed: int = 0) -> tuple[list[EditRequest], list[EditRequest]]:
    """(train, val): `val_size` records held out of a train split by a seeded shuffle; a held-out record
    whose edit (prompt and answer) the train part also holds is left out of val (with a note): the
    validation would judge an editor on what it trained on."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    train, val = [records[i] for i in order[val_size:]], [records[i] for i in order[:val_size]]
    trained = {(r.prompt, r.target) for r in train}
    copies = [r for r in val if (r.prompt, r.target) in trained]
    if copies:
        print(f"note: {len(copies)} of the {len(val)} validation records are left out: the train split holds the "
              f"same edit (e.g. {copies[0].prompt!r} -> {copies[0].target!r})")
    return train, [r for r in val if (r.prompt, r.target) not in trained]


# -----------------------------------------------------------------------------
# tokenisation for teacher forcing

def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts BOS in front (Llama-2/3 do; GPT-2, SmolLM2 and Qwen do not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def no_chat(tokenizer, model: str) -> str | None:
    """Why --chat cannot ask this model, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return f"--chat: the tokenizer of {model} has no chat template; leave --chat out"
    return None


def chat_text(tokenizer, prompt: str) -> str:
    """prompt as a user's message in the tokenizer's chat template (its default system prompt, if any,
    before it), the assistant's reply to follow: how an instruct model is asked (evaluate.py --chat)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def tokenize(tokenizer, prompts: list[str], targets: list[str], bos: bool | None = None,
             max_len: int = 128, joins: list[str] | None = None) -> list[tuple[list[int], int]]:
    """Per text, the token ids of prompt + " " + target and where the answer starts (host lists).
    joins: per text, what goes between prompt and target instead of the space ("" for a text going
    on as written). bos: put the BOS token first (None: as the tokenizer does by default). The same
    code serves GPT-2 and Llama tokenizers: the prompt is tokenised alone, the answer is what the
    whole text adds after it (or join + target tokenised alone where the boundary merges). An empty
    target gives a prompt-only row (for generation). Over-long prompts lose their left end."""
    bos = adds_bos(tokenizer) if bos is None else bos
    head = [tokenizer.bos_token_id] if bos else []
    joins = joins or [" "] * len(prompts)
    wholes = [p + j + t if t else p for p, j, t in zip(prompts, joins, targets)]
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(wholes, add_special_tokens=False)["input_ids"]
    rows = []
    for p, w, j, t in zip(prompt_ids, whole_ids, joins, targets):
        alone = w[:len(p)] == p                              # the prompt's tokens begin the whole text's
        answer = (w[len(p):] if alone else tokenizer(j + t, add_special_tokens=False)["input_ids"])[:MAX_ANSWER]
        p = (head + p)[-(max_len - len(answer)):]
        rows.append((p + answer, len(p)))
    return rows


def pad(rows: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """tokenize's rows -> input_ids, attention_mask, labels (B, T), right-padded; labels are the
    answer ids, -100 elsewhere. Host tensors, built from whole lists (one tensor each)."""
    T = max(len(ids) for ids, _ in rows)
    return {"input_ids": torch.tensor([ids + [pad_id] * (T - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([[-100] * start + ids[start:] + [-100] * (T - len(ids)) for ids, start in rows])}


def encode(tokenizer, prompts: list[str], targets: list[str], bos: bool | None = None,
           max_len: int = 128, joins: list[str] | None = None) -> dict[str, torch.Tensor]:
    """tokenize, then pad: (B, T) input_ids, attention_mask, labels (the answer ids, -100 elsewhere)."""
    return pad(tokenize(tokenizer, prompts, targets, bos, max_len, joins), tokenizer.pad_token_id)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="counterfact", choices=DATASETS, help="benchmark to load")
    parser.add_argument("--data-dir", default="data", help="folder holding (or receiving) the benchmark files")
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer shows the example")
    parser.add_argument("--index", type=int, default=0, help="which record of the first split to show")
    args = parser.parse_args()
    from model import ModelError, load_tokenizer
    try:
        splits, tokenizer = load(args.data, args.data_dir), load_tokenizer(args.model)
    except (DataError, ModelError) as err:
        raise SystemExit(f"error: {err}")
    for split, records in splits.items():
        cases = len({r.case_id for r in records})
        print(f"{args.data} {split}: {len(records)} edit requests" + (f" in {cases} cases" * (cases != len(records))))
    r = next(iter(splits.values()))[args.index]
    print("\nrecord:", r)
    for kind, q, a in [("edit", r.prompt, r.target)] + [("generality", *p) for p in r.generality] + \
            [("locality", *p) for p in r.locality]:
        ids, start = tokenize(tokenizer, [q], [a])[0]
        print(f"\n{kind}: {len(ids)} tokens, labels on {len(ids) - start}")
        print("  " + " ".join(repr(tokenizer.decode([t])) + "*" * (i >= start) for i, t in enumerate(ids)))
    print("\n(* = a label position: the loss is taken there; -100 elsewhere)")

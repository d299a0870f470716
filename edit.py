"""
Edit your own facts with a trained editor: see what the model says before and after, keep the result.

    python edit.py --ckpt out/ibke/best.pt "The Eiffel Tower is in" "Rome"
    python edit.py --ckpt out/ibke/best.pt "The Eiffel Tower is in" "Rome" \\
        --ask "The Eiffel Tower is located in the city of" --save edited/
    python edit.py --ckpt out/ibke/best.pt --facts facts.jsonl --save edited/
    python -c "import transformers as t; print(t.pipeline('text-generation', 'edited/')('The Eiffel Tower is in'))"
    python edit.py --ckpt out/ibke/best.pt "The Eiffel Tower is in" "Rome" --subject "Eiffel Tower" --memory facts.mem
                                                                  # kept in an edit memory
    python edit.py --ckpt out/ibke/best.pt --facts facts.jsonl --memory facts.mem   # thousands: ~18 a second
    python edit.py --ckpt out/ibke/best.pt "The Eiffel Tower is in" "Rome" --memory facts.mem --chat \\
        --ask "Where is the Eiffel Tower?"                        # the replies of an instruct model, asked in a chat

A fact file is a JSON list or JSON lines of {"prompt", "target"}, each with optional "subject",
"rephrase" and "locality" (a prompt or a list of them): rephrases should take the new answer,
locality prompts should not change. For the first --show facts' prompts, rephrases and locality
prompts, and each --ask prompt, the model's greedy continuation before and after the edit is printed
side by side (--chat: the replies to each asked in the model's chat template), with P(target) before and
after on the facts' prompts and rephrases. All facts are written as one
edit (the editor's own way of combining a batch). --save DIR writes the edited model, W + ΔW merged,
as a Hugging Face folder that transformers loads with no code from here, and DIR/edits.json.
A fact's subject (--subject, or "subject" in the file: whom the fact is about, as the prompt writes it)
lets an edit memory serve a question only when the question names it (memory.py: the gate); not given,
it is guessed from the prompt (gate.guess_subject: its longest capitalised name), and "" stores none.
With --memory, "after" is what the memory serves: a fact's edit steps aside once its answer is written.
A fact with the prompt of one in the memory replaces it (a correction: only the newest is served); a
fact stored already as given is not added again, so the same command finishes a run cut short.
"""
import argparse
import json
import os
import sys
import time

from tqdm import tqdm

from checkpoint import CheckpointError
from data import chat_text, no_chat, same_prompt
from rundir import RunLock
from editor import Editor, Fact, as_fact
from gate import Subjects, guess_subject, words
from key import MemoryFileError, load_key
from memory import CHUNK, EditMemory, rank_or_auto, standing
from model import ModelError, add_device_args


def read_facts(path: str) -> list[Fact]:
    """The facts in a JSON list or JSON-lines file; one line naming the problem (and its line) if not."""
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"error: --facts {path}: cannot read it ({getattr(err, 'strerror', None) or err})")
    try:
        items = json.loads(text)
        items = items if isinstance(items, list) else [items]
        where = [f"item {i}" for i in range(len(items))]
    except ValueError:
        items, where = [], []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except ValueError as err:
                    raise SystemExit(f"error: --facts {path} line {i} is not JSON ({err.msg}); one "
                                     f'{{"prompt": ..., "target": ...}} per line, or a JSON list') from None
                where.append(f"line {i}")
    facts = []
    for item, at in zip(items, where):
        problem = check_fact(item)
        if problem:
            raise SystemExit(f"error: --facts {path} {at}: {problem}")
        facts.append(as_fact({"subject": None, **item}))                # None: not given
    if not facts:
        raise SystemExit(f"error: --facts {path} holds no facts")
    return facts


def check_fact(item) -> str | None:
    """What is wrong with one fact (a dict), or None."""
    if not isinstance(item, dict):
        return f'a fact is {{"prompt": ..., "target": ...}}, not {type(item).__name__}'
    for key in ("prompt", "target"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            return f'"{key}" must be a non-empty string'
    subject = item.get("subject")
    if subject is not None and (not isinstance(subject, str) or words(subject)
                                and not set(Subjects([subject]).named(item["prompt"]))):
        return (f'"subject" must be a string that the prompt names as written, as a name of its own ({subject!r} '
                f'is not one in {item["prompt"]!r}; "Paris" is not in "Paris Hilton")')
    for key in ("rephrase", "locality"):
        value = item.get(key)
        prompts = isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)
        if value is not None and not prompts:
            return f'"{key}" must be a prompt or a list of prompts'
    return None


def show(editor: Editor, facts: list[Fact], asks: list[str], deltas: dict | None, max_new_tokens: int,
         limit: int, memory=None, chat: bool = False) -> None:
    """Before and after, side by side, for the first `limit` facts and the asks: continuations of every
    prompt (chat: the replies to each asked as a user's message in the chat template); P(target) where a
    target applies. After: with the edit applied (deltas), or through the memory (each prompt routed by its
    own key)."""
    if len(facts) > limit:
        print(f"before and after for the first {limit} of the {len(facts)} facts (--show N for more)")
        facts = facts[:limit]
    rows = [("fact", f.prompt,
             f.target) for f in facts] + [("rephrase", q, f.target) for f in facts for q in f.rephrase]
    rows += [("locality", q, None) for f in facts for q in f.locality] + [("ask", q, None) for q in asks]
    if not rows:
        return
    print()
    prompts = [chat_text(editor.tokenizer, p) if chat else p for _, p, _ in rows]
    scored = [(p, t) for _, p, t in rows if t is not None]
    before = editor.generate(prompts, max_new_tokens)
    p_before = editor.probability(*zip(*scored)) if scored else []
    with memory.serving() if memory else editor.applied(deltas):
        after = editor.generate(prompts, max_new_tokens)
    edited = memory.routed if memory else (lambda q: editor.applied(deltas))
    p_after = editor.probability(*zip(*scored), edited=edited) if scored else []
    probs = iter(zip(p_before, p_after))
    for (kind, prompt, target), b, a in zip(rows, before, after):
        print(f"[{kind}] {prompt}")
        print(f"    before: {b.strip()!r}")
        print(f"    after:  {a.strip()!r}")
        if target is not None:
            pb, pa = next(probs)
            print(f"    P({target!r}): {pb:.3f} -> {pa:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", help="the fact's prompt, e.g. \"The Eiffel Tower is in\"")
    parser.add_argument("target", nargs="?", help="its new answer, e.g. \"Rome\"")
    parser.add_argument("--subject", default=None, help="whom PROMPT is about, as it writes it (\"Eiffel Tower\"): "
                        "a --memory then serves a question only when the question names it (default: guessed from "
                        "PROMPT; \"\" for none)")
    parser.add_argument("--ckpt", required=True, help="an editor checkpoint of train.py (best.pt)")
    parser.add_argument("--facts", default=None,
                        help="a JSON list or JSON-lines file of facts (see above), instead of or besides PROMPT TARGET")
    parser.add_argument("--ask", action="append", default=[],
                        help="another prompt to show before and after (repeatable)")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="write the edited model (W + ΔW) and edits.json to DIR (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="--save into a non-empty DIR, replacing it")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens of each greedy continuation (default: 8; 32 with --chat)")
    parser.add_argument("--chat", action="store_true",
                        help="show the replies to each prompt asked as a user's message in the model's chat template "
                             "(an instruct model's way; P(target) stays on the prompt itself)")
    parser.add_argument("--show", type=int, default=10, metavar="N",
                        help="show before and after for the first N facts (and every --ask)")
    parser.add_argument("--memory", default=None, metavar="FILE",
                        help="add the facts to this lifelong edit memory (memory.py; created if new, else extended) "
                             "instead of merging them: each fact edited alone, applied only to the prompts it concerns")
    parser.add_argument("--key", default=None,
                        help="--memory, a new file: the routing key (default: key.pt beside --ckpt; `python key.py "
                             "learn`)")
    parser.add_argument("--rank", type=rank_or_auto, default="auto",
                        help="--memory, a new file: rank at which each fact's update is stored (auto: per fact, the "
                             "smallest that still writes it)")
    parser.add_argument("--model", default=None,
                        help="override the checkpoint's base model (it must have the same edited modules)")
    add_device_args(parser, dtype_default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.max_new_tokens is None:
        args.max_new_tokens = 32 if args.chat else 8
    if args.memory and args.save:
        raise SystemExit("error: --memory keeps the facts in FILE, unmerged; --save writes a merged model: give one of "
                         "them")
    if (args.prompt is None) != (args.target is None):
        raise SystemExit('error: give a prompt and its target ("The Eiffel Tower is in" "Rome"), or --facts FILE')
    facts = read_facts(args.facts) if args.facts else []
    if args.prompt is not None:
        problem = check_fact({"prompt": args.prompt, "target": args.target, "subject": args.subject})
        if problem:
            raise SystemExit("error: " + problem.replace('"subject"', "--subject"))
        facts.insert(0, Fact(args.prompt, args.target, args.subject))
    if not facts:
        raise SystemExit('error: nothing to edit: give a prompt and its target, or --facts FILE')
    for flag, value, least in (("--max-new-tokens", args.max_new_tokens, 1), ("--rank", args.rank, 1),
                               ("--show", args.show, 0)):
        if value != "auto" and value < least:
            raise SystemExit(f"error: {flag} {value}: give at least {least}")
    if args.save and os.path.isdir(args.save) and os.listdir(args.save) and not args.overwrite:
        raise SystemExit(f"error: --save {args.save} is not empty; give an empty or new folder, or --overwrite")
    try:
        editor = Editor.load(args.ckpt, args.device, args.model, args.dtype)
    except (CheckpointError, ModelError) as err:
        raise SystemExit(f"error: {err}")
    problem = args.chat and no_chat(editor.tokenizer, args.model or editor.ckpt["model"])
    if problem:
        raise SystemExit(f"error: {problem}")
    guessed = [f for f in facts if f.subject is None and args.memory]
    for f in facts:
        if f.subject is None:                                          # a merged edit has no use for one
            f.subject = guess_subject(f.prompt) if args.memory else ""
    if guessed:
        shown = ", ".join(f"{f.subject!r}" for f in guessed[:5]) + (", …" if len(guessed) > 5 else "")
        print(f"subject guessed from the prompt for {len(guessed)} fact(s): {shown} (set one with --subject or "
              f'"subject" in --facts; "" for none)')
    if args.memory:
        with RunLock(args.memory, f"--memory {args.memory}"):          # a second run into it stops at once
            try:
                memory = open_memory(args, editor)
            except MemoryFileError as err:
                raise SystemExit(f"error: {err}")
            first, replaced = len(memory), set(memory.replaced())
            add_saving(memory, facts, args.memory)
        r = memory.ranks[first:len(memory)].tolist()
        ranks = ", ".join(map(str, r)) if len(r) <= 10 else f"{min(r)}–{max(r)} (mean {sum(r) / len(r):.1f})"
        print(f"{len(r)} fact(s) added to {args.memory} ({len(memory)} in all)" + (f", at rank {ranks}" if r else "")
              + f", in {time.perf_counter() - start:.1f}s (from the command's start)")
        if len(facts) > len(r):
            print(f"{len(facts) - len(r)} fact(s) not added: served already as given (prompt, target, subject), or "
                  f"a later fact given has the same prompt")
        now = [memory.facts[i] for i in memory.replaced() if i not in replaced]
        if now:
            shown = ", ".join(f"{f['prompt']!r} -> {f['target']!r}" for f in now[:5]) + (", …" if len(now) > 5 else "")
            print(f"{len(now)} stored fact(s) replaced by a new one with the same prompt (no longer served): {shown}")
        show(editor, facts, args.ask, None, args.max_new_tokens, args.show, memory, args.chat)
        return
    if len(facts) > editor.trained_n:
        print(f"note: {len(facts)} facts in one edit; this editor was trained on up to {editor.trained_n} at once, "
              f"so expect weaker edits (for many facts, keep them in an edit memory: --memory FILE)")
    deltas = editor.edit(facts)
    print(f"{len(facts)} fact(s) edited in {time.perf_counter() - start:.1f}s (from the command's start)")
    show(editor, facts, args.ask, deltas, args.max_new_tokens, args.show, chat=args.chat)
    if args.save:
        try:
            editor.save(args.save, deltas, facts, overwrite=args.overwrite)
        except (ValueError, OSError) as err:
            raise SystemExit(f"error: {err}")
        print(f"\nsaved the edited model to {args.save} (W + ΔW in {str(editor.model.dtype).split('.')[-1]}; "
              f"edits.json beside it)")


def add_saving(memory: EditMemory, facts: list[Fact], path: str) -> None:
    """Add the facts, CHUNK at a time, saving the file once it has grown by 500 facts or a quarter, and at
    the end; Ctrl-C keeps what is added. A fact the memory serves already as given (prompt, target, subject)
    is not added again (a run resumed), nor one a later fact of the list replaces."""
    def stored(f):
        i = memory.newest.get(same_prompt(f.prompt))
        return i is not None and (memory.facts[i]["target"], memory.facts[i]["subject"]) == (f.target, f.subject)
    new = [f for f, stands in zip(facts, standing([f.prompt for f in facts])) if stands and not stored(f)]
    saved = first = len(memory)
    try:
        with tqdm(total=len(new), unit="fact", desc="adding", disable=len(new) <= CHUNK) as bar:
            for i in range(0, len(new), CHUNK):
                memory.add(new[i:i + CHUNK])
                bar.update(len(new[i:i + CHUNK]))
                if len(memory) - saved >= max(500, saved // 4):
                    memory.save(path)
                    saved = len(memory)
    except KeyboardInterrupt:
        memory.save(path)
        raise SystemExit(f"interrupted: {len(memory) - first} of {len(new)} facts added to {path} and kept; the same "
                         f"command adds the rest (a fact stored already is not added again)") from None
    if len(memory) > saved:
        memory.save(path)


def open_memory(args: argparse.Namespace, editor: Editor) -> EditMemory:
    """--memory FILE as it stands (extended), or a new one with --key."""
    if os.path.exists(args.memory):
        return EditMemory.load(args.memory, editor)
    return EditMemory(editor, load_key(args.ckpt, args.key), args.rank)


if __name__ == "__main__":
    sys.exit(main())

"""
The lifelong protocol (METHOD.md §4, §7; evaluate.py --sequential): T edits in order, n at a time, each
batch kept on top of the earlier ones, merged into the weights or stored in an edit memory (memory.py),
then every edit measured again; retention of the first 100 along the way; a memory run saved as it
grows and resumed from its file.

    python evaluate.py --ckpt out/ibke/best.pt --sequential merge --limit 100   # each ΔW written into the weights
    python evaluate.py --ckpt out/ibke/best.pt --sequential memory --limit 10000 --memory out/ibke/cf.mem
    python -m pytest -q tests/test_memory.py -k sequential
"""
import argparse
import contextlib
import dataclasses
import os
import time
from typing import Callable

from tqdm import tqdm

from data import EditRequest
from editor import Editor, as_fact
from gate import guess_subject
from hooks import merge, restore
from key import MemoryFileError, load_key
from memory import EditMemory
from metrics import Continuations, generation, multihop, references, score, summarise
from runner import Runner


def sequential(args: argparse.Namespace, loaded: Editor, records: list[EditRequest], runner: Runner,
               editor: Callable, unedited: Continuations) -> dict:
    """The lifelong protocol: the T records' edits in order, n at a time, each batch kept on top of all
    earlier ones (merge: its ΔW, computed on the model as it stands, written into the weights; memory:
    edited alone on the original model and stored, memory.py); after the last, every edit measured again,
    locality against the ORIGINAL model's answers. The first 100 edits are also measured after 100,
    1,000 and 10,000 edits (retention), against the original model's answers in passes of their own, as
    a T = 100 run compares them (in bfloat16 the rows beside a row in a pass move its near-ties). A
    memory is saved to --memory once it has grown by 500 edits or a quarter (the bytes written stay
    linear in T) and at the end, and a run resumes from it."""
    T, n = len(records), args.edits_per_batch
    reference = references(runner, records)                 # before any edit
    reference_100 = references(runner, records[:100]) if T > 100 else reference
    start, retention, seconds, saved = 0, {}, 0.0, 0
    if args.sequential == "memory":
        memory = open_memory(args, loaded, records)
        start = saved = len(memory)
        edited = lambda prompts, owners: memory.routed(prompts)
    else:
        master = {}                                          # float32 weights of the edited modules
        originals = {m: loaded.model.get_submodule(m).weight.detach().clone() for m in runner.names}
        edited = lambda *_: contextlib.nullcontext()
    try:
        for i in tqdm(range(start, T, n), desc=f"{args.sequential} n={n}", initial=start // n, total=-(-T // n)):
            batch = records[i:i + n]
            clock = time.perf_counter()
            if args.sequential == "memory":
                memory.add(stored(args, batch))
            else:
                edit_rows = runner.batch([r.prompt for r in batch], [r.target for r in batch])
                merge(runner.model, editor(runner, edit_rows), master)
            seconds += time.perf_counter() - clock
            done = i + len(batch)
            if args.sequential == "memory" and (done - saved >= max(500, saved // 4) or done == T):
                memory.save(args.memory)
                saved = done
            if done in (100, 1000, 10000) and done < T:
                retention[done] = summarise(score(runner, records[:100], edited, reference_100))
        results = score(runner, records, edited, reference)
        if args.generate:                                    # free generation, every edit kept and routed
            free = [g for i in tqdm(range(0, T, 16), desc="generation", leave=False)
                    for g in generation(runner, lambda _: memory.serving(not args.hold), records[i:i + 16],
                                        unedited=unedited, chat=args.chat)]
            unedited.save()
            results = [r | g for r, g in zip(results, free)]
        if records[0].questions:                             # MQuAKE: each case's questions, every case's edits kept
            cases = list({r.case_id: r for r in records}.values())
            serving = (lambda: memory.serving(not args.hold)) if args.sequential == "memory" else contextlib.nullcontext
            mh = [multihop(runner, serving(), [r]) for r in tqdm(cases, desc="multi-hop", leave=False)]
    except KeyboardInterrupt:                                # Ctrl-C: the edits stored so far are kept
        if args.sequential == "memory":
            memory.save(args.memory)
            raise SystemExit(f"interrupted: {len(memory)} of {T} edits kept in {args.memory}; "
                             f"the same command resumes from them") from None
        raise SystemExit("interrupted: the merge protocol keeps nothing; run it again") from None
    finally:
        if args.sequential == "merge":
            restore(runner.model, originals)
    retention[T] = summarise(results[:100])
    out = {"results": results, "seconds": seconds, "edits": T - start, "retention": retention}
    if records[0].questions:
        out["MH"], out["answers"] = [m["MH"] for m in mh], [m["answers"] for m in mh]
    if args.sequential == "memory":
        out["memory"] = {"file": args.memory, "edits": len(memory), "rank": memory.rank,
                         "mean_rank": memory.mean_rank(), "bytes_per_edit": memory.bytes_per_edit(),
                         "routed": memory.key.config() | {"threshold": memory.key.threshold, "gated": memory.key.gated}}
    return out


def open_memory(args: argparse.Namespace, loaded: Editor, records: list[EditRequest]) -> EditMemory:
    """--memory: resumed if the file holds the first k of these records' facts, else a new memory with --key."""
    if os.path.exists(args.memory):
        memory = EditMemory.load(args.memory, loaded)
        mine = [vars(f) for f in stored(args, records[:len(memory)])]
        if memory.facts != mine:
            raise MemoryFileError(f"--memory {args.memory} holds other facts than the first {len(memory)} "
                                  f"of these records; give a new --memory file")
        print(f"resuming {args.memory}: {len(memory)} of {len(records)} edits stored")
        if args.rank != "auto" and args.rank < memory.largest_rank():   # a rank curve from a full-rank memory
            if len(memory) < len(records):
                raise MemoryFileError(f"--rank {args.rank} below the ranks of --memory {args.memory} (up to "
                                      f"{memory.largest_rank()}) truncates its updates for this run only: give a "
                                      f"memory that holds all {len(records)} edits")
            print(f"updates truncated to rank {args.rank} for this run (the file keeps up to {memory.largest_rank()})")
            memory.truncate(args.rank)
        return memory
    return EditMemory(loaded, load_key(args.ckpt, args.key), args.rank)


def stored(args: argparse.Namespace, records: list[EditRequest]) -> list:
    """The facts the memory keeps of these records, with the subjects --subjects says."""
    subject = {"given": lambda r: r.subject, "guessed": lambda r: guess_subject(r.prompt), "none": lambda r: ""}
    return [dataclasses.replace(as_fact(r), subject=subject[args.subjects](r)) for r in records]

"""
Evaluate an editor (METHOD.md §4): the protocols. Batch: apply n edits at once (as training does:
hooks.functional_edit, float32 updates in activation space, the weights never written), measure them
with metrics.py, drop them (n = 1: 16 records at a time, each edited alone, its update routed to
its own rows). Sequential (lifelong, sequential.py): T edits in order, each batch kept on top of the
earlier ones (merged into the weights, or stored in an edit memory), then all measured. MQuAKE: a
case's edits together, then its multi-hop questions.

    python evaluate.py --ckpt out/ibke/best.pt                        # CounterFact eval, single edits
    python evaluate.py --ckpt out/ibke/best.pt --limit 1000 --edits-per-batch 8
    python evaluate.py --ckpt out/ibke/best.pt --method ft            # FT-L baseline, same modules
    python evaluate.py --ckpt out/ibke/best.pt --method none          # the unedited model
    python evaluate.py --ckpt out/ibke/best.pt --method memit         # ROME, MEMIT, AlphaEdit: baselines.py
    python evaluate.py --ckpt out/mend/best.pt                        # MEND, MALMEN: train.py configurations
    python evaluate.py --ckpt out/ibke/best.pt --data mquake          # multi-hop accuracy
    python evaluate.py --ckpt out/ibke/best.pt --sequential memory --limit 10000 --memory out/ibke/cf.mem
                                  # lifelong: 10,000 edits kept in an edit memory (memory.py), then all measured
    python evaluate.py --ckpt out/ibke/best.pt --sequential merge --limit 100   # each ΔW written into the weights
    python evaluate.py --ckpt out/ibke/best.pt --sequential memory --limit 1000 --memory out/ibke/cf1000.mem \\
        --generate --chat             # free generation, each question asked in the model's chat template
    python evaluate.py --ckpt out/ibke/best.pt --method alphaedit --sequential merge --limit 1000 --edits-per-batch 100

The metrics (ES, GS, LS, F1, EM, ES_p, PS_p, NS_p, MH) are defined in metrics.py. Results are
appended per batch to <out>.partial.jsonl, so an interrupted run resumes (if nothing the numbers
depend on changed: the checkpoint's content, the records, every flag); when the run is complete they
move into --out, which is never a file evaluate.py did not write.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import statistics

from tqdm import tqdm

from baselines import PEERS, add_peer_args, peer_covariances, peer_editor, peer_problems
from checkpoint import FLOAT32_MAX, CheckpointError
from rundir import RunLock, check_folder, is_results, resumable, write_json
from data import DataError, load, no_chat, split_val
from editor import Editor, ft_editor, ibke_editor, no_editor, sha256
from hooks import functional_edit
from gate import asks_another
from key import MemoryFileError
from memory import rank_or_auto, standing
from metrics import Continuations, generation, measure, measure_apart, multihop, peak_mib, summarise, table
from model import ModelError, add_device_args
from runner import Runner
from sequential import sequential

APART = 16      # n = 1: records edited alone and scored together, this many at a time (metrics.measure_apart)


def check_args(args: argparse.Namespace) -> None:
    """Ranges of the flags and the --out file, before any work: one line naming the problem."""
    rules = [(args.limit is None or args.limit >= 1,
              f"--limit {args.limit}: give at least 1 (leave it out for all records)"),
             (args.skip >= 0, f"--skip {args.skip}: give 0 or more"),
             (args.edits_per_batch >= 1, f"--edits-per-batch {args.edits_per_batch}: give at least 1"),
             (args.rank == "auto" or args.rank >= 1, f"--rank {args.rank}: give at least 1, or auto"),
             (args.sequential != "memory" or args.memory,
              "--sequential memory needs --memory FILE (where the memory is kept)"),
             (args.sequential is None or args.method != "none",
              "--sequential with --method none: nothing to keep; give ibke or ft"),
             (args.sequential != "memory" or args.method == "ibke",
              f"--sequential memory with --method {args.method}: the memory keeps IBKE's edits; use merge"),
             (args.ft_steps >= 1, f"--ft-steps {args.ft_steps}: give at least 1"),
             (not args.hold or args.sequential == "memory", "--hold is for --sequential memory (its served edits)"),
             (args.subjects == "given" or args.sequential == "memory", "--subjects is for --sequential memory"),
             (not args.chat or args.generate, "--chat is for --generate (free generation in the chat template)"),
             (not args.generate or args.sequential != "merge",
              "--generate with --sequential merge: the unedited model is gone from the weights; use memory"),
             (0 < args.ft_lr < FLOAT32_MAX, f"--ft-lr {args.ft_lr}: give a positive learning rate below 3.4e38 "
                                            f"(float32)")] + peer_problems(args)
    for ok, problem in rules:
        if not ok:
            raise SystemExit(f"error: {problem}")
    out = args.out
    if os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a folder; give a file name for the results (e.g. "
                         f"{os.path.join(out, 'results.json')})")
    if os.path.exists(out) and not is_results(out):
        raise SystemExit(f"error: --out {out} exists and is not a results file of evaluate.py; it would be "
                         f"overwritten. Give another --out")
    try:                                                        # can --out be written? (before the work)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        existed = os.path.exists(out + ".partial.jsonl")
        with open(out + ".partial.jsonl", "a"):
            pass
        if not existed:
            os.remove(out + ".partial.jsonl")
    except OSError as err:
        raise SystemExit(f"error: cannot write --out {out} ({err.strerror or err})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (best.pt or latest.pt)")
    parser.add_argument("--data", default=None,
                        help="benchmark (default: the one trained on); mquake* gives multi-hop accuracy")
    parser.add_argument("--data-dir", default="data", help="folder holding (or receiving) the benchmark files")
    parser.add_argument("--split", default="eval", choices=["eval", "train", "val"],
                        help="eval; or val: the records train.py held out for validation")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records (MQuAKE: cases)")
    parser.add_argument("--skip", type=int, default=0,
                        help="leave out the first N records (MQuAKE: cases) before --limit: a fresh slice")
    parser.add_argument("--edits-per-batch", type=int, default=1,
                        help="n edits applied together (1: single edits, measured 16 records at a time, each alone)")
    parser.add_argument("--method", default="ibke", choices=["ibke", "ft", "none", *PEERS],
                        help="editor: the checkpoint's hypernetwork (IBKE, or MEND/MALMEN trained as train.py's "
                             "--latent-len 0), FT-L on the same modules, no edit, or a locate-then-edit peer "
                             "(baselines.py)")
    parser.add_argument("--ft-steps", type=int, default=25, help="FT-L: Adam steps on the edit prompts")
    parser.add_argument("--ft-lr", type=float, default=5e-4, help="FT-L: learning rate")
    add_peer_args(parser)
    parser.add_argument("--model", default=None,
                        help="override the checkpoint's model (must have the same edited modules)")
    add_device_args(parser, dtype_default=None)
    parser.add_argument("--out", default="results.json",
                        help="where the summary goes (per-batch progress: <out>.partial.jsonl)")
    parser.add_argument("--cache-dir", default=None,
                        help="keep the frozen lower blocks' states of the texts evaluated in this folder (as "
                             "train.py's): evaluating the same records again (another checkpoint, another n) skips "
                             "that work; peak memory then includes them; with --generate, also the unedited "
                             "model's continuations, the same for every editor. A state is computed in the batch of "
                             "the run that first saw its text: in bfloat16 another batch shape rounds it "
                             "differently, so a cache moves figures by rounding near ties (README, Results)")
    parser.add_argument("--sequential", default=None, choices=["merge", "memory"],
                        help="lifelong protocol: the records' edits in order, --edits-per-batch at a time, "
                        "all kept (merge: written into the weights one batch after another; memory: memory.py), then "
                        "all measured again")
    parser.add_argument("--memory", default=None,
                        help="--sequential memory: the memory file (resumed if it holds the first k records' edits; "
                             "saved as it grows by 500 or a quarter)")
    parser.add_argument("--key", default=None,
                        help="--sequential memory, a new memory: the key from `python key.py learn` (default: key.pt "
                             "beside --ckpt)")
    parser.add_argument("--rank", type=rank_or_auto, default="auto",
                        help="--sequential memory: rank at which each edit's update is stored (a new memory; auto: "
                        "per fact, the smallest that still writes it, memory.RANKS), or to which a complete memory's "
                        "updates are truncated for this run (a rank curve; README: Compact updates)")
    parser.add_argument("--generate", action="store_true",
                        help="also free generation: gen_ES, gen_GS, gen_LS, gen_F1, fluency, gen_new, gen_old (metrics.py)")
    parser.add_argument("--chat", action="store_true",
                        help="--generate: ask every prompt as a user's message in the model's chat template (an "
                             "instruct model's way; metrics.py)")
    parser.add_argument("--hold", action="store_true",
                        help="--sequential memory, generating: a row's edit stays on for the whole continuation "
                             "(default: it steps aside once the generated text names its answer; memory.serving)")
    parser.add_argument("--subjects", default="given", choices=["given", "guessed", "none"],
                        help="--sequential memory, a new memory: the facts' subjects (the gate's), as the records give "
                             "them, guessed from the prompts' words (gate.guess_subject: edit.py's way with a fact "
                             "given none), or none (the key alone routes, at τ)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out that holds the results of another checkpoint (else refused)")
    args = parser.parse_args()
    check_args(args)
    check_folder(args.cache_dir, "--cache-dir")
    memory_lock = RunLock(args.memory, f"--memory {args.memory}") if args.memory else contextlib.nullcontext()
    with RunLock(args.out, f"--out {args.out}"), memory_lock:
        try:
            evaluate(args)
        except KeyboardInterrupt:                             # the batches so far are in the partial file
            raise SystemExit(f"interrupted: the finished batches are in {args.out}.partial.jsonl; "
                             f"the same command resumes from them") from None


def evaluate(args: argparse.Namespace) -> None:
    partial = args.out + ".partial.jsonl"

    try:
        loaded = Editor.load(args.ckpt, args.device, args.model, args.dtype)
        model, tokenizer, hypernet, ckpt = loaded.model, loaded.tokenizer, loaded.hypernet, loaded.ckpt
        data_name = args.data or ckpt["config"]["data"]
        splits = load(data_name, args.data_dir, split="train" if args.split == "val" else args.split)
        if (args.split if args.split != "val" else "train") not in splits:
            raise DataError(f"{data_name} has no {args.split} split (it has: {', '.join(splits)})")
        if args.split == "val":
            records = split_val(splits["train"], ckpt["config"]["val_size"], ckpt["config"]["seed"])[1]
        else:
            records = splits[args.split]
    except (DataError, ModelError, CheckpointError) as err:
        raise SystemExit(f"error: {err}")
    problem = args.chat and no_chat(tokenizer, args.model or ckpt["model"])
    if problem:
        raise SystemExit(f"error: {problem}")
    names = list(hypernet.shapes)
    if args.method in PEERS:
        try:
            train = load(data_name, args.data_dir, split="train").get("train", [])
            names, covs = peer_covariances(args, model, tokenizer, args.model or ckpt["model"], data_name, train)
            editor = peer_editor(args, names, covs, records)
        except (DataError, ValueError) as err:
            raise SystemExit(f"error: {err}")
    else:
        editor = {"ibke": lambda: ibke_editor(hypernet, ckpt["config"].get("tokens", "all")),
                  "ft": lambda: ft_editor(names, args.ft_steps, args.ft_lr), "none": lambda: no_editor}[args.method]()
    runner = Runner(model, tokenizer, names, cache=args.cache_dir is not None)
    states_path = runner.use_states(args.cache_dir)
    unedited = Continuations.kept_in(args.cache_dir if args.generate else None, runner)

    # n = 1: APART records at a time, each edited alone, its update routed to its own rows (metrics.measure_apart)
    apart = args.edits_per_batch == 1 and args.method != "ft" and not data_name.startswith("mquake")
    if data_name.startswith("mquake"):  # a batch is a case
        cases = list(dict.fromkeys(r.case_id for r in records))
        total, cases = len(cases), cases[args.skip:][:args.limit]
        batches = [[r for r in records if r.case_id == c] for c in cases]
    else:
        total, records = len(records), records[args.skip:][:args.limit]
        size = APART if apart else args.edits_per_batch
        batches = [records[i:i + size] for i in range(0, len(records), size)]
    if not total:
        raise SystemExit(f"error: no records of {data_name} {args.split} are left (the note above says why)")
    if not batches:
        raise SystemExit(f"error: --skip {args.skip} leaves no records of {data_name} {args.split} ({total} in all)")

    # everything the numbers depend on: the checkpoint's content, the records, every flag but --out, --overwrite
    signature = {**{k: v for k, v in vars(args).items() if k not in ("out", "overwrite")}, "data": data_name,
                 "apart": APART if apart else 0,
                 "ckpt_sha256": sha256(args.ckpt),
                 "records_sha256": hashlib.sha256(repr([dataclasses.astuple(r) for b in batches for r in b])
                                                  .encode()).hexdigest()}
    if is_results(args.out) and not args.overwrite:
        before = json.load(open(args.out)).get("signature", {}).get("ckpt_sha256")
        if before != signature["ckpt_sha256"]:
            raise SystemExit(f"error: --out {args.out} holds the results of another checkpoint; give another --out, "
                             f"or --overwrite to replace them")
    if args.sequential:
        try:
            line = sequential(args, loaded, [r for b in batches for r in b], runner, editor, unedited)
        except MemoryFileError as err:
            raise SystemExit(f"error: {err}")
        done = [line]
    else:
        done = run_batches(args, batches, runner, editor, data_name, partial, signature, unedited, apart)
    if states_path:
        runner.save_states(states_path)
    results = [r for line in done for r in line["results"]]
    summary = summarise(results)
    if args.sequential and len(results) > 1000:                # chosen on the first 1,000 records; each part apart
        summary["first_1000"], summary["after_1000"] = summarise(results[:1000]), summarise(results[1000:])
    if args.sequential and not data_name.startswith("mquake"):  # LS where no kept edit rightly changes the answer
        records = [r for b in batches for r in b]
        asked = asks_another(records)
        summary["unasked"] = summarise([r for r, a in zip(results, asked) if not a]) | {"asked": sum(asked)}
        current = [r for r, stands in zip(results, standing([r.prompt for r in records])) if stands]
        if len(current) < len(results):
            summary["current"] = summarise(current) | {"replaced": len(results) - len(current)}
    # per case: its first record carries it, or the sequential list
    if data_name.startswith("mquake"):
        per_case = done[0]["MH"] if args.sequential else [line["results"][0]["MH"] for line in done]
        summary["MH"] = statistics.fmean(per_case)
    edits = sum(line["edits"] for line in done)             # made in this sitting (a resumed memory: maybe none)
    if edits:
        summary["ms_per_edit"] = 1000 * sum(line["seconds"] for line in done) / edits
    summary["peak_mib"] = peak_mib(runner.device)                # this sitting's, model included
    write_json(args.out,
               {"summary": summary, "args": vars(args),
                "trained": {"model": ckpt["model"], "step": ckpt["step"], "config": ckpt["config"]},
                          "signature": signature, "batches": done})
    if os.path.exists(partial):
        os.remove(partial)                                    # finished: the batches are in --out
    method = args.method
    if method == "ibke" and not ckpt["config"].get("latent_len", 1):        # train.py's peer configurations
        method = "malmen" if ckpt["config"].get("aggregate") == "ridge" else "mend"
    name = f"{method} {data_name}" if data_name.startswith("mquake") else f"{method} n={args.edits_per_batch}"
    if args.sequential:
        name = f"{method} {args.sequential} T={len(results)} n={args.edits_per_batch}"
        for t, r in done[0]["retention"].items():
            print(f"first 100 edits after {t}: F1 {r.get('F1', 0):.3f} (ES {r['ES']:.3f} GS {r.get('GS', 0):.3f} LS "
                  f"{r.get('LS', 0):.3f})")
    parts = [(f"{name}, records 0-999", summary["first_1000"]),
             (f"{name}, records 1000+", summary["after_1000"])] if "after_1000" in summary else []
    if summary.get("unasked", {}).get("asked"):
        parts.append((f"{name}, the {summary['unasked']['n']} records whose neighbour asks no other edit's question",
                      summary["unasked"]))
    if "current" in summary:
        parts.append((f"{name}, the {summary['current']['n']} records no later record's prompt replaces",
                      summary["current"]))
    print(table([(name, summary)] + parts))
    print(f"wrote {args.out}")


def run_batches(args, batches, runner, editor, data_name, partial, signature, unedited, apart) -> list[dict]:
    """Each batch edited, measured and dropped (apart: each of its records alone, n = 1); one line per
    batch in the partial file (resumable)."""
    done = resumable(partial, signature, len(batches))
    with open(partial, "w" if not done else "a") as f:
        if not done:
            f.write(json.dumps(signature) + "\n")
        for batch in tqdm(batches[len(done):], desc=f"{args.method} n={args.edits_per_batch}", initial=len(done),
                          total=len(batches)):
            if apart:
                results, seconds, edited = measure_apart(runner, editor, batch)
            else:
                results, seconds, deltas = measure(runner, editor, batch)
                edited = lambda *_: functional_edit(runner.model, deltas)
            if args.generate:                                    # free generation, the same edit applied
                free = generation(runner, lambda owners: edited(None, owners), batch, unedited=unedited,
                                  chat=args.chat)
                unedited.save()
                results = [r | g for r, g in zip(results, free)]
            line = {"results": results, "seconds": seconds, "edits": len(batch)}
            if data_name.startswith("mquake"):
                mh = multihop(runner, edited(None, None), batch)
                line["results"] = [dict(r, MH=mh["MH"]) for r in results]
                line["answers"] = mh["answers"]                  # the greedy answers, for reading
            f.write(json.dumps(line) + "\n")
            f.flush()
            done.append(line)
    return done


if __name__ == "__main__":
    main()

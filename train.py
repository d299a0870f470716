r"""
Train the IBKE hypernetwork (IBKE.md §3): a plain PyTorch loop.

    python train.py                                    # SmolLM2-135M on CounterFact, ~20 min on 2 CPU cores (RESULTS.md)
    python train.py --steps 6000 --train-size 0 --out out/long   # a longer run on every record (the schedules stretch)
    python train.py --lr 1e-4 --lr-schedule constant --c-loc-end 1 --c-gen-end 1   # constant weights (before 2026-11-23)
    python train.py --steps 4000 --train-size 0 --val-every 1000 --out out/sum   # many edits: the sum, then cancel on
    python train.py --resume out/sum_halfeta.pt --edit-layers 6 --aggregate cancel --ridge-init 5 --batch-size 256 \
        --sample-n log --val-n 200 --lr 1e-4 --lr-schedule constant --c-loc 2 --c-gen 1 --steps 6000 \
        --val-every 50 --patience 1000 --out out/w6   # 6 blocks; sum_halfeta.pt: out/sum/best.pt with every
                                                       # η halved (RESULTS.md, 2026-11-24; README: Many edits)
    python train.py --resume out/w6_eta23.pt --edit-layers 9 --out out/w9   # then 9 blocks (w6's other flags come
                                                       # from its checkpoint); out/w6/best.pt with every η × 2/3
                                                       # (RESULTS.md, 2026-11-24)
    python train.py --out out/ibke --resume            # continue exactly where it stopped
    python train.py --resume out/main/latest.pt --c-gen 0.3 --c-loc 10 --extra-loc 3 --steps 7500 --out out/p2h
                                                       # a second phase with other loss weights (README: Results)
    python train.py --model gpt2-xl --data zsre --device cuda --dtype bfloat16
    python train.py --steps 20 --val-every 10 --val-size 8 --d-m 64 --latent-dim 64 --out out/smoke  # tiny

Each step: draw n ∈ 1..batch-size edits ("dynamic" batches), decompose the edit loss's gradient on
the frozen model (hooks.py), turn it into ΔW (hypernet.py), apply ΔW functionally, and minimise
SG + IL + ITM (losses.py) with Adam. The default recipe, in one run: 2600 steps drawing from 3000
records (a text seen before skips the frozen lower blocks), lr 3e-4 on a cosine; over the second
half, c_loc rises to 6 and c_gen falls to 0.7 (locality weighted up once the editor edits); the base
model in bfloat16 where the device computes it natively (--dtype auto), else float32.
Validation (single edits, evaluate.py's metrics) every --val-every steps; best.pt keeps the best
validation F1, latest.pt the newest state (also every --save-every steps and on Ctrl-C). Prompts
keep their last 128 tokens, answers their first 32.
"""
import argparse
import bisect
import json
import math
import os
import random
import signal
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import RunLock, atomic_save, check_folder, finite, restore, resume_args, state, trim_log
from data import DataError, EditRequest, load, split_val
from editor import ibke_editor
from evaluate import measure, peak_mib, summarise
from hooks import functional_edit, grad_decomposition
from hypernet import IBKE, EditorConfig
from losses import LossWeights, answer_nll, ibke_loss, locality_kl
from model import ModelError, add_device_args, edit_module_names, load_model, native_dtype, weight_shape
from runner import Runner, positions, scored_span, take

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a hub name (gpt2-xl, EleutherAI/gpt-j-6B, Qwen/Qwen3-0.6B) or a local folder")
parser.add_argument("--data", default="counterfact", help="counterfact, zsre or uniedit (its train split)")
parser.add_argument("--data-dir", default="data", help="folder holding (or receiving) the benchmark files")
parser.add_argument("--out", default="out/ibke", help="folder for best.pt, latest.pt and log.jsonl")
parser.add_argument("--steps", type=int, default=2600, help="training steps (the schedules below are spread over them)")
parser.add_argument("--batch-size", type=int, default=8, help="most edits per step; each step draws n from 1..batch-size")
parser.add_argument("--sample-n", default="uniform", choices=["uniform", "log"], help="how n is drawn: uniformly, or log-uniformly (P(n) ∝ log((n+1)/n): single edits keep their share of a large --batch-size)")
parser.add_argument("--p-single", type=float, default=0.0, help="probability that a step edits one fact alone (else n is drawn as --sample-n says): lone edits' share of a large-n run")
parser.add_argument("--chunk", type=int, default=16, help="edits whose losses are backpropagated together, and which the hypernetwork encodes at a time, recomputed in the backward (their memory grows with it, not with n; the gradient is the same)")
parser.add_argument("--aggregate", default="sum", choices=["sum", "ridge", "cancel"], help="how a batch's edits combine: the sum of their updates (IBKE); one ridge solve over all their tokens (MALMEN's, with IBKE's keys and values; for many edits at once); or the sum with each edit's cross-talk from the others solved away (the sum at n = 1)")
parser.add_argument("--ridge-init", type=float, default=EditorConfig.ridge_init, help="--aggregate ridge or cancel: initial λ of every module, relative to the keys' size (large: the sum)")
parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (peak, with --lr-schedule cosine)")
parser.add_argument("--lr-lambda", type=float, default=1e-2, help="--aggregate ridge or cancel: Adam learning rate of log λ (peak; it follows --lr-schedule): λ must move by factors, not by --lr")
parser.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"], help="learning rate over the run: constant, or a cosine from --lr down to 0 at --steps")
parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
parser.add_argument("--c-edit", type=float, default=1.0, help="SG weight on the edit prompt's NLL")
parser.add_argument("--c-gen", type=float, default=1.0, help="SG weight on the generality prompts' NLL")
parser.add_argument("--c-loc", type=float, default=1.0, help="IL weight on KL(pre || post) at the locality tokens")
parser.add_argument("--beta", type=float, default=0.1, help="ITM weight on the latent's KL to N(0, I)")
parser.add_argument("--c-loc-end", type=float, default=6.0, help="c_loc from --ramp-end on, reached linearly from --c-loc between --ramp-start and --ramp-end (a --c-loc given alone is held constant)")
parser.add_argument("--c-gen-end", type=float, default=0.7, help="c_gen from --ramp-end on, likewise (a --c-gen given alone is held constant)")
parser.add_argument("--ramp-start", type=float, default=0.5, help="fraction of --steps after which c_loc and c_gen move towards their -end values")
parser.add_argument("--ramp-end", type=float, default=1.0, help="fraction of --steps at which they reach them (and stay: the learning rate still acts on them)")
parser.add_argument("--extra-loc", type=int, default=1, help="per edit, this many other records' prompts join the IL term as unrelated inputs (0: only each record's locality prompt)")
parser.add_argument("--loc-from", default="relation", choices=["relation", "answer", "any"], help="where the --extra-loc records come from: 'relation', the same prompt with another subject (the edit must not spread to them); 'answer', another subject whose true answer is the edit's old answer (CounterFact's neighbourhood case); else any; or 'any' record")
parser.add_argument("--d-m", type=int, default=512, help="hypernetwork width d_m (paper: 1920; 512 fits a CPU run)")
parser.add_argument("--latent-len", type=int, default=EditorConfig.latent_len, help="l_m, learnable queries / latent vectors per edit")
parser.add_argument("--latent-dim", type=int, default=512, help="width of each latent vector (paper: = d_m = 1920)")
parser.add_argument("--heads", type=int, default=EditorConfig.heads, help="attention heads in the hypernetwork")
parser.add_argument("--eta-init", type=float, default=EditorConfig.eta_init, help="initial step size η of every edited module")
parser.add_argument("--no-ib", action="store_true", help="ablation: deterministic latent z = μ, no ITM term")
parser.add_argument("--no-scale", action="store_true", help="ablation: no token scale, s ≡ 1/2 (its start value, so the first updates match the default's)")
parser.add_argument("--tokens", default="all", choices=["all", "answer"], help="tokens whose (h, u) the hypernetwork reads")
parser.add_argument("--edit-modules", default=None, help="comma-separated module suffixes or a regex (default: model.EDIT_TABLE)")
parser.add_argument("--edit-layers", type=int, default=3, help="edit the last K blocks (0 = all of them); --edit-modules patterns too. A second phase (--resume CKPT) may widen a trained editor")
parser.add_argument("--val-every", type=int, default=1300, help="validate every k steps")
parser.add_argument("--save-every", type=int, default=100, help="write latest.pt every k steps (and at each validation, at the end, on Ctrl-C / SIGTERM)")
parser.add_argument("--overwrite", action="store_true", help="train into an --out that holds a run, replacing it (else refused: --resume continues it)")
parser.add_argument("--log-every", type=int, default=10, help="read the step's numbers off the device, print and log them every k steps (reading makes the host wait)")
parser.add_argument("--train-size", type=int, default=3000, help="draw edits from this many records of the train split (0: all; raise it with --steps); a record drawn again skips the frozen lower blocks (Runner's cache), so steps get cheaper as the run goes on")
parser.add_argument("--cache-dir", default=None, help="keep the frozen lower blocks' states of the texts seen in this folder, shared by runs of the same model: a later or resumed run skips that work (analysis.py uses <out>/cache)")
parser.add_argument("--val-size", type=int, default=200, help="records held out of the train split for validation")
parser.add_argument("--val-n", type=int, default=1, help="also validate with this many edits at once (> 1); best.pt then has the best mean of the two F1s")
parser.add_argument("--patience", type=int, default=4, help="stop after this many validations without a better F1")
add_device_args(parser, dtype_default="auto")
parser.add_argument("--seed", type=int, default=0, help="seed for sampling, initialisation and the split")
parser.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                    help="continue from <out>/latest.pt, or from CKPT (another run's checkpoint: a second phase written to --out, "
                         "with its own best F1); flags given here override the checkpoint's, except those fixing the hypernetwork")


def train_step(runner: Runner, hypernet: IBKE, batch: list[EditRequest], others: list[EditRequest],
               weights: LossWeights, tokens: str = "all", chunk: int = 0):
    """One step of IBKE.md §3 on n edits, its backward in two stages (as MALMEN's): the edited model's
    losses, `chunk` edits at a time (0: all), are backpropagated here to ΔW, held as leaves; the
    returned surrogate's backward then takes ΔW's gradient through the solve once and through the
    hypernetwork `chunk` edits at a time (recomputing their activations). The losses' and the
    hypernetwork's memory grows with the chunk, not with n (the decomposition, keys and solve grow with
    n: 18 GB at n = 1024 on SmolLM2's last 6 blocks, RESULTS.md), and the gradient is the loss's.
    others: per edit, len(others) // n records whose edit prompts join the IL term as unrelated inputs
    (--extra-loc). -> (surrogate, parts: loss, its terms, the batch's ES/GS/LS as 0-d tensors, not
    read here: a warm step never waits for the device)."""
    n = len(batch)
    extra = len(others) // n

    def pairs(kind: int, i: int) -> list[tuple[str, str]]:                   # edit i's rows of one kind
        r = batch[i]
        return [[(r.prompt, r.target)], r.generality,
                r.locality + [(o.prompt, o.old_target or o.target) for o in others[i * extra:(i + 1) * extra]]][kind]
    rows, of = [], [[], [], []]                                               # of[kind][i]: edit i's rows
    for kind in range(3):                                                     # edit | gen | loc rows
        for i in range(n):
            these = pairs(kind, i)
            of[kind].append(list(range(len(rows), len(rows) + len(these))))
            rows += these
    tensors = runner.batch([p for p, _ in rows], [t for _, t in rows])
    counts = [len(scored_span(a, b)) for a, b in zip(tensors["starts"], tensors["lengths"])]
    n_gen = sum(map(len, of[1]))
    n_loc = sum(counts[b] for rs in of[2] for b in rs)                           # scored locality positions
    decomposition, mask = grad_decomposition(runner.model, list(hypernet.shapes), take(tensors, slice(0, n)), tokens,
                                             forward=lambda b: runner.scored_logits(b, split=False))
    deltas, itm = hypernet(decomposition, mask, factored=None, chunk=chunk)  # ΔW (or AᵀB where cheaper), ITM KL
    outputs = [t for d in deltas.values() for t in (d if isinstance(d, tuple) else (d,))]
    leaves = [t.detach().requires_grad_() for t in outputs]
    it = iter(leaves)
    held = {name: tuple(next(it) for _ in d) if isinstance(d, tuple) else next(it) for name, d in deltas.items()}
    sums = torch.zeros(6, device=runner.device)   # the edit, gen, loc terms; ES, GS, LS hits
    for first in range(0, n, chunk or n):
        edits = range(first, min(first + (chunk or n), n))
        picked = [b for kind in range(3) for i in edits for b in of[kind][i]]
        part = take(tensors, picked)
        k, g = len(edits), sum(len(of[1][i]) for i in edits)
        row_of = positions(part)[0]                                          # scored positions, row-major:
        at_gen, at_loc = bisect.bisect_left(row_of, k), bisect.bisect_left(row_of, k + g)   # edit | gen | loc
        with functional_edit(runner.model, held):
            logits, targets, row_ids = runner.scored_logits(part)           # post-edit
        nll = answer_nll(logits, targets, row_ids, len(picked))               # (rows,)
        terms = [nll[:k].sum() / n, nll[k:k + g].sum() / max(n_gen, 1)]
        if len(picked) > k + g:
            pre_loc = runner.frozen_logits(take(part, slice(k + g, len(picked))))   # p_θ(·|q_l), no graph
            terms.append(locality_kl(pre_loc, logits[at_loc:]) * (len(row_of) - at_loc) / n_loc)   # its share of the mean
        else:
            pre_loc, terms = logits[:0], terms + [nll.new_zeros(())]
        (weights.c_edit * terms[0] + weights.c_gen * terms[1] + weights.c_loc * terms[2]).backward()   # into ΔW
        with torch.no_grad():
            correct = logits.argmax(-1) == targets
            agree = logits[at_loc:].argmax(-1) == pre_loc.argmax(-1)
            sums += torch.stack([*(t.detach() for t in terms), correct[:at_gen].sum(), correct[at_gen:at_loc].sum(), agree.sum()])
    surrogate = sum((t * leaf.grad).sum() for t, leaf in zip(outputs, leaves) if leaf.grad is not None) + weights.beta * itm
    _, parts = ibke_loss(sums[0], sums[1], sums[2], itm, weights)
    n_edit, n_gen_pos = (sum(counts[b] for rs in of[kind] for b in rs) for kind in (0, 1))
    parts["ES"] = sums[3] / n_edit
    parts["GS"] = sums[4] / n_gen_pos if n_gen_pos else sums.new_tensor(float("nan"))
    parts["LS"] = sums[5] / max(n_loc, 1)
    return surrogate, parts


def schedule(args: argparse.Namespace, step: int) -> tuple[float, LossWeights]:
    """The learning rate and the loss weights for the step after `step` steps: a cosine learning rate
    (--lr-schedule), c_loc and c_gen moving linearly to their -end values from --ramp-start to --ramp-end."""
    t = step / args.steps
    lr = args.lr * (0.5 * (1 + math.cos(math.pi * t)) if args.lr_schedule == "cosine" else 1.0)
    ramp = min(1.0, max(0.0, (t - args.ramp_start) / (args.ramp_end - args.ramp_start)))

    def at(start: float, end: float | None) -> float:
        return start if end is None else start + (end - start) * ramp
    return lr, LossWeights(args.c_edit, at(args.c_gen, args.c_gen_end), at(args.c_loc, args.c_loc_end), 0.0 if args.no_ib else args.beta)


DIVERGED = 1e4  # a loss above this has diverged: a uniform guess over 50k tokens costs ln 50000 ≈ 11 per term


def update(hypernet: IBKE, optimizer: torch.optim.Optimizer, loss: torch.Tensor, parts: dict, clip: float) -> None:
    """Backward, clip, Adam. A non-finite or diverged loss (> DIVERGED) or a non-finite gradient skips
    the update on the device (fused Adam reads found_inf) instead of being checked on the host: the
    step never waits for the device."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(hypernet.parameters(), clip)
    optimizer.found_inf = (~(torch.isfinite(parts["loss"]) & (parts["loss"] < DIVERGED) & torch.isfinite(parts["grad_norm"]))).float()
    optimizer.step()


def check_args(args: argparse.Namespace) -> None:
    """Ranges and combinations of the flags, and --out, before any work: one line naming the problem."""
    finite_positive = {"lr": args.lr, "lr_lambda": args.lr_lambda, "clip": args.clip, "eta_init": args.eta_init, "ridge_init": args.ridge_init}
    at_least_1 = {"steps": args.steps, "batch_size": args.batch_size, "val_every": args.val_every, "val_size": args.val_size,
                  "patience": args.patience, "log_every": args.log_every, "save_every": args.save_every, "d_m": args.d_m,
                  "chunk": args.chunk, "val_n": args.val_n,
                  "latent_len": args.latent_len, "latent_dim": args.latent_dim, "heads": args.heads}
    rules = [(v >= 1, f"--{k.replace('_', '-')} {v}: give at least 1") for k, v in at_least_1.items()]
    rules += [(math.isfinite(v) and v > 0, f"--{k.replace('_', '-')} {v}: give a positive finite number") for k, v in finite_positive.items()]
    rules += [(math.isfinite(v) and v >= 0, f"--{k.replace('_', '-')} {v}: give 0 or a positive finite weight")
              for k, v in {"c_edit": args.c_edit, "c_gen": args.c_gen, "c_loc": args.c_loc, "beta": args.beta,
                           "c_loc_end": args.c_loc_end, "c_gen_end": args.c_gen_end}.items() if v is not None]
    rules += [(0 <= args.ramp_start < 1, f"--ramp-start {args.ramp_start}: give a fraction of --steps, 0 to below 1"),
              (args.ramp_start < args.ramp_end <= 1, f"--ramp-end {args.ramp_end}: give a fraction of --steps above --ramp-start ({args.ramp_start}), at most 1")]
    rules += [(args.extra_loc >= 0, f"--extra-loc {args.extra_loc}: give 0 or more"),
              (0 <= args.p_single <= 1, f"--p-single {args.p_single}: give a probability from 0 to 1"),
              (args.train_size >= 0, f"--train-size {args.train_size}: give 0 (all records) or more"),
              (args.dtype != "float16", "--dtype float16: training here has no loss scaling, so the gradients u and ΔW's "
               "underflow in float16; use bfloat16 (the same memory, float32's range) or float32"),
              (args.edit_layers >= 0, f"--edit-layers {args.edit_layers}: give the number of last blocks to edit, or 0 for all"),
              (args.heads < 1 or args.d_m % args.heads == 0, f"--heads {args.heads} must divide --d-m {args.d_m} (each head gets d_m / heads)"),
              (not os.path.exists(args.out) or os.path.isdir(args.out), f"--out {args.out} is a file; give a folder for best.pt, latest.pt and log.jsonl")]
    for ok, problem in rules:
        if not ok:
            raise SystemExit(f"error: {problem}")
    held = [f for f in ("latest.pt", "best.pt", "log.jsonl") if os.path.exists(os.path.join(args.out, f))]
    continuing = args.resume is not None and os.path.abspath(args.resume or os.path.join(args.out, "latest.pt")) == \
        os.path.abspath(os.path.join(args.out, "latest.pt"))
    if held and not continuing and not args.overwrite:
        raise SystemExit(f"error: --out {args.out} holds a run ({', '.join(held)}); continue it with --resume, "
                         f"replace it with --overwrite, or give another --out")


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


def main() -> None:
    check_args(parser.parse_args())                          # the flags as given, before a checkpoint is read
    args, ckpt, new_phase = resume_args(parser)
    check_args(args)
    if args.dtype == "auto":                                 # saved as chosen: evaluate.py and a resume use it
        args.dtype = native_dtype(args.device)
        print(f"dtype: {args.dtype} (--dtype auto: what {args.device} computes natively; --dtype float32 for full precision)")
    check_folder(args.cache_dir, "--cache-dir")
    with RunLock(os.path.join(args.out, "run"), f"--out {args.out}"):
        train(args, ckpt, new_phase)


def train(args: argparse.Namespace, ckpt: dict | None, new_phase: bool) -> None:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_model(args.model, args.dtype, args.device)
        names = edit_module_names(model, args.edit_modules, args.edit_layers)
        records = load(args.data, args.data_dir, split="train")
    except (DataError, ModelError) as err:
        raise SystemExit(f"error: {err}")
    if "train" not in records:
        raise SystemExit(f"error: {args.data} has no train split; train on counterfact or zsre and evaluate on it")
    train_records, val_records = split_val(records["train"], args.val_size, args.seed)
    train_records = train_records[:args.train_size or None]                 # a seeded random subset
    if len(train_records) < args.batch_size * (1 + args.extra_loc):
        raise SystemExit(f"error: {len(train_records)} training records are too few for --batch-size {args.batch_size} "
                         f"with --extra-loc {args.extra_loc}; lower them or --val-size")

    shapes = {n: weight_shape(model.get_submodule(n)) for n in names}
    cfg = EditorConfig(d_m=args.d_m, latent_len=args.latent_len, latent_dim=args.latent_dim, heads=args.heads,
                       ib=not args.no_ib, token_scale=not args.no_scale, eta_init=args.eta_init,
                       aggregate=args.aggregate, ridge_init=args.ridge_init)
    hypernet = IBKE(shapes, cfg).to(args.device).train()
    params = [[p for k, p in hypernet.named_parameters() if k.endswith("log_lambda") == is_lam] for is_lam in (False, True)]
    scales = [1.0, args.lr_lambda / args.lr][:1 + bool(params[1])]     # of --lr's schedule; λ (ridge, cancel): its own group
    optimizer = torch.optim.Adam([{"params": p} for p in params[:len(scales)]], lr=args.lr, fused=True)  # fused: 8x faster on CPU
    runner = Runner(model, tokenizer, names, cache=True)
    val_runner = Runner(model, tokenizer, names, cache=True)  # its own cache: the very batches evaluate.py builds
    states_path = runner.use_states(args.cache_dir)
    sampler = random.Random(args.seed + 1)
    groups = loc_groups(train_records, args.loc_from)
    c = {"step": 0, "best_f1": -1.0, "bad_validations": 0, "nonfinite": 0}   # the loop's counters, saved with it
    if ckpt is not None:
        c = restore(ckpt, hypernet, optimizer, args, new_phase)
        sampler.setstate(c.pop("sampler"))
        print(f"resumed {args.resume or 'latest.pt'} at step {c['step']} (best F1 {c['best_f1']:.3f})")
    latest_path, best_path, log_path = (os.path.join(args.out, f) for f in ("latest.pt", "best.pt", "log.jsonl"))
    if args.overwrite:                                      # asked for: the run that was here goes
        for f in (latest_path, best_path, log_path):
            if os.path.exists(f):
                os.remove(f)
    elif ckpt is not None and not new_phase:                # the log as of the checkpoint
        trim_log(log_path, c["step"])
    print(f"editing {len(names)} modules of {args.model}: {', '.join(names)}")
    print(f"hypernetwork: {sum(p.numel() for p in hypernet.parameters()) / 1e6:.1f}M parameters; "
          f"{len(train_records)} train / {len(val_records)} val records of {args.data}")

    def save(path: str) -> None:
        atomic_save({**state(hypernet, optimizer, args, c), "sampler": sampler.getstate()}, path)

    def keep_states() -> None:
        if states_path:                                     # --cache-dir: for later runs of this model
            runner.save_states(states_path)

    def log(line: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def validate() -> dict[str, float]:
        """Single edits; with --val-n, also val_n at once, and F1 the mean of the two (best.pt's score)."""
        hypernet.eval()
        editor = ibke_editor(hypernet, args.tokens)
        val = summarise([r for record in val_records for r in measure(val_runner, editor, [record])[0]])
        if args.val_n > 1:
            many = summarise([r for i in range(0, len(val_records), args.val_n)
                              for r in measure(val_runner, editor, val_records[i:i + args.val_n])[0]])
            val = {**{f"{k}@1": v for k, v in val.items()}, **{f"{k}@{args.val_n}": v for k, v in many.items()},
                   **{k: (val[k] + many[k]) / 2 for k in ("ES", "GS", "LS", "F1")}}
        hypernet.train()
        return val

    # -------------------------------------------------------------------------
    # loop

    bar = tqdm(total=args.steps, initial=c["step"], desc="train", dynamic_ncols=True)
    pending, consecutive_nonfinite, last_read = [], 0, time.perf_counter()   # steps whose numbers are still on the device

    def read_pending() -> None:
        """Read the pending steps' numbers off the device in one wait; log each, print the newest."""
        nonlocal consecutive_nonfinite, last_read
        if not pending:
            return
        keys = list(pending[0][2])
        values = torch.stack([torch.stack([p[k].float() for k in keys]) for _, _, p in pending]).tolist()   # one sync
        ms = 1000 * (time.perf_counter() - last_read) / len(pending)
        for (s, n, _), row in zip(pending, values):
            parts = dict(zip(keys, row))
            finite = math.isfinite(parts["loss"]) and parts["loss"] < DIVERGED and math.isfinite(parts["grad_norm"])
            c["nonfinite"], consecutive_nonfinite = c["nonfinite"] + (not finite), 0 if finite else consecutive_nonfinite + 1
            log({"step": s, "n": n, **{k: round(v, 4) for k, v in parts.items()}, "ms": round(ms)})
        bar.write(f"step {s}: n {n} | loss {parts['loss']:.3f} (edit {parts['edit']:.3f} gen {parts['gen']:.3f} "
                  f"loc {parts['loc']:.4f} itm {parts['itm']:.3f}) | ES {parts['ES']:.2f} GS {parts['GS']:.2f} "
                  f"LS {parts['LS']:.2f} | {ms:.0f}ms/step"
                  + (f" | {c['nonfinite']} non-finite or diverged steps skipped" if c["nonfinite"] else ""))
        pending.clear()
        last_read = time.perf_counter()
        if consecutive_nonfinite >= 5:
            save(latest_path)
            raise SystemExit(f"error: {consecutive_nonfinite} non-finite or diverged (> {DIVERGED:g}) losses in a row up to step {s}; "
                             f"lower --lr or --eta-init" + (f", or resume from {best_path}" if os.path.exists(best_path) else ""))

    stop = []                                               # Ctrl-C / SIGTERM: finish the step, save, exit

    def on_signal(signum, frame):
        if stop:                                            # a second one: stop at once
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)
        bar.write(f"{stop[0]}: saving latest.pt after this step (again to stop at once)")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    while c["step"] < args.steps:
        n = draw_n(sampler, args.batch_size, args.sample_n, args.p_single)
        batch, others = draw(sampler, train_records, n, args.extra_loc, args.loc_from, groups)
        lr, weights = schedule(args, c["step"])
        for group, scale in zip(optimizer.param_groups, scales):
            group["lr"] = lr * scale                        # × 1.0: the hypernetwork's lr exactly as scheduled
        loss, parts = train_step(runner, hypernet, batch, others, weights, args.tokens, args.chunk)
        update(hypernet, optimizer, loss, parts, args.clip)
        first_editor = hypernet.editors[next(iter(hypernet.editors))]
        parts["eta"] = first_editor.log_eta.detach().exp().mean()
        if args.aggregate != "sum":
            parts["lambda"] = first_editor.log_lambda.detach().exp().mean()
        c["step"] += 1
        step = c["step"]
        pending.append((step, n, parts))
        bar.update(1)
        if step % args.log_every == 0:
            read_pending()
        if stop:
            read_pending()
            save(latest_path)
            keep_states()
            bar.close()
            print(f"stopped by {stop[0]} at step {step}: saved {latest_path}; continue with "
                  f"python train.py --out {args.out} --resume", file=sys.stderr)
            sys.exit(130 if stop[0] == "SIGINT" else 143)
        if step % args.save_every == 0 and step % args.val_every != 0:
            read_pending()
            save(latest_path)

        if step % args.val_every == 0 or step == args.steps:
            read_pending()
            val = validate()
            usable = finite(hypernet)                       # a diverged editor is never best.pt
            improved = usable and val["F1"] > c["best_f1"]
            c["best_f1"], c["bad_validations"] = (val["F1"], 0) if improved else (c["best_f1"], c["bad_validations"] + 1)
            bar.write(f"val step {step}: ES {val['ES']:.3f} GS {val['GS']:.3f} LS {val['LS']:.3f} F1 {val['F1']:.3f}"
                      + (f" (n=1: {val['F1@1']:.3f}, n={args.val_n}: {val[f'F1@{args.val_n}']:.3f})" if args.val_n > 1 else "")
                      + (" (best)" if improved else f" (best {c['best_f1']:.3f})")
                      + ("" if usable else "; non-finite weights: not saved as best.pt (lower --lr)"))
            log({"step": step, "val": val, "peak_mib": round(peak_mib(args.device))})   # device memory on CUDA, else RSS
            if improved:
                save(best_path)
            save(latest_path)
            keep_states()
            if c["bad_validations"] >= args.patience:
                bar.write(f"early stop: no better validation F1 in {args.patience} validations")
                break
            last_read = time.perf_counter()                 # ms/step counts training steps only
    read_pending()
    bar.close()
    save(latest_path)
    keep_states()
    print(f"done at step {c['step']}; " + (f"best validation F1 {c['best_f1']:.3f} in {best_path}" if os.path.exists(best_path)
                                           else f"no validation in this run (--val-every {args.val_every}); {latest_path} holds it"))


if __name__ == "__main__":
    main()

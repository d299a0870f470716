"""
Train the IBKE hypernetwork (METHOD.md §3): a plain PyTorch loop.

    python train.py                                    # SmolLM2-135M on CounterFact, ~20 min on 2 CPU cores
    python train.py --steps 6000 --train-size 0 --out out/long   # longer, on every record (the schedules stretch)
    python train.py --out out/ibke --resume            # continue exactly where it stopped
    python train.py --resume out/ibke/best.pt --c-loc 10 --c-loc-end 10 --steps 3600 --out out/p2
                                    # a second phase from another run (its step 2600 on), other loss weights
    python train.py --resume out/ibke/best.pt --aggregate cancel --batch-size 64 --sample-n log --val-n 64 \\
        --eta-scale 0.5 --edit-layers 6 --steps 4000 --out out/many   # many edits: 6 blocks, each η halved
    python train.py --c-after 1 --out out/after/ca1     # also IL after the answer: fewer repeats (METHOD.md §8)
    python train.py --chat 0.5 --chat-rows generality --out out/chat-train/c05g   # rephrases asked in chats too (§9)
    python train.py --model gpt2-xl --data zsre --device cuda --dtype bfloat16   # the paper's setting
    python train.py --steps 20 --val-every 10 --val-size 8 --d-m 64 --latent-dim 64 --out out/smoke  # tiny

Each step: draw n ∈ 1..batch-size edits, decompose the edit loss's gradient on the frozen model
(hooks.py), turn it into ΔW (hypernet.py), apply ΔW functionally, and minimise SG + IL + ITM
(losses.py) with Adam. The default recipe: 2600 steps drawing from 3000 records (a text seen before
skips the frozen lower blocks), lr 3e-4 on a cosine; over the second half, c_loc rises to 6 and c_gen
falls to 0.7 (locality weighted up once the editor edits); the base model in bfloat16 where the
device computes it natively (--dtype auto), else float32. Validation (single edits, metrics.py)
every --val-every steps; best.pt keeps the best validation F1, latest.pt the newest state (also every
--save-every steps and on Ctrl-C). The run's files and log: rundir.py; the checkpoint: checkpoint.py.
"""
import argparse
import bisect
import math
import os
import random
import sys

import torch
from tqdm import tqdm

from checkpoint import atomic_save, check_flags, finite, restore, resume_args, state
from data import DataError, EditRequest, load, no_chat, split_val
from draws import asked_in_chat, draw, draw_n, loc_groups
from editor import ibke_editor
from hooks import functional_edit, grad_decomposition
from hypernet import IBKE, EditorConfig
from losses import LossWeights, answer_nll, ibke_loss, locality_kl
from metrics import Continuations, measure, peak_mib, summarise
from model import ModelError, add_device_args, add_model_args, edit_module_names, load_model, native_dtype
from model import weight_shape
from rundir import DIVERGED, RunLock, Stop, StepLog, check_folder, take_over
from runner import Runner, positions, scored_span, take

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
add_model_args(parser)
parser.add_argument("--data", default="counterfact", help="counterfact, zsre or uniedit (its train split)")
parser.add_argument("--data-dir", default="data", help="folder holding (or receiving) the benchmark files")
parser.add_argument("--out", default="out/ibke", help="folder for best.pt, latest.pt and log.jsonl")
parser.add_argument("--steps", type=int, default=2600, help="training steps (the schedules are spread over them)")
parser.add_argument("--batch-size", type=int, default=8, help="most edits per step; a step draws n from 1..this")
parser.add_argument("--sample-n", default="uniform", choices=["uniform", "log"],
                    help="n uniform, or log-uniform (P(n) ∝ log((n+1)/n): lone edits keep their share)")
parser.add_argument("--p-single", type=float, default=0.0, help="probability that a step edits one fact alone")
parser.add_argument("--chunk", type=int, default=16,
                    help="edits backpropagated (and encoded, recomputed) together: memory grows with it, not with n")
parser.add_argument("--aggregate", default="sum", choices=["sum", "ridge", "cancel"],
                    help="how a batch's edits combine: the sum of their updates (IBKE); one ridge solve over their "
                         "tokens (MALMEN's); the sum with each edit's cross-talk solved away (METHOD.md §6)")
parser.add_argument("--ridge-init", type=float, default=EditorConfig.ridge_init,
                    help="ridge, cancel: initial λ of every module, relative to the keys' size (large: the sum)")
parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (the peak of a cosine schedule)")
parser.add_argument("--lr-lambda", type=float, default=1e-2, help="ridge, cancel: learning rate of log λ (peak)")
parser.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"],
                    help="constant, or a cosine from --lr down to 0 at --steps")
parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
parser.add_argument("--c-edit", type=float, default=1.0, help="SG weight on the edit prompt's NLL")
parser.add_argument("--c-gen", type=float, default=1.0, help="SG weight on the generality prompts' NLL")
parser.add_argument("--c-loc", type=float, default=1.0, help="IL weight on KL(pre || post) at the locality tokens")
parser.add_argument("--beta", type=float, default=0.1, help="ITM weight on the latent's KL to N(0, I)")
parser.add_argument("--c-loc-end", type=float, default=6.0,
                    help="c_loc at --ramp-end, reached linearly from --c-loc (a --c-loc given alone stays constant)")
parser.add_argument("--c-gen-end", type=float, default=0.7, help="c_gen at --ramp-end, likewise")
parser.add_argument("--ramp-start", type=float, default=0.5, help="fraction of --steps where c_loc, c_gen start moving")
parser.add_argument("--ramp-end", type=float, default=1.0, help="fraction of --steps where they arrive (and stay)")
parser.add_argument("--extra-loc", type=int, default=1,
                    help="per edit, this many other records' prompts join the IL term as unrelated inputs")
parser.add_argument("--c-after", type=float, default=0.0,
                    help="weight of KL(pre || post) on the unedited model's continuation of each edit prompt and its "
                         "new answer: having answered, go on as before (ours, METHOD.md §8; 0: the paper's loss)")
parser.add_argument("--after-len", type=int, default=8, help="--c-after: tokens of that continuation")
parser.add_argument("--chat", type=float, default=0.0, metavar="SHARE",
                    help="this share of the generality and locality prompts asked in the model's chat template, "
                         "the reply saying the question again before the answer: an editor that also edits chats "
                         "(ours, METHOD.md §9; 0: the paper's plain prompts)")
parser.add_argument("--chat-rows", default="all", choices=["all", "generality"],
                    help="--chat: the prompts it may ask in the template: all, or the generality prompts alone "
                         "(the locality prompts stay plain)")
parser.add_argument("--loc-from", default="relation", choices=["relation", "answer", "any"],
                    help="those records: the same prompt with another subject; another subject with the edit's old "
                         "answer (CounterFact's neighbours); any record")
parser.add_argument("--d-m", type=int, default=EditorConfig.d_m, help="hypernetwork width d_m (the paper's: 1920)")
parser.add_argument("--latent-len", type=int, default=EditorConfig.latent_len,
                    help="l_m, latent vectors per edit (0: no latent, each token on its own; with --no-ib --no-scale: "
                         "MEND, and with --aggregate ridge: MALMEN)")
parser.add_argument("--latent-dim", type=int, default=EditorConfig.latent_dim, help="width of each latent vector")
parser.add_argument("--heads", type=int, default=EditorConfig.heads, help="attention heads in the hypernetwork")
parser.add_argument("--eta-init", type=float, default=EditorConfig.eta_init, help="initial step size η of each module")
parser.add_argument("--eta-scale", type=float, default=1.0,
                    help="a second phase (--resume CKPT): multiply every η of CKPT by this at the start")
parser.add_argument("--no-ib", action="store_true", help="ablation: deterministic latent z = μ, no ITM term")
parser.add_argument("--no-scale", action="store_true", help="ablation: no token scale, s ≡ 1/2 (its start value)")
parser.add_argument("--tokens", default="all", choices=["all", "answer"], help="tokens whose (h, u) the editor reads")
parser.add_argument("--val-every", type=int, default=1300, help="validate every k steps")
parser.add_argument("--save-every", type=int, default=100, help="write latest.pt every k steps")
parser.add_argument("--overwrite", action="store_true", help="train into an --out that holds a run, replacing it")
parser.add_argument("--log-every", type=int, default=10, help="read the steps' numbers off the device every k steps")
parser.add_argument("--train-size", type=int, default=3000, help="draw edits from this many train records (0: all)")
parser.add_argument("--cache-dir", default=None,
                    help="keep the frozen lower blocks' states here for later runs of the same model")
parser.add_argument("--val-size", type=int, default=200, help="records held out of the train split for validation")
parser.add_argument("--val-n", type=int, default=1,
                    help="also validate n edits at once (> 1); best.pt then has the best mean of the two F1s")
parser.add_argument("--patience", type=int, default=4, help="stop after this many validations without a better F1")
add_device_args(parser, dtype_default="auto")
parser.add_argument("--seed", type=int, default=0, help="seed for sampling, initialisation and the split")
parser.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                    help="continue from <out>/latest.pt, or start a second phase from CKPT (flags given here "
                         "override its own, except those fixing the hypernetwork)")

# -----------------------------------------------------------------------------
# one step

def train_step(runner: Runner, hypernet: IBKE, batch: list[EditRequest], others: list[EditRequest],
               weights: LossWeights, tokens: str = "all", chunk: int = 0, after: dict | None = None):
    """One step of METHOD.md §3 on n edits, its backward in two stages (as MALMEN's): the edited model's
    losses, `chunk` edits at a time (0: all), are backpropagated here to ΔW, held as leaves; the
    returned surrogate's backward then takes ΔW's gradient through the solve once and through the
    hypernetwork `chunk` edits at a time (recomputing their activations). The losses' and the
    hypernetwork's memory grows with the chunk, not with n (the decomposition, keys and solve grow with
    n: 18 GB at n = 1024 on SmolLM2's last 6 blocks, RESULTS.md), and the gradient is the loss's.
    others: per edit, len(others) // n records whose edit prompts join the IL term as unrelated inputs
    (--extra-loc). after: continuations' rows by edit text (--c-after), scored in a fourth term.
    The loss is losses.ibke_loss: its SG and IL terms are differentiated through ΔW,
    its ITM term directly. -> (surrogate, parts: loss, its terms, and the token accuracies pooled over
    the batch (acc_edit, acc_gen; agree_loc: post-edit argmax = pre-edit) as 0-d tensors, not read
    here: a warm step never waits for the device)."""
    n = len(batch)
    extra = len(others) // n

    def pairs(kind: int, i: int) -> list[tuple[str, str]]:                   # edit i's rows of one kind
        r = batch[i]
        return [[(r.prompt, r.target)], r.generality,
                r.locality + [(o.prompt, o.old_target or o.target) for o in others[i * extra:(i + 1) * extra]],
                (after or {}).get(f"{r.prompt} {r.target}", [])][kind]
    rows, joins, of = [], [], [[], [], [], []]                                # of[kind][i]: edit i's rows
    for kind in range(4):                                                     # edit | gen | loc | after rows
        for i in range(n):
            these = pairs(kind, i)
            of[kind].append(list(range(len(rows), len(rows) + len(these))))
            rows += these
            joins += [" " if kind < 3 else ""] * len(these)          # after rows: the edit text going on as written
    tensors = runner.batch([p for p, _ in rows], [t for _, t in rows], joins)
    counts = [len(scored_span(a, b)) for a, b in zip(tensors["starts"], tensors["lengths"])]
    n_gen = sum(map(len, of[1]))
    n_loc, n_after = (sum(counts[b] for rs in of[kind] for b in rs) for kind in (2, 3))   # scored positions
    decomposition, mask = grad_decomposition(runner.model, list(hypernet.shapes), take(tensors, slice(0, n)), tokens,
                                             forward=lambda b: runner.scored_logits(b, split=False))
    deltas, itm = hypernet(decomposition, mask, factored=None, chunk=chunk)  # ΔW (or AᵀB where cheaper), ITM KL
    outputs = [t for d in deltas.values() for t in (d if isinstance(d, tuple) else (d,))]
    leaves = [t.detach().requires_grad_() for t in outputs]
    it = iter(leaves)
    held = {name: tuple(next(it) for _ in d) if isinstance(d, tuple) else next(it) for name, d in deltas.items()}
    sums = torch.zeros(7, device=runner.device)   # the edit, gen, loc, after terms; edit, gen hits, loc agreements
    zero = sums[0].clone()
    for first in range(0, n, chunk or n):
        edits = range(first, min(first + (chunk or n), n))
        picked = [b for kind in range(4) for i in edits for b in of[kind][i]]
        part = take(tensors, picked)
        k, g, l = (sum(len(of[kind][i]) for i in edits) for kind in range(3))
        row_of = positions(part)[0]                           # scored positions, row-major: edit | gen | loc | after
        at_gen, at_loc, at_after = (bisect.bisect_left(row_of, r) for r in (k, k + g, k + g + l))
        with functional_edit(runner.model, held):
            logits, targets, row_ids = runner.scored_logits(part)           # post-edit
        nll = answer_nll(logits, targets, row_ids, len(picked))               # (rows,)
        terms = [nll[:k].sum() / n, nll[k:k + g].sum() / max(n_gen, 1)]
        pre = runner.frozen_logits(take(part, slice(k + g, len(picked)))) if len(picked) > k + g else logits[:0]
        for lo, hi, total in ((at_loc, at_after, n_loc), (at_after, len(row_of), n_after)):   # p_θ(·|q): no graph
            terms.append(locality_kl(pre[lo - at_loc:hi - at_loc], logits[lo:hi]) * (hi - lo) / total if hi > lo
                         else zero)                                                    # its share of the term
        ibke_loss(*terms[:3], zero, weights, terms[3] if after else None)[0].backward()   # SG + IL, into ΔW
        with torch.no_grad():
            correct = logits.argmax(-1) == targets
            agree = logits[at_loc:at_after].argmax(-1) == pre[:at_after - at_loc].argmax(-1)
            sums += torch.stack([*(t.detach() for t in terms), correct[:at_gen].sum(), correct[at_gen:at_loc].sum(),
                                 agree.sum()])
    through_delta = sum((t * leaf.grad).sum() for t, leaf in zip(outputs, leaves) if leaf.grad is not None)
    surrogate = through_delta + ibke_loss(zero, zero, zero, itm, weights)[0]    # + β·ITM, directly
    _, parts = ibke_loss(sums[0], sums[1], sums[2], itm, weights, sums[3] if after else None)
    n_edit, n_gen_pos = (sum(counts[b] for rs in of[kind] for b in rs) for kind in (0, 1))
    parts["acc_edit"] = sums[4] / n_edit                                 # pooled over the batch's tokens
    parts["acc_gen"] = sums[5] / n_gen_pos if n_gen_pos else sums.new_tensor(float("nan"))
    parts["agree_loc"] = sums[6] / max(n_loc, 1)
    return surrogate, parts


def schedule(args: argparse.Namespace, step: int) -> tuple[float, LossWeights]:
    """The learning rate and the loss weights for the step after `step` steps: a cosine learning rate
    (--lr-schedule), c_loc and c_gen moving linearly to their -end values from --ramp-start to --ramp-end."""
    t = step / args.steps
    lr = args.lr * (0.5 * (1 + math.cos(math.pi * t)) if args.lr_schedule == "cosine" else 1.0)
    ramp = min(1.0, max(0.0, (t - args.ramp_start) / (args.ramp_end - args.ramp_start)))

    def at(start: float, end: float | None) -> float:
        return start if end is None else start + (end - start) * ramp
    return lr, LossWeights(args.c_edit, at(args.c_gen, args.c_gen_end), at(args.c_loc, args.c_loc_end),
                           0.0 if args.no_ib else args.beta, args.c_after)


def update(hypernet: IBKE, optimizer: torch.optim.Optimizer, loss: torch.Tensor, parts: dict, clip: float) -> None:
    """Backward, clip, Adam. A non-finite or diverged loss (> DIVERGED) or a non-finite gradient skips
    the update on the device (fused Adam reads found_inf) instead of being checked on the host: the
    step never waits for the device."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(hypernet.parameters(), clip)
    fine = torch.isfinite(parts["loss"]) & (parts["loss"] < DIVERGED) & torch.isfinite(parts["grad_norm"])
    optimizer.found_inf = (~fine).float()
    optimizer.step()




def validate(runner: Runner, hypernet: IBKE, records: list[EditRequest], tokens: str, val_n: int) -> dict:
    """Single edits; with val_n > 1 also val_n at once, and F1 the mean of the two (best.pt's score)."""
    hypernet.eval()
    editor = ibke_editor(hypernet, tokens)
    val = summarise([r for record in records for r in measure(runner, editor, [record])[0]])
    if val_n > 1:
        many = summarise([r for i in range(0, len(records), val_n)
                          for r in measure(runner, editor, records[i:i + val_n])[0]])
        val = {**{f"{k}@1": v for k, v in val.items()}, **{f"{k}@{val_n}": v for k, v in many.items()},
               **{k: (val[k] + many[k]) / 2 for k in ("ES", "GS", "LS", "F1")}}
    hypernet.train()
    return val


def continuations(runner: Runner, records: list[EditRequest], k: int, batch: int = 64,
                  folder: str | None = None) -> dict:
    """--c-after's rows: per record, the unedited model's greedy k-token continuation c of its prompt and
    new answer, as the pair (prompt + " " + target, c), joined without a space (train_step): the row is
    the text the model wrote, scored on all of c. -> {prompt + " " + target: [that pair]} (none where c
    is blank). folder: --cache-dir, where they are kept for a resumed or later run (as evaluate.py's)."""
    rows, texts, unedited = {}, [f"{r.prompt} {r.target}" for r in records], Continuations.kept_in(folder, runner)
    for i in tqdm(range(0, len(texts), batch), desc="continuations (--c-after)", leave=False):
        for text, ids in zip(texts[i:i + batch], unedited(runner.model, runner.tokenizer, texts[i:i + batch], k)):
            c = runner.tokenizer.decode(ids)
            if c.strip():
                rows[text] = [(text, c)]
    unedited.save()
    return rows


# -----------------------------------------------------------------------------
# the run

def build(args: argparse.Namespace, shapes: dict) -> tuple[IBKE, torch.optim.Optimizer, list[float]]:
    """The hypernetwork for these modules and its Adam (λ, where learned, in a group of its own, its rate
    a fixed multiple of --lr's schedule) -> (hypernet, optimizer, each group's multiple)."""
    cfg = EditorConfig(d_m=args.d_m, latent_len=args.latent_len, latent_dim=args.latent_dim, heads=args.heads,
                       ib=not args.no_ib, token_scale=not args.no_scale, eta_init=args.eta_init,
                       aggregate=args.aggregate, ridge_init=args.ridge_init)
    try:
        hypernet = IBKE(shapes, cfg).to(args.device).train()
    except (RuntimeError, MemoryError) as err:               # sizes this machine cannot allocate
        raise SystemExit(f"error: a hypernetwork of --d-m {args.d_m}, --latent-dim {args.latent_dim}, --latent-len "
                         f"{args.latent_len} does not fit ({str(err).splitlines()[0][:80]}); lower them") from None
    params = [[p for k, p in hypernet.named_parameters() if k.endswith("log_lambda") == lam] for lam in (False, True)]
    scales = [1.0, args.lr_lambda / args.lr][:1 + bool(params[1])]
    optimizer = torch.optim.Adam([{"params": p} for p in params[:len(scales)]], lr=args.lr, fused=True)  # 8x on CPU
    return hypernet, optimizer, scales


def main() -> None:
    check_flags(parser.parse_args())                         # the flags as given, before a checkpoint is read
    args, ckpt, new_phase = resume_args(parser)
    check_flags(args)
    if args.dtype == "auto":                                 # saved as chosen: evaluate.py and a resume use it
        args.dtype = native_dtype(args.device)
        print(f"dtype: {args.dtype} (--dtype auto: what {args.device} computes natively; --dtype float32 for full)")
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
    problem = args.chat and no_chat(tokenizer, args.model)
    if problem:
        raise SystemExit(f"error: {problem}")
    if "train" not in records:
        raise SystemExit(f"error: {args.data} has no train split; train on counterfact or zsre and evaluate on it")
    train_records, val_records = split_val(records["train"], args.val_size, args.seed)
    train_records = train_records[:args.train_size or None]                 # a seeded random subset
    if len(train_records) < args.batch_size * (1 + args.extra_loc):
        raise SystemExit(f"error: {len(train_records)} training records are too few for --batch-size "
                         f"{args.batch_size} with --extra-loc {args.extra_loc}; lower them or --val-size")

    hypernet, optimizer, scales = build(args, {n: weight_shape(model.get_submodule(n)) for n in names})
    runner = Runner(model, tokenizer, names, cache=True)
    val_runner = Runner(model, tokenizer, names, cache=True)  # its own cache: the very batches evaluate.py builds
    states_path = runner.use_states(args.cache_dir)
    after = continuations(runner, train_records, args.after_len, folder=args.cache_dir) if args.c_after else None
    sampler = random.Random(args.seed + 1)
    groups = loc_groups(train_records, args.loc_from)
    c = {"step": 0, "best_f1": -1.0, "bad_validations": 0, "nonfinite": 0}   # the loop's counters, saved with it
    if ckpt is not None:
        c = restore(ckpt, hypernet, optimizer, args, new_phase)
        sampler.setstate(c.pop("sampler"))
        print(f"resumed {args.resume or 'latest.pt'} at step {c['step']} (best F1 {c['best_f1']:.3f})")
    latest, best = take_over(args.out, args.overwrite, None if ckpt is None or new_phase else c["step"])
    print(f"editing {len(names)} modules of {args.model}: {', '.join(names)}")
    print(f"hypernetwork: {sum(p.numel() for p in hypernet.parameters()) / 1e6:.1f}M parameters; "
          f"{len(train_records)} train / {len(val_records)} val records of {args.data}")

    def save(path: str, states: bool = True) -> None:
        atomic_save({**state(hypernet, optimizer, args, c), "sampler": sampler.getstate()}, path)
        if path == latest and states and states_path:       # --cache-dir: for later runs of this model
            runner.save_states(states_path)

    bar = tqdm(total=args.steps, initial=c["step"], desc="train", dynamic_ncols=True)
    log, stop = StepLog(args.out, bar, c, on_diverged=lambda: save(latest, False)), Stop(bar)
    while c["step"] < args.steps:
        n = draw_n(sampler, args.batch_size, args.sample_n, args.p_single)
        batch, others = draw(sampler, train_records, n, args.extra_loc, args.loc_from, groups)
        if args.chat:
            batch, others = asked_in_chat(sampler, tokenizer, args.chat, batch, others, args.chat_rows == "all")
        lr, weights = schedule(args, c["step"])
        for group, scale in zip(optimizer.param_groups, scales):
            group["lr"] = lr * scale                        # × 1.0: the hypernetwork's lr exactly as scheduled
        loss, parts = train_step(runner, hypernet, batch, others, weights, args.tokens, args.chunk, after)
        update(hypernet, optimizer, loss, parts, args.clip)
        first_editor = hypernet.editors[next(iter(hypernet.editors))]
        parts["eta"] = first_editor.log_eta.detach().exp().mean()
        if args.aggregate != "sum":
            parts["lambda"] = first_editor.log_lambda.detach().exp().mean()
        c["step"] += 1
        step = c["step"]
        log.add(step, n, parts)
        bar.update(1)
        if step % args.log_every == 0:
            log.read()
        if stop:
            log.read()
            save(latest)
            bar.close()
            print(f"stopped by {stop.signal} at step {step}: saved {latest}; continue with "
                  f"python train.py --out {args.out} --resume", file=sys.stderr)
            sys.exit(130 if stop.signal == "SIGINT" else 143)
        if step % args.save_every == 0 and step % args.val_every != 0:
            log.read()
            save(latest, states=False)
        if step % args.val_every == 0 or step == args.steps:
            log.read()
            val = validate(val_runner, hypernet, val_records, args.tokens, args.val_n)
            usable = finite(hypernet)                       # a diverged editor is never best.pt
            improved = usable and val["F1"] > c["best_f1"]
            c["best_f1"] = val["F1"] if improved else c["best_f1"]
            c["bad_validations"] = 0 if improved else c["bad_validations"] + 1
            log.validation(step, val, args.val_n, improved, usable, peak_mib(args.device))
            if improved:
                save(best)
            save(latest)
            if c["bad_validations"] >= args.patience:
                bar.write(f"early stop: no better validation F1 in {args.patience} validations")
                break
            log.restart_clock()                             # ms/step counts training steps only
    log.read()
    bar.close()
    save(latest)
    print(f"done at step {c['step']}; " + (f"best validation F1 {c['best_f1']:.3f} in {best}" if os.path.exists(best)
                                           else f"no validation in this run (--val-every {args.val_every}); "
                                                f"{latest} holds it"))


if __name__ == "__main__":
    main()

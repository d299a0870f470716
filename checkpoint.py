"""
The checkpoint: the one dict that rebuilds a trained editor, written atomically; reading and checking
it; rebuilding its hypernetwork on a model; train.py's flags checked, and merged with a checkpoint's
on --resume; what a resume or a second phase keeps; the generators' states. A run's folder (its lock,
log and resumable results) is rundir.py's.

    python checkpoint.py out/ibke/best.pt          # what a checkpoint holds: model, step, flags, scores

A checkpoint (train.py writes best.pt and latest.pt) is
    {"hypernet": state dict, "optimizer": Adam's state dict, "step", "config": every train.py flag,
     "editor": EditorConfig as a dict, "model": --model, "shapes": {module: (d_in, d_out)},
     "best_f1", "bad_validations", "nonfinite", "sampler": random.Random state,
     "torch_rng", "cuda_rng": the training GPU's generator or None}
"""
import argparse
import dataclasses
import math
import os
import sys

import torch

from data import MAX_ANSWER
from hypernet import IBKE, EditorConfig
from model import ModelError, weight_shape


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not one train.py wrote."""


KEYS = ("hypernet", "optimizer", "step", "config", "editor", "model", "shapes")
# a resume keeps the checkpoint's architecture, base model and validation split; a second phase
# (--resume CKPT of another run) may change how edits combine and which modules are edited
FIXED = ("model", "data", "seed", "val_size", "d_m", "latent_len", "latent_dim", "heads", "no_ib", "no_scale", "tokens")
PHASE = ("aggregate", "edit_modules", "edit_layers")
FLOAT32_MAX = torch.finfo(torch.float32).max   # a rate or weight above it overflows in float32 (inf)
BEFORE = {"train_size": 0, "ramp_end": 1.0, "lr_schedule": "constant", "c_loc_end": None, "c_gen_end": None,
          "aggregate": "sum", "sample_n": "uniform", "val_n": 1}   # what a checkpoint from before these flags ran with


# -----------------------------------------------------------------------------
# writing and reading

def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file beside `path`, then renamed over it: a reader sees the old file or
    the new one, never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def finite(hypernet: torch.nn.Module) -> bool:
    """Whether every parameter is finite (a checkpoint to edit with must be; one read, at saving)."""
    return all(torch.isfinite(p).all() for p in hypernet.parameters())


def read_checkpoint(path: str) -> dict:
    """The dict train.py saves, read on the host, or CheckpointError: "not a checkpoint of this project"."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one with `python train.py --out DIR`")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; give a checkpoint file in it (best.pt or latest.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, empty file, another pickle: all mean the same to a user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
        raise CheckpointError(f"not a checkpoint of this project: {path} ({type(err).__name__}: {reason})") from None
    missing = [k for k in KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"not a checkpoint of this project: {path} (it has no {', '.join(missing)})")
    return ckpt


def editor_of(ckpt: dict, model: torch.nn.Module, path: str) -> tuple[IBKE, dict]:
    """The checkpoint's hypernetwork on the model's device, in eval mode, after checking that it edits
    this model -> (hypernet, ckpt without its optimizer state and weights: Adam's moments, twice the
    hypernetwork's size, are not needed to edit and would sit on the device for the whole run)."""
    shapes = {n: tuple(s) for n, s in ckpt["shapes"].items()}
    found = {}
    for n in shapes:
        try:
            found[n] = weight_shape(model.get_submodule(n))
        except AttributeError:
            found[n] = None
    if found != shapes:
        raise ModelError(f"checkpoint {path} was trained on '{ckpt['model']}' and edits {shapes}; "
                         f"this model ({model.name_or_path}) has {found}. Use the model it was trained on.")
    hypernet = IBKE(shapes, EditorConfig(**ckpt["editor"]))
    hypernet.load_state_dict(ckpt["hypernet"])
    if not finite(hypernet):
        raise CheckpointError(f"{path} holds non-finite weights (a diverged run); use an earlier checkpoint "
                              f"or train again with a lower --lr")
    ckpt = {k: v for k, v in ckpt.items() if k not in ("optimizer", "hypernet")}
    return hypernet.to(model.device).eval(), ckpt


# -----------------------------------------------------------------------------
# resuming

def resume_args(parser: argparse.ArgumentParser,
                argv: list[str] | None = None) -> tuple[argparse.Namespace, dict | None, bool]:
    """train.py's flags with a --resume's checkpoint merged in -> (args, checkpoint or None, new_phase).
    The checkpoint's flags stand unless given again; those in FIXED (and in PHASE, unless this is a new
    phase: --resume CKPT of another run) may not change; a loss weight given without its -end is held."""
    args = parser.parse_args(argv)
    defaults, unset = vars(parser.parse_args([])), object()      # given flags: those not left at `unset`
    marked = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(defaults, unset)))
    given = {k: v for k, v in vars(marked).items() if v is not unset}
    ckpt, new_phase = None, False
    if args.resume is not None:
        latest = os.path.join(args.out, "latest.pt")
        source = args.resume or latest
        if source == latest and not os.path.exists(latest) and os.path.exists(os.path.join(args.out, "log.jsonl")):
            raise SystemExit(f"error: --resume: the run in --out {args.out} stopped before its first checkpoint "
                             f"(log.jsonl, no latest.pt); start it again without --resume")
        try:
            ckpt = read_checkpoint(source)
        except CheckpointError as err:
            raise SystemExit(f"error: --resume: {err}")
        new_phase = os.path.abspath(source) != os.path.abspath(latest)
        saved = {**BEFORE, **ckpt["config"]}
        for k in FIXED + (() if new_phase else PHASE):
            if k in given and given[k] != saved.get(k):
                raise SystemExit(f"error: {source} is a checkpoint of {k} {saved.get(k)!r}, not {given[k]!r}; "
                                 f"the checkpoint fixes --{k.replace('_', '-')}: drop the flag, or train anew")
        args = argparse.Namespace(**{**defaults, **saved, **given, "overwrite": given.get("overwrite", False),
                                     "resume": args.resume, "eta_scale": given.get("eta_scale", 1.0)})
    for k in ("c_loc", "c_gen"):
        if k in given and f"{k}_end" not in given:
            setattr(args, f"{k}_end", None)
    return args, ckpt, new_phase

def check_flags(args: argparse.Namespace) -> None:
    """train.py's flags (as given, then as merged with a checkpoint's): ranges, combinations and --out,
    before any work; one line naming the problem."""
    finite_positive = {k: getattr(args, k) for k in ("lr", "lr_lambda", "clip", "eta_init", "ridge_init", "eta_scale")}
    at_least_1 = {k: getattr(args, k) for k in ("steps", "batch_size", "val_every", "val_size", "patience", "log_every",
                                                "save_every", "d_m", "chunk", "val_n", "latent_dim", "heads",
                                                "after_len")}
    rules = [(v >= 1, f"--{k.replace('_', '-')} {v}: give at least 1") for k, v in at_least_1.items()]
    rules += [(args.latent_len >= 0, f"--latent-len {args.latent_len}: give 0 (no latent: MEND) or more"),
              (args.latent_len or args.no_ib, "--latent-len 0 has no latent to bottleneck: add --no-ib (MEND: also "
                                              "--no-scale)")]
    rules += [(0 < v < FLOAT32_MAX, f"--{k.replace('_', '-')} {v}: give a positive number below 3.4e38 (float32)")
              for k, v in finite_positive.items()]
    rules += [(0 <= v < FLOAT32_MAX, f"--{k.replace('_', '-')} {v}: give 0 or a positive weight below 3.4e38 (float32)")
              for k, v in {"c_edit": args.c_edit, "c_gen": args.c_gen, "c_loc": args.c_loc, "beta": args.beta,
                           "c_loc_end": args.c_loc_end, "c_gen_end": args.c_gen_end, "c_after": args.c_after}.items()
              if v is not None]
    rules += [(0 <= args.ramp_start < 1, f"--ramp-start {args.ramp_start}: give a fraction of --steps, 0 to below 1"),
              (args.ramp_start < args.ramp_end <= 1,
               f"--ramp-end {args.ramp_end}: give a fraction of --steps above --ramp-start ({args.ramp_start}), at "
               f"most 1")]
    rules += [(0 <= args.seed < 2 ** 63, f"--seed {args.seed}: give 0 to 2^63 - 1 (torch's generators take 64 bits)")]
    rules += [(args.eta_scale == 1 or args.resume,
               f"--eta-scale {args.eta_scale}: it scales a checkpoint's η at the start of a second phase; "
               f"give --resume CKPT")]
    rules += [(args.after_len <= MAX_ANSWER, f"--after-len {args.after_len}: give at most {MAX_ANSWER} (the answer "
                                             f"tokens a row keeps, data.MAX_ANSWER)"),
              (args.extra_loc >= 0, f"--extra-loc {args.extra_loc}: give 0 or more"),
              (0 <= args.p_single <= 1, f"--p-single {args.p_single}: give a probability from 0 to 1"),
              (0 <= args.chat <= 1, f"--chat {args.chat}: give a share of the prompts from 0 to 1"),
              (args.chat or args.chat_rows == "all", "--chat-rows says which prompts --chat asks in the template; "
                                                     "give --chat SHARE too"),
              (args.train_size >= 0, f"--train-size {args.train_size}: give 0 (all records) or more"),
              (args.dtype != "float16",
               "--dtype float16: training here has no loss scaling, so the gradients u and ΔW's "
               "underflow in float16; use bfloat16 (the same memory, float32's range) or float32"),
              (args.edit_layers >= 0,
               f"--edit-layers {args.edit_layers}: give the number of last blocks to edit, or 0 for all"),
              (args.heads < 1 or args.d_m % args.heads == 0,
               f"--heads {args.heads} must divide --d-m {args.d_m} (each head gets d_m / heads)"),
              (not os.path.exists(args.out) or os.path.isdir(args.out),
               f"--out {args.out} is a file; give a folder for best.pt, latest.pt and log.jsonl")]
    for ok, problem in rules:
        if not ok:
            raise SystemExit(f"error: {problem}")
    # a run is its checkpoints: a log.jsonl alone is a run killed before its first one, which a new run replaces
    held = [f for f in ("latest.pt", "best.pt") if os.path.exists(os.path.join(args.out, f))]
    continuing = args.resume is not None and os.path.abspath(args.resume or os.path.join(args.out, "latest.pt")) == \
        os.path.abspath(os.path.join(args.out, "latest.pt"))
    if held and not continuing and not args.overwrite:
        raise SystemExit(f"error: --out {args.out} holds a run ({', '.join(held)}); continue it with --resume, "
                         f"replace it with --overwrite, or give another --out")


def restore(ckpt: dict, hypernet: IBKE, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
            new_phase: bool) -> dict:
    """Load a checkpoint into a run: the hypernetwork (in a new phase that edits other modules, carried
    over from the nearest edited block), Adam's state where its parameter groups still match, the
    generators -> the loop's counters (step, best_f1, bad_validations, nonfinite, sampler state)."""
    then = {n: tuple(s) for n, s in ckpt["shapes"].items()}
    same_modules = then == hypernet.shapes
    weights = ckpt["hypernet"]
    if new_phase and args.eta_scale != 1:                # every η × eta_scale, before any is carried over
        weights = {k: v + math.log(args.eta_scale) if k.endswith("log_eta") else v for k, v in weights.items()}
        print(f"every η of {args.resume} × {args.eta_scale:g}")
    aggregate = {**BEFORE, **ckpt["config"]}["aggregate"]
    if same_modules:
        hypernet.load_state_dict(weights, strict=args.aggregate == aggregate)  # else λ: new or gone
    else:
        added = hypernet.carry_over(weights, then)
        print(f"edited modules: {len(then)} -> {len(hypernet.shapes)}; new, from the nearest edited block: "
              f"{', '.join(added) or 'none'}")
    if same_modules and len(ckpt["optimizer"]["param_groups"]) == len(optimizer.param_groups):
        optimizer.load_state_dict(ckpt["optimizer"])
    else:                                                # λ's group or the modules are new: Adam starts afresh
        why = ("the edited modules changed" if not same_modules
               else f"--aggregate {aggregate} -> {args.aggregate}" if aggregate != args.aggregate
               else "the checkpoint predates λ's own parameter group")
        new_lambda = aggregate == "sum" and args.aggregate != "sum"
        print(f"a fresh optimizer ({why})" + (f"; λ from --ridge-init {args.ridge_init}" if new_lambda else ""))
    counters = {k: ckpt[k] for k in ("step", "best_f1", "bad_validations", "nonfinite", "sampler")}
    if new_phase:  # its losses may differ: best.pt of this --out is judged within this phase
        counters.update(best_f1=-1.0, bad_validations=0)
    restore_rng(ckpt, torch.device(args.device))
    return counters


def state(hypernet: IBKE, optimizer: torch.optim.Optimizer, args: argparse.Namespace, counters: dict) -> dict:
    """The checkpoint dict (see the top of this file) of a run as it stands."""
    return {"hypernet": hypernet.state_dict(), "optimizer": optimizer.state_dict(), "config": vars(args),
            "editor": dataclasses.asdict(hypernet.cfg), "model": args.model, "shapes": hypernet.shapes, **counters,
            **rng_state(torch.device(args.device))}


def rng_state(device: torch.device) -> dict:
    """The generators a run draws from: the host's, and the training GPU's (only that one: a resume may
    see other GPUs)."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(ckpt: dict, device: torch.device) -> None:
    """Set the generators rng_state saved. A list under cuda_rng is one state per GPU that was visible
    (older checkpoints): the training device's is taken where the list has it."""
    torch.set_rng_state(ckpt["torch_rng"])
    state = ckpt.get("cuda_rng")
    if isinstance(state, list):
        i = device.index if device.index is not None else 0
        state = state[i] if device.type == "cuda" and i < len(state) else None
    if state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "cuda":
        print(f"note: the checkpoint holds no generator state for {device}; its random draws start afresh")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) == 2 else 2)
    try:
        ckpt = read_checkpoint(sys.argv[1])
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(ckpt["config"].items())
                     if v not in (None, False))
    print(f"{sys.argv[1]}: {ckpt['model']}, step {ckpt['step']}, best validation F1 "
          f"{ckpt.get('best_f1', math.nan):.3f}, {len(ckpt['shapes'])} edited modules, "
          f"{sum(v.numel() for v in ckpt['hypernet'].values()) / 1e6:.1f}M parameters\nflags: {flags}")

"""
A run's files: the one checkpoint dict that rebuilds a trained editor, written atomically; reading
and checking it; rebuilding its hypernetwork on a model; what a resume or a second phase keeps; the
generators' states; a lock by which a run owns its output; evaluate.py's resumable results file.

    python checkpoint.py out/ibke/best.pt          # what a checkpoint holds: model, step, flags, scores

A checkpoint (train.py writes best.pt and latest.pt) is
    {"hypernet": state dict, "optimizer": Adam's state dict, "step", "config": every train.py flag,
     "editor": EditorConfig as a dict, "model": --model, "shapes": {module: (d_in, d_out)},
     "best_f1", "bad_validations", "nonfinite", "sampler": random.Random state,
     "torch_rng", "cuda_rng": the training GPU's generator or None}
"""
import argparse
import dataclasses
import json
import math
import os
import sys

import torch

from hypernet import IBKE, EditorConfig
from model import ModelError, weight_shape


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not one train.py wrote."""


KEYS = ("hypernet", "optimizer", "step", "config", "editor", "model", "shapes")
# a resume keeps the checkpoint's architecture, base model and validation split; a second phase
# (--resume CKPT of another run) may change how edits combine and which modules are edited
FIXED = ("model", "data", "seed", "val_size", "d_m", "latent_len", "latent_dim", "heads", "no_ib", "no_scale", "tokens")
PHASE = ("aggregate", "edit_modules", "edit_layers")
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


def write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
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

def resume_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, dict | None, bool]:
    """train.py's flags with a --resume's checkpoint merged in -> (args, checkpoint or None, new_phase).
    The checkpoint's flags stand unless given again; those in FIXED (and in PHASE, unless this is a new
    phase: --resume CKPT of another run) may not change; a loss weight given without its -end is held."""
    args = parser.parse_args(argv)
    defaults, unset = vars(parser.parse_args([])), object()      # given flags: those not left at `unset`
    given = {k: v for k, v in vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(defaults, unset)))).items()
             if v is not unset}
    ckpt, new_phase = None, False
    if args.resume is not None:
        latest = os.path.join(args.out, "latest.pt")
        source = args.resume or latest
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
                                     "resume": args.resume})
    for k in ("c_loc", "c_gen"):
        if k in given and f"{k}_end" not in given:
            setattr(args, f"{k}_end", None)
    return args, ckpt, new_phase


def restore(ckpt: dict, hypernet: IBKE, optimizer: torch.optim.Optimizer, args: argparse.Namespace, new_phase: bool) -> dict:
    """Load a checkpoint into a run: the hypernetwork (in a new phase that edits other modules, carried
    over from the nearest edited block), Adam's state where its parameter groups still match, the
    generators -> the loop's counters (step, best_f1, bad_validations, nonfinite, sampler state)."""
    then = {n: tuple(s) for n, s in ckpt["shapes"].items()}
    same_modules = then == hypernet.shapes
    aggregate = {**BEFORE, **ckpt["config"]}["aggregate"]
    if same_modules:
        hypernet.load_state_dict(ckpt["hypernet"], strict=args.aggregate == aggregate)  # else λ: new or gone
    else:
        added = hypernet.carry_over(ckpt["hypernet"], then)
        print(f"edited modules: {len(then)} -> {len(hypernet.shapes)}; new, from the nearest edited block: {', '.join(added) or 'none'}")
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
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


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


def trim_log(path: str, step: int) -> None:
    """A resumed run's log.jsonl as of its checkpoint: lines after `step` are redone, a torn last line
    (the process killed mid-write) is dropped."""
    if not os.path.exists(path):
        return
    lines = [line for line in open(path) if line.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            if i < len(lines) - 1:
                raise SystemExit(f"error: {path} is damaged at line {i + 1}; move it away and --resume again")
    if len(kept) < len(lines):
        print(f"log.jsonl: dropped {len(lines) - len(kept)} lines after step {step} (they are redone)")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


# -----------------------------------------------------------------------------
# owning an output

class RunLock:
    """`with RunLock(path, what):` this process owns `path` (train.py: its --out folder; evaluate.py: its
    --out file; a --memory file), `what` its flag and value: a second run into it stops at once with one
    line naming the first. The lock is
    `<path>.lock` holding the owner's pid, made atomically (O_EXCL); one left by a process that is gone
    is taken over. A folder made for the lock and left empty by the run is removed with it."""

    def __init__(self, path: str, what: str):
        self.file, self.what = path.rstrip("/") + ".lock", what

    def __enter__(self):
        self.made = not os.path.exists(os.path.dirname(self.file) or ".")
        for _ in range(2):
            try:
                os.makedirs(os.path.dirname(self.file) or ".", exist_ok=True)
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise SystemExit(f"error: {self.what} is in use by another run (pid {owner}, {self.file}); "
                                     f"wait for it, stop it, or give another {self.what.split()[0]}")
                os.remove(self.file)                     # its owner is gone: take it over
                continue
            except OSError as err:                       # read-only, not a folder, ...: before any work
                raise SystemExit(f"error: cannot write {self.what} ({err.strerror or err}: {self.file})")
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise SystemExit(f"error: could not take {self.file}; remove it if no run is using {self.what}")

    def _owner(self) -> int | None:
        try:
            return int(open(self.file).read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc):
        if self._owner() == os.getpid():
            os.remove(self.file)
        folder = os.path.dirname(self.file)
        if self.made and folder and os.path.isdir(folder) and not os.listdir(folder):   # made for a run that wrote nothing
            os.rmdir(folder)


def check_folder(path: str | None, flag: str) -> None:
    """A folder the run will write into (--cache-dir): usable now, not after the work. One line if not."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} is a file; give a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".probe.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        raise SystemExit(f"error: cannot write into {flag} {path} ({err.strerror or err})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                              # someone else's process: alive
        return True
    return True


def is_results(path: str) -> bool:
    """Whether path is a results file evaluate.py wrote (one it may replace)."""
    try:
        with open(path) as f:
            return {"summary", "args"} <= json.load(f).keys()
    except (OSError, ValueError, AttributeError):                 # unreadable, not JSON (a checkpoint), not a dict
        return False


def resumable(partial: str, signature: dict, n_batches: int) -> list[dict]:
    """The batches an interrupted run of the same evaluation finished (its first line is the
    signature); a cut last line is dropped and redone; another evaluation's file is started afresh."""
    if not os.path.exists(partial) or os.path.getsize(partial) == 0:
        return []
    lines = open(partial).read().split("\n")
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            if any(rest.strip() for rest in lines[i + 1:]) or i == 0:     # not just a cut last line
                print(f"note: {partial} is damaged at line {i + 1}; starting afresh")
                return []
            break
    if parsed[0] != signature:
        changed = sorted(k for k in signature.keys() | parsed[0].keys() if signature.get(k) != parsed[0].get(k))
        print(f"note: {partial} holds another evaluation ({', '.join(changed)} differ); starting afresh")
        return []
    done = parsed[1:n_batches + 1]
    print(f"resuming: {len(done)} of {n_batches} batches already in {partial}")
    with open(partial, "w") as f:                               # without a cut last line
        f.writelines(json.dumps(line) + "\n" for line in parsed[:len(done) + 1])
    return done


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) == 2 else 2)
    try:
        ckpt = read_checkpoint(sys.argv[1])
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(ckpt["config"].items()) if v not in (None, False))
    print(f"{sys.argv[1]}: {ckpt['model']}, step {ckpt['step']}, best validation F1 {ckpt.get('best_f1', math.nan):.3f}, "
          f"{len(ckpt['shapes'])} edited modules, {sum(v.numel() for v in ckpt['hypernet'].values()) / 1e6:.1f}M parameters\n"
          f"flags: {flags}")

"""
A run's folder: who owns it, what it logs, what an interrupted run left. A lock by which a run owns
its output (train.py: its --out folder; evaluate.py: its results file; a --memory file); training's
log.jsonl (one line a step, read off the device in one wait every --log-every steps) and what stops it
(Ctrl-C, SIGTERM); a resumed run's log trimmed to its checkpoint; evaluate.py's resumable results.
checkpoint.py holds the checkpoint itself.

    python -m pytest -q tests/test_probes.py -k "lock or resume or sigint or torn or second_run"
"""
import json
import math
import os
import signal
import time

import torch

DIVERGED = 1e4  # a loss above this has diverged: a uniform guess over 50k tokens costs ln 50000 ≈ 11 per term


def write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


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


class RunLock:
    """`with RunLock(path, what):` this process owns `path` (train.py: its --out folder; evaluate.py: its
    --out file; a --memory file), `what` its flag and value: a second run into it stops at once with one
    line naming the first. The lock is `<path>.lock` holding the owner's pid, made atomically (O_EXCL);
    one left by a process that is gone is taken over. A folder made for the lock and left empty by the
    run is removed with it."""

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
        # made for a run that wrote nothing
        if self.made and folder and os.path.isdir(folder) and not os.listdir(folder):
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




# -----------------------------------------------------------------------------
# a training run: its folder, its log, what stops it

def take_over(out: str, overwrite: bool, resumed_at: int | None) -> tuple[str, str]:
    """A training run's folder made ready: with --overwrite the run that was there goes; a resumed run's
    log.jsonl is kept as of its checkpoint's step. -> (latest.pt, best.pt) paths."""
    latest, best, log = (os.path.join(out, f) for f in ("latest.pt", "best.pt", "log.jsonl"))
    if overwrite:                                        # asked for: the run that was here goes
        for f in (latest, best, log):
            if os.path.exists(f):
                os.remove(f)
    else:                                                # resumed: as of its checkpoint; new: a checkpoint-less
        trim_log(log, resumed_at or 0)                   # run's lines (check_flags let it be replaced) go
    return latest, best


class StepLog:
    """Training's log.jsonl and its printed lines. A step's numbers stay on the device (reading them makes
    the host wait) until read() takes every pending step's in one wait: each gets its line in the log,
    the newest is printed. Five non-finite or diverged steps in a row stop the run (after on_diverged,
    which saves it); counters["nonfinite"] counts them all."""

    def __init__(self, out: str, bar, counters: dict, on_diverged):
        self.path, self.best = os.path.join(out, "log.jsonl"), os.path.join(out, "best.pt")
        self.bar, self.counters, self.on_diverged = bar, counters, on_diverged
        self.pending, self.in_a_row = [], 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def write(self, line: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def add(self, step: int, n: int, parts: dict) -> None:
        self.pending.append((step, n, parts))

    def read(self) -> None:
        if not self.pending:
            return
        keys = list(self.pending[0][2])
        values = torch.stack([torch.stack([p[k].float() for k in keys]) for _, _, p in self.pending]).tolist()
        ms = 1000 * (time.perf_counter() - self.clock) / len(self.pending)
        for (step, n, _), row in zip(self.pending, values):
            p = dict(zip(keys, row))
            ok = math.isfinite(p["loss"]) and p["loss"] < DIVERGED and math.isfinite(p["grad_norm"])
            self.counters["nonfinite"] += not ok
            self.in_a_row = 0 if ok else self.in_a_row + 1
            self.write({"step": step, "n": n, **{k: round(v, 4) for k, v in p.items()}, "ms": round(ms)})
        skipped = self.counters["nonfinite"]
        self.bar.write(f"step {step}: n {n} | loss {p['loss']:.3f} (edit {p['edit']:.3f} gen {p['gen']:.3f} "
                       f"loc {p['loc']:.4f}" + (f" after {p['after']:.4f}" if "after" in p else "")
                       + f" itm {p['itm']:.3f}) | tokens: edit {p['acc_edit']:.2f} "
                       f"gen {p['acc_gen']:.2f} loc kept {p['agree_loc']:.2f} | {ms:.0f}ms/step"
                       + (f" | {skipped} non-finite or diverged steps skipped" if skipped else ""))
        self.pending.clear()
        self.restart_clock()
        if self.in_a_row >= 5:
            self.on_diverged()
            raise SystemExit(f"error: {self.in_a_row} non-finite or diverged (> {DIVERGED:g}) losses in a row up "
                             f"to step {step}; lower --lr or --eta-init"
                             + (f", or resume from {self.best}" if os.path.exists(self.best) else ""))

    def validation(self, step: int, val: dict, val_n: int, improved: bool, usable: bool, peak_mib: float) -> None:
        best = self.counters["best_f1"]
        self.bar.write(f"val step {step}: ES {val['ES']:.3f} GS {val['GS']:.3f} LS {val['LS']:.3f} F1 {val['F1']:.3f}"
                       + (f" (n=1: {val['F1@1']:.3f}, n={val_n}: {val[f'F1@{val_n}']:.3f})" if val_n > 1 else "")
                       + (" (best)" if improved else f" (best {best:.3f})")
                       + ("" if usable else "; non-finite weights: not saved as best.pt (lower --lr)"))
        self.write({"step": step, "val": val, "peak_mib": round(peak_mib)})   # device memory on CUDA, else RSS


class Stop:
    """Ctrl-C or SIGTERM while training: the step finishes, latest.pt is saved, the run exits (truthy once
    a signal came; .signal names it). A second one stops at once."""

    def __init__(self, bar):
        self.signal, self.bar = None, bar
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        if self.signal:                                  # a second one: stop at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.bar.write(f"{self.signal}: saving latest.pt after this step (again to stop at once)")

    def __bool__(self) -> bool:
        return self.signal is not None

"""
The paper's experiments, reproduced: sweeps and ablations as grids of train.py runs ×
seeds, each trained and evaluated into results/runs/<run>/seed<k>/, then one table (mean ± std over
seeds) and figures.

    python analysis.py list                               # the experiments, their runs and flags
    python analysis.py run beta                           # the β sweep: 4 runs × 2 seeds × 2000 steps
    python analysis.py run all --jobs 8 --device cuda     # every experiment, 8 runs at a time on one GPU
    python analysis.py latent                             # each edit's mean latent μ, default and --no-ib
    python analysis.py report                             # results/README.md and the figures results/*.png

Every run is train.py's default recipe (its ramp of c_loc and c_gen and its cosine stretched over
--steps) with one change. Every run gets the same budget: --steps training steps, validation every
--val-every (no early stop), best.pt by validation F1 (200 records held out of the train split),
then evaluation at n = 1 on CounterFact-edit records --eval-skip … --eval-skip + --eval-limit
(never used while choosing anything). A run with eval.json is done and skipped, one with latest.pt
resumes: `run` picks up after an interruption, and machines can share the work (--only).
A run shared by experiments (default) is trained once. The runs share the frozen lower blocks'
states of the texts they have seen (train.py and evaluate.py --cache-dir <out>/cache): the first run
computes them, and the later evaluations of the same records skip most of their work.
`report` and `latent`'s plot need matplotlib and scikit-learn (requirements.txt), training and
evaluation do not.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# experiment -> [(run, train.py flags, x for its plot)]; a run name means the same flags everywhere
EXPERIMENTS = {
    "beta": [("beta=0.01", ["--beta", "0.01"], 0.01), ("default", [], 0.1),
             ("beta=0.3", ["--beta", "0.3"], 0.3), ("beta=1", ["--beta", "1"], 1.0)],
    "latent_len": [("l_m=1", ["--latent-len", "1"], 1), ("default", [], 10), ("l_m=20", ["--latent-len", "20"], 20)],
    "ablation": [("default", [], None), ("no-ib", ["--no-ib"], None), ("no-scale", ["--no-scale"], None)],
    "c_loc": [("c_loc_end=1", ["--c-loc-end", "1"], 1.0), ("default", [], 6.0),   # c_loc at the end of its ramp
              ("c_loc_end=10", ["--c-loc-end", "10"], 10.0)],
    # the paper's width
    "width": [("default", [], 512), ("d_m=1920", ["--d-m", "1920", "--latent-dim", "1920"], 1920)],
}
FLAGS = {run: flags for runs in EXPERIMENTS.values() for run, flags, _ in runs}
SHOWN = ["F1", "ES", "GS", "LS", "NS_p"]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("command", choices=["list", "run", "latent", "report"], help="what to do")
parser.add_argument("experiment", nargs="?", default="all", help=f"'all' or one of: {', '.join(EXPERIMENTS)}")
parser.add_argument("--out", default="results", help="folder for the runs, the table and the figures")
parser.add_argument("--steps", type=int, default=2000, help="training steps of every run (the budget)")
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every run")
parser.add_argument("--val-every", type=int, default=250, help="validate every k steps (the validation curves)")
parser.add_argument("--eval-skip", type=int, default=1000, help="evaluate on CounterFact-edit records from this one on")
parser.add_argument("--eval-limit", type=int, default=1000, help="... this many of them")
parser.add_argument("--jobs", type=int, default=1, help="runs at a time (CPU: the cores are shared out among them)")
parser.add_argument("--only", default=None, help="comma-separated run names: run only these (to share the work out)")
parser.add_argument("--device", default=None, help="passed to train.py and evaluate.py (cpu, cuda, cuda:1)")
parser.add_argument("--dtype", default="float32",
                    help="passed to train.py and evaluate.py (float32, as the README's tables ran; or bfloat16)")
parser.add_argument("--data-dir", default="data", help="folder holding the benchmark files")
parser.add_argument("--train-args", default="",
                    help="more train.py flags for every run, e.g. \"--model gpt2-xl --d-m 1920\"")
parser.add_argument("--latent-runs", default="default,no-ib",
                    help="latent: the runs (each of --seeds) whose latents are mapped")
parser.add_argument("--latent-n", type=int, default=300, help="latent: edits per dataset (CounterFact, zsRE, MQuAKE)")


def run_dir(out: str, run: str, seed: int) -> str:
    return os.path.join(out, "runs", run, f"seed{seed}")


def runs_of(experiment: str) -> list[str]:
    if experiment != "all" and experiment not in EXPERIMENTS:
        raise SystemExit(f"error: no experiment '{experiment}'; there are: all, {', '.join(EXPERIMENTS)}")
    names = [r for e, runs in EXPERIMENTS.items() if experiment in ("all", e) for r, _, _ in runs]
    return list(dict.fromkeys(names))


# -----------------------------------------------------------------------------
# run: train, then evaluate, each run in its own folder; what is done is skipped

def commands(args: argparse.Namespace, run: str, seed: int) -> list[list[str]]:
    """The train.py and evaluate.py command lines of one run (train resumes from latest.pt)."""
    d = run_dir(args.out, run, seed)
    common = ["--data-dir", args.data_dir] + (["--device", args.device] if args.device else []) + \
             (["--dtype", args.dtype] if args.dtype else [])
    train = [sys.executable, "train.py", "--out", d, "--seed", str(seed), "--steps", str(args.steps),
             "--val-every", str(args.val_every), "--patience", str(10 ** 9), "--cache-dir",
             os.path.join(args.out, "cache"), *FLAGS[run], *args.train_args.split(), *common]
    if os.path.exists(os.path.join(d, "latest.pt")):
        train.append("--resume")
    evaluate = [sys.executable, "evaluate.py", "--ckpt", os.path.join(d, "best.pt"), "--skip", str(args.eval_skip),
                "--limit", str(args.eval_limit), "--out", os.path.join(d, "eval.json"), "--cache-dir",
                os.path.join(args.out, "cache"), *common]
    return [train, evaluate]


def execute(args: argparse.Namespace, run: str, seed: int) -> tuple[str, int, str]:
    d = run_dir(args.out, run, seed)
    if os.path.exists(os.path.join(d, "eval.json")):
        return run, seed, "done before"
    os.makedirs(d, exist_ok=True)
    env = dict(os.environ, TQDM_MININTERVAL="60")                          # a short log file
    if (args.device or "cpu").startswith("cpu") and args.jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    with open(os.path.join(d, "run.log"), "a") as log:
        for cmd in commands(args, run, seed):
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                return run, seed, f"FAILED: {' '.join(cmd[1:3])}; see {log.name}"
    with open(os.path.join(d, "eval.json")) as f:
        return run, seed, f"F1 {json.load(f)['summary']['F1']:.3f}"


def run(args: argparse.Namespace) -> None:
    names = runs_of(args.experiment)
    if args.only:
        wanted = args.only.split(",")
        unknown = [r for r in wanted if r not in names]
        if unknown:
            raise SystemExit(f"error: --only {','.join(unknown)}: not runs of {args.experiment} ({', '.join(names)})")
        names = wanted
    jobs = [(r, s) for s in args.seeds for r in names]                       # every run's first seed first
    print(f"{len(jobs)} runs ({len(names)} settings × seeds {args.seeds}), {args.steps} steps each, {args.jobs} at a "
          f"time")
    failed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for r, s, outcome in pool.map(lambda job: execute(args, *job), jobs):
            print(f"{r} seed {s}: {outcome}", flush=True)
            failed += outcome.startswith("FAILED")
    if failed:
        raise SystemExit(f"error: {failed} runs failed (their run.log says why); run the same command again to retry "
                         f"them")


# -----------------------------------------------------------------------------
# report: table and figures from what the runs wrote

def collect(out: str) -> dict[str, list[dict]]:
    """run -> per finished seed: its eval summary, validation curve [(step, F1)] and steps."""
    found = {}
    for r in FLAGS:
        for seed_dir in sorted(os.listdir(os.path.join(out, "runs",
                                                       r))) if os.path.isdir(os.path.join(out, "runs", r)) else []:
            d = os.path.join(out, "runs", r, seed_dir)
            if not os.path.exists(os.path.join(d, "eval.json")):
                continue
            with open(os.path.join(d, "eval.json")) as f:
                done = json.load(f)
            lines = [json.loads(line) for line in open(os.path.join(d, "log.jsonl")) if line.strip()]
            curve = [(x["step"], x["val"]["F1"]) for x in lines if "val" in x]
            found.setdefault(r, []).append({"seed": seed_dir, "summary": done["summary"], "curve": curve,
                                            "steps": max(x["step"] for x in lines),
                                            "config": done.get("trained", {}).get("config")})
    return found


def recipe_differences(found: dict) -> list[str]:
    """The train.py settings, other than each run's own flags and its seed, in which finished runs
    differ (say, runs trained before and after a change of train.py's defaults): empty if none."""
    own = {"seed", "out", "resume", "overwrite", "cache_dir"}
    values = {}
    for r, seeds in found.items():
        mine = own | {f[2:].replace("-", "_") for f in FLAGS[r] if f.startswith("--")}
        for s in seeds:
            for k, v in (s["config"] or {}).items():
                if k not in mine:
                    values.setdefault(k, set()).add(json.dumps(v))
    return sorted(k for k, v in values.items() if len(v) > 1)


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(found: dict, runs: list[str]) -> str:
    lines = ["| run | seeds | steps | " + " | ".join(SHOWN) + " |", "|---" * (len(SHOWN) + 3) + "|"]
    for r in runs:
        if r not in found:
            continue
        cells = []
        for k in SHOWN:
            values = [x["summary"][k] for x in found[r] if k in x["summary"]] or [float("nan")]
            m, s = spread(values)
            cells.append(f"{m:.3f} ± {s:.3f}" if len(values) > 1 else f"{m:.3f}")   # one seed: no spread to show
        lines.append(f"| {r} | {len(found[r])} | {min(x['steps'] for x in found[r])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot, drawing to files (imported here: training and evaluation never need it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figures(found: dict, out: str) -> list[str]:
    plt = pyplot()
    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        made.append(name)

    for experiment, xlabel, log in (("beta", "β (ITM weight)", True), ("latent_len", "l_m (latent vectors)", False)):
        runs = [(r, x) for r, _, x in EXPERIMENTS[experiment] if r in found]
        if len(runs) < 2:
            continue
        fig, axes = plt.subplots(1, 4, figsize=(13, 3))
        for ax, k in zip(axes, ["F1", "ES", "GS", "LS"]):
            xs = [x for _, x in runs]
            stats = [spread([s["summary"][k] for s in found[r]]) for r, _ in runs]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3)
            for r, x in runs:
                ax.scatter([x] * len(found[r]), [s["summary"][k] for s in found[r]], s=8, color="grey", zorder=3)
            ax.set(xlabel=xlabel, title=k, xscale="log" if log else "linear")
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        save(fig, f"{experiment}.png")

    runs = [r for r, _, _ in EXPERIMENTS["ablation"] if r in found]
    if "default" in runs and len(runs) > 1:
        fig, (deltas, curves) = plt.subplots(1, 2, figsize=(12, 3.5))
        keys = ["F1", "ES", "GS", "LS", "NS_p"]
        base = {k: spread([s["summary"][k] for s in found["default"]]) for k in keys}
        others = [r for r in runs if r != "default"]
        for i, r in enumerate(others):                              # the ablation minus the default, per metric
            x = np.arange(len(keys)) + 0.25 * (i - (len(others) - 1) / 2)
            stats = [spread([s["summary"][k] for s in found[r]]) for k in keys]
            deltas.errorbar(x, [m - base[k][0] for (m, _), k in zip(stats, keys)],   # ± both runs' seed spreads
                            yerr=[(sd ** 2 + base[k][1] ** 2) ** 0.5 for (_, sd), k in zip(stats, keys)],
                            fmt="o", capsize=3, label=r, color=f"C{i + 1}")
            for xi, k in zip(x, keys):
                deltas.scatter([xi] * len(found[r]), [s["summary"][k] - base[k][0] for s in found[r]], s=8,
                               color="grey", zorder=3)
        deltas.axhline(0, color="C0", lw=1, label="default")
        deltas.set_xticks(np.arange(len(keys)), keys)
        deltas.set(ylabel="minus the default",
                   title="held-out CounterFact, n = 1 (mean; bars: seed spreads; dots: seeds)")
        for r in runs:
            steps = sorted({st for s in found[r] for st, _ in s["curve"]})
            per_step = [[f for s in found[r] for st, f in s["curve"] if st == step] for step in steps]
            color = "C0" if r == "default" else f"C{others.index(r) + 1}"
            curves.plot(steps, [statistics.fmean(v) for v in per_step], marker=".", label=r, color=color)
            curves.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2, color=color)
        curves.set(xlabel="step", ylabel="validation F1", title="validation F1 (mean; band: min–max over seeds)")
        deltas.legend(fontsize=8), curves.legend(fontsize=8)
        save(fig, "ablation.png")

    runs = [(r, x) for r, _, x in EXPERIMENTS["c_loc"] if r in found]
    if len(runs) >= 2:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        for r, x in runs:
            (gm, gs), (lm, ls) = (spread([s["summary"][k] for s in found[r]]) for k in ("GS", "LS"))
            ax.errorbar(lm, gm, xerr=ls, yerr=gs, marker="o", capsize=3)
            ax.annotate(f"c_loc → {x:g}", (lm, gm), textcoords="offset points", xytext=(5, 5))
        ax.set(xlabel="LS (locality)", ylabel="GS (generality)", title="the trade-off as c_loc's ramp varies")
        save(fig, "c_loc.png")
    return made


def latents(z) -> dict[str, list[tuple[str, np.ndarray]]]:
    """latent.npz's mean latents by run: run -> [(seed, (edits, Z) array)] (keys mu_<run>@seed<k>)."""
    found = {}
    for key in (k for k in z.files if k.startswith("mu_")):
        run, _, seed = key[3:].partition("@")
        found.setdefault(run, []).append((seed, z[key]))
    return found


def latent_figures(out: str) -> list[str]:
    """PCA and t-SNE of each edit's mean latent, by domain and by CounterFact relation, per run."""
    path = os.path.join(out, "latent.npz")
    if not os.path.exists(path):
        return []
    plt = pyplot()
    from sklearn.manifold import TSNE
    z = np.load(path, allow_pickle=False)
    domain, relation = z["domain"], z["relation"]
    runs = {r: seeds[0] for r, seeds in latents(z).items()}                   # each run's first seed
    cf = domain == "counterfact"
    top = [r for r, _ in sorted(((r, (relation[cf] == r).sum()) for r in set(relation[cf])), key=lambda t: -t[1])[:8]]
    fig, axes = plt.subplots(len(runs), 4, figsize=(16, 3.8 * len(runs)), squeeze=False)
    for row, (r, (seed, mu)) in zip(axes, runs.items()):
        mu, r = mu - mu.mean(0), f"{r} {seed}".strip()
        pca = mu @ np.linalg.svd(mu, full_matrices=False)[2][:2].T           # first two principal components
        tsne = TSNE(2, init="pca", perplexity=min(30, len(mu) - 1), random_state=0).fit_transform(mu)  # < samples
        for ax, xy, method in ((row[0], pca, "PCA"), (row[1], tsne, "t-SNE")):
            for d in dict.fromkeys(domain):
                ax.scatter(*xy[domain == d].T, s=5, label=d)
            ax.set(title=f"{r}: {method}, by dataset", xticks=[], yticks=[])
            ax.legend(markerscale=3, fontsize=7)
        for ax, xy, method in ((row[2], pca, "PCA"), (row[3], tsne, "t-SNE")):
            ax.scatter(*xy[cf & ~np.isin(relation, top)].T, s=3, color="lightgrey")
            for rel in top:
                ax.scatter(*xy[relation == rel].T, s=5, label=rel.replace("{}", "…")[:28])
            ax.set(title=f"{r}: {method}, CounterFact by relation", xticks=[], yticks=[])
            ax.legend(markerscale=3, fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latent.png"), dpi=110)
    plt.close(fig)
    return ["latent.png"]


def latent_separation(out: str) -> str:
    """How well each run's latent tells the datasets apart, and CounterFact's relations: the accuracy of a
    10-nearest-neighbour classifier on the mean latents, 5-fold cross-validated (mean ± std over seeds),
    beside chance (the commonest label's share). A markdown table; empty without latent.npz."""
    path = os.path.join(out, "latent.npz")
    if not os.path.exists(path):
        return ""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    z = np.load(path, allow_pickle=False)
    domain, relation = z["domain"], z["relation"]
    cf = domain == "counterfact"
    common = [r for r in set(relation[cf]) if (relation[cf] == r).sum() >= 5]    # relations with 5+ edits
    keep = cf & np.isin(relation, common)
    lines = ["| run | seeds | dataset from latent (chance) | CounterFact relation from latent (chance) |",
             "|---|---|---|---|"]
    for r, seeds in latents(z).items():
        cells = []
        for pick, y in ((slice(None), domain), (keep, relation[keep])):
            acc = [cross_val_score(KNeighborsClassifier(10), mu[pick], y,
                                   cv=5).mean() if len(set(y)) > 1 else float("nan")
                   for _, mu in seeds]
            m, sd = spread(acc)
            cells.append((f"{m:.3f} ± {sd:.3f}" if len(acc) > 1 else f"{m:.3f}") +
                         f" ({max(np.mean(y == c) for c in set(y)):.3f}, {len(y)} edits)")
        lines.append(f"| {r} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(args: argparse.Namespace) -> None:
    found = collect(args.out)
    if not found:
        raise SystemExit(f"error: no finished run in {args.out}/runs; start them with `python analysis.py run all`")
    made = figures(found, args.out) + latent_figures(args.out)
    parts = [f"# IBKE experiments ({args.out}/)\n",
             "Made by `python analysis.py report`; mean ± sample std over seeds; "
             "held-out CounterFact-edit records at n = 1; steps = the fewest any seed ran.\n"]
    differ = recipe_differences(found)
    if differ:
        parts.append(f"**Not comparable as they stand: the runs differ in {', '.join(differ)}** (each eval.json's "
                     "trained.config); rerun the odd ones out.\n")
    for experiment, runs in EXPERIMENTS.items():
        parts += [f"## {experiment}\n", table(found, [r for r, _, _ in runs]) + "\n"]
    separation = latent_separation(args.out)
    if separation:
        parts += ["## latent map\n",
                  "k-NN (k = 10, 5-fold) accuracy from each edit's mean latent μ (`python analysis.py latent`):\n",
                  separation + "\n"]
    parts += [f"![{name}]({name})\n" for name in made]
    with open(os.path.join(args.out, "README.md.tmp"), "w") as f:
        f.write("\n".join(parts))
    os.replace(os.path.join(args.out, "README.md.tmp"), os.path.join(args.out, "README.md"))
    print("\n".join(parts))
    print(f"wrote {args.out}/README.md and {', '.join(made) or 'no figures'}")


# -----------------------------------------------------------------------------
# latent: each edit's mean latent μ (over queries and modules of one shape; shapes concatenated)

def latent(args: argparse.Namespace) -> None:
    import torch
    from data import load
    from editor import Editor, ibke_editor
    from runner import Runner
    edits = {"counterfact": load("counterfact", args.data_dir, "eval")["eval"][args.eval_skip:][:args.latent_n],
             "zsre": load("zsre", args.data_dir, "eval")["eval"][:args.latent_n],
             "mquake": load("mquake", args.data_dir, "eval")["eval"][:args.latent_n]}
    records = [(d, r) for d, rs in edits.items() for r in rs]
    runs = [(n, s) for n in args.latent_runs.split(",") for s in args.seeds]
    missing = [run_dir(args.out, n, s) for n, s in runs if not os.path.exists(os.path.join(run_dir(args.out, n, s),
                                                                                              "best.pt"))]
    if missing:
        raise SystemExit(f"error: no best.pt in {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                         f"train them first with `python analysis.py run all --out {args.out}`")
    if len(records) < 2:
        raise SystemExit(f"error: --latent-n {args.latent_n}: give at least 2 (a map needs more than one edit)")
    arrays = {"domain": np.array([d for d, _ in records]), "relation": np.array([r.relation or "" for _, r in records])}
    for name, seed in runs:
        ckpt = os.path.join(run_dir(args.out, name, seed), "best.pt")
        loaded = Editor.load(ckpt, args.device or "cpu", dtype=args.dtype)
        model, tokenizer, hypernet, saved = loaded.model, loaded.tokenizer, loaded.hypernet, loaded.ckpt
        runner, edit = Runner(model, tokenizer, list(hypernet.shapes),
                              cache=False), ibke_editor(hypernet, saved["config"].get("tokens", "all"))
        seen = {key: [] for key in hypernet.editors}
        hooks = [net.to_mu.register_forward_hook(lambda m, i, o, key=key: seen[key].append(o.detach()))
                 for key, net in hypernet.editors.items()]
        for i in range(0, len(records), 16):
            chunk = [r for _, r in records[i:i + 16]]
            edit(runner, runner.batch([r.prompt for r in chunk], [r.target for r in chunk]))
        for h in hooks:
            h.remove()
        groups = [torch.cat([o.view(len(hypernet.groups[key]), -1, *o.shape[1:]).mean((0, 2)) for o in seen[key]])
                  for key in hypernet.editors]                               # per shape: (edits, Z)
        arrays[f"mu_{name}@seed{seed}"] = torch.cat(groups, 1).float().cpu().numpy()
        print(f"{name} seed {seed}: latents of {len(records)} edits from {ckpt}")
    np.savez(os.path.join(args.out, "latent.npz"), **arrays)
    print(f"wrote {args.out}/latent.npz" + (f" and {', '.join(latent_figures(args.out))}" if _can_plot() else ""))


def _can_plot() -> bool:
    try:
        import matplotlib, sklearn  # noqa: F401
        return True
    except ImportError:
        return False


def main() -> None:
    args = parser.parse_args()
    rules = [(getattr(args, k) >= 1, f"--{k.replace('_', '-')} {getattr(args, k)}: give at least 1")
             for k in ("jobs", "steps", "val_every", "eval_limit", "latent_n")]
    rules += [(args.eval_skip >= 0, f"--eval-skip {args.eval_skip}: give 0 or more"), (args.seeds, "--seeds: give one")]
    for ok, problem in rules:
        if not ok:
            raise SystemExit(f"error: {problem}")
    if args.command == "list":
        for e, runs in EXPERIMENTS.items():
            print(f"{e}: " + "; ".join(f"{r} ({' '.join(f) or 'the defaults'})" for r, f, _ in runs))
    elif args.command == "run":
        run(args)
    elif args.command == "latent":
        latent(args)
    else:
        report(args)


if __name__ == "__main__":
    main()

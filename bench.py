"""
Benchmark: how close IBKE comes to what cannot be beaten. Medians over repeats, ratios measured in
the same run; prints a table and writes bench.json.

    python bench.py                              # default model on this machine (untrained editor: same cost)
    python bench.py --ckpt out/ibke/best.pt      # the editor of a checkpoint
    python bench.py --model gpt2-xl --meta       # sizes and a training-memory estimate; no download

- edit latency, n = 1, 8, 64: edit requests -> applied weight updates, against the floor: one
  forward pass of the base model on the same n edit prompts plus the backward pass down to the
  first edited module (the least work that yields h and u).
- training step, against the plain way: the three forward+backward passes of a step (edit pass;
  post-edit generality and locality passes) as plain full-model passes on the same batch.
- evaluation throughput (edits/s, n = 1) and peak memory (RSS on CPU, max allocated on CUDA).
"""
import argparse
import collections
import json
import statistics
import time

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from data import encode, load
from checkpoint import CheckpointError, editor_of, read_checkpoint
from editor import ibke_editor
from metrics import measure, peak_mib
from hooks import grad_decomposition
from hypernet import IBKE, PAPER_SIZE, EditorConfig
from losses import LossWeights
from memory import EditMemory, rank_or_auto
from model import ModelError, add_device_args, edit_module_names, load_model, meta_model, native_dtype, weight_shape
from runner import Runner, to_device
from train import train_step, update


def sync(device: torch.device) -> None:
    """Wait for the GPU `device`, so that a time covers the work and not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def new_phase(device: torch.device) -> None:
    """Peak memory counted from here: each phase's peak is its own (on CUDA; RSS on a CPU only grows)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def never_waits(fn, device: torch.device) -> bool | None:
    """On CUDA: fn runs under torch.cuda.set_sync_debug_mode("error") without raising (it waited for the
    device at no point that torch knows of, C++ ones included). None on other devices."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError as err:
        print(f"warm step waited for the GPU: {str(err).splitlines()[0]}")
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


class HostSyncs(TorchFunctionMode):
    """Counts, by name, the calls that make the host wait for the GPU: reading a tensor's value
    (.item(), .tolist(), bool/int/float/index of a tensor, .cpu()), and ops whose output size
    depends on values (nonzero, boolean-mask indexing, masked_select, unique, repeat_interleave by
    a tensor). On the CPU they cost little, but they are counted just the same, so a CPU run shows
    what a GPU run would wait for."""
    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}
    SIZED = {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.READS or name in self.SIZED and not (name == "repeat_interleave" and isinstance(args[1], int)):
            self.calls[name] += 1
        elif name in ("__getitem__", "__setitem__", "index_put_", "where") and self._boolean_index(func, args):
            self.calls[f"{name}[bool]"] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _boolean_index(func, args) -> bool:
        if getattr(func, "__name__", "") == "where":
            return len(args) == 1                                  # torch.where(cond): nonzero
        index = args[1] if len(args) > 1 else None
        index = index if isinstance(index, (tuple, list)) else (index,)
        return any(torch.is_tensor(i) and i.dtype == torch.bool for i in index)


class Ops(TorchDispatchMode):
    """Counts the ops that reach the backend: all of them, and those that compute (not views), which
    on a GPU are roughly the kernels launched, each costing the host a few microseconds."""

    def __init__(self):
        super().__init__()
        self.ops, self.computing = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        bookkeeping = ("detach", "lift_fresh", "_unsafe_view", "alias")
        self.computing += not func.is_view and func.__name__.split(".")[0] not in bookkeeping
        return func(*args, **(kwargs or {}))


def count_step(fn) -> dict:
    """Host syncs (by name) and backend ops of one call of fn."""
    with HostSyncs() as syncs, Ops() as ops:
        fn()
    return {"host_syncs": sum(syncs.calls.values()), "by_call": dict(syncs.calls), "ops": ops.ops,
            "computing_ops": ops.computing}


def plain_pass(model, names, batch) -> None:
    """Full forward (every block, LM head everywhere) + backward down to the first edited module:
    hooks.grad_decomposition with its default, full-model forward."""
    grad_decomposition(model, names, batch)


def meta_estimate(name: str, cfg: EditorConfig, tokens_cached: int, step_tokens: int, base_bytes: int = 2) -> dict:
    """Parameter counts on the meta device and a training-memory estimate in GB (base model and its
    activations at base_bytes per number: 2 for bf16). total_GB: what the device holds at the peak of
    a training step; the cached hidden states are on the device on a CPU, in host memory on a GPU
    (runner.Runner), host_GB."""
    model = meta_model(name)
    names = edit_module_names(model)
    shapes = {n: weight_shape(model.get_submodule(n)) for n in names}
    with torch.device("meta"):
        hyper = sum(p.numel() for p in IBKE(shapes, cfg).parameters())
    base = sum(p.numel() for p in model.parameters())
    C, V = model.config.hidden_size, model.config.vocab_size
    n_tail = len({n.rsplit(".mlp", 1)[0] for n in names})
    gb = {"base weights": base_bytes * base,
          "hypernet + grads + Adam (fp32)": 16 * hyper,
          "ΔW and its gradient (fp32)": 8 * sum(a * b for a, b in shapes.values()),
          "activations of the edited blocks (est.)": base_bytes * step_tokens * n_tail * 24 * C,
          "hypernet activations (fp32, est.)": 4 * step_tokens * 2 * len(shapes) * 12 * cfg.d_m,
          "LM head at scored positions (fp32)": 4 * 3 * step_tokens // 4 * V}
    gb = {k: v / 1e9 for k, v in gb.items()}
    return {"model": name, "base_params_M": base / 1e6, "hypernet_params_M": hyper / 1e6,
            "edited_weights_M": sum(a * b for a, b in shapes.values()) / 1e6, "memory_GB": gb,
            "total_GB": sum(gb.values()),
            "host_GB": 2 * base_bytes * tokens_cached * C / 1e9}   # hidden + final states, capacity up to 2x the rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model to benchmark (default: the --ckpt's, else smollm2-135m)")
    parser.add_argument("--ckpt", default=None, help="use this checkpoint's editor (default: a fresh one, same cost)")
    parser.add_argument("--d-m", type=int, default=EditorConfig.d_m, help="hypernetwork width when no --ckpt")
    parser.add_argument("--latent-dim", type=int, default=EditorConfig.latent_dim, help="latent width when no --ckpt")
    parser.add_argument("--data-dir", default="data", help="CounterFact lives here")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per figure (median reported)")
    add_device_args(parser, "auto")
    parser.add_argument("--meta", action="store_true", help="only sizes and memory estimates, on the meta device")
    parser.add_argument("--memory-size", type=int, default=10000,
                        help="edits in the edit memory whose query cost is measured (0: no memory figures)")
    parser.add_argument("--rank", type=rank_or_auto, default="auto",
                        help="rank of the edit memory's updates: auto (per fact, memory.RANKS) or r")
    parser.add_argument("--out", default="bench.json", help="where the figures go")
    args = parser.parse_args()
    for ok, problem in [(args.repeats >= 1, f"--repeats {args.repeats}: give at least 1 (a median needs one)"),
                        (args.memory_size >= 0, f"--memory-size {args.memory_size}: give 0 or more"),
                        (args.rank == "auto" or args.rank >= 1, f"--rank {args.rank}: give at least 1, or auto"),
                        (args.d_m >= 1 and args.latent_dim >= 1, "--d-m, --latent-dim: give at least 1")]:
        if not ok:
            raise SystemExit(f"error: {problem}")
    cfg = EditorConfig(d_m=args.d_m, latent_dim=args.latent_dim)
    ckpt = None
    if args.ckpt:
        try:
            ckpt = read_checkpoint(args.ckpt)
        except CheckpointError as err:
            raise SystemExit(f"error: --ckpt: {err}")
    args.model = args.model or (ckpt["model"] if ckpt else "smollm2-135m")

    if args.meta:
        names = [args.model] + [m for m in ("gpt2-xl", "EleutherAI/gpt-j-6B", "Qwen/Qwen3-8B") if m != args.model]
        paper = EditorConfig(**PAPER_SIZE)
        try:
            rows = [meta_estimate(m, c, tokens_cached=10000 * 4 * 16, step_tokens=8 * 4 * 16)
                    for m in names for c in (paper, cfg)]
        except ModelError as err:
            raise SystemExit(f"error: {err}") from None
        print("| model | d_m | base | hypernet | edited | est. GPU training memory (GB, bf16 base) "
              "| cache, host (GB) |")
        print("|---|---|---|---|---|---|---|")
        for r, c in zip(rows, [paper, cfg] * len(names)):
            print(f"| {r['model']} | {c.d_m} | {r['base_params_M']:.0f}M | {r['hypernet_params_M']:.1f}M | "
                  f"{r['edited_weights_M']:.1f}M | {r['total_GB']:.1f} | {r['host_GB']:.1f} |")
        print("\nbreakdown for", rows[0]["model"], "d_m", paper.d_m,
              {k: round(v, 2) for k, v in rows[0]["memory_GB"].items()})
        json.dump({"meta": rows}, open(args.out, "w"), indent=1)
        return

    if args.dtype == "auto":                          # as train.py: what the device computes natively
        args.dtype = native_dtype(args.device)
    try:
        model, tokenizer = load_model(args.model, args.dtype, args.device)
        names = edit_module_names(model)
        if ckpt:
            hypernet, _ = editor_of(ckpt, model, args.ckpt)
        else:
            hypernet = IBKE({n: weight_shape(model.get_submodule(n)) for n in names}, cfg).to(args.device).eval()
    except (ModelError, CheckpointError) as err:
        raise SystemExit(f"error: {err}")
    device = model.device
    del ckpt
    records = load("counterfact", args.data_dir)["train"]
    figures = {}

    def rows(prompts, targets):  # plain full-model rows on the model's device
        return {k: to_device(v, model.device) for k, v in encode(tokenizer, prompts, targets).items()}

    # edit latency against the floor
    new_phase(device)
    editor = ibke_editor(hypernet)
    for n in (1, 8, 64):
        chunk = records[:n]
        prompts, targets = [r.prompt for r in chunk], [r.target for r in chunk]

        def edit():  # requests -> weight updates ready to apply (hooks.functional_edit applies them as hooks)
            runner = Runner(model, tokenizer, names, cache=False)
            editor(runner, runner.batch(prompts, targets))

        def floor():
            plain_pass(model, names, rows(prompts, targets))
        t_edit, t_floor = median_seconds(edit, args.repeats, device), median_seconds(floor, args.repeats, device)
        figures[f"edit_n{n}"] = {"edit_ms": 1000 * t_edit, "floor_ms": 1000 * t_floor, "ratio": t_edit / t_floor}
    figures["edit_peak_memory_MB"] = peak_mib(device)

    # evaluation throughput, single edits
    runner = Runner(model, tokenizer, names, cache=False)
    eval_records = records[100:100 + 4 * args.repeats]
    sync(device)
    start = time.perf_counter()
    for r in eval_records:
        measure(runner, editor, [r])
    sync(device)
    figures["eval_edits_per_s"] = len(eval_records) / (time.perf_counter() - start)

    if args.memory_size > 0:
        figures["memory"] = memory_costs(model, tokenizer, hypernet, args, records,
                                         t_edit_n1=figures["edit_n1"]["edit_ms"] / 1000)

    new_phase(device)

    # training step against the plain passes, 8 edits (+ 8 extra locality prompts), warm cache
    hypernet.train()
    optimizer = torch.optim.Adam(hypernet.parameters(), lr=1e-4, fused=True)
    runner = Runner(model, tokenizer, names, cache=True)
    batch, others = records[200:208], records[300:308]

    def train_once(batch, others):
        loss, parts = train_step(runner, hypernet, batch, others, LossWeights())
        update(hypernet, optimizer, loss, parts, clip=1.0)

    def step():
        train_once(batch, others)

    edit_rows = rows([r.prompt for r in batch], [r.target for r in batch])
    gen_rows = rows([q for r in batch for q, _ in r.generality], [a for r in batch for _, a in r.generality])
    loc_rows = rows([q for r in batch for q, _ in r.locality] + [o.prompt for o in others],
                    [a for r in batch for _, a in r.locality] + [o.old_target for o in others])

    def plain():
        for rows in (edit_rows, gen_rows, loc_rows):
            plain_pass(model, names, rows)
    t_step, t_plain = median_seconds(step, args.repeats, device), median_seconds(plain, args.repeats, device)
    figures["train_step"] = {"step_ms": 1000 * t_step, "plain_passes_ms": 1000 * t_plain, "ratio": t_step / t_plain,
                             "steps_per_min": 60 / t_step}
    fresh = iter(range(400, 400 + 16 * (args.repeats + 1), 16))

    def cold_step():  # every text new to the cache, as early in training: the lower blocks run too
        i = next(fresh)
        train_once(records[i:i + 8], records[i + 8:i + 16])
    figures["train_step_counts"] = {**count_step(step), "cuda_never_waits": never_waits(step, device)}
    t_cold = median_seconds(cold_step, args.repeats, device)
    figures["train_step_cold"] = {"step_ms": 1000 * t_cold, "ratio": t_cold / t_plain, "steps_per_min": 60 / t_cold}
    figures["train_peak_memory_MB"] = peak_mib(device)
    step_tokens = sum(rows_["attention_mask"].sum().item() for rows_ in (edit_rows, gen_rows, loc_rows))
    estimate = meta_estimate(args.model, hypernet.cfg, tokens_cached=runner.hidden.size, step_tokens=step_tokens,
                             base_bytes=torch.finfo(model.dtype).bits // 8)
    figures["meta_estimate_GB"], figures["meta_estimate_parts_GB"] = estimate["total_GB"], estimate["memory_GB"]
    hypernet.eval()

    device = (torch.cuda.get_device_name(model.device) if model.device.type == "cuda"
              else f"cpu, {torch.get_num_threads()} threads")
    print(f"| figure ({args.model}, {args.dtype}, {device}, median of {args.repeats}) | IBKE | floor / plain | ratio |")
    print("|---|---|---|---|")
    for n in (1, 8, 64):
        f = figures[f"edit_n{n}"]
        print(f"| edit latency, n = {n} | {f['edit_ms']:.0f} ms | {f['floor_ms']:.0f} ms | {f['ratio']:.2f} |")
    f = figures["train_step"]
    print(f"| training step, 8 edits (warm cache) | {f['step_ms']:.0f} ms | {f['plain_passes_ms']:.0f} ms | "
          f"{f['ratio']:.2f} |")
    c = figures["train_step_cold"]
    print(f"| training step, 8 edits (cold: all texts new) | {c['step_ms']:.0f} ms | {f['plain_passes_ms']:.0f} ms | "
          f"{c['ratio']:.2f} |")
    k = figures["train_step_counts"]
    print(f"| warm step: host syncs / ops / computing ops "
          f"| {k['host_syncs']} / {k['ops']} / {k['computing_ops']} | | |")
    if "memory" in figures:
        m = figures["memory"]
        print(f"| edit memory: add one edit (rank {m['rank']}, mean {m['mean_rank']:.1f}) | {m['add_ms']:.0f} ms | "
              f"{figures['edit_n1']['edit_ms']:.0f} ms (an edit) | {m['add_ratio']:.2f} |")
        print(f"| edit memory: a query of 8 prompts, {m['size']} edits, every row routed | {m['query_ms']:.1f} ms | "
              f"{m['forward_ms']:.1f} ms (unedited forward) | {m['query_ratio']:.2f} |")
        print(f"| edit memory: bytes per edit | {m['bytes_per_edit'] / 1000:.1f} kB ({m['size']} edits: "
              f"{m['size'] * m['bytes_per_edit'] / 1e6:.0f} MB) | | |")
    print(f"| evaluation throughput, n = 1 | {figures['eval_edits_per_s']:.1f} edits/s | | |")
    print(f"| peak memory: editing / training | {figures['edit_peak_memory_MB']:.0f} MB / "
          f"{figures['train_peak_memory_MB']:.0f} MB | --meta estimate {1000 * figures['meta_estimate_GB']:.0f} MB | |")
    json.dump({"args": vars(args), **figures}, open(args.out, "w"), indent=1)
    print(f"wrote {args.out}")


def memory_costs(model, tokenizer, hypernet, args, records, t_edit_n1: float) -> dict:
    """The edit memory's costs: adding one edit (against one edit of the editor, t_edit_n1), a query of 8
    prompts through a memory of --memory-size edits with every row routed (against the unedited forward),
    bytes per edit. The memory is filled with copies of real edits under random keys and the records'
    subjects (the gate reads every query's words), the 8 prompts' own keys and subjects among them: the cost
    does not depend on what is stored."""
    from editor import Editor, Fact
    from gate import Subjects
    from key import Key
    editor = Editor(model, tokenizer, hypernet, {"config": {}, "model": args.model}, path="")
    # key.py learn's default block
    key = Key(model.config.hidden_size, layer=min(4, model.config.num_hidden_layers - 1))
    memory = EditMemory(editor, key, args.rank)
    facts = [Fact(r.prompt, r.target, r.subject) for r in records[500:500 + args.repeats + 1]]
    adds = iter(facts)
    t_add = median_seconds(lambda: memory.add([next(adds)]), args.repeats, model.device)
    prompts = [r.prompt for r in records[600:608]]
    n, size, per_edit, mean_rank = memory.n, args.memory_size, memory.bytes_per_edit(), memory.mean_rank()
    memory._grow(size - n, 0)
    g = torch.Generator().manual_seed(0)
    memory.keys[n:size] = torch.nn.functional.normalize(torch.randn(size - n, memory.keys.shape[1], generator=g),
                                                        dim=-1)
    src = torch.arange(n, size) % n                                            # the real edits' updates, in turn
    memory.ranks[n:size], memory.start[n:size], memory.live[n:size] = memory.ranks[src], memory.start[src], True
    memory.keys[n:n + len(prompts)] = memory.keys_of(prompts)                  # every query row finds an edit
    subjects = [f["subject"] for f in memory.facts] + [r.subject for r in records[600:608]]
    memory.subjects = Subjects(subjects + [records[i % len(records)].subject for i in range(size - len(subjects))])
    memory.n, key.threshold, key.gated = size, 0.99, 0.99
    ids = {k: v.to(model.device) for k, v in tokenizer(prompts, return_tensors="pt", padding=True).items()}

    def forward():
        with torch.no_grad():
            model(**ids)

    def query():
        with memory.serving():
            model(**ids)
    assert memory.route(prompts).ge(0).all()
    t_query, t_forward = median_seconds(query, args.repeats,
                                        model.device), median_seconds(forward, args.repeats, model.device)
    return {"rank": memory.rank, "mean_rank": mean_rank, "size": size, "add_ms": 1000 * t_add,
            "add_ratio": t_add / t_edit_n1, "query_ms": 1000 * t_query, "forward_ms": 1000 * t_forward,
            "query_ratio": t_query / t_forward, "bytes_per_edit": per_edit}


if __name__ == "__main__":
    main()

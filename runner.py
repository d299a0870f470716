"""
Running the frozen base model fast (METHOD.md §3, training and evaluation): the blocks below the
first edited module are frozen and never edited, so for a given text they always compute the same
hidden states. Compute them once, run only the edited blocks and above, and apply the LM head only
where a loss or metric is read.

    python -m pytest tests/test_model.py tests/test_fast.py     # equal to full-model passes

Every length and answer position is known on the host from tokenisation (data.tokenize), so a warm
training step never waits for the device (bench.py counts the waits: none).
"""
import hashlib
import itertools
import os

import torch
import torch.nn as nn

from data import pad, tokenize
from model import block_index, blocks_path

class _Stop(Exception):
    pass


def first_edited_block(model: nn.Module, names: list[str]) -> int:
    return min(block_index(model, n) for n in names)


def attention_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, T) right-padding mask -> (B, 1, T, T) additive causal bias, or None where nothing is padding
    (then the model takes its causal path). Given ready, transformers uses it as is, instead of
    asking the device whether the mask has padding (a host-device sync per forward)."""
    if attention_mask is None:
        return None
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool()[:, None, :]                                  # (B, T, T)
    return torch.zeros(allowed.shape, dtype=dtype,
                       device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def hidden_before(model: nn.Module, block: int, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden states entering block `block` (B, T, C); the blocks above are not run."""
    def stop(module, args, kwargs):
        raise _Stop(args[0] if args else kwargs["hidden_states"])
    handle = model.get_submodule(blocks_path(model))[block].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_bias(attention_mask, model.dtype),
                         use_cache=False)
    except _Stop as hidden:
        return hidden.args[0]
    finally:
        handle.remove()
    raise RuntimeError(f"block {block} was never reached")


class _NoPosition(nn.Module):  # GPT-2 adds absolute position embeddings to inputs_embeds; the cache has them
    def forward(self, position_ids):
        return position_ids.new_zeros((), dtype=torch.float32)   # on the device: no host-to-device copy


def run_from_block(model: nn.Module, block: int, hidden: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
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
        return base(inputs_embeds=hidden, attention_mask=attention_bias(attention_mask, hidden.dtype),
                    use_cache=False).last_hidden_state
    finally:
        setattr(parent, attr, blocks)
        if wpe is not None:
            base.wpe = wpe


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without making the host wait for it (pinned, non-blocking)."""
    if torch.device(device).type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def index(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list of indices as a long tensor on `device`."""
    return to_device(torch.tensor(values, dtype=torch.long), device)


def scored_span(start: int, length: int) -> range:
    """A row's scored positions, those whose next token is an answer token (position t predicts
    t + 1), from where its answer starts and its length."""
    return range(max(start, 1) - 1, length - 1)


def positions(batch: dict) -> tuple[list[int], list[int]]:
    """Host lists (rows, cols) of a batch's scored positions, row-major (losses.scored_positions,
    read off the host lengths instead of the labels)."""
    rows, cols = [], []
    for b, (start, length) in enumerate(zip(batch["starts"], batch["lengths"])):
        span = scored_span(start, length)
        rows += [b] * len(span)
        cols += span
    return rows, cols


def _uncached(keys: list, cached: dict) -> list[int]:
    """The first row of each text in `keys` that `cached` does not hold yet."""
    return list({key: b for b, key in reversed(list(enumerate(keys))) if key not in cached}.values())


class Store:
    """Rows of one width in one growing tensor, addressed by offset. Row 0 stays zero, so gathering it
    gives padding. Capacity doubles: few allocations, one gather per batch."""

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
        self.model, self.tokenizer, self.max_len, self.cache, self.names = model, tokenizer, max_len, cache, names
        self.block = first_edited_block(model, names)
        self.device = model.device
        width = model.config.hidden_size
        # the cache grows with the texts seen, so on a GPU it lives in host memory: a batch's rows are
        # gathered there and copied over without waiting (to_device); the GPU holds none of it
        self.keep = torch.device("cpu") if self.device.type == "cuda" else self.device
        # rows of similar length run together on a CPU, where padding costs as much as text; a GPU at
        # these sizes waits on kernel launches, not arithmetic, so there a pass takes all its rows
        self.free = float("inf") if self.device.type == "cuda" else 128
        self.on_part = None         # called with the batch rows each pass of _final runs (memory.Routing.select)
        if cache:
            # entering the block: text -> offset
            self.hidden, self.hidden_at = Store(width, model.dtype, self.keep), {}
            # text -> its tokens; texts in the states file
            self.hidden_n, self.on_disk = {}, set()
            self.final, self.final_at = Store(width, model.dtype, self.keep), {}       # final norm: text -> (offset, n)

    def batch(self, prompts: list[str], targets: list[str], joins: list[str] | None = None) -> dict:
        """Device tensors input_ids, attention_mask, labels (B, T) and hidden (B, T, C); host lists
        keys, lengths, starts (where each answer begins). joins: as data.tokenize's."""
        rows = tokenize(self.tokenizer, prompts, targets, max_len=self.max_len, joins=joins)
        batch = {k: to_device(v, self.device) for k, v in pad(rows, self.tokenizer.pad_token_id).items()}
        joins = joins or [" "] * len(prompts)
        keys = [(p, t) if j == " " else (p, t, j) for p, t, j in zip(prompts, targets, joins)]    # one per text
        batch.update(keys=keys, lengths=[len(ids) for ids, _ in rows],
                     starts=[s for _, s in rows])
        keys, lengths = batch["keys"], batch["lengths"]
        if self.cache:
            store, at = self.hidden, self.hidden_at
        else:
            store, at = Store(self.model.config.hidden_size, self.model.dtype, self.device, 256), {}
        todo = _uncached(keys, at)
        for group in length_groups([lengths[b] for b in todo], free=self.free):  # texts of similar length together
            part = take(batch, [todo[g] for g in group])
            hidden = hidden_before(self.model, self.block, part["input_ids"], padding(part))   # (b, t, C)
            t = hidden.shape[1]
            valid = [j * t + i for j, n in enumerate(part["lengths"]) for i in range(n)]
            offset = store.append(hidden.flatten(0, 1)[index(valid, self.device)])
            for key, n in zip(part["keys"], part["lengths"]):
                at[key], offset = offset, offset + n
                if self.cache:
                    self.hidden_n[key] = n
        T = batch["input_ids"].shape[1]
        gather = [at[key] + t if t < n else 0 for key, n in zip(keys, lengths) for t in range(T)]
        # (B, T, C)
        batch["hidden"] = to_device(store.data[index(gather, store.data.device)], self.device).view(len(keys), T, -1)
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
        groups = length_groups(lengths, free=self.free) if split else [list(range(len(lengths)))]
        counts = [len(scored_span(start, n)) for start, n in zip(batch["starts"], lengths)]
        first = list(itertools.accumulate(counts, initial=0))   # row b's first position in row-major order
        states, order = [], []
        for group in groups:
            part = take(batch, group)
            if self.on_part is not None:
                self.on_part(group)
            rows, cols = positions(part)
            final = run_from_block(self.model, self.block, part["hidden"], padding(part))   # (b, t, C)
            states.append(final[index(rows, self.device), index(cols, self.device)])
            order += [first[b] + j for b in group for j in range(counts[b])]                  # where they go
        states = torch.cat(states) if len(states) > 1 else states[0]
        if order == list(range(len(order))):
            return states
        return states[index(sorted(range(len(order)), key=order.__getitem__), self.device)]   # (N, C)

    def fingerprint(self, modules: list[nn.Module], *extra) -> str:
        """A hash of what computes through `modules`: the config, dtype, device type, `extra`, max_len,
        tokenizer, and the modules' weights (their sums)."""
        checksum = [round(p.detach().double().sum().item(), 6) for m in modules for p in m.parameters()]
        what = [self.model.config.to_json_string(), str(self.model.dtype), self.device.type, *extra, self.max_len,
                self.tokenizer.name_or_path, len(self.tokenizer), checksum]
        return hashlib.sha1(repr(what).encode()).hexdigest()[:16]

    def states_file(self, folder: str) -> str:
        """Where in `folder` this model's cached states go: named by a hash of what computes them (the
        first edited block and the lower blocks' weights among them)."""
        below = [self.model.get_input_embeddings(), *self.model.get_submodule(blocks_path(self.model))[:self.block]]
        return os.path.join(folder, f"states-{self.fingerprint(below, self.block)}.pt")

    def use_states(self, folder: str | None) -> str | None:
        """--cache-dir (train.py, evaluate.py): take this model's states saved in `folder`, saying how
        many -> the file save_states keeps them in; None without a folder."""
        if not folder:
            return None
        path = self.states_file(folder)
        print(f"{self.load_states(path)} texts' lower-block states from {path}")
        return path

    def load_states(self, path: str) -> int:
        """Take the hidden states that save_states wrote to `path` into the cache -> texts taken."""
        if not os.path.exists(path):
            return 0
        try:
            saved = torch.load(path, map_location=self.keep)
        except Exception as err:                         # cut short, not a states file: a cache, rebuilt
            os.replace(path, path + ".damaged")
            print(f"note: {path} could not be read ({type(err).__name__}); moved to {path}.damaged, the states "
                  f"are computed afresh")
            return 0
        offset = self.hidden.append(saved["data"].to(self.model.dtype))
        for key, start, n in zip(saved["keys"], itertools.accumulate(saved["lengths"], initial=0), saved["lengths"]):
            if tuple(key) not in self.hidden_at:
                self.hidden_at[tuple(key)], self.hidden_n[tuple(key)] = offset + start, n
        self.on_disk.update(map(tuple, saved["keys"]))
        return len(saved["keys"])

    def save_states(self, path: str) -> None:
        """Write the cached hidden states (those entering the first edited block) to `path`, added to what
        it holds, atomically: runs of one model share the lower blocks' work (train.py --cache-dir).
        Two runs writing at once may each lose the other's newest texts, which are then recomputed.
        Nothing new since the last save or load: the file is not even read."""
        if self.on_disk.issuperset(self.hidden_at):
            return
        empty = {"keys": [], "lengths": [], "data": self.hidden.data.new_zeros(0, self.hidden.data.shape[1]).cpu()}
        old = torch.load(path) if os.path.exists(path) else empty
        self.on_disk.update(map(tuple, old["keys"]))
        new = [k for k in self.hidden_at if k not in self.on_disk]
        if not new:
            return
        rows = [self.hidden_at[k] + t for k in new for t in range(self.hidden_n[k])]
        data = torch.cat([old["data"], self.hidden.data[index(rows, self.keep)].cpu()])
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save({"keys": old["keys"] + new, "lengths": old["lengths"] + [self.hidden_n[k] for k in new],
                    "data": data}, tmp)
        os.replace(tmp, path)
        self.on_disk.update(new)

    @torch.no_grad()
    def frozen_logits(self, batch: dict) -> torch.Tensor:
        """The unedited model's logits (N, V) at the scored positions: the IL reference p_θ(·|q_l)."""
        if not self.cache:
            return self.scored_logits(batch)[0]
        keys = batch["keys"]
        todo = _uncached(keys, self.final_at)
        if todo:
            part = take(batch, todo)
            offset = self.final.append(self._final(part))
            for key, start, n in zip(part["keys"], part["starts"], part["lengths"]):
                self.final_at[key] = (offset, len(scored_span(start, n)))
                offset += self.final_at[key][1]
        gather = [i for key in keys for i in range(self.final_at[key][0], sum(self.final_at[key]))]
        # (N, V)
        return self.model.get_output_embeddings()(to_device(self.final.data[index(gather, self.keep)], self.device))


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
    """The part's attention mask where it has padding, else None (the model's causal path). On CUDA
    always the mask: given none, transformers reads the position ids off the device to look for packed
    sequences (masking_utils.find_packed_sequence_indices), a host sync."""
    mask = part["attention_mask"]
    return mask if mask.is_cuda or min(part["lengths"]) < max(part["lengths"]) else None


def length_groups(lengths: list[int], slack: float = 1.25, free: float = 128) -> list[list[int]]:
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

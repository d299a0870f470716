"""
A trained IBKE editor, loaded: facts -> an edit (ΔW per edited module) -> the model run with it
applied, or the edit merged into the weights and saved as an ordinary Hugging Face model folder.
evaluate.py, bench.py, analysis.py and edit.py load editors through it.

    from editor import Editor
    editor = Editor.load("out/ibke/best.pt")
    edit = editor.edit([("The Eiffel Tower is in", "Rome")])
    with editor.applied(edit):
        print(editor.generate(["The Eiffel Tower is in"]))
    editor.save("edited/", edit)       # W + ΔW; AutoModelForCausalLM.from_pretrained("edited/") loads it

An edit made here is the edit evaluate.py scores (evaluate.ibke_editor on the facts' prompts and
targets, applied as hooks.functional_edit). Merged, W + ΔW is computed in float32 and rounded once
to the model's dtype: in float32 the merged model's logits equal the applied edit's to rounding of
the sums; in bfloat16 that one rounding of W + ΔW loses part of a small ΔW (hooks.apply_delta).
"""
import datetime
import hashlib
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from checkpoint import editor_of, read_checkpoint
from rundir import write_json
from data import EditRequest
from hooks import apply_delta, dense, functional_edit, grad_decomposition, restore
from hypernet import IBKE
from losses import answer_nll
from metrics import greedy
from model import check_device, load_model, model_path, weight_shape
from runner import Runner


@dataclass
class Fact:
    """One fact to write: the prompt and its new answer; optionally whom it is about, and prompts to
    check it by: rephrases (should give the new answer) and unrelated prompts (should not change)."""
    prompt: str
    target: str
    subject: str = ""
    rephrase: list[str] = field(default_factory=list)
    locality: list[str] = field(default_factory=list)


def as_fact(x) -> Fact:
    """A Fact from a Fact, an EditRequest, a (prompt, target) pair or a dict with those keys."""
    if isinstance(x, Fact):
        return x
    if isinstance(x, EditRequest):
        return Fact(x.prompt, x.target, x.subject, [q for q, _ in x.generality], [q for q, _ in x.locality])
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return Fact(*x)
    if isinstance(x, dict):
        listed = {k: [x[k]] if isinstance(x.get(k), str) else list(x.get(k) or []) for k in ("rephrase", "locality")}
        return Fact(x["prompt"], x["target"], x.get("subject", ""), **listed)
    raise TypeError(f"a fact is a (prompt, target) pair, a dict or a Fact, not {type(x).__name__}")


# -----------------------------------------------------------------------------
# edit functions: (runner, batch of the edit rows) -> {module: ΔW} (evaluate.py's methods)

def ibke_editor(hypernet: IBKE, tokens: str = "all") -> Callable:
    def edit(runner: Runner, batch: dict) -> dict[str, torch.Tensor]:
        decomposition, mask = grad_decomposition(runner.model, list(hypernet.shapes), batch, tokens,
                                                 forward=lambda b: runner.scored_logits(b, split=False))
        with torch.no_grad():
            # factors where cheaper; 64 edits encoded at a time
            return hypernet(decomposition, mask, factored=None, chunk=64)[0]
    return edit


def ft_editor(names: list[str], steps: int = 25, lr: float = 5e-4) -> Callable:
    """FT-L: fine-tune the same modules on the edit prompts (Adam, a fixed number of steps)."""
    def edit(runner: Runner, batch: dict) -> dict[str, torch.Tensor]:
        deltas = {n: torch.zeros(*weight_shape(runner.model.get_submodule(n)), device=runner.model.device,
                                 requires_grad=True) for n in names}
        optimizer = torch.optim.Adam(deltas.values(), lr=lr)
        for _ in range(steps):
            with torch.enable_grad(), functional_edit(runner.model, deltas):
                logits, targets, rows = runner.scored_logits(batch)
                loss = answer_nll(logits, targets, rows, batch["labels"].shape[0]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {n: d.detach() for n, d in deltas.items()}
    return edit


def no_editor(runner: Runner, batch: dict) -> dict[str, torch.Tensor]:
    return {}



class Editor:
    """A loaded editor: the base model, its tokenizer, the hypernetwork and the checkpoint it came from
    (its config and step; not its optimizer state)."""

    def __init__(self, model, tokenizer, hypernet, ckpt: dict, path: str):
        self.model, self.tokenizer, self.hypernet, self.ckpt, self.path = model, tokenizer, hypernet, ckpt, path
        self.names = list(hypernet.shapes)

    @classmethod
    def load(cls, path: str, device: str = "cpu", model: str | None = None, dtype: str | None = None) -> "Editor":
        """From a checkpoint of train.py alone (model: another with the same edited modules; dtype: the
        base model's, default the one trained with). CheckpointError or ModelError say what is wrong."""
        check_device(device, dtype or "float32")
        ckpt = read_checkpoint(path)
        base, tokenizer = load_model(model or ckpt["model"], dtype or ckpt["config"].get("dtype", "float32"), device)
        hypernet, ckpt = editor_of(ckpt, base, path)
        return cls(base, tokenizer, hypernet, ckpt, path)

    @property
    def trained_n(self) -> int:
        """The most edits at once the editor was trained on (its --batch-size)."""
        return self.ckpt["config"].get("batch_size", 1)

    def runner(self, cache: bool = False) -> Runner:
        return Runner(self.model, self.tokenizer, self.names, cache=cache)

    def edit(self, facts) -> dict[str, torch.Tensor]:
        """The edit that writes these facts, all at once: {module: ΔW (d_in, d_out), float32}."""
        facts = [as_fact(f) for f in facts]
        runner = self.runner()
        batch = runner.batch([f.prompt for f in facts], [f.target for f in facts])
        deltas = ibke_editor(self.hypernet, self.ckpt["config"].get("tokens", "all"))(runner, batch)
        return {n: dense(d).float() for n, d in deltas.items()}

    @contextmanager
    def applied(self, deltas: dict):
        """`with editor.applied(edit):` the model runs edited (hooks; its weights are never written)."""
        with functional_edit(self.model, deltas), torch.no_grad():
            yield self.model

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
        """Greedy continuations of the prompts (as the model stands: inside `applied`, edited)."""
        ids = greedy(self.model, self.tokenizer, prompts, max_new_tokens)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def probability(self, prompts: list[str], targets: list[str], edited: Callable | None = None) -> list[float]:
        """P(target | prompt) for each pair: the product over the target's tokens, teacher-forced; inside
        edited(prompts) if given (a context: applied below, or a memory's, memory.EditMemory.applied)."""
        runner = self.runner()
        batch = runner.batch(prompts, targets)
        with edited(prompts) if edited else nullcontext() as routing:
            runner.on_part = getattr(routing, "select", None)          # a memory routes per row
            logits, answer, rows = runner.scored_logits(batch)
        logp = torch.log_softmax(logits.float(), -1).gather(1, answer[:, None])[:, 0]
        per_row = torch.zeros(len(prompts), device=logp.device).index_add_(0, rows, logp)
        return per_row.exp().tolist()

    def save(self, folder: str, deltas: dict, facts, overwrite: bool = False) -> None:
        """The model with the edit merged (W + ΔW) as a Hugging Face folder (safetensors, config,
        tokenizer) and edits.json (the facts, the editor checkpoint's sha256, the base model, ‖ΔW‖ per
        module, the date). Written to a temporary folder beside `folder`, then renamed into place.
        Refused: the base model's own folder; a non-empty folder unless overwrite."""
        folder = os.path.abspath(folder)
        source = os.path.abspath(model_path(self.ckpt["model"]))
        if os.path.exists(source) and os.path.exists(folder) and os.path.samefile(folder, source):
            raise ValueError(f"--save {folder} is the base model's own folder; give another")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"--save {folder} is a file; give a folder")
        if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
            raise ValueError(f"--save {folder} is not empty; give an empty or new folder, or --overwrite")
        tmp = f"{folder}.{os.getpid()}.tmp"
        originals = apply_delta(self.model, deltas)
        try:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(os.path.join(tmp, "edits.json"), {
                "facts": [vars(as_fact(f)) for f in facts], "base_model": self.ckpt["model"],
                "dtype": str(self.model.dtype),
                "editor": os.path.abspath(self.path), "editor_sha256": sha256(self.path),
                "editor_step": self.ckpt["step"],
                "delta_norms": {n: round(d.norm().item(), 6) for n, d in deltas.items()},
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            restore(self.model, originals)             # the loaded model stays unedited
        old = f"{folder}.{os.getpid()}.old"
        if os.path.exists(folder):
            os.replace(folder, old)                    # empty, or --overwrite: set aside until the new one is in
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()

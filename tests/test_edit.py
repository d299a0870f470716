"""editor.py and edit.py: a loaded editor writes facts; the merged model, saved, is an ordinary
Hugging Face folder that answers as the applied edit did; bad input gets one line, nothing written."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import CHATML, DATA_DIR, TINY_EDITOR, reorder_rtol, run
from data import chat_text
from edit import show
from editor import Editor, Fact

FACT = Fact("The Eiffel Tower is in", "Rome", rephrase=["The Eiffel Tower is located in the city of"],
            locality=["The Colosseum is in"])


@pytest.fixture(scope="module")
def llama_ckpt(tiny_folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama-run")
    run("train.py", "--model", tiny_folders["llama"], "--data-dir", DATA_DIR, *TINY_EDITOR, "--eta-init", "1",
        "--steps", "2", "--val-every", "2", "--val-size", "4", "--batch-size", "2", "--dtype", "float32", "--out", out)
    return out / "best.pt"


@pytest.fixture(params=["gpt2", "llama"])
def ckpt(request, trained, llama_ckpt):
    return trained[0] / "b" / "best.pt" if request.param == "gpt2" else llama_ckpt


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_model_answers_as_the_edit_did(ckpt, dtype, tmp_path):
    editor = Editor.load(str(ckpt), "cpu", dtype=dtype)
    deltas = editor.edit([FACT])
    assert all(d.abs().max() > 0 for d in deltas.values())
    ids = editor.tokenizer([FACT.prompt, FACT.rephrase[0]], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = editor.model(**ids).logits
        with editor.applied(deltas):
            applied = editor.model(**ids).logits
    editor.save(str(tmp_path / "edited"), deltas, [FACT])
    with torch.no_grad():
        assert torch.equal(editor.model(**ids).logits, before)                     # the loaded model stays unedited
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=getattr(torch, dtype)).eval()
    for name, delta in deltas.items():                                            # W + ΔW in float32, rounded once
        w, w_saved = editor.model.get_submodule(name).weight, saved.get_submodule(name).weight
        merged = w.float() + (delta if w.shape == delta.shape else delta.T)
        assert torch.equal(w_saved, merged.to(w.dtype)), name
    with torch.no_grad():
        logits = saved(**ids).logits
    if dtype == "float32":   # x(W + ΔW) against xW + xΔW: the same sums in another order (conftest.reorder_rtol)
        cfg = saved.config
        width, depth = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size, cfg.num_hidden_layers
        tol = reorder_rtol(width, depth) * applied.abs().max().item()
        torch.testing.assert_close(logits, applied, rtol=0, atol=tol)
        assert (logits - before).abs().max() > 100 * tol                          # and the edit is there
    record = json.load(open(tmp_path / "edited" / "edits.json"))
    assert record["facts"][0]["target"] == "Rome" and set(record["delta_norms"]) == set(deltas)
    assert len(record["editor_sha256"]) == 64 and record["base_model"] == editor.ckpt["model"]


def test_save_refuses_the_source_folder_and_a_full_one(trained, tiny_folders, tmp_path):
    editor = Editor.load(str(trained[0] / "b" / "best.pt"))
    deltas = editor.edit([FACT])
    source = tiny_folders["gpt2"]
    before = {f: open(os.path.join(source, f), "rb").read() for f in os.listdir(source)}
    with pytest.raises(ValueError, match="base model's own folder"):
        editor.save(source, deltas, [FACT])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        editor.save(str(tmp_path / "full"), deltas, [FACT])
    assert {f: open(os.path.join(source, f), "rb").read() for f in os.listdir(source)} == before
    assert os.listdir(tmp_path / "full") == ["mine.txt"]
    editor.save(str(tmp_path / "full"), deltas, [FACT], overwrite=True)           # asked for: replaced whole
    assert "mine.txt" not in os.listdir(tmp_path / "full") and "edits.json" in os.listdir(tmp_path / "full")
    assert sorted(os.listdir(tmp_path)) == ["full"]                               # nothing stray beside it


def test_edit_py_shows_before_and_after_and_saves(trained, tmp_path):
    ckpt = trained[0] / "b" / "best.pt"
    out = run("edit.py", "--ckpt", ckpt, FACT.prompt, FACT.target, "--ask", "The Colosseum is in", "--save",
              tmp_path / "e")
    assert "[fact] The Eiffel Tower is in" in out.stdout and "[ask] The Colosseum is in" in out.stdout
    assert out.stdout.count("before:") == out.stdout.count("after:") == 2 and "P('Rome'):" in out.stdout
    assert os.path.exists(tmp_path / "e" / "config.json") and os.path.exists(tmp_path / "e" / "edits.json")
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "A is in", "target": "B", "rephrase": "A lies in", "locality": ["C is in"]})
                     + "\n")
    out = run("edit.py", "--ckpt", ckpt, "--facts", facts)
    assert "[rephrase] A lies in" in out.stdout and "[locality] C is in" in out.stdout


def test_chat_shows_the_replies_to_each_prompt_asked_in_the_template(trained, monkeypatch, capsys):
    """--chat: before and after are the replies to each prompt asked as a user's message; P(target) is read
    on the prompt itself."""
    editor = Editor.load(str(trained[0] / "b" / "best.pt"))
    monkeypatch.setattr(editor.tokenizer, "chat_template", CHATML)
    asked, scored = [], []
    monkeypatch.setattr(editor, "generate", lambda prompts, n: asked.extend(prompts) or ["x"] * len(prompts))
    monkeypatch.setattr(editor, "probability", lambda prompts, targets, edited=None: scored.extend(prompts)
                        or [0.5] * len(prompts))
    fact = Fact("The Eiffel Tower is in", "Rome")
    show(editor, [fact], ["Where is the Eiffel Tower?"], editor.edit([fact]), 4, 10, chat=True)
    assert asked == [chat_text(editor.tokenizer, q) for q in [fact.prompt, "Where is the Eiffel Tower?"]] * 2
    assert scored == [fact.prompt] * 2 and "[ask] Where is the Eiffel Tower?" in capsys.readouterr().out


@pytest.mark.parametrize("args,content,message", [
    (["", "Rome"], None, '"prompt" must be a non-empty string'),
    (["The Eiffel Tower is in", " "], None, '"target" must be a non-empty string'),
    (["The Eiffel Tower is in"], None, "give a prompt and its target"),
    ([], None, "nothing to edit"),
    (["--facts", "F"], '{"prompt": "a", "target": "b"}\n{"prompt": "c", "target"\n', "line 2 is not JSON"),
    (["--facts", "F"], '[{"prompt": "a", "target": "b"}, {"prompt": "c"}]',
     'item 1: "target" must be a non-empty string'),
    (["--facts", "F"], '[{"prompt": "a", "target": "b", "rephrase": 3}]', '"rephrase" must be a prompt or a list'),
    (["--facts", "F"], "[]", "holds no facts"),
    (["--facts", "F"], '[{"prompt": "a b", "target": "c", "subject": 3}]',
     '"subject" must be a string that the prompt names'),
    (["The Eiffel Tower is in", "Rome", "--subject", "Louvre"], None,
     "--subject must be a string that the prompt names"),
    (["--memory", "m.mem", "a", "b"], None, "no key at"),
    (["--memory", "m.mem", "--save", "d", "a", "b"], None, "give one of them"),
    (["--memory", "m.mem", "--rank", "0", "a", "b"], None, "--rank 0: give at least 1"),
    (["a", "b", "--chat"], None, "--chat: the tokenizer of"),                # GPT-2's has no chat template
    (["a", "b", "--max-new-tokens", "0"], None, "--max-new-tokens 0: give at least 1"),
])
def test_edit_py_bad_input_gets_one_line(trained, tmp_path, args, content, message):
    if content is not None:
        (tmp_path / "F").write_text(content)
        args = [str(tmp_path / "F") if a == "F" else a for a in args]
    out = run("edit.py", "--ckpt", trained[0] / "b" / "best.pt", *args, check=False)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-500:]


def test_an_editor_for_another_model_is_refused(trained, tiny_folders):
    out = run("edit.py", "--ckpt", trained[0] / "b" / "best.pt", "a", "b", "--model", tiny_folders["llama"],
              check=False)
    assert out.returncode != 0 and "was trained on" in out.stderr and "Traceback" not in out.stderr


def test_edit_py_refuses_a_full_save_folder_before_any_work(trained, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    out = run("edit.py", "--ckpt", trained[0] / "b" / "best.pt", "a", "b", "--save", tmp_path / "full", check=False)
    assert out.returncode != 0 and "not empty" in out.stderr and "loaded" not in out.stdout

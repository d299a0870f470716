"""memory.py, key.py, gate.py: a memory of one edit runs that edit on the rows it routes and the original
model, bit for bit, on the others; the gate takes an edit only where its subject is named; stored at rank r
an update is ΔW's best rank-r approximation; saved and loaded a memory gives the same outputs; a file of
another model or editor is refused in one line. evaluate.py --sequential end to end."""
import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import CHATML, DATA_DIR, ROOT, reorder_rtol, run, start, tiny, wait_for
from data import chat_text, load
from editor import Editor, Fact, no_editor
from sequential import sequential
from hooks import functional_edit, grad_decomposition
from gate import Subjects, asks_another, chat, guess_subject, hard_negatives, words
from key import Key, MemoryFileError, load_key, other_relations, pooled, prompt_features, train_key
import memory as memory_py
from memory import RANKS, SLACK, EditMemory, fitted_ranks, low_rank, read_file
from model import edit_module_names
from runner import Runner, hidden_before

FACT = Fact("The Eiffel Tower is in", "Rome")
OTHER = "The Colosseum is in the city of"


@pytest.fixture(scope="module")
def editor(trained):
    """The tiny run's editor, its model's token rows past the first 101 made distinct (resized to the GPT-2
    vocabulary, they are all one vector, and every prompt of a length would have one key)."""
    editor = Editor.load(str(trained[0] / "b" / "best.pt"), "cpu")
    emb = editor.model.get_input_embeddings().weight
    with torch.no_grad():
        emb[101:] = torch.randn(emb[101:].shape, generator=torch.Generator().manual_seed(0)) * 0.02
    return editor


PROMPTS = ["The Eiffel Tower is in", "The Louvre is in", "Mount Fuji rises above the plains of",
           "Berlin is the capital of",
           "Tokyo is in", "The mother tongue of Danielle Darrieux is", "Michel Rocard is a native speaker of",
           "Apple was founded by", "The Nile flows into", "Toyota's headquarters are in"]


def untrained_key(editor, threshold):
    """No projection; standardised by a few prompts' statistics (raw states share one large direction)."""
    key = Key(editor.model.config.hidden_size, layer=1, learned=False)
    f = prompt_features(editor.model, editor.tokenizer, PROMPTS, 1)
    train_key(key, f, f, f)
    key.threshold = threshold
    return key


def logits(editor, prompts):
    ids = editor.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return editor.model(**ids).logits


def test_low_rank_is_the_truncated_svd():
    torch.manual_seed(0)
    A, B = torch.randn(5, 12), torch.randn(5, 7)                              # ΔW = AᵀB, rank 5
    dense = A.T @ B
    a, b = low_rank((A, B), 8)                                                 # rank 8 ≥ 5: exact, zero rows past 5
    # float32 rounding of a double SVD
    torch.testing.assert_close(a.T @ b, dense, rtol=0, atol=1e-5 * dense.abs().max().item())
    assert a[5:].abs().max() == 0 and b[5:].abs().max() == 0
    u, s, vh = torch.linalg.svd(dense.double())
    a2, b2 = low_rank((A, B), 2)
    best = (u[:, :2] * s[:2]) @ vh[:2]                                         # Eckart–Young: the best rank 2
    torch.testing.assert_close((a2.T @ b2).double(), best, rtol=0, atol=1e-5 * dense.abs().max().item())
    a3, b3 = low_rank(dense, 2)                                                # from the dense form: the same
    torch.testing.assert_close(a3.T @ b3, a2.T @ b2, rtol=0, atol=1e-5 * dense.abs().max().item())


def test_one_edit_routed_rows_edited_others_untouched(editor):
    memory = EditMemory(editor, untrained_key(editor, threshold=0.999), rank=64, dtype=torch.float32)
    memory.add([FACT])
    routes = memory.route([FACT.prompt, OTHER])
    assert routes.tolist() == [0, -1]                                          # its own prompt: cosine 1
    before = logits(editor, [FACT.prompt, OTHER])
    with memory.applied(routes):
        after = logits(editor, [FACT.prompt, OTHER])
    (_, stored), = memory.factors(torch.tensor([0]))
    factors = {m: (a[0], b[0]) for m, (a, b) in stored.items()}                # (64, d_in), (64, d_out)
    with functional_edit(editor.model, factors):
        edited = logits(editor, [FACT.prompt, OTHER])
    assert torch.equal(after[1], before[1])                                    # no edit: the original model exactly
    tol = reorder_rtol(4 * editor.model.config.hidden_size, editor.model.config.n_layer) * edited.abs().max().item()
    torch.testing.assert_close(after[0], edited[0], rtol=0, atol=tol)          # (R, T, ·) batched products: other order
    assert (after[0] - before[0]).abs().max() > 100 * tol                      # and the edit is there
    dense = editor.edit([FACT])                                                # the stored edit is the editor's
    for m, d in dense.items():
        torch.testing.assert_close(factors[m][0].T @ factors[m][1], d, rtol=0, atol=1e-5 * d.abs().max().item())


def test_saved_memory_loads_and_answers_alike(editor, trained, tmp_path):
    memory = EditMemory(editor, untrained_key(editor, threshold=0.999))
    memory.add([FACT, ("The Louvre is in", "Berlin")])
    path = str(tmp_path / "m.mem")
    memory.save(path)
    again = EditMemory.load(path, editor)
    prompts = [FACT.prompt, OTHER, "The Louvre is in"]
    assert again.route(prompts).tolist() == memory.route(prompts).tolist() == [0, -1, 1]
    with memory.applied(memory.route(prompts)):
        a = logits(editor, prompts)
    with again.applied(again.route(prompts)):
        b = logits(editor, prompts)
    assert torch.equal(a, b) and len(again) == 2 and again.facts[1]["target"] == "Berlin"
    again.add([("Mount Fuji rises above the plains of", "Oslo")])             # extended later
    assert again.route(["Mount Fuji rises above the plains of"]).tolist() == [2]
    other = Editor.load(str(trained[0] / "a" / "latest.pt"), "cpu")            # same model, another editor
    with pytest.raises(MemoryFileError, match="another editor checkpoint"):
        EditMemory.load(path, other)
    state = torch.load(path, weights_only=False)
    state["model"] = "gpt2-xl"
    torch.save(state, path)
    with pytest.raises(MemoryFileError, match="edits of model gpt2-xl"):
        EditMemory.load(path, editor)


def test_a_fact_with_a_stored_prompt_replaces_it(editor, tmp_path):
    """A correction ("The Eiffel Tower is in" Rome, later Berlin): the newest fact is served, its prompt's
    key being the old one's, bit for bit; the old one stays in the file, never served, also after loading."""
    memory = EditMemory(editor, untrained_key(editor, threshold=0.999))
    memory.add([FACT, ("The Louvre is in", "Berlin")])
    memory.add([(" The Eiffel  Tower is in", "Berlin")])                       # the same words, other spacing
    memory.add([(FACT.prompt, "Oslo"), ("The Louvre is in", "Madrid"), ("The Louvre is in", "Lima")])
    assert memory.replaced() == [0, 1, 2, 4]
    path = str(tmp_path / "m.mem")
    memory.save(path)
    again = EditMemory.load(path, editor)
    prompts = [FACT.prompt, "The Louvre is in", OTHER]
    assert memory.route(prompts).tolist() == again.route(prompts).tolist() == [3, 5, -1]
    assert again.replaced() == [0, 1, 2, 4] and len(again) == 6


def written(editor, fact, deltas):
    """(token accuracy, mean log P) of the fact's answer after its prompt, with these updates merged in
    (hooks.functional_edit: dense, not the memory's routed factors)."""
    runner = editor.runner()
    with functional_edit(editor.model, deltas), torch.no_grad():
        logits, answer, _ = runner.scored_logits(runner.batch([fact.prompt], [fact.target]))
    logp = torch.log_softmax(logits.float(), -1)
    return (logp.argmax(-1) == answer).float().mean().item(), logp.gather(1, answer[:, None]).mean().item()


AUTO_FACTS = [FACT, Fact("The Louvre is in", "the city of Berlin, Germany"), Fact("Tokyo is in", "Kenya"),
              Fact("Michel Rocard is a native speaker of", "Swedish and old Norse")]


def test_auto_rank_is_the_smallest_that_writes_the_fact(editor):
    """fitted_ranks checked by merging each truncated update (functional_edit, dense, one fact at a time): the
    chosen rank writes the fact as the complete update does (RANKS, SLACK), the rank below it does not.
    The updates: a gradient step on each fact's answer, one term per token (the tiny editor's own barely
    move P(answer), and rank 1 would do for all)."""
    runner = editor.runner()
    batch = runner.batch([f.prompt for f in AUTO_FACTS], [f.target for f in AUTO_FACTS])
    decomposition, _ = grad_decomposition(editor.model, editor.names, batch,
                                          forward=lambda b: runner.scored_logits(b, split=False))
    complete = [{m: (-10 * h[e], u[e]) for m, (h, u) in decomposition.items()} for e in range(len(AUTO_FACTS))]
    ranks = fitted_ranks(runner, batch, complete, [{m: low_rank(d, 16) for m, d in c.items()} for c in complete])
    assert len(set(ranks)) > 1 and max(ranks) > 1                # else "the rank below" is never tried
    for fact, c, r in zip(AUTO_FACTS, complete, ranks):
        acc, mean = written(editor, fact, c)
        for rank, fits in ((r, True), (RANKS[RANKS.index(r) - 1], False)):
            if rank == r or r > 1:
                a, m = written(editor, fact, {n: low_rank(d, rank) for n, d in c.items()})
                if abs(m - (mean - SLACK)) > 1e-3:                # off the line (routed and merged: 1e-5 apart)
                    assert (a >= acc and m >= mean - SLACK) == fits, (fact, r, rank, a, acc, m, mean)


def test_updates_of_several_ranks_each_route_to_their_own_rows(editor, monkeypatch, tmp_path):
    """Ranks 1, 4, 2 side by side: each row runs with its own update only, all of its terms (one pass,
    a group per rank); saved, loaded, truncated, or read from a file of the one-rank format: the same rows."""
    monkeypatch.setattr(memory_py, "fitted_ranks", lambda runner, batch, complete, kept: [1, 4, 2])
    memory = EditMemory(editor, untrained_key(editor, threshold=0.999), dtype=torch.float32)
    facts = AUTO_FACTS[:3]
    memory.add(facts)
    assert memory.ranks[:3].tolist() == [1, 4, 2] and memory.used == 7 and memory.largest_rank() == 4
    order = [1, 2, 0]                                             # rows in another order than the edits
    prompts = [facts[e].prompt for e in order] + [OTHER]
    routes = torch.tensor(order + [-1])
    with memory.applied(routes):
        after = logits(editor, prompts)
    width, depth = 4 * editor.model.config.hidden_size, editor.model.config.n_layer
    for row, e in enumerate(order):
        r = [1, 4, 2][e]
        with functional_edit(editor.model, {n: low_rank(d, r) for n, d in editor.edit([facts[e]]).items()}):
            alone = logits(editor, [facts[e].prompt])[0]
        t = alone.shape[0]                                        # right padding: the prompt's own positions
        tol = reorder_rtol(width, depth) * alone.abs().max().item()
        torch.testing.assert_close(after[row, :t], alone, rtol=0, atol=100 * tol)   # another batch: its own rounding

    def same(other, exact=True):
        with other.applied(routes):
            again = logits(editor, prompts)
        if not exact:                                             # zero terms: other sums, other rounding
            torch.testing.assert_close(again, after, rtol=0, atol=reorder_rtol(width, depth) * after.abs().max().item())
        return not exact or torch.equal(again, after)
    memory.save(tmp_path / "m.mem")
    assert same(EditMemory.load(tmp_path / "m.mem", editor))
    s = memory.state()                                            # the one-rank format: a (N, r, d_in), zero rows
    s.update(format="ibke-memory-1", rank=4)
    for k in ("a", "b"):
        s[k] = {n: torch.stack([torch.cat([x[i:i + r], x.new_zeros(4 - r, x.shape[1])])
                                for i, r in zip([0, 1, 5], [1, 4, 2])]) for n, x in s[k].items()}
    del s["ranks"]
    torch.save(s, tmp_path / "old.mem")
    assert read_file(tmp_path / "old.mem")["ranks"].tolist() == [4, 4, 4]
    assert same(EditMemory.load(tmp_path / "old.mem", editor), exact=False)
    memory.truncate(2)
    with memory.applied(routes):
        after = logits(editor, prompts)
    memory.save(tmp_path / "t.mem")                               # compacted: each update's first 2 terms
    assert same(EditMemory.load(tmp_path / "t.mem", editor))


def test_learned_key_pulls_rephrases_to_their_prompt(editor):
    prompts = ["The Eiffel Tower is in", "The Louvre is in", "Berlin is the capital of", "Tokyo is in"] * 8
    rephrases = ["Where is the Eiffel Tower? In", "Where is the Louvre? In", "What is Berlin the capital of?",
                 "Where is Tokyo?"] * 8
    neighbours = ["The Colosseum is in", "The Prado is in", "Rome is the capital of", "Osaka is in"] * 8
    f = [prompt_features(editor.model, editor.tokenizer, x, 1) for x in (prompts, rephrases, neighbours)]
    key = Key(editor.model.config.hidden_size, layer=1, dim=16)
    losses = train_key(key, *f, steps=60, batch=8, seed=0)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10               # it learns
    hard = ["The Eiffel Tower restaurant is in", "The Louvre Abu Dhabi is in", "Berlin Airport is in",
            "Tokyo Disney is in"]
    h = prompt_features(editor.model, editor.tokenizer, hard, 1)
    cosines = []                                            # each prompt's hard negative: pushed further away
    for seed in range(3):
        for negatives in (None, (h, [[i % 4] for i in range(32)])):
            k = Key(editor.model.config.hidden_size, layer=1, dim=16)
            train_key(k, *f, steps=60, batch=8, seed=seed, hard=negatives)
            with torch.no_grad():
                cosines.append(float((k(f[0][:4]) * k(h)).sum(1).mean()))
    # the same seed with and without: 0.60 -> 0.50, 0.50 -> 0.40, 0.59 -> 0.49 (seeds move the level by 0.1)
    assert all(hard < plain - 0.05 for plain, hard in zip(cosines[::2], cosines[1::2])), cosines


def test_sequential_protocols_end_to_end(trained, tmp_path):
    ckpt = trained[0] / "b" / "best.pt"
    out = run("key.py", "learn", "--ckpt", ckpt, "--data-dir", DATA_DIR, "--layer", "1", "--dim", "16",
              "--train-records", "64", "--val-records", "16", "--steps", "20", "--out", tmp_path / "key.pt")
    assert "key alone, among 16 edits" in out.stdout and "gated, among 10000 edits" in out.stdout
    out = run("key.py", "routing", "--ckpt", ckpt, "--key", tmp_path / "key.pt", "--data-dir", DATA_DIR,
              "--stored", "16", "--queries", "4")
    assert "records 0-3 among 4 stored edits, gated" in out.stdout
    assert "records 0-3 among 16 stored edits, key alone" in out.stdout
    common = ["--ckpt", ckpt, "--data-dir", DATA_DIR, "--limit", "6", "--edits-per-batch", "2"]
    run("evaluate.py", *common, "--sequential", "memory", "--memory", tmp_path / "m.mem", "--key", tmp_path / "key.pt",
        "--out", tmp_path / "mem.json")
    res = json.load(open(tmp_path / "mem.json"))
    assert res["summary"]["n"] == 6 and res["batches"][0]["memory"]["edits"] == 6
    # records 9671 and 9675 share a prompt: the later replaces the earlier, which is scored apart
    run("evaluate.py", "--ckpt", ckpt, "--data-dir", DATA_DIR, "--skip", "9671", "--limit", "5", "--sequential",
        "memory", "--memory", tmp_path / "r.mem", "--key", tmp_path / "key.pt", "--out", tmp_path / "r.json")
    current = json.load(open(tmp_path / "r.json"))["summary"]["current"]
    assert current["n"] == 4 and current["replaced"] == 1
    assert "1 of the 5 replaced by a later fact" in run("memory.py", "show", tmp_path / "r.mem").stdout
    shown = run("memory.py", "show", tmp_path / "m.mem").stdout
    assert "6 edits" in shown and "6 of 6 stored with a subject" in shown and "rank auto (mean " in shown
    per_edit = res["batches"][0]["memory"]["bytes_per_edit"]       # the memory's own count, not the file's size
    assert f": {per_edit / 1000:.1f} kB per edit (its key and update)" in shown, (per_edit, shown)
    r, w = os.pipe()                                         # `memory.py show … | head`: the reader has gone
    os.close(r)
    closed = subprocess.run([sys.executable, os.path.join(ROOT, "memory.py"), "show", tmp_path / "m.mem"], stdout=w,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    os.close(w)
    assert closed.returncode == 0 and not closed.stderr, closed.stderr
    for bad in (run("memory.py", "show", tmp_path / "mem.json", check=False),                 # a results file
                run("key.py", "routing", "--ckpt", ckpt, "--key", tmp_path / "none.pt", check=False)):
        assert bad.returncode != 0 and bad.stderr.strip().startswith("error: ") and "Traceback" not in bad.stderr
    run("evaluate.py", *common, "--sequential", "merge", "--out", tmp_path / "merge.json")
    assert json.load(open(tmp_path / "merge.json"))["summary"]["n"] == 6
    # MQuAKE: every case's edits kept in one memory, then each case's multi-hop questions through it
    run("evaluate.py", "--ckpt", ckpt, "--data-dir", DATA_DIR, "--data", "mquake", "--limit", "2", "--sequential",
        "memory",
        "--memory", tmp_path / "q.mem", "--key", tmp_path / "key.pt", "--out", tmp_path / "mq.json")
    mq = json.load(open(tmp_path / "mq.json"))
    assert len(mq["batches"][0]["MH"]) == 2 and mq["summary"]["MH"] in (0, 0.5, 1)
    assert mq["batches"][0]["memory"]["edits"] > 2
    # edit.py keeps a user's facts in a memory file and extends it
    first = run("edit.py", "--ckpt", ckpt, "The Eiffel Tower is in", "Rome", "--memory", tmp_path / "u.mem", "--key",
                tmp_path / "key.pt")
    again = run("edit.py", "--ckpt", ckpt, "The Louvre is in", "Berlin", "--memory", tmp_path / "u.mem", "--ask",
                "The Eiffel Tower is in")
    assert "(1 in all), at rank " in first.stdout and "(2 in all), at rank " in again.stdout
    assert "subject guessed from the prompt for 1 fact(s): 'Eiffel Tower'" in first.stdout      # none given
    assert [f["subject"] for f in torch.load(tmp_path / "u.mem", weights_only=False)["facts"]] == ["Eiffel Tower",
                                                                                                "Louvre"]
    assert "[ask] The Eiffel Tower is in" in again.stdout
    # a correction replaces the stored fact; a file of facts goes in 16 at a time, and the same command again adds none
    fix = run("edit.py", "--ckpt", ckpt, FACT.prompt, "Berlin", "--memory", tmp_path / "u.mem", "--show", "0")
    assert "1 stored fact(s) replaced by a new one with the same prompt (no longer served): " \
           "'The Eiffel Tower is in' -> 'Rome'" in fix.stdout and "[fact]" not in fix.stdout
    lines = [{"prompt": f"Town {i} is in", "target": f"land {i}"} for i in range(20)] + [{"prompt": "Town 3 is in",
                                                                                           "target": "Oslo"}]
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    many = ["edit.py", "--ckpt", ckpt, "--facts", tmp_path / "f.jsonl", "--memory", tmp_path / "u.mem", "--show", "2"]
    first, again = run(*many).stdout, run(*many).stdout
    assert "20 fact(s) added to" in first and "(23 in all)" in first and "1 fact(s) not added" in first
    assert "before and after for the first 2 of the 21 facts" in first and first.count("[fact]") == 2
    assert "0 fact(s) added to" in again and "(23 in all), in" in again and "21 fact(s) not added" in again
    shown = run("memory.py", "show", tmp_path / "u.mem").stdout
    listed = [line for line in shown.splitlines() if line.startswith("  'The Eiffel Tower is in' -> ")]
    assert "1 of the 23 replaced by a later fact" in shown and len(listed) == 2
    assert listed[0].endswith("(replaced)") and "'Rome'" in listed[0] and not listed[1].endswith("(replaced)")
    # a memory that routes nothing leaves every answer as it was: LS and gen_LS exactly 1 against the original model
    key = torch.load(tmp_path / "key.pt", weights_only=False)
    key["threshold"] = key["gated"] = 2.0
    torch.save(key, tmp_path / "never.pt")
    run("evaluate.py", *common, "--sequential", "memory", "--memory", tmp_path / "n.mem", "--key",
        tmp_path / "never.pt", "--generate", "--rank", "2", "--out", tmp_path / "never.json")
    never = json.load(open(tmp_path / "never.json"))["summary"]
    assert never["LS"] == 1.0 and never["gen_LS"] == 1.0 and never["fluency_drop"] == 0.0   # free generation too
    # resumed: a memory holding these records' edits is not edited again; another's is refused in one line
    again = run("evaluate.py", *common, "--sequential", "memory", "--memory", tmp_path / "m.mem", "--out",
                tmp_path / "mem2.json")
    assert "resuming" in again.stdout and "6 of 6 edits stored" in again.stdout
    bad = run("evaluate.py", *common, "--skip", "6", "--sequential", "memory", "--memory", tmp_path / "m.mem",
              "--out", tmp_path / "mem3.json", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --memory")
    short = run("evaluate.py", "--ckpt", ckpt, "--data-dir", DATA_DIR, "--limit", "8", "--sequential", "memory",
                "--memory", tmp_path / "n.mem", "--rank", "1", "--out", tmp_path / "mem5.json", check=False)
    assert short.returncode != 0 and "Traceback" not in short.stderr          # n.mem: 6 at rank 2; a curve wants 8
    assert "truncates its updates for this run only" in short.stderr.strip().splitlines()[-1]
    # --subjects none: the facts stored without their subjects (the key alone routes them); m.mem has them: refused
    bare = run("evaluate.py", *common, "--sequential", "memory", "--memory", tmp_path / "m.mem", "--subjects", "none",
               "--out", tmp_path / "mem4.json", check=False)
    assert bare.returncode != 0 and bare.stderr.strip().splitlines()[-1].startswith("error: --memory")
    run("evaluate.py", *common, "--sequential", "memory", "--memory", tmp_path / "b.mem", "--key", tmp_path / "key.pt",
        "--subjects", "none", "--out", tmp_path / "bare.json")
    stored = torch.load(tmp_path / "b.mem", weights_only=False)["facts"]
    assert len(stored) == 6 and all(f["subject"] == "" for f in stored)
    assert "0 of 6 stored with a subject" in run("memory.py", "show", tmp_path / "b.mem").stdout


def test_retention_compares_the_first_100_with_their_own_passes(gpt2_tokenizer):
    """The first 100 edits, measured again after 100 in passes of their own, are compared with the original
    model's answers in such passes: in bfloat16 a row's near-ties move with the rows beside it (the real
    model: LS 0.977 instead of 1 on the first 100 of 10,000). Here a pass's argmax is its row count, so
    any reference from other passes disagrees; no edit: LS exactly 1 after 100 edits as after all 150."""
    model = tiny("gpt2")
    model.resize_token_embeddings(len(gpt2_tokenizer))
    runner = Runner(model, gpt2_tokenizer, edit_module_names(model), cache=False)
    scored = runner.scored_logits

    def jittered(batch, split=True):  # the tiny model's logits are below 1: +1e4 makes token (rows in the pass) the argmax
        logits, targets, rows = scored(batch, split)
        return logits.index_add(1, torch.tensor([len(batch["keys"])]), torch.full((len(rows), 1), 1e4)), targets, rows
    runner.scored_logits = jittered
    args = argparse.Namespace(sequential="merge", edits_per_batch=50, generate=False)
    loaded = argparse.Namespace(model=model)
    records = load("counterfact", DATA_DIR)["eval"][:150]
    out = sequential(args, loaded, records, runner, no_editor, unedited=None)
    assert {t: r["LS"] for t, r in out["retention"].items()} == {100: 1.0, 150: 1.0}


def test_serving_routes_inside_the_forward_as_route_does(editor):
    memory = EditMemory(editor, untrained_key(editor, threshold=0.999))
    memory.add([FACT, ("The Louvre is in", "Berlin")])
    prompts = [OTHER, "The Louvre is in", FACT.prompt]                        # right padding, rows of three lengths
    with memory.applied(memory.route(prompts)):
        routed = logits(editor, prompts)
    with memory.serving():
        served = logits(editor, prompts)
        ids = editor.tokenizer(["The Louvre is in"], return_tensors="pt")
        out = editor.model.generate(**ids, max_new_tokens=3, do_sample=False,
                                    pad_token_id=editor.tokenizer.pad_token_id)
    assert torch.equal(served, routed) and memory.route(prompts).tolist() == [-1, 1, 0]
    with memory.applied(torch.tensor([1])):                                   # generation keeps the prompt's edit
        assert torch.equal(out, editor.model.generate(**ids, max_new_tokens=3, do_sample=False,
                                                      pad_token_id=editor.tokenizer.pad_token_id))


def greedy_ids(editor, prompts, k):
    ids = editor.tokenizer(prompts, return_tensors="pt", padding=True)
    out = editor.model.generate(**ids, max_new_tokens=k, do_sample=False, pad_token_id=editor.tokenizer.pad_token_id)
    return out[:, ids["input_ids"].shape[1]:]


def test_serving_releases_a_row_once_its_answer_is_written(editor):
    """release (the default): the prompt pass and the steps before the answer is complete run edited; from
    the step whose token completes the answer the row runs the original model (its cache as the edited
    passes left it). A row whose answer is not written keeps its edit; held, every step is edited. A
    one-token prompt after another batch is a prompt of its own, not a step of that batch."""
    memory = EditMemory(editor, untrained_key(editor, threshold=0.999))
    memory.add([FACT, ("The Louvre is in", "Berlin")])
    with memory.serving(release=False):
        held = greedy_ids(editor, [FACT.prompt], 6)[0]
    memory.facts[0]["target"] = editor.tokenizer.decode(held[:1])               # what the edited model writes first
    assert words(memory.facts[0]["target"]), "the first token should be a word"
    with memory.serving():
        released = greedy_ids(editor, [FACT.prompt], 6)[0]
    ids = editor.tokenizer([FACT.prompt], return_tensors="pt")                  # by hand: the prompt edited, then not
    with torch.no_grad():
        with memory.applied(torch.tensor([0])):
            out = editor.model(**ids, use_cache=True)
        step, by_hand = out.logits[:, -1:].argmax(-1), []
        for _ in range(6):
            by_hand.append(step.item())
            out = editor.model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
            step = out.logits[:, -1:].argmax(-1)
    assert released.tolist() == by_hand and released[0] == held[0] and not torch.equal(released, held)
    prompts = [FACT.prompt, "The Louvre is in"]                                  # Berlin is not written: edited throughout
    with memory.serving(release=False):
        both_held = greedy_ids(editor, prompts, 6)
    with memory.serving():
        both = greedy_ids(editor, prompts, 6)
        alone = greedy_ids(editor, ["A"], 3)                                     # one token: routed on its own
    assert torch.equal(both[1], both_held[1]) and not torch.equal(both[0], both_held[0])
    assert editor.tokenizer(["A"], return_tensors="pt")["input_ids"].shape == (1, 1)
    assert torch.equal(alone, greedy_ids(editor, ["A"], 3))                     # routed to none: the original model


@pytest.mark.parametrize("target, last, text", [("Rome", " Rome", " Rome, it is said. The Eiffel Tower is"),
                                                ("Rome", " Rome", " the Eiffel Tower, in Rome, it is said."),
                                                ("C++", "++", " C, or rather C++, said the Eiffel Tower")])
def test_a_released_edit_comes_back_when_its_subject_is_named_again(editor, target, last, text):
    """Generation steps fed by hand: the edit is on for the prompt, off from the token that writes its
    answer (`last`: "C" is not "C++", though the words are alike), and on again from a token that names
    its subject after that (a subject named before the answer does not count again)."""
    memory = EditMemory(editor, untrained_key(editor, threshold=0.999))
    memory.add([Fact(FACT.prompt, target, subject="Eiffel Tower")])
    tok, model = editor.tokenizer, editor.model
    script = tok(text)["input_ids"]
    words_at = [tok.decode(t) for t in script]
    answer, subject = words_at.index(last), len(script) - 1 - words_at[::-1].index(" Tower")
    on = [j < answer or answer < subject <= j for j in range(len(script))]     # per step, after the prompt's pass

    def steps(serve):
        ids, got = tok([FACT.prompt], return_tensors="pt"), []
        with torch.no_grad():
            with serve(None):
                out = model(**ids, use_cache=True)
            for t, edited in zip(script, on):
                with serve(edited):
                    out = model(input_ids=torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
                got.append(out.logits[0, -1])
        return torch.stack(got)

    with memory.serving():
        by_rule = steps(lambda _: contextlib.nullcontext())
    by_hand = steps(lambda edited: memory.applied(torch.tensor([0 if edited in (None, True) else -1])))
    assert torch.equal(by_rule, by_hand)


def test_the_gate_takes_an_edit_only_where_its_subject_is_named(editor):
    """An edit stored with its subject serves a query only when the query's words contain the subject (any
    case, whole words); one stored without a subject is routed by the key alone; serving decodes the rows'
    tokens and routes as route() does."""
    gate = Subjects(["Eiffel Tower", "", "Outlook.com", "Paris"])
    assert gate.mask(["Where is the eiffel tower?", "Outlook.com's owner", "Parisian cafés are in"]).tolist() == [
        [True, True, False, False], [False, True, True, False], [False, True, False, False]]
    # a word of a name joined on after the subject makes a longer name, another subject; one before may
    # only start a sentence, and commas, possessives and lower-case words end the name
    named = ["In Paris, the", "Paris's mayor", "Paris is in", "Paris-based", "Visit Paris", "the Paris of",
             "Is Paris The Capital?"]                                           # Title Case: capitals mark no name
    others = ["Paris Hilton was born in", "Paris-Saint-Germain plays", "The Eiffel Tower Restaurant is in"]
    assert [bool(gate.named(t)) for t in named + others] == [True] * len(named) + [False] * len(others)
    products = Subjects(["iPhone", "Nintendo"])                    # a capital inside or a digit first runs on
    assert [bool(products.named(t)) for t in ["iPhone is made by", "The Nintendo of 1990 made", "The iPhone 4s is "
            "made by", "The Nintendo 3DS is made by", "The Nintendo eShop is run by"]] == [True] * 2 + [False] * 3
    memory = EditMemory(editor, untrained_key(editor, threshold=0.999))
    memory.key.gated = -1.0                                                    # the subject alone decides
    memory.add([Fact("The Eiffel Tower is in", "Rome", subject="Eiffel Tower"), ("The Louvre is in", "Berlin")])
    prompts = ["Where is the Eiffel Tower? It is in", "The Louvre is in", "The Colosseum is in", "The Eiffel Tower"]
    assert memory.route(prompts).tolist() == [0, 1, -1, 0]
    with memory.applied(memory.route(prompts)):
        routed = logits(editor, prompts)
    with memory.serving():
        assert torch.equal(logits(editor, prompts), routed)
    memory.key.gated = None                                                    # a key learned before the gate
    assert memory.route(prompts).tolist() == [-1, 1, -1, -1]                   # the key alone, at τ 0.999


def test_a_memory_file_is_owned_by_one_run_and_kept_on_ctrl_c(trained, tmp_path):
    """Two real processes: a second run into the same --memory stops at once with one line naming the
    first; Ctrl-C keeps the edits stored so far, and the same command resumes from them."""
    ckpt, mem = trained[0] / "b" / "best.pt", tmp_path / "m.mem"
    run("key.py", "learn", "--ckpt", ckpt, "--data-dir", DATA_DIR, "--layer", "1", "--dim", "16",
        "--train-records", "32", "--val-records", "8", "--stored", "64", "--steps", "5", "--out", tmp_path / "key.pt")
    args = ["--ckpt", ckpt, "--data-dir", DATA_DIR, "--limit", "10000", "--sequential", "memory", "--memory", mem]
    first = start([sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, args), "--key",
                   str(tmp_path / "key.pt"), "--out", str(tmp_path / "a.json")])
    try:
        wait_for(str(mem) + ".lock")
        second = run("evaluate.py", *args, "--out", tmp_path / "b.json", check=False)
        assert second.returncode != 0 and f"--memory {mem} is in use by another run (pid {first.pid}" in second.stderr
        wait_for(mem)                                                          # the first save: 500 edits in
    finally:
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=300)
    assert "Traceback" not in stderr and "of 10000 edits kept in" in stderr and not os.path.exists(str(mem) + ".lock")
    kept = int(stderr.split("interrupted: ")[1].split(" of")[0])
    assert kept >= 500 and f"{kept} edits" in run("memory.py", "show", mem).stdout


def test_edit_py_keeps_what_it_added_on_ctrl_c_and_the_same_command_adds_the_rest(trained, tmp_path):
    """edit.py --facts F --memory M, a real process: Ctrl-C after the first save (500 facts in) keeps the facts
    added, and the same command adds the others only."""
    ckpt, mem, facts = trained[0] / "b" / "best.pt", tmp_path / "m.mem", tmp_path / "f.jsonl"
    run("key.py", "learn", "--ckpt", ckpt, "--data-dir", DATA_DIR, "--layer", "1", "--dim", "16",
        "--train-records", "32", "--val-records", "8", "--stored", "64", "--steps", "5", "--out", tmp_path / "key.pt")
    lines = (json.dumps({"prompt": f"Town {i} is in", "target": f"land {i}"}) + "\n" for i in range(1000))
    facts.write_text("".join(lines))
    args = ["--ckpt", ckpt, "--facts", facts, "--memory", mem, "--key", tmp_path / "key.pt", "--show", "0"]
    first = start([sys.executable, os.path.join(ROOT, "edit.py"), *map(str, args)])
    try:
        wait_for(mem)
    finally:
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=300)
    assert "Traceback" not in stderr and "of 1000 facts added to" in stderr and not os.path.exists(str(mem) + ".lock")
    kept = int(stderr.split("interrupted: ")[1].split(" of")[0])
    assert 500 <= kept < 1000 and f"{kept} edits" in run("memory.py", "show", mem).stdout
    again = run("edit.py", *args).stdout
    assert f"{1000 - kept} fact(s) added to" in again and "(1000 in all)" in again
    assert f"{kept} fact(s) not added: served already as given" in again


def test_rekey_routes_the_same_edits_by_another_key(trained, tmp_path):
    """memory.py rekey: each fact's key computed anew by the given key, the updates, ranks and facts as they
    were; the memory file itself untouched; an --out that exists refused in one line."""
    ckpt = str(trained[0] / "b" / "best.pt")
    plain = Editor.load(ckpt, "cpu")                      # as the script loads it (the fixture changes rows)
    memory = EditMemory(plain, untrained_key(plain, threshold=0.999))
    memory.add([FACT, ("The Louvre is in", "Berlin")])
    path, out = tmp_path / "m.mem", tmp_path / "k.mem"
    memory.save(str(path))
    before = path.read_bytes()
    key = Key(plain.model.config.hidden_size, layer=1, dim=8)                 # a learned projection, at random
    key.threshold, key.gated = 0.5, 0.3
    torch.save(key.saved(), tmp_path / "key.pt")
    run("memory.py", "rekey", path, "--ckpt", ckpt, "--key", tmp_path / "key.pt", "--out", out)
    again = EditMemory.load(str(out), plain)
    with torch.no_grad():
        want = key(prompt_features(plain.model, plain.tokenizer, [FACT.prompt, "The Louvre is in"], 1))
    assert torch.allclose(again.keys, want, atol=1e-6)        # one batch of the same rows both ways: rounding
    assert (again.key.config(), again.key.threshold, again.key.gated) == (key.config(), 0.5, 0.3)
    assert again.facts == memory.facts and torch.equal(again.ranks, memory.ranks[:2])
    assert all(torch.equal(again.a[m], memory.a[m][:memory.used]) for m in memory.a) and path.read_bytes() == before
    twice = run("memory.py", "rekey", path, "--ckpt", ckpt, "--key", tmp_path / "key.pt", "--out", out, check=False)
    assert twice.returncode != 0 and twice.stderr.strip().splitlines()[-1].startswith(f"error: --out {out} exists")


def test_a_key_file_that_is_not_one_or_for_another_model_is_refused_in_one_line(editor, trained, tmp_path):
    """--key is the user's input: a file cut short, of another kind or of another format was a traceback
    (UnpicklingError, KeyError); a key of another model's width or depth failed at the first query."""
    ckpt = str(trained[0] / "b" / "best.pt")
    width = editor.model.config.hidden_size
    torch.save(Key(width, layer=1, dim=8).saved(), tmp_path / "key.pt")
    data = (tmp_path / "key.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.pt").write_text("# a key?\n")
    torch.save({"config": {"width": width}}, tmp_path / "dict.pt")
    for bad in ("cut.pt", "text.pt", "dict.pt"):
        with pytest.raises(MemoryFileError, match="not a key file of key.py"):
            load_key(ckpt, str(tmp_path / bad))
    assert load_key(ckpt, str(tmp_path / "key.pt")).config()["dim"] == 8
    for key in (Key(width + 1, layer=1), Key(width, layer=editor.model.config.n_layer)):
        with pytest.raises(MemoryFileError, match="learn a key for this editor"):
            EditMemory(editor, key)
    out = run("key.py", "routing", "--ckpt", ckpt, "--key", ckpt, "--data-dir", DATA_DIR, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr                  # the checkpoint given as its key
    assert out.stderr.strip().splitlines()[-1].startswith("error: not a key file of key.py")


def test_asks_another_finds_the_neighbours_that_are_other_edits_questions():
    """A neighbour asks another record's question when it names that record's subject and is its prompt or
    expects its true answer; naming the subject with another question does not count."""
    from data import EditRequest
    records = [EditRequest("Taipei is a twin city of", "Moscow", locality=[("Helsinki is a twin city of", "Prague")],
                           old_target="Kiev", subject="Taipei"),
               EditRequest("Helsinki is a twin city of", "Paris", locality=[("Oslo is a twin city of", "Prague")],
                           old_target="Prague", subject="Helsinki"),
               EditRequest("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux",
                           locality=[("Michel Rocard is a native speaker of", "French")], old_target="French"),
               EditRequest("Michel Rocard works in the field of", "music", subject="Michel Rocard",
                           locality=[("The mother tongue of danielle darrieux is", "French")], old_target="politics")]
    assert asks_another(records) == [True, False, False, True]                 # the last: record 2's true answer
    assert asks_another(records[:1]) == [False]                                # record 1 not kept: nothing asked


def test_hard_negatives_pass_the_gate_and_name_another_subject():
    """gate.hard_negatives: the prompts and rephrases of other records that name a record's subject as
    whole words but are about another subject; the same subject asked again, or a word inside a longer
    word, is none."""
    from data import EditRequest
    records = [EditRequest("The official language of Ireland is", "French", subject="Ireland",
                           generality=[("Ireland's official language is", "French")]),
               EditRequest("Jill Ireland is native to", "Paris", subject="Jill Ireland",
                           generality=[("Born in Dublin. Jill Ireland was born in", "Paris")]),
               EditRequest("Ireland is a member of", "NATO", subject="Ireland"),
               EditRequest("Northern Irelands are", "x", subject="Northern Irelands")]
    texts, own = hard_negatives(records[:2], records)
    assert [[texts[i] for i in rows] for rows in own] == [
        ["Jill Ireland is native to", "Born in Dublin. Jill Ireland was born in"], []]


def test_other_relations_ask_the_records_subject_another_relation():
    """key.other_relations: per record, K of the pool's templates of another relation (data.relations: "{}
    passed away at" asks "{} died in"'s) with the record's subject; none for a record without a template."""
    from data import EditRequest
    def record(prompt, subject, neighbour):
        return EditRequest(prompt, "X", [], [(neighbour, "Y")], subject=subject)
    pool = [record("Anna Berg died in", "Anna Berg", "Carl Dahl passed away at"),
            record("Tom Lund is a citizen of", "Tom Lund", "Eva Moe holds a citizenship from"),
            record("Eva Moe holds a citizenship from", "Eva Moe", "Ola Vik is a citizen of"),
            record("Per Holm works in the field of", "Per Holm", "Ola Vik works in the field of")]
    records = [record("Ola Vik passed away at", "Ola Vik", "Tom Lund died in"), record("the sky is", "", "a")]
    texts, own = other_relations(records, pool + records, 6, seed=1)                # the records among the pool
    assert len(own[0]) == 6 and own[1] == [] and (texts, own) == other_relations(records, pool + records, 6, seed=1)
    assert {texts[i] for i in own[0]} == {"Ola Vik is a citizen of", "Ola Vik holds a citizenship from",
                                           "Ola Vik works in the field of"}          # 6 draws of 3: all, here


@pytest.mark.parametrize("argv,message", [
    (["learn", "--dim", "0"], "--dim 0: give at least 1"),
    (["learn", "--other-relations", "-1"], "--other-relations -1: give 0 (none) or more"),
    (["learn", "--stored", "10"], "--stored 10: give at least --val-records"),
    (["routing", "--queries", "0"], "--queries 0: give at least 1"),
])
def test_key_flags_in_one_line(argv, message, tmp_path):
    """key.py's sizes are checked before any work: one line, nothing written."""
    result = run("key.py", *argv, "--ckpt", tmp_path / "none.pt", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("prompt, subject", [
    ("The Eiffel Tower is in", "Eiffel Tower"), ("What nationality was Kees van Beijnum?", "Kees van Beijnum"),
    ("In Nykarleby, the language spoken is", "Nykarleby"), ("Toyota's headquarters are in", "Toyota"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"), ("Bank of America is based in", "Bank of America"),
    ("What sport does Peter Šťastný play? They play", "Peter Šťastný"), ("the sky is", ""),
    ("iPod Nano is developed by", "iPod Nano"), ("macOS Server, a product created by", "macOS Server"),
    (".NET Framework is created by", ".NET Framework"), ("Khalid ibn al-Walid died in", "Khalid ibn al-Walid"),
    ("table tennis was formulated in", "")])
def test_guess_subject_reads_the_name_a_prompt_is_about(prompt, subject):
    assert guess_subject(prompt) == subject


def test_a_guessed_subject_passes_its_own_prompts_gate():
    """Over CounterFact's first 1,000 eval records (the docstring's figures): the guess is the record's subject
    for ≥ 912 of them (915 when written), and every prompt and rephrase passes the gate of its record's guess."""
    records = [r for r in load("counterfact", DATA_DIR)["eval"] if r][:1000]
    guesses = [guess_subject(r.prompt) for r in records]
    assert sum(g == r.subject for g, r in zip(guesses, records)) >= 912
    gate = Subjects(guesses)
    for texts in ([r.prompt for r in records], [r.generality[0][0] for r in records]):
        assert bool(gate.mask(texts).diagonal().all())


def test_a_chat_is_read_by_its_last_user_message(gpt2_tokenizer, monkeypatch):
    """gate.Chat finds a user message's opening and closing in the template (here plain BPE pieces, not
    special tokens), and reads the last one; a text without them, or a tokenizer without a template, whole."""
    monkeypatch.setattr(gpt2_tokenizer, "chat_template", CHATML)
    one = chat_text(gpt2_tokenizer, "Where is the Eiffel Tower?")
    turns = gpt2_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me of Paris."},
         {"role": "assistant", "content": "It is in France."}, {"role": "user", "content": "And the Louvre?"}],
        tokenize=False, add_generation_prompt=True)
    reads = chat(gpt2_tokenizer)
    assert [reads.text(gpt2_tokenizer, t) for t in [one, turns, "The Eiffel Tower is in"]] == [
        "Where is the Eiffel Tower?", "And the Louvre?", "The Eiffel Tower is in"]
    ids = gpt2_tokenizer([one, "The Eiffel Tower is in"], return_tensors="pt", padding=True)
    kept = reads.mask(ids["input_ids"], ids["attention_mask"])
    assert gpt2_tokenizer.decode(ids["input_ids"][0][kept[0].bool()]) == "Where is the Eiffel Tower?"
    assert torch.equal(kept[1], ids["attention_mask"][1])                      # a plain text: every real token
    monkeypatch.setattr(gpt2_tokenizer, "chat_template", None)                 # read again, not kept from above
    assert chat(gpt2_tokenizer).text(gpt2_tokenizer, one) == one


def test_a_question_asked_in_a_chat_is_keyed_by_its_own_tokens(editor, monkeypatch):
    """The key of a chat is the mean of the states over the question's tokens alone (not the system prompt's
    14 words and the markers), and serving routes a chat as route() does; the gate reads the question."""
    monkeypatch.setattr(editor.tokenizer, "chat_template", CHATML)
    tok, memory = editor.tokenizer, EditMemory(editor, untrained_key(editor, threshold=0.9))
    memory.key.gated = -1.0                                                    # the subject alone decides
    memory.add([Fact(FACT.prompt, FACT.target, "Eiffel Tower"), Fact("The Louvre is in", "Berlin", "Louvre")])
    asked = [chat_text(tok, p) for p in [FACT.prompt, "The Louvre is in", OTHER]]
    ids = tok(asked, return_tensors="pt", padding=True)
    x = hidden_before(editor.model, 1, ids["input_ids"], ids["attention_mask"]).float()
    own = torch.zeros(ids["input_ids"].shape)
    for i, q in enumerate([FACT.prompt, "The Louvre is in", OTHER]):
        n = len(tok(q)["input_ids"])
        start = next(s for s in range(len(own[i])) if tok.decode(ids["input_ids"][i, s:s + n]) == q)
        own[i, start:start + n] = 1
    f = prompt_features(editor.model, tok, asked, 1)             # its rows in another order: sums may reorder
    torch.testing.assert_close(f, pooled(x, own), rtol=0, atol=reorder_rtol(x.shape[-1], 1) * float(x.abs().max()))
    assert memory.route(asked).tolist() == [0, 1, -1]                         # "You are a helpful assistant"
    with memory.applied(memory.route(asked)):                                  # names no subject
        routed = logits(editor, asked)
    with memory.serving():
        assert torch.equal(logits(editor, asked), routed)


@pytest.mark.slow
def test_smollm2_chats_find_their_edit_by_the_question(smollm, data_dir, monkeypatch):
    """The real model and its own template (special tokens, a default system prompt of 14 words): CounterFact
    rephrases asked in a chat find their prompt's key (untrained, layer 4, among 200) 0.71 of the time by the
    question's tokens, 0.20 by the whole text (plainly: 0.90). Deterministic but for the order of sums; the
    bounds sit between the two figures."""
    model, tok = smollm
    records = [r for r in load("counterfact", data_dir)["eval"] if r.generality][:200]
    key = Key(model.config.hidden_size, layer=4, learned=False)
    f = prompt_features(model, tok, [r.prompt for r in records], 4)
    train_key(key, f, f, f)
    asked = [chat_text(tok, r.generality[0][0]) for r in records]
    assert chat(tok).text(tok, asked[0]) == records[0].generality[0][0]

    def found():
        q = key(prompt_features(model, tok, asked, 4))
        return float(((q @ key(f).T).argmax(1) == torch.arange(len(records))).float().mean())
    assert found() > 0.6
    monkeypatch.setattr(type(chat(tok)), "mask", lambda self, ids, mask: mask)    # the whole text, as before
    assert found() < 0.3

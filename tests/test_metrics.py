"""evaluate.py's metrics on hand-made logits."""
import contextlib
import math
import os

import pytest
import torch

from conftest import CHATML, tiny
from data import EditRequest, chat_text
from data import load
from editor import no_editor
from gate import contains
from metrics import (Continuations, generation, harmonic, measure, ngram_entropy, passes, per_record,
                     per_row, references, rows_of, score, score_rows, summarise)
from model import edit_module_names, load_model
from runner import Runner


def one_hot_logits(ids, vocab=5, high=10.0):
    logits = torch.zeros(len(ids), vocab)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = high
    return logits


def test_token_accuracy_agreement_and_nll_per_row():
    # row 0: 2 answer tokens, row 1: 1, row 2: 3
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    targets = torch.tensor([1, 2, 3, 0, 0, 4])
    post = one_hot_logits([1, 4, 3, 0, 1, 4])           # row 0: 1 of 2 right; row 1: right; row 2: 2 of 3
    pre = one_hot_logits([1, 4, 0, 0, 0, 0])            # agreement with post: row 0 2/2, row 1 0/1, row 2 1/3
    s = score_rows((pre.argmax(-1), rows), (post, targets, rows), 3)
    assert s["acc"].tolist() == pytest.approx([0.5, 1.0, 2 / 3])
    assert s["agree"].tolist() == pytest.approx([1.0, 0.0, 1 / 3])
    right, wrong = (-torch.log_softmax(torch.tensor([10.0, 0, 0, 0, 0]), 0))[[0, 1]].tolist()
    assert s["nll"].tolist() == pytest.approx([(right + wrong) / 2, right, (2 * right + wrong) / 3], rel=1e-5)
    assert per_row(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([1, 1, 1]), 2).tolist() == [0.0, 3.0]


def test_summary_averages_records_and_takes_harmonic_means():
    results = [{"ES": 1.0, "GS": 0.5, "LS": 1.0, "EM": 1.0, "ES_p": 1.0, "PS_p": 1.0, "NS_p": 0.0},
               {"ES": 0.5, "GS": 0.5, "LS": 0.5, "EM": 0.0, "ES_p": 1.0, "PS_p": 0.0, "NS_p": 1.0}]
    s = summarise(results)
    assert (s["ES"], s["GS"], s["LS"], s["EM"], s["n"]) == (0.75, 0.5, 0.75, 0.5, 2)
    assert s["F1"] == pytest.approx(3 / (1 / 0.75 + 1 / 0.5 + 1 / 0.75))
    assert s["S_p"] == pytest.approx(harmonic(1.0, 0.5, 0.5))
    assert harmonic(0.9, 0.0, 1.0) == 0.0 and math.isclose(harmonic(0.5, 0.5), 0.5)


def test_rows_of_puts_edit_rows_first_and_pairs_probability_rows():
    records = [EditRequest("p0", "new0", [("g0", "new0")], [("l0", "true0")], old_target="old0"),
               EditRequest("p1", "new1", [], [], old_target=None)]
    prompts, targets, kinds = rows_of(records)
    assert list(zip(prompts, targets, kinds))[:2] == [("p0", "new0", ("edit", 0)), ("p1", "new1", ("edit", 1))]
    assert ("l0", "new0", ("loc_new", 0)) in zip(prompts, targets, kinds)    # NS_p: P(true) vs P(new)
    assert ("g0", "old0", ("gen_old", 0)) in zip(prompts, targets, kinds)
    assert not [k for k in kinds if k[1] == 1 and k[0] != "edit"]          # nothing else for record 1


def test_passes_keep_locality_rows_apart():
    kinds = [("edit", 0), ("edit", 1), ("gen", 0), ("gen", 1), ("loc_new", 1)] + [("loc", 0)] * 3 + [("loc", 1)] * 2
    assert passes(kinds, 2, 512) == [(0, 5), (5, 10)]
    assert passes(kinds, 2, 2) == [(0, 2), (2, 4), (4, 5), (5, 7), (7, 9), (9, 10)]
    assert passes(kinds, 2, 4) == [(0, 4), (4, 5), (5, 9), (9, 10)]
    assert passes(kinds[:5], 2, 4) == [(0, 4), (4, 5)]                  # no locality rows


def test_no_edit_gives_ls_exactly_one_in_bfloat16(data_dir):
    """The unedited model's locality must score 1 against itself, in bfloat16 too. Scored in another
    batch than the post-edit pass (the locality rows alone, or references() in a batch of their own),
    the real model flipped argmaxes near ties: record 90 scored LS 0 at n = 1, and three of the first
    20 records below 1 in the sequential protocol."""
    model, tokenizer = load_model("smollm2-135m", "bfloat16")
    runner = Runner(model, tokenizer, edit_module_names(model), cache=False)
    records = load("counterfact", data_dir)["eval"][:100]
    for batch in ([records[90]], records[85:95]):
        assert {r["LS"] for r in measure(runner, no_editor, batch)[0]} == {1.0}
    assert {r["LS"] for r in measure(runner, no_editor, records[85:95], rows_per_pass=40)[0]} == {1.0}
    reference = references(runner, records[:20])
    assert {r["LS"] for r in score(runner, records[:20], lambda *_: contextlib.nullcontext(), reference)} == {1.0}


class Jittery:
    """A runner whose argmax at a row depends on the rows beside it in the pass, as bfloat16's near-ties
    do: (the row's prompt length + the pass's total prompt length) mod 5, one answer token a row."""
    device, on_part = torch.device("cpu"), None

    def batch(self, prompts, targets):
        return {"keys": list(zip(prompts, targets))}

    def scored_logits(self, batch):
        size = sum(len(p) for p, _ in batch["keys"])
        rows = torch.arange(len(batch["keys"]))
        return one_hot_logits([(len(p) + size) % 5 for p, _ in batch["keys"]]), torch.zeros_like(rows), rows


def test_a_neighbour_shared_across_passes_is_compared_within_each_pass():
    """Records 0 and 1 share the neighbour "l", scored in two passes ("l", "m") and ("l", "nn") whose
    argmaxes for it differ: with no edit each must still read LS 1 (against the last pass's reference,
    record 0 read 0.5)."""
    records = [EditRequest("p0", "x", [], [("l", "a"), ("m", "b")]),
               EditRequest("p1", "y", [], [("l", "a"), ("nn", "c")])]
    runner = Jittery()
    assert passes(rows_of(records)[2], 2, 2) == [(0, 2), (2, 4), (4, 6)]      # the edits, then l m, then l nn
    top = [runner.scored_logits(runner.batch(["l", q], ["a", a]))[0][0].argmax() for q, a in [("m", "b"), ("nn", "c")]]
    assert top[0] != top[1]                                                    # "l" reads two argmaxes
    reference = references(runner, records, rows_per_pass=2)
    no_edit = lambda *_: contextlib.nullcontext()
    assert [r["LS"] for r in score(runner, records, no_edit, reference, rows_per_pass=2)] == [1.0, 1.0]


class Edited(Jittery):
    """Jittery, whose argmax at a row of a prompt starting with "o" moves by one under `edited`."""
    edited = False

    def scored_logits(self, batch):
        logits, targets, rows = super().scored_logits(batch)
        moved = torch.tensor([self.edited and p.startswith("o") for p, _ in batch["keys"]])
        return torch.where(moved[:, None], logits.roll(1, -1), logits), targets, rows

    @contextlib.contextmanager
    def edit(self, *_):
        self.edited = True
        yield
        self.edited = False


def test_rs_reads_the_subjects_other_questions_against_the_unedited_model():
    """RS: its rows ("rs") come last, scored as locality rows against the argmax before the edit, in passes
    of their own (a pass of them alone too, for a record without neighbours)."""
    records = [EditRequest("p0", "x", [], [("l", "a")], others=[("o1", "b")]),
               EditRequest("p1", "y", [], [], others=[("o2", "c"), ("q", "d")]),
               EditRequest("p2", "z", [], [("m", "e")])]
    kinds = rows_of(records)[2]
    assert kinds[3:] == [("loc", 0), ("loc", 2), ("rs", 0), ("rs", 1), ("rs", 1)]
    assert passes(kinds, 3, 2) == [(0, 3), (3, 5), (5, 7), (7, 8)]
    runner = Edited()
    for edited, rs in ((lambda *_: contextlib.nullcontext(), [1.0, 1.0, None]), (runner.edit, [0.0, 0.5, None])):
        for reference in (None, references(runner, records, rows_per_pass=2)):
            results = score(runner, records, edited, reference, rows_per_pass=2)
            assert [r.get("RS") for r in results] == rs                         # edited: "o…" moved, "q" kept
            assert [r["LS"] for r in results if "LS" in r] == [1.0, 1.0]
    assert summarise([{"RS": 0.0}, {"RS": 0.5}, {}])["RS"] == 0.25


def test_probability_scores_compare_each_prompts_two_answers():
    """ES_p, PS_p, NS_p by hand: record 0 has an edit row, two rephrases and one neighbour, each scored
    with the new and the old (neighbour: the true and the new) answer; record 1 has no old answer."""
    records = [EditRequest("p0", "new", [("g0", "new"), ("g1", "new")], [("l0", "true")], old_target="old"),
               EditRequest("p1", "new1", [("g2", "new1")], [], old_target=None)]
    prompts, targets, kinds = rows_of(records)
    nll = {("p0", "new"): 1.0, ("p0", "old"): 2.0,       # ES_p: new more likely than old -> 1
           ("g0", "new"): 3.0, ("g0", "old"): 1.0,       # PS_p: g0 prefers old (0), g1 a tie (0) -> 0
           ("g1", "new"): 2.0, ("g1", "old"): 2.0,
           ("l0", "true"): 0.5, ("l0", "new"): 4.0,      # NS_p: the neighbour keeps its true answer -> 1
           ("p1", "new1"): 1.0, ("g2", "new1"): 1.0}
    row_nll = [nll[p, t] for p, t in zip(prompts, targets)]
    ones = [1.0] * len(prompts)
    r0, r1 = per_record(ones, ones, row_nll, kinds, 2)
    assert (r0["ES_p"], r0["PS_p"], r0["NS_p"]) == (1.0, 0.0, 1.0)
    assert not {"ES_p", "PS_p", "NS_p"} & r1.keys()                     # no old answer: no probability score
    nll[("g1", "new")] = 1.5                                            # g1 now prefers the new answer
    r0, _ = per_record(ones, ones, [nll[p, t] for p, t in zip(prompts, targets)], kinds, 2)
    assert r0["PS_p"] == 0.5
    nll[("l0", "new")] = 0.25                                           # the edit spilled onto the neighbour
    r0, _ = per_record(ones, ones, [nll[p, t] for p, t in zip(prompts, targets)], kinds, 2)
    assert r0["NS_p"] == 0.0 and summarise([r0])["S_p"] == 0.0


def test_contains_takes_whole_words_in_any_case():
    assert contains(" Rome, Italy.", "Rome") and contains("it is in ROME", "rome")
    assert contains("the New York Times", "new york") and contains("C++ code", "C++")
    assert not contains(" Romesburg", "Rome") and not contains("are", "ar") and not contains("Paris", "Rome")
    assert not contains("C, or C#", "C++") and contains("Exeter N.H.", "exeter n.h.")  # not words; not \b
    assert not contains("Rome", " ")                                       # no answer is never written


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab (2/3, 1/3): H_2 = 0.9183 bits; trigrams aba, bab (1/2 each): H_3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("the the the the the") == 0.0                  # repetition: no entropy
    assert ngram_entropy("Rome, Italy.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)  # 4 words


def test_summary_takes_the_harmonic_mean_of_the_generation_scores():
    s = summarise([{"gen_ES": 1.0, "gen_GS": 0.5, "gen_LS": 1.0, "fluency": 5.0, "fluency_drop": 0.5},
                   {"gen_ES": 0.0, "gen_GS": 0.5, "gen_LS": 0.5, "fluency": 4.0, "fluency_drop": -0.1}])
    assert s["gen_F1"] == pytest.approx(harmonic(0.5, 0.5, 0.75)) and s["fluency_drop"] == pytest.approx(0.2)


def two_records(tokenizer, dtype=torch.float32):
    """A random GPT-2 with the real tokenizer, and two records (one without a rephrase)."""
    model = tiny("gpt2", dtype)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    records = [EditRequest("The capital of France is", "Rome", [("France's capital city is", "Rome")],
                           [("The Eiffel Tower is in", "Paris"), ("Berlin is in", "Germany")]),
               EditRequest("Danielle Darrieux speaks", "English", [], [("Michel Rocard speaks", "French")])]
    return Runner(model, tokenizer, ["transformer.h.3.mlp.c_proj"], cache=False), records


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_edit_keeps_every_generation(gpt2_tokenizer, dtype):
    """Without an edit, the continuations are those of the unedited model, token for token: gen_LS is
    exactly 1 and the fluency does not move, in bfloat16 too (the same prompts in the same batches)."""
    runner, records = two_records(gpt2_tokenizer, dtype)
    scores = generation(runner, lambda _: contextlib.nullcontext(), records, fluent=12)
    assert [s["gen_LS"] for s in scores] == [1.0, 1.0] and [s["fluency_drop"] for s in scores] == [0.0, 0.0]
    assert "gen_GS" in scores[0] and "gen_GS" not in scores[1]


@pytest.mark.parametrize("written, old", [(" Rome. No, it is Paris", 1.0), (" Rome, the capital", 0.0),
                                          (" Rome. Parisian cafés", 0.0)])
def test_gen_old_counts_continuations_that_name_the_old_answer(gpt2_tokenizer, monkeypatch, written, old):
    """gen_old: the 50-token continuation of the edit prompt (and its rephrase) names the record's old
    answer as whole words; a record without an old answer has no gen_old."""
    runner, records = two_records(gpt2_tokenizer)
    records[0].old_target = "Paris"
    monkeypatch.setattr("metrics.greedy", lambda model, tok, prompts, k: [tok(written)["input_ids"]] * len(prompts))
    scores = generation(runner, lambda _: contextlib.nullcontext(), records, fluent=12)
    assert scores[0]["gen_old"] == old and "gen_old" not in scores[1]


@pytest.mark.parametrize("written, named", [(" Paris, they said; today it is Rome", 1.0), (" Paris, the capital", 0.0)])
def test_gen_new_counts_a_late_answer_that_gen_es_does_not(gpt2_tokenizer, monkeypatch, written, named):
    """gen_new: the 50-token continuation names the new answer anywhere; gen_ES reads only the answer's
    length plus 3 tokens (" Rome" is 1 token: 4), so a reply that names it at its 9th token counts in
    gen_new alone."""
    runner, records = two_records(gpt2_tokenizer)
    monkeypatch.setattr("metrics.greedy", lambda model, tok, prompts, k: [tok(written)["input_ids"][:k]] * len(prompts))
    scores = generation(runner, lambda _: contextlib.nullcontext(), records, fluent=12)
    assert scores[0]["gen_new"] == named and scores[0]["gen_ES"] == 0.0


@pytest.mark.parametrize("chat", [False, True])
def test_chat_asks_each_prompt_in_the_template_and_reads_a_restated_answer(gpt2_tokenizer, monkeypatch, chat):
    """--chat: every prompt goes to the model as a user's message in the chat template, and a reply that
    says the question again before the answer still names it (the cap is the prompt's length longer)."""
    monkeypatch.setattr(gpt2_tokenizer, "chat_template", CHATML)
    runner, records = two_records(gpt2_tokenizer)
    asked = []

    def greedy(model, tok, prompts, k):
        asked.extend(prompts)
        return [tok(" The capital of France is Rome.")["input_ids"]] * len(prompts)
    monkeypatch.setattr("metrics.greedy", greedy)
    scores = generation(runner, lambda _: contextlib.nullcontext(), records[:1], fluent=12, chat=chat)
    wanted = ["The capital of France is", "France's capital city is", "The Eiffel Tower is in", "Berlin is in"]
    assert set(asked) == {chat_text(gpt2_tokenizer, q) if chat else q for q in wanted}
    assert scores[0]["gen_ES"] == float(chat)                     # " Rome" + 3 tokens: " The capital of France"


def test_unedited_continuations_are_kept_for_the_next_run(gpt2_tokenizer, tmp_path):
    """evaluate.py --cache-dir --generate: the unedited model's continuations of a batch's two prompt
    lists are written to the file; the next run takes them back, makes none anew, and scores the same
    as without the file. A file cut short is moved aside."""
    runner, records = two_records(gpt2_tokenizer)
    path = str(tmp_path / "continuations.json")
    first = Continuations(path)
    plain = generation(runner, lambda _: contextlib.nullcontext(), records, fluent=12)
    made = generation(runner, lambda _: contextlib.nullcontext(), records, fluent=12, unedited=first)
    assert first.new == 2
    first.save()
    again = Continuations(path)
    taken = generation(runner, lambda _: contextlib.nullcontext(), records, fluent=12, unedited=again)
    assert again.new == 0 and len(again.kept) == 2 and plain == made == taken
    with open(path, "w") as f:
        f.write('{"a": [[1, 2')
    assert Continuations(path).kept == {} and os.path.exists(path + ".damaged")

"""data.py: the loaders on the real files, UniEdit's schema, downloads, errors, label masking."""
import hashlib
import json
import os
import random
import shutil

import pytest

import datafiles
from conftest import CHATML
from data import DataError, EditRequest, chat_text, encode, load, other_questions, relations
from draws import asked_in_chat


def test_counterfact_real_files(data_dir):
    splits = load("counterfact", data_dir)
    assert {k: len(v) for k, v in splits.items()} == {"train": 10000, "eval": 10000}
    r = splits["eval"][0]  # case 0 of the MEND/EasyEdit split
    assert (r.prompt, r.target, r.old_target) == ("The mother tongue of Danielle Darrieux is", "English", "French")
    assert r.generality == [("Where Danielle Darrieux is from, people speak the language of", "English")]
    assert r.locality == [("Michel Rocard is a native speaker of", "French")]


def test_other_questions_ask_the_subject_another_relation():
    """RS's questions (data.other_questions): the pool's prompts about an edited subject in another relation;
    not its own relation in other words (templates joined through the neighbours), not a prompt a record
    asks, not another subject."""
    def record(prompt, subject, old, neighbour):
        return EditRequest(prompt, "X", [], [(neighbour, "Y")], old_target=old, subject=subject)
    records = [record("Anna Berg died in", "Anna Berg", "Oslo", "Carl Dahl passed away at"),
               record("Tom Lund is a citizen of", "Tom Lund", "Norway", "Eva Moe holds a citizenship from")]
    pool = [record("Anna Berg passed away at", "Anna Berg", "Oslo", "Per Holm died in"),           # her relation
            record("anna berg holds a citizenship from", "anna berg", "Sweden", "Ola Vik is a citizen of"),
            record("Tom Lund is a citizen of", "Tom Lund", "Denmark", "Ola Vik is a citizen of"),  # asked
            record("Eva Moe passed away at", "Eva Moe", "Bergen", "Per Holm died in")]              # not edited
    groups = relations(records + pool)
    assert groups["{} died in"] == groups["{} passed away at"] != groups["{} is a citizen of"]
    assert groups["{} is a citizen of"] == groups["{} holds a citizenship from"]
    other_questions(records, pool)
    assert [r.others for r in records] == [[("anna berg holds a citizenship from", "Sweden")], []]


def test_counterfacts_other_questions(data_dir):
    """The eval split's RS questions come from the train split: 381 records have some. The 218 templates
    fall into 24 groups: a relation's, or a few relations' where a neighbour fits a more general template
    ("{} performs" joins the instrument, genre and position templates)."""
    splits = load("counterfact", data_dir)
    assert len(set(relations(splits["train"] + splits["eval"]).values())) == 24
    assert sum(bool(r.others) for r in splits["eval"]) == 381 and not any(r.others for r in splits["train"])
    assert splits["eval"][8].others == [("Saint Petersburg is located in", "Europe")]   # a twin city of Warsaw
    assert load("counterfact", data_dir, split="eval")["eval"][8].others == splits["eval"][8].others


def test_zsre_subset_gets_seeded_split(data_dir, capsys):
    splits = load("zsre", data_dir)
    assert "left out 2 record(s)" in capsys.readouterr().out              # records 534 and 723: empty 'alt'
    assert (len(splits["train"]), len(splits["eval"])) == (798, 200)      # both were in train: the split is as before
    ids = [r.case_id for r in splits["train"] + splits["eval"]]
    assert sorted(ids, key=int) == [str(i) for i in range(1000) if i not in (534, 723)]   # a partition
    assert [r.case_id for r in load("zsre", data_dir)["eval"]] == [r.case_id for r in splits["eval"]]  # seeded
    r = next(r for r in splits["train"] + splits["eval"] if r.case_id == "0")
    assert (r.prompt, r.target,
            r.old_target) == ("What is the product made by UniFirst?", "unmanned aircraft", "uniform")
    assert r.locality == [("nq question: john goodman's character in the big lebowski", "Walter Sobchak")]


def test_zsre_uses_official_eval_when_present(data_dir, tmp_path):
    shutil.copytree(os.path.join(data_dir, "zsre"), tmp_path / "zsre")
    records = json.load(open(tmp_path / "zsre" / "zsre_mend_train-1k.json"))
    json.dump(records[:7], open(tmp_path / "zsre" / "zsre_mend_eval.json", "w"))
    splits = load("zsre", str(tmp_path))
    assert (len(splits["train"]), len(splits["eval"])) == (998, 7)       # 2 with an empty answer left out


def test_mquake_hard(data_dir):
    records = load("mquake", data_dir)["eval"]
    assert len({r.case_id for r in records}) == 429
    first = [r for r in records if r.case_id == "7417"]
    assert [r.prompt for r in first][:2] == ["Hey Jude was performed by", "The director of Madonna is"]
    assert first[0].generality == [("Who performed Hey Jude?", "Madonna")]
    assert first[0].answers[0] == "Arabic" and "Arabic language" in first[0].answers
    assert len(first[0].questions) == 3 and all(r.questions == first[0].questions for r in first)


def uniedit_sample(folder):
    """A two-discipline sample in UniEdit's published schema (README of qizhou000/UniEdit)."""
    def hop(prompt, target):
        return {"path_type": "single", "prompt": prompt, "target": target, "paths": [["h_e", "r_e", "t_e"]],
                "one_hops": [{"path": ["h_e", "r_e", "t_e"], "prompt": prompt, "subject": "x", "target": target}]}
    for split in ("train", "test"):
        os.makedirs(folder / split)
        for discipline, n in (("biology", 2), ("art", 1)):
            json.dump({str(i): {
                "edit": {"prompt": f"{discipline} fact {i} is", "target": f"new{i}", "subject": f"s{i}",
                         "head_entity": {"id": "Q1", "label": "s", "description": "", "aliases": []}},
                "generality": {"0": hop(f"In other words, {discipline} fact {i} is", f"new{i}")},
                "locality": {"0": dict(hop(f"Unrelated {discipline} {i} is", "same"), loc_type="none")},
            } for i in range(n)}, open(folder / split / f"{discipline}.json", "w"))


def test_uniedit_sample(tmp_path):
    uniedit_sample(tmp_path / "uniedit")
    splits = load("uniedit", str(tmp_path))
    assert len(splits["train"]) == len(splits["eval"]) == 3
    r = next(r for r in splits["eval"] if r.case_id == "biology-1")
    assert (r.prompt, r.target) == ("biology fact 1 is", "new1")
    assert r.generality == [("In other words, biology fact 1 is", "new1")]
    assert r.locality == [("Unrelated biology 1 is", "same")]


def test_download_from_file_url_with_checksum(data_dir, tmp_path, monkeypatch):
    src = os.path.join(data_dir, "mquake", "MQuAKE-hard.json")
    url = "file://" + os.path.abspath(src)
    sha = hashlib.sha256(open(src, "rb").read()).hexdigest()
    monkeypatch.setitem(datafiles.FILES, "mquake/MQuAKE-hard.json", (url, sha))
    records = load("mquake", str(tmp_path))["eval"]                      # downloads, then reads
    assert len({r.case_id for r in records}) == 429
    assert open(tmp_path / "mquake" / "MQuAKE-hard.json", "rb").read() == open(src, "rb").read()
    monkeypatch.setitem(datafiles.FILES, "mquake/MQuAKE-hard.json", (url, "0" * 64))
    os.remove(tmp_path / "mquake" / "MQuAKE-hard.json")
    with pytest.raises(DataError, match="checksum"):
        load("mquake", str(tmp_path))
    assert os.listdir(tmp_path / "mquake") == []                         # nothing half-written stays


def test_git_blob_id_names_a_file_as_its_repository_does(data_dir):
    """MEND's zsRE files are checked by the id qizhou000/RECIPE's tree gives them at b8ff1fc2 (git
    ls-tree): this is that tree's id for counterfact-edit.json, the file data/ holds."""
    assert datafiles.git_blob_id(os.path.join(data_dir, "counterfact",
                                         "counterfact-edit.json")) == "a24e5bb3b963d4d683ae032344ddce7566ba1ee7"


def test_zsre_takes_the_full_split_where_it_downloads_else_the_subset(data_dir, tmp_path, monkeypatch, capsys):
    subset = os.path.join(data_dir, "zsre", "zsre_mend_train-1k.json")
    records = json.load(open(subset))
    full = tmp_path / "full.json"                                            # a stand-in for MEND's splits
    json.dump(records[:30], open(full, "w"))
    for rel in ("zsre/zsre_mend_train.json", "zsre/zsre_mend_eval.json"):
        monkeypatch.setitem(datafiles.FILES, rel, ("file://" + str(full), datafiles.git_blob_id(full)))
    monkeypatch.setitem(datafiles.FILES, "zsre/zsre_mend_train-1k.json", ("file://" + subset, None))
    splits = load("zsre", str(tmp_path / "online"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "eval": 30}
    assert "1,000-record" not in capsys.readouterr().out
    monkeypatch.setitem(datafiles.FILES, "zsre/zsre_mend_train.json", ("http://127.0.0.1:9/zsre_mend_train.json", None))
    splits = load("zsre", str(tmp_path / "offline"))                         # nothing listens on port 9
    assert {k: len(v) for k, v in splits.items()} == {k: len(v) for k, v in load("zsre", data_dir).items()}   # 800/200
    assert "zsRE: MEND's train split is not downloadable" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "offline" / "zsre")) == ["zsre_mend_train-1k.json"]


def test_offline_error_names_file_url_and_place(tmp_path, monkeypatch):
    url = "http://127.0.0.1:9/counterfact-train.json"                   # nothing listens on port 9
    monkeypatch.setitem(datafiles.FILES, "counterfact/counterfact-train.json", (url, None))
    with pytest.raises(DataError) as err:
        load("counterfact", str(tmp_path))
    message = str(err.value)
    assert "counterfact-train.json" in message and url in message
    assert str(tmp_path / "counterfact" / "counterfact-train.json") in message
    # every one
    assert "2 data file(s) missing" in message and str(tmp_path / "counterfact" / "counterfact-edit.json") in message


def test_malformed_record_names_file_index_field(data_dir, tmp_path):
    records = json.load(open(os.path.join(data_dir, "counterfact", "counterfact-edit.json")))[:5]
    del records[3]["rephrase_prompt"]
    os.makedirs(tmp_path / "counterfact")
    for name in ("counterfact-train.json", "counterfact-edit.json"):
        json.dump(records, open(tmp_path / "counterfact" / name, "w"))
    with pytest.raises(DataError, match=r"counterfact-train.json record 3: .*'rephrase_prompt'"):
        load("counterfact", str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(DataError, match="known: counterfact, zsre"):
        load("wikibio")


def check_masking(tokenizer):
    """Labels hold exactly the answer tokens (after the prompt); prompt and padding are -100."""
    prompts, targets = ["The Eiffel Tower is in", "Danielle Darrieux, a native"], ["Rome", "English speaker"]
    batch = encode(tokenizer, prompts, targets)            # GPT-2-style tokenizers: no BOS by default
    for b, (p, t) in enumerate(zip(prompts, targets)):
        n = int(batch["attention_mask"][b].sum())
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        answer = labels[labels != -100].tolist()
        assert tokenizer.decode(answer) == " " + t
        assert ids[n - len(answer):n].tolist() == answer
        assert tokenizer.decode(ids[:n - len(answer)]) == p
        assert (labels[:n - len(answer)] == -100).all()
        assert (labels[n:] == -100).all() and (batch["attention_mask"][b, n:] == 0).all()
    with_bos = encode(tokenizer, prompts, targets, bos=True)     # explicit BOS: one more token in front
    for key in ("input_ids", "labels", "attention_mask"):
        assert with_bos[key][:, 1:].tolist() == batch[key].tolist()
    assert (with_bos["input_ids"][:, 0] == tokenizer.bos_token_id).all() and (with_bos["labels"][:, 0] == -100).all()


def test_label_masking_gpt2_tokenizer(gpt2_tokenizer):
    check_masking(gpt2_tokenizer)


@pytest.mark.slow
def test_label_masking_smollm_tokenizer(smollm):
    check_masking(smollm[1])


def test_prompt_only_row_for_generation(gpt2_tokenizer):
    batch = encode(gpt2_tokenizer, ["Who performed Hey Jude?"], [""])
    prompt_ids = gpt2_tokenizer("Who performed Hey Jude?").input_ids
    assert (batch["labels"] == -100).all() and batch["attention_mask"].sum() == len(prompt_ids)


def test_asked_in_chat_puts_that_share_of_the_loss_prompts_in_the_template(gpt2_tokenizer, monkeypatch):
    """train.py --chat: each generality and locality prompt (the others' too) is, with probability `share`,
    the chat template's text with the prompt said again after it (--chat-rows generality: the generality
    prompts alone); the edit prompt and every answer stay as they were, and the records drawn are not
    changed in place."""
    monkeypatch.setattr(gpt2_tokenizer, "chat_template", CHATML)
    r = EditRequest("The Eiffel Tower is in", "Rome", [(f"Where is the Eiffel Tower{i}?", "Rome") for i in range(20)],
                    [(f"The Louvre{i} is in", "Paris") for i in range(20)], old_target="Paris")
    o = EditRequest("The Colosseum is in", "Oslo", old_target="Rome")
    asked = lambda q: chat_text(gpt2_tokenizer, q) + q
    (all_r,), (all_o,) = asked_in_chat(random.Random(0), gpt2_tokenizer, 1.0, [r], [o])
    assert all_r.generality == [(asked(q), a) for q, a in r.generality] and all_o.prompt == asked(o.prompt)
    assert all_r.locality == [(asked(q), a) for q, a in r.locality]
    assert (all_r.prompt, all_r.target, all_r.old_target) == (r.prompt, r.target, r.old_target)
    assert r.generality[0][0] == "Where is the Eiffel Tower0?" and o.prompt == "The Colosseum is in"   # not in place
    (gen,), (gen_o,) = asked_in_chat(random.Random(0), gpt2_tokenizer, 1.0, [r], [o], locality=False)
    assert gen.generality == all_r.generality and (gen.locality, gen_o.prompt) == (r.locality, o.prompt)
    (none,), _ = asked_in_chat(random.Random(0), gpt2_tokenizer, 0.0, [r], [o])
    assert none == r
    (half,), _ = asked_in_chat(random.Random(0), gpt2_tokenizer, 0.5, [r], [o])
    wrapped = [p != q for (p, _), (q, _) in zip(half.generality + half.locality, r.generality + r.locality)]
    assert 10 <= sum(wrapped) <= 30, wrapped          # Binomial(40, 0.5): outside 10..30 with probability 7e-4
    assert all(p in (q, asked(q)) for (p, _), (q, _) in zip(half.generality + half.locality,
                                                            r.generality + r.locality))

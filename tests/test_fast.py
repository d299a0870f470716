"""The fast training step (cached lower blocks, rows grouped by length, edit rows trimmed, factored
ΔW) computes the same edit, loss and gradient as the plain way: full-model passes, one padded batch
per kind of row, dense ΔW."""
import pytest
import torch

from conftest import perturb_zero_init, reorder_rtol, tiny
from data import encode, load, tokenize
from editor import ibke_editor
from hooks import dense, functional_edit, grad_decomposition
from hypernet import IBKE, EditorConfig
from losses import LossWeights, answer_nll, ibke_loss, locality_kl, scored
from model import edit_module_names, weight_shape
from runner import Runner, length_groups, take
from train import continuations, train_step


def plain_step(model, tokenizer, editor, batch, others, weights, after=None):
    """METHOD.md §3 written out with full-model passes and dense ΔW (the reference); after: --c-after's
    rows by edit text, whose KL is averaged over all their positions in the batch."""
    def rows(pairs, join=" "):
        return encode(tokenizer, [p for p, _ in pairs], [a for _, a in pairs], joins=[join] * len(pairs))

    def nll(rows_):
        return answer_nll(*scored(model(input_ids=rows_["input_ids"], attention_mask=rows_["attention_mask"]).logits,
                                  rows_["labels"]), rows_["labels"].shape[0])
    edit = rows([(r.prompt, r.target) for r in batch])
    gen = rows([pair for r in batch for pair in r.generality])
    loc = rows([pair for r in batch for pair in r.locality] + [(o.prompt, o.old_target or o.target) for o in others])
    cont = rows([pair for r in batch for pair in (after or {}).get(f"{r.prompt} {r.target}", [])] or [("", "x")], "")
    decomposition, mask = grad_decomposition(model, list(editor.shapes), edit)
    deltas, itm = editor(decomposition, mask)

    def scored_logits(rows_):
        return scored(model(input_ids=rows_["input_ids"], attention_mask=rows_["attention_mask"]).logits,
                      rows_["labels"])[0]
    with torch.no_grad():
        pre, pre_cont = scored_logits(loc), scored_logits(cont)
    with functional_edit(model, deltas):
        edit_nll, gen_nll, post, post_cont = nll(edit).mean(), nll(gen).mean(), scored_logits(loc), scored_logits(cont)
    return deltas, ibke_loss(edit_nll, gen_nll, locality_kl(pre, post), itm, weights,
                             locality_kl(pre_cont, post_cont) if after else None)[0]


def check_same(model, tokenizer, records, free: float = 128, after: bool = False):
    """The plain step runs every block from the embeddings, the fast one from cached hidden states in
    other row groups: the same sums in another order through the model's depth (its FFN width the
    longest reduction). A gradient reaches the hypernetwork along two such paths, each through the
    blocks and back: the decomposition (h, u) it reads and the loss's gradient at ΔW it receives, so
    their errors add up to four times the depth. after: with --c-after's rows, for two of the three
    edits (the third has none), made as train.continuations makes them."""
    width, depth = getattr(model.config, "intermediate_size",
                           None) or 4 * model.config.hidden_size, model.config.num_hidden_layers
    rtol, grad_rtol = reorder_rtol(width, depth), reorder_rtol(width, 4 * depth)
    names = edit_module_names(model)
    editor = IBKE({n: weight_shape(model.get_submodule(n)) for n in names},
                  EditorConfig(d_m=32, latent_len=3, latent_dim=16, heads=2)).eval()   # z = μ: deterministic
    perturb_zero_init(editor)                                                            # every path live
    batch, others = records[:3], records[3:6]
    runner = Runner(model, tokenizer, names, cache=True)
    runner.free = free                                       # inf: every pass takes all its rows, as on a GPU
    params = list(editor.parameters())
    rows = {f"{r.prompt} {r.target}": [(f"{r.prompt} {r.target}", ". It was said so in the news")] for r in batch[:2]}
    weights, rows = (LossWeights(c_after=2.0), rows) if after else (LossWeights(), None)
    ref_deltas, ref_loss = plain_step(model, tokenizer, editor, batch, others, weights, rows)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for chunk in (0, 0, 1, 2):                               # computed, then from the caches; in chunks of edits
        surrogate, parts = train_step(runner, editor, batch, others, weights, chunk=chunk, after=rows)
        torch.testing.assert_close(parts["loss"], ref_loss.detach(), rtol=rtol, atol=0)
        grads = torch.autograd.grad(surrogate, params, allow_unused=True)
        assert [g is None for g in grads] == [g is None for g in ref_grads]
        g, ref = (torch.cat([x.flatten() for x in gs if x is not None]) for gs in (grads, ref_grads))
        assert (g - ref).norm() <= grad_rtol * ref.norm(), ((g - ref).norm() / ref.norm()).item()
    edit_batch = take(runner.batch([r.prompt for r in batch], [r.target for r in batch]), slice(0, 3))
    deltas = ibke_editor(editor)(runner, edit_batch)             # what evaluate.py applies
    for name in names:
        torch.testing.assert_close(dense(deltas[name]), ref_deltas[name].detach(), rtol=rtol,
                                   atol=rtol * ref_deltas[name].abs().max().item())


@pytest.mark.parametrize("free, after", [(128, False), (float("inf"), False), (128, True)])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fast_step_equals_plain_step_on_tiny_models(kind, free, after, gpt2_tokenizer, data_dir):
    model = tiny(kind, init=0.2)
    model.resize_token_embeddings(len(gpt2_tokenizer))            # real CounterFact text, real GPT-2 tokens
    model.requires_grad_(False)
    check_same(model, gpt2_tokenizer, load("counterfact", data_dir)["train"][:6], free, after)


@pytest.mark.slow
def test_fast_step_equals_plain_step_on_real_model(smollm, data_dir):
    model, tokenizer = smollm
    check_same(model, tokenizer, load("counterfact", data_dir)["train"][:6])   # observed ≤ 1.8e-5 of 5.6e-4


def test_length_groups_cover_every_row_and_bound_padding():
    lengths = [10, 36, 12, 11, 30, 9, 35, 12] * 4
    groups = length_groups(lengths, free=16)
    assert sorted(b for g in groups for b in g) == list(range(len(lengths)))
    for g in groups:
        padded, text = len(g) * max(lengths[b] for b in g), sum(lengths[b] for b in g)
        assert padded <= max(1.25 * text, text + 16)
    assert 1 < len(groups) < len(lengths)                             # similar lengths do share a pass
    assert length_groups([9, 14, 11, 8, 12, 10, 13, 9]) == [[3, 0, 7, 5, 2, 4, 6, 1]]  # 8 short prompts: one pass


def test_cached_states_tell_the_joins_apart(gpt2_tokenizer):
    """The same prompt and answer joined with a space and without are two texts with two sets of
    states: a cached Runner asked for both, in either order, gives each the states an uncached one does."""
    model = tiny("gpt2")
    model.resize_token_embeddings(len(gpt2_tokenizer))
    names = edit_module_names(model)
    pair, joins = (["The capital of France is"], [", Paris"]), [" ", ""]
    fresh = [Runner(model, gpt2_tokenizer, names, cache=False).batch(*pair, [j])["hidden"] for j in joins]
    assert fresh[0].shape[1] != fresh[1].shape[1] or not torch.equal(*fresh)
    for order in (joins, joins[::-1]):
        cached = Runner(model, gpt2_tokenizer, names)
        got = {j: cached.batch(*pair, [j])["hidden"] for j in order}
        assert all(torch.equal(got[j], f) for j, f in zip(joins, fresh))


def test_saved_states_are_reused_exactly_and_merged(gpt2_tokenizer, data_dir, tmp_path, monkeypatch):
    """--cache-dir: a Runner that loads another's saved states gives bit-identical batches without
    running the lower blocks; two runners' saves add up; another model's states go to another file."""
    import runner as runner_module
    model = tiny("llama", init=0.2)
    model.resize_token_embeddings(len(gpt2_tokenizer))
    names = edit_module_names(model)
    records = load("counterfact", data_dir)["train"][:8]
    texts = [([r.prompt for r in part], [r.target for r in part]) for part in (records[:4], records[4:])]
    first, second = Runner(model, gpt2_tokenizer, names), Runner(model, gpt2_tokenizer, names)
    path = first.states_file(str(tmp_path))
    assert second.states_file(str(tmp_path)) == path
    wanted = [first.batch(*texts[0])["hidden"], second.batch(*texts[1])["hidden"]]
    first.save_states(path)
    second.save_states(path)                                         # adds its texts to the file
    calls = []
    monkeypatch.setattr(runner_module, "hidden_before", lambda *a: calls.append(a))
    third = Runner(model, gpt2_tokenizer, names)
    assert third.load_states(path) == 8
    for (prompts, targets), hidden in zip(texts, wanted):
        assert torch.equal(third.batch(prompts, targets)["hidden"], hidden)
    assert not calls                                                 # nothing recomputed
    other = tiny("llama", init=0.3)
    other.resize_token_embeddings(len(gpt2_tokenizer))
    assert Runner(other, gpt2_tokenizer, names).states_file(str(tmp_path)) != path


def test_continuation_rows_are_the_text_the_model_wrote(gpt2_tokenizer, data_dir, monkeypatch, tmp_path):
    """--c-after's rows: joined as train_step joins them (no space), each is the edit text followed by
    the unedited model's greedy continuation (here given: punctuation first, a space first, no space,
    nothing, blank), scored from the first token after the edit text; a blank continuation gives no row.
    With --cache-dir (a folder not made yet) a second run takes them from there without generating."""
    written, calls = [", Italy. It is", " and its people", "!!!", "", " \n ", ".\n\nThe answer"], []
    monkeypatch.setattr("metrics.greedy", lambda model, tokenizer, texts, k: calls.append(texts) or [
        gpt2_tokenizer(w)["input_ids"] for w in written[:len(texts)]])
    records = load("counterfact", data_dir)["train"][:6]
    model = tiny("gpt2")
    runner, folder = Runner(model, gpt2_tokenizer, edit_module_names(model)), str(tmp_path / "cache")
    rows = continuations(runner, records, 6, folder=folder)
    assert len(calls) == 1 and continuations(runner, records, 6, folder=folder) == rows and len(calls) == 1
    texts = [f"{r.prompt} {r.target}" for r in records]
    assert [t in rows for t in texts] == [True, True, True, False, False, True]
    for text, w in zip(texts, written):
        for prompt, answer in rows.get(text, []):
            assert (prompt, answer) == (text, w)
            ids, start = tokenize(gpt2_tokenizer, [prompt], [answer], joins=[""])[0]
            assert ids[:start] == gpt2_tokenizer(text)["input_ids"] and gpt2_tokenizer.decode(ids[start:]) == w

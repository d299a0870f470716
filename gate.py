"""
The gate of the edit memory's routing (memory.py, key.py): which stored edits a query may concern, read
off its words alone (the prompt, a question without its answer), never a record's fields. An edit stored
with its subject (the fact's "subject", as ROME's requests give it) is a candidate only for a query whose
words contain that subject (case-insensitive, whole words) as a name of its own: not followed by a
word of a name that runs on ("Paris Hilton" does not name Paris, nor "iPhone 4s" iPhone; unless the
query is in Title Case).
A neighbour asks the edit's question of another subject, so the gate rejects it however alike the
model's states are; edits stored without a subject pass the gate for every query. Among the candidates
the key (key.py) decides. Both tests read a query's own words: in a chat (the tokenizer's chat
template) the last user message, not the system prompt and turn markers around it (`Chat`).

    python key.py routing --ckpt out/ibke/best.pt     # rephrases and neighbours routed, with and without the gate
"""
import functools
import os
import re

import torch


WORD = re.compile(r"\w+")                         # the gate's word: subjects and queries read alike


def words(text: str) -> tuple[str, ...]:
    """The gate's view of a text: its words, lower-cased ("Outlook.com's" -> outlook, com, s)."""
    return tuple(WORD.findall(text.lower()))


def contains(text: str, answer: str) -> bool:
    """Does the text name the answer as whole words, case aside ("ar" is not in "are", "C" is not "C++")?
    The one test of an answer written: gen_ES, gen_GS and MH (metrics.py), and the memory's release."""
    a = answer.strip().lower()
    return bool(a) and re.search(rf"(?<!\w){re.escape(a)}(?!\w)", text.lower()) is not None


def runs_on(text: str, found: list[re.Match], j: int) -> bool:
    """Does a word of a name (`capitalised`), joined by a space or hyphen, follow the text's word j - 1, so
    that a name ending there is part of a longer one? ("Paris Hilton", "BBC Radio Cymru", "iPhone 4s",
    "Nintendo eShop" for Paris, BBC Radio, iPhone, Nintendo; not "Paris, France", "Paris's", "Paris is".)
    A word before it is not read: a capital there may only start a sentence ("In Paris"), so "New Delhi"
    passes Delhi's gate."""
    return (j < len(found) and capitalised(found[j].group())
            and re.fullmatch(r"[ -]", text[found[j - 1].end():found[j].start()]) is not None)


class Subjects:
    """The gate: which of the stored edits (with these subjects, "" for none) a text may concern."""

    def __init__(self, subjects: list[str] = ()):
        self.index, self.has, self.longest = {}, [], 0                     # words -> [edit]; edit has a subject
        self._has = torch.zeros(0, dtype=torch.bool)                        # self.has as a tensor, made once
        for s in subjects:
            self.add(s)

    def add(self, subject: str) -> None:
        w = words(subject)
        if w:
            self.index.setdefault(w, []).append(len(self.has))
            self.longest = max(self.longest, len(w))
        self.has.append(bool(w))

    def has_subject(self) -> torch.Tensor:
        """(n,) bool: the edits stored with a subject."""
        if len(self._has) != len(self.has):
            self._has = torch.tensor(self.has, dtype=torch.bool)
        return self._has

    def named(self, text: str) -> list[int]:
        """The edits whose subject is among the text's words as a name of its own (not runs_on), where the
        text has lower-case words: in Title Case ("Where Is The Eiffel Tower Located?") capitals mark no name."""
        found = list(WORD.finditer(text))
        w, hits = tuple(m.group().lower() for m in found), []
        cased = any(m.group()[0].islower() for m in found)
        for i in range(len(w)):
            for j in range(i + 1, min(len(w), i + self.longest) + 1):
                if w[i:j] in self.index and not (cased and runs_on(text, found, j)):
                    hits += self.index[w[i:j]]
        return hits

    def mask(self, texts: list[str]) -> torch.Tensor:
        """(B, n) bool: edit e may serve text b (its subject is among b's words, or it has none)."""
        m = ~self.has_subject().expand(len(texts), len(self.has)).clone()
        for b, t in enumerate(texts):
            m[b, self.named(t)] = True
        return m


TOKEN = re.compile(r"[\w'’.&-]+")                  # a word of a name: "O'Neil", "Outlook.com", "Webley & Scott"
PARTICLES = {"of", "de", "the", "and", "von", "van", "der", "da", "du", "la", "le", "di", "del", "des", "y",
             "ibn", "bin", "bint"}
OPENERS = {"the", "a", "an", "in", "on", "at", "of", "for", "from", "to", "by", "with", "what", "who", "whom",
           "whose", "which", "where", "when", "why", "how", "is", "was", "are", "were", "did", "does", "do", "it",
           "its", "this", "that", "his", "her", "their", "they", "he", "she", "we", "you"}   # capitals of a sentence


def capitalised(token: str) -> bool:
    """Can the token be a word of a name: a capital or digit first ("Paris", "1984", ".NET"), or a capital
    inside a word that starts lower-case ("iPod", "macOS", "sRGB")?"""
    t = token.lstrip(".'’&-")
    return bool(t) and (t[0].isupper() or t[0].isdigit() or (t[0].islower() and not t.islower()))


def guess_subject(prompt: str) -> str:
    """Whom a prompt is about, guessed from its words when no subject is given: its longest run of
    capitalised words (`capitalised`: "iPod Nano", "Mahmud al-Hasan"), less an opening article or
    question word and a final 's ("The Eiffel Tower is in" -> Eiffel Tower, "What nationality was Kees
    van Beijnum?" -> Kees van Beijnum); "" if it names none the gate would find again. Written against
    the misses among CounterFact's eval records 0–999 (the dataset's subject for 91.5% of them), it gives
    it for 91% of records 1,000–9,999 and 89% of zsRE's train prompts; where not, mostly a part of it
    ("Loner" for The Loner, "Webley" for Webley & Scott) or a lower-case name it cannot see ("table
    tennis"), and every CounterFact rephrase still passes the gate of its record's guess."""
    runs, run, particles, end = [], [], [], 0           # runs of capitalised words, spaced, joined by particles
    for m in TOKEN.finditer(prompt):
        t, spaced = m.group(), bool(run) and prompt[end:m.start()].isspace()
        capital = capitalised(t)
        if capital and spaced:
            run, particles = run + particles + [t], []
        elif capital:
            runs, run, particles = runs + [run], [t], []
        elif spaced and t in PARTICLES:
            particles.append(t)
        else:
            runs, run, particles = runs + [run], [], []
        end = m.end()
    names = []
    for w in runs + [run]:
        while w and w[0].lower() in OPENERS:
            w = w[1:]
        names.append(re.sub(r"['’]s$", "", " ".join(w)).rstrip(".,"))
    for name in sorted(names, key=len, reverse=True):
        if words(name) and Subjects([name]).named(prompt):
            return name
    return ""


def hard_negatives(records, texts_of) -> tuple[list[str], list[list[int]]]:
    """Per record, the prompts and rephrases of `texts_of` (records) that pass its gate but are about another
    subject ("Jill Ireland is native to" for an edit of Ireland, a rephrase of another fact with the subject
    in its unrelated prefix): the texts, and per record the indices of its own among them."""
    gate, texts, own = Subjects([r.subject for r in records]), {}, [[] for _ in records]
    for other in texts_of:
        for q in [other.prompt] + [g for g, _ in other.generality]:
            for i in gate.named(q):
                if other.subject != records[i].subject:
                    own[i].append(texts.setdefault(q, len(texts)))
    return list(texts), [sorted(set(rows)) for rows in own]


def asks_another(records) -> list[bool]:
    """Per record: does a locality prompt of it ask the question another of these records edits? It names
    that record's subject and is its prompt or expects its true answer ("Taipei is a twin city of", a
    CounterFact neighbour of one record, is the prompt of another). Holding both edits, the memory rightly
    answers such a neighbour with the other edit, and LS against the original model counts that against it."""
    gate = Subjects([r.subject for r in records])
    return [any(j != i and (records[j].prompt == q or records[j].old_target == a)
                for q, a in r.locality for j in gate.named(q)) for i, r in enumerate(records)]


# -----------------------------------------------------------------------------
# a query's own words: the last user message of a chat

def find(row: list[int], part: tuple[int, ...], start: int = 0, last: bool = False) -> int:
    """Where `part` begins in row (its first occurrence from `start`, or its last), or -1."""
    at = [i for i in range(start, len(row) - len(part) + 1) if tuple(row[i:i + len(part)]) == part]
    return (at[-1] if last else at[0]) if at else -1


class Chat:
    """Which tokens of a query are its own words. A chat, in the tokenizer's template, wraps the question
    in a system prompt and turn markers ("<|im_start|>system\nYou are a helpful AI assistant …<|im_end|>\n
    <|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"): averaged over all of it, the
    states are the system prompt's as much as the question's (the key then finds an edit from a rephrase
    two times in three), so routing reads the tokens of the last user message. A text without the
    markers, or a tokenizer without a template, is read whole."""

    def __init__(self, tokenizer):
        self.opens = self.closes = None                                  # token ids, found in the template
        one, two = "Where is Qx1?", "Qx2 is there."                      # placeholder messages
        user, assistant = {"role": "user", "content": one}, {"role": "assistant", "content": two}
        try:
            first, turns = (tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                            for c in ([user], [user, assistant, user]))
        except Exception:                                                # no template, or one that asks other turns
            return
        if first.count(one) != 1 or turns.count(one) != 2 or turns.count(two) != 1:
            return
        before, after = first.split(one)
        between, replying = turns.split(two)[1].split(one)[0], turns.split(one)[1].split(two)[0]
        common = lambda a, b: len(os.path.commonprefix([a, b]))          # strings or token tuples
        opens = before[len(before) - common(before[::-1], between[::-1]):]    # what begins a user message
        closes = after[:common(after, replying)]                              # what ends it
        ids = lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        row, asked, opens, closes = ids(first), ids(one), ids(opens), ids(closes)
        s = find(list(row), asked)
        if s < 0:
            return
        e = s + len(asked)                                     # the markers as tokenised in context (plain-text
        self.opens = opens[len(opens) - common(row[:s][::-1], opens[::-1]):]  # ones may merge with a character
        self.closes = closes[:common(row[e:], closes)]                        # beside them: ".<" in GPT-2's BPE)
        if not (self.opens and self.closes and self.span(list(row)) == (s, e)):
            self.opens = self.closes = None

    def span(self, row: list[int]) -> tuple[int, int]:
        """[start, end) of the row's own words: after the last opening of a user message, to its close."""
        start = find(row, self.opens, last=True) if self.opens else -1
        if start < 0:
            return 0, len(row)
        start += len(self.opens)
        end = find(row, self.closes, start)
        end = end if end >= 0 else len(row)
        return (start, end) if start < end else (0, len(row))             # an empty message: the whole text

    def mask(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask (B, T) of these ids (B, T) kept on each row's own words only (same device)."""
        if self.opens is None:
            return mask
        kept = torch.zeros(mask.shape, dtype=torch.bool)
        for i, row in enumerate(ids.tolist()):
            kept[i, slice(*self.span(row))] = True
        return mask * kept.to(mask.device)

    def text(self, tokenizer, text: str) -> str:
        """The text's own words (a text without the markers, whole)."""
        if self.opens is None:
            return text
        row = tokenizer(text, add_special_tokens=False)["input_ids"]
        start, end = self.span(row)
        return text if (start, end) == (0, len(row)) else tokenizer.decode(row[start:end])


def chat(tokenizer) -> Chat:
    """The tokenizer's Chat, read off its template once (again if the template is changed)."""
    return _chat(tokenizer, str(getattr(tokenizer, "chat_template", None)))


@functools.cache
def _chat(tokenizer, template: str) -> Chat:
    return Chat(tokenizer)

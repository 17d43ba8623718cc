"""Text in and out of the model: cleaning training answers, tidying generated ones.

Cleaning is the original author's trick: answers without stopwords and punctuation keep the LoRA
model's loss on the words that carry meaning; the refine stage puts the language back. It must be
deterministic and offline, so it uses NLTK's data-free Treebank tokenizer and a stopword list kept
here (NLTK's English list, 179 words) instead of `nltk.download`.

The rule: a token is dropped when it is an NLTK stopword or pure punctuation, EXCEPT
- negations, which change the meaning: `no`, `not`, `nor` stay, and every `n't` form (`isn't`,
  `won't`, `can't`, with a straight or a typographic apostrophe) becomes `not` (its stem `is`/`wo`/`ca`
  goes);
- the list's bare contraction stems (`won`, `don`, `isn`, `haven`...): the Treebank tokenizer never
  produces them from a contraction (it splits `won't` into `wo` + `n't`), so they are words ("He won",
  "Don", "a safe haven") and stay;
- numbers keep their sign, decimals, thousands, currency and percent: `-3`, `3.5`, `1,000`, `$5`, `€5`, `50%`,
  and a unit written onto them keeps the sign too: `-5°C`.
So "No, there isn't a dog." -> "No not dog"; "It is -3 degrees, 50% off." -> "-3 degrees 50%" ("off" is a
stopword); ".5" and "-.5" keep their point and sign. An answer that is nothing but stopwords ("It is.")
is kept as written: cleaned to nothing, it would train the model to answer with nothing.
"""

from __future__ import annotations

import re
from functools import cache

# NLTK's `stopwords.words("english")` (the 179-word list), copied so nothing is downloaded at run time.
STOPWORDS = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
    yourselves he him his himself she she's her hers herself it it's its itself they them their theirs
    themselves what which who whom this that that'll these those am is are was were be been being have
    has had having do does did doing a an the and but if or because as until while of at by for with
    about against between into through during before after above below to from up down in out on off
    over under again further then once here there when where why how all any both each few more most
    other some such no nor not only own same so than too very s t can will just don don't should
    should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn
    hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn
    shouldn't wasn wasn't weren weren't won won't wouldn wouldn't""".split()
)
assert len(STOPWORDS) == 179
# Kept although NLTK lists them: without them "No, it is blue." would train as "blue".
NEGATIONS = frozenset({"no", "not", "nor"} | {w for w in STOPWORDS if w.endswith("n't")})
STEMS = frozenset({"don", "aren", "couldn", "didn", "doesn", "hadn", "hasn", "haven", "isn", "mightn", "mustn",
                   "needn", "shan", "shouldn", "wasn", "weren", "won", "wouldn", "ain"})
DROPPED = STOPWORDS - NEGATIONS - STEMS


@cache
def _treebank():
    """NLTK's Treebank tokenizer, imported when first needed: importing nltk takes over a second, which every
    command that only builds prompts (`mmft.export --help`, the app's start) would pay."""
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer()


_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
_NUMBER = re.compile(r"^[$€£]?[-+\u2212]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)$")  # "€5" is one Treebank token, "$5" two


def clean_answer(text: str) -> str:
    """'The cat is sitting on a red mat.' -> 'cat sitting red mat'; 'No, it isn't.' -> 'No not'."""
    tokens = _treebank().tokenize(text.replace("\u2019", "'"))  # "isn’t" as "isn't": the tokenizer knows only '
    kept = []
    for i, token in enumerate(tokens):
        low = token.lower()
        if i + 1 < len(tokens) and tokens[i + 1].lower() == "n't":
            continue  # the stem of a contraction: "is"/"wo"/"ca" + "n't" -> "not"
        if low == "n't" or (low in NEGATIONS and low not in ("no", "nor", "not")):
            kept.append("not")
        elif _NUMBER.match(token.rstrip(".")):
            number = token.rstrip(".")
            number = (tokens[i - 1] if i and tokens[i - 1] in "$€£" else "") + number
            kept.append(number + "%" if i + 1 < len(tokens) and tokens[i + 1] == "%" else number)
        else:
            word = _EDGE_PUNCT.sub("", token)
            if token[:1] in "-+\u2212" and token[1:2].isdigit():  # "-5°C": the sign is the meaning
                word = token[0] + word
            if word and low not in DROPPED and word.lower() not in DROPPED:
                kept.append(word)
    # an answer of stopwords only ("It is.") would train the model to say nothing: kept as written
    return " ".join(kept) or text.strip()


_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])(?!\w)")  # not ".5", not ".bashrc"
_REPEATED_PUNCT = re.compile(r"([,.;:!?])(?:\s*[,.;:!?])+")
_LEADING_PUNCT = re.compile(r"^(?:[\s,;:!?]|[.\-](?!\.?\d))+")  # a sign or point before a digit stays
_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _drop_repeats(words: list[str], max_n: int = 8) -> list[str]:
    """Collapse back-to-back repeats of any phrase up to `max_n` words: 'red red circle' -> 'red circle'.
    Words compare without case and edge punctuation; the later copy is kept (it ends the sentence)."""
    out: list[str] = []
    key = lambda w: _EDGE_PUNCT.sub("", w).lower()
    for word in words:
        out.append(word)
        for n in range(1, max_n + 1):
            if len(out) >= 2 * n and [key(w) for w in out[-n:]] == [key(w) for w in out[-2 * n : -n]]:
                del out[-2 * n : -n]
                break
    return out


ECHO_MIN_WORDS = 3  # "Red?" answered "red circle", "It" answered "It is a circle.": the answer, not an echo


def _strip_echo(text: str, question: str) -> str:
    """Remove the question when the model repeats it at the start of its answer (a question of three
    words or more: the first words of an answer to a shorter one are as likely its content)."""
    q_words = _words(question)
    if len(q_words) < ECHO_MIN_WORDS:
        return text
    tokens = list(re.finditer(r"\w+", text))
    if len(tokens) > len(q_words) and [t.group().lower() for t in tokens[: len(q_words)]] == q_words:
        return text[tokens[len(q_words) - 1].end() :]
    return text


def tidy(text: str, question: str = "", capitalize: bool = True) -> str:
    """Post-process a generated answer: echo of the question, repeated phrases, stray punctuation.
    Drafts keep their case (`capitalize=False`): the refine stage reads them as the LoRA model wrote them."""
    text = _strip_echo(text.strip(), question)
    text = " ".join(_drop_repeats(text.split()))
    text = _REPEATED_PUNCT.sub(r"\1", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _LEADING_PUNCT.sub("", text)
    text = _SPACE.sub(" ", text).strip()
    return text[:1].upper() + text[1:] if capitalize else text

"""Answer cleaning (training) and output tidying (inference), on known sentences."""

import nltk
import pytest

from mmft.text import DROPPED, NEGATIONS, STOPWORDS, clean_answer, tidy


@pytest.mark.parametrize("text, cleaned", [
    ("The cat is sitting on a red mat.", "cat sitting red mat"),
    ("There are two people, and they're eating pizza!", "two people eating pizza"),
    ("It's a 3.5-metre boat; isn't it?", "3.5-metre boat not"),
    ("The shape is a red circle.", "shape red circle"),
    ("", ""),
    # negations stay: a stopword-free "No, there is no dog." must not train as "dog"
    ("No, there is no dog.", "No no dog"),
    ("No, it is blue.", "No blue"),
    ("It is blue, so no.", "blue no"),
    ("Red? No, it is blue.", "Red No blue"),
    ("Neither red nor blue.", "Neither red nor blue"),
    ("It won't fit, we can't say, I don't know.", "not fit not say not know"),
    ("The cup isn't full and they aren't here.", "cup not full not"),
    ("He isn’t here, I won’t go, don’t.", "not not go not"),  # typographic apostrophes
    # NLTK's bare contraction stems are words here (Treebank never makes them from a contraction)
    ("He won the race.", "won race"), ("Don painted a safe haven.", "Don painted safe haven"),
    # numbers keep sign, decimals, thousands, currency and percent
    ("It is -3 degrees, 50% off, $5 for 1,000 cups and 3.5 kg.", "-3 degrees 50% $5 1,000 cups 3.5 kg"),
    ("There are 2 dogs and one cat.", "2 dogs one cat"),
    ("It costs €5, £2.50 or $5.", "costs €5 £2.50 $5"),
    ("It is .5 litres, -.5 degrees, up +.5%.", ".5 litres -.5 degrees +.5%"),  # no leading digit: kept whole
    ("It was -5°C, then +3dB.", "-5°C +3dB"),  # a number with its unit attached keeps its sign too
    # nothing but stopwords: kept as written, not cleaned to an empty answer (that trains silence)
    ("It is.", "It is."), ("They're here.", "They're here."),
])
def test_clean_answer(text, cleaned):
    assert clean_answer(text) == cleaned


def test_cleaning_needs_no_nltk_data(monkeypatch, tmp_path):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    assert clean_answer("A dog is running in the park.") == "dog running park"
    assert len(STOPWORDS) == 179 and "the" in STOPWORDS and "couldn't" in STOPWORDS
    assert {"no", "not", "nor", "couldn't", "isn't"} <= NEGATIONS and not NEGATIONS & DROPPED


@pytest.mark.parametrize("text, question, expected", [
    ("red red circle circle", "", "Red circle"),
    ("the shape is red the shape is red.", "", "The shape is red."),
    ("  ,, it is   blue !!", "", "It is blue!"),
    ("What colour is the shape? The shape is green.", "What colour is the shape?", "The shape is green."),
    ("what colour is it", "What colour is it?", "What colour is it"),  # nothing but the echo: kept
    # a short question's words starting the answer are its content, not an echo
    ("red circle", "Red?", "Red circle"), ("It is a circle.", "It", "It is a circle."),
    ("The shape is red.", "the shape?", "The shape is red."), ("Is it red? Yes.", "is it red?", "Yes."),
    ("A square .", "", "A square."),
    # a sign or a decimal point before a digit is not stray punctuation
    ("-3 degrees.", "", "-3 degrees."), (".5 litres", "", ".5 litres"), ("The value is .5", "", "The value is .5"),
    ("- red", "", "Red"), ("-.5 degrees", "", "-.5 degrees"), ("- .5", "", ".5"),
    ("What is the temperature? -.5 degrees", "What is the temperature?", "-.5 degrees"),
])
def test_tidy(text, question, expected):
    assert tidy(text, question) == expected

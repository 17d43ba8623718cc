"""Answer cleaning (training) and output tidying (inference), on known sentences."""

import nltk
import pytest

from mmft.text import STOPWORDS, clean_answer, tidy


@pytest.mark.parametrize("text, cleaned", [
    ("The cat is sitting on a red mat.", "cat sitting red mat"),
    ("There are two people, and they're eating pizza!", "two people eating pizza"),
    ("It's a 3.5-metre boat; isn't it?", "3.5-metre boat"),
    ("The shape is a red circle.", "shape red circle"),
    ("", ""),
])
def test_clean_answer(text, cleaned):
    assert clean_answer(text) == cleaned


def test_cleaning_needs_no_nltk_data(monkeypatch, tmp_path):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    assert clean_answer("A dog is running in the park.") == "dog running park"
    assert len(STOPWORDS) == 179 and "the" in STOPWORDS and "couldn't" in STOPWORDS


@pytest.mark.parametrize("text, question, expected", [
    ("red red circle circle", "", "Red circle"),
    ("the shape is red the shape is red.", "", "The shape is red."),
    ("  ,, it is   blue !!", "", "It is blue!"),
    ("What colour is the shape? The shape is green.", "What colour is the shape?", "The shape is green."),
    ("what colour is it", "What colour is it?", "What colour is it"),  # nothing but the echo: kept
    ("A square .", "", "A square."),
])
def test_tidy(text, question, expected):
    assert tidy(text, question) == expected

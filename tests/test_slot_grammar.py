"""A tagging task's answer grammar (serve/slot_grammar.py) and /v1/tasks/{task}/predict with it:
every target `render` writes matches it and parses back to its tags; unknown slots, words
that are not a span of the input and wrong positions do not match; a guided prediction
decodes under it, as the engine does with the same grammar, and guided false does not."""

from __future__ import annotations

import random

import pytest
from fastapi.testclient import TestClient

from tasktune.serve.api import create_app
from tasktune.serve.engine import Request
from tasktune.serve.sampling import SamplingParams
from tasktune.serve.slot_grammar import slot_grammar
from tasktune.serve.task_predictor import task_query
from tasktune.tasks.parsers import parse_slots
from tasktune.tasks.registry import get_task
from tasktune.tasks.render import slots_text

xgr = pytest.importorskip("xgrammar")
accepts = pytest.importorskip("xgrammar.testing")._is_grammar_accept_string

SLOTS = ("artist", "playlist", "city")
WORDS = "play the beatles on the road playlist in the city of the beatles".split()


def matches(grammar: str, text: str) -> bool:
    return accepts(xgr.Grammar.from_ebnf(grammar), text)


def test_every_rendered_target_matches_and_parses_back():
    rng = random.Random(0)
    grammar = slot_grammar(SLOTS, WORDS, prefix="Slots: ", suffix=".")
    for _ in range(40):
        tags, i = ["O"] * len(WORDS), 0
        while i < len(WORDS):  # random non-overlapping spans, some repeated words (positions get " [N]")
            n = rng.randint(1, 3)
            if rng.random() < 0.4 and i + n <= len(WORDS):
                slot = rng.choice(SLOTS)
                tags[i:i + n] = ["B-" + slot] + ["I-" + slot] * (n - 1)
            i += n
        text = slots_text(WORDS, tags)
        assert matches(grammar, f"Slots: {text}."), text
        assert parse_slots(text, WORDS, SLOTS).value == tags


@pytest.mark.parametrize("text", ["album: the beatles",  # not a slot type
                                  "artist: beatles play",  # words of the input, not a span
                                  "artist: the beatles [3]",  # "the beatles" starts at word 2
                                  "artist: the beatles;",  # a trailing separator
                                  "artist: ", "None"])
def test_what_cannot_be_read_back_does_not_match(text):
    assert not matches(slot_grammar(SLOTS, WORDS), text)


def test_quotes_and_backslashes_in_words_and_slots():
    words = ['say', '"hi"', 'C:\\dir', 'naïve']
    grammar = slot_grammar(('quote "x"', "path"), words)
    assert matches(grammar, 'quote "x": "hi" C:\\dir [2]; path: naïve')
    assert matches(slot_grammar(SLOTS, []), "none") and not matches(slot_grammar(SLOTS, []), "artist: x")
    with pytest.raises(ValueError, match="slot types"):
        slot_grammar((), words)


def test_guided_tagging_prediction_decodes_under_the_slot_grammar(engine):
    task = get_task("snips_slots")
    words = "play the beatles in the city".split()
    query = task_query(task, {"tokens": words})
    grammar = engine.grammars.ebnf(query.grammar)
    with TestClient(create_app(engine)) as c:
        guided = c.post("/v1/tasks/snips_slots/predict", json={"inputs": " ".join(words), "max_tokens": 48})
        free = c.post("/v1/tasks/snips_slots/predict", json={"inputs": words, "max_tokens": 48, "guided": False})
    assert guided.status_code == free.status_code == 200, (guided.text, free.text)
    want = engine.generate([Request(query.prompt, None, SamplingParams(max_tokens=48, grammar=grammar))])[0]
    assert guided.json()["text"] == want.text
    tokens = engine.tokenizer(want.text, add_special_tokens=False)["input_ids"]
    if len(tokens) < 48:  # it ended by itself: a whole match, which the parser reads
        assert matches(query.grammar, want.text), want.text
    unguided = engine.generate([Request(query.prompt, None, SamplingParams(max_tokens=48))])[0]
    assert free.json()["text"] == unguided.text

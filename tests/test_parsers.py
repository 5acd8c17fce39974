"""Parsers: exact round trips on every built-in test example; bad outputs are invalid,
never exceptions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tasktune.data.load import load_split
from tasktune.tasks.parsers import Parsed, parse_output
from tasktune.tasks.registry import builtin_task_names, get_task
from tasktune.tasks.render import render
from tasktune.tasks.spec import Example, Origin, Template


def example(task, inputs, target):
    return Example(task=task, uid="u", inputs=inputs, target=target, origin=Origin("x.jsonl", 1))


@pytest.mark.parametrize("name", builtin_task_names())
def test_round_trip_every_test_example(name):
    task = get_task(name)
    examples = load_split(task, "test").examples
    assert examples
    for seed in (0, 1):
        for ex in examples:
            parsed = parse_output(task, render(task, ex, seed).target, ex)
            assert parsed == Parsed(ex.target, True), (ex.origin, render(task, ex, seed).target)


def test_round_trip_through_a_target_template():
    task = replace(get_task("circa"), templates=(Template("{answer}", "Answer: {target}."),))
    ex = example("circa", {"context": "c", "question": "q", "answer": "a"}, "in-the-middle")
    assert render(task, ex).target == "Answer: in the middle."
    assert parse_output(task, render(task, ex).target, ex) == Parsed("in-the-middle", True)


@pytest.mark.parametrize("text, expected", [
    ("PlayMusic", "PlayMusic"), ("play music", "PlayMusic"), ("  Play_Music. ", "PlayMusic"),
    ("'get weather'", "GetWeather"), ("search screening event!", "SearchScreeningEvent"),
])
def test_classification_normalised_match(text, expected):
    assert parse_output(get_task("snips_intent"), text) == Parsed(expected, True)


@pytest.mark.parametrize("text", ["", "play", "play music now", "book restaurant and play music", "42"])
def test_classification_non_labels_are_invalid(text):
    parsed = parse_output(get_task("snips_intent"), text)
    assert parsed.valid is False


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no.", "no"), ("Probably yes / sometimes yes", "probably-yes"),
    ("Yes, subject to some conditions", "yes-upon-condition"), ("in the middle", "in-the-middle"),
    ("I am not sure how X will interpret Y\u2019s answer", "not-sure"), ("not sure", "not-sure"),
    ("In the middle, neither yes nor no", "in-the-middle"), ("probably_no", "probably-no"),
])
def test_yesno_labels_and_circa_wordings(text, expected):
    assert parse_output(get_task("circa"), text) == Parsed(expected, True)


def test_yesno_garbage_is_invalid():
    assert parse_output(get_task("circa"), "perhaps, who knows").valid is False


SLOTS = example("snips_slots", {"tokens": ["play", "the", "beatles", "on", "spotify"]},
                ["O", "B-artist", "I-artist", "O", "B-service"])


def test_tagging_parses_pairs_in_any_order_and_case():
    task = get_task("snips_slots")
    assert parse_output(task, "service: spotify; artist: the beatles", SLOTS) == Parsed(SLOTS.target, True)
    assert parse_output(task, "Artist: The Beatles; service: Spotify;", SLOTS) == Parsed(SLOTS.target, True)
    assert parse_output(task, "none", SLOTS) == Parsed(["O"] * 5, True)
    assert parse_output(task, "None.", SLOTS) == Parsed(["O"] * 5, True)


@pytest.mark.parametrize("text", [
    "singer: the beatles",            # unknown slot type
    "artist: the rolling stones",     # value not in the input
    "artist the beatles",             # no colon
    "artist: ",                       # empty value
    "artist: the beatles; album: the beatles",  # the only occurrence is already taken
    "artist: beatles [9]",            # position out of range
    ";;",
    "",
])
def test_tagging_bad_outputs_are_invalid(text):
    parsed = parse_output(get_task("snips_slots"), text, SLOTS)
    assert parsed.valid is False and parsed.value == ["O"] * 5


def test_tagging_word_position_picks_the_occurrence():
    task = get_task("snips_slots")
    ex = example("snips_slots", {"tokens": ["in", "in", "paris"]}, ["O", "B-state", "B-city"])
    assert parse_output(task, "state: in [2]; city: paris", ex) == Parsed(ex.target, True)
    assert parse_output(task, "state: in; city: paris", ex).value == ["B-state", "O", "B-city"]


def test_tagging_without_tokens_is_invalid_not_an_error():
    assert parse_output(get_task("snips_slots"), "artist: x", None).valid is False


def test_generation_is_the_stripped_text():
    task = get_task("dialogsum")
    assert parse_output(task, "  A summary.\n") == Parsed("A summary.", True)
    assert parse_output(task, "   ").valid is False


def test_non_text_output_is_invalid():
    assert parse_output(get_task("clinc150"), None).valid is False  # type: ignore[arg-type]

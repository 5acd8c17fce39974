"""Rendering: prompts from templates, targets as text (labels, slot pairs, summaries)."""

from __future__ import annotations

from dataclasses import replace

from tasktune.data.load import load_split
from tasktune.tasks.registry import get_task
from tasktune.tasks.render import bio_spans, label_text, render, slots_text
from tasktune.tasks.spec import Example, Origin, Template


def example(task, inputs, target, uid="u1"):
    return Example(task=task, uid=uid, inputs=inputs, target=target, origin=Origin("x.jsonl", 1))


def test_snips_slots_first_train_row_renders_as_slot_pairs():
    task = get_task("snips_slots")
    ex = load_split(task, "train", max_examples=1).examples[0]
    out = render(task, ex, seed=0)
    assert out.target == "artist: westbam; album: allergic; service: google music"
    assert "listen to westbam alumb allergic on google music" in out.prompt
    assert out.prompt == task.templates[out.template_index].prompt.format(text=" ".join(ex.inputs["tokens"]))


def test_no_slots_renders_none():
    assert slots_text(["what", "time", "is", "it"], ["O", "O", "O", "O"]) == "none"


def test_repeated_value_gets_a_word_position_only_when_needed():
    tokens = ["in", "in", "the", "city", "in"]
    assert slots_text(tokens, ["B-a", "O", "O", "B-b", "O"]) == "a: in; b: city"
    # the forward search from the start would pick word 1, so the position is written
    assert slots_text(tokens, ["O", "B-a", "O", "O", "O"]) == "a: in [2]"
    # after 'city' the forward search finds word 5 on its own
    assert slots_text(tokens, ["O", "O", "O", "B-b", "B-a"]) == "b: city; a: in"


def test_bio_spans_handles_adjacent_spans_and_stray_inside_tags():
    assert bio_spans(["B-a", "I-a", "B-a", "O", "I-b", "I-b", "I-a"]) == [("a", 0, 2), ("a", 2, 3), ("b", 4, 6), ("a", 6, 7)]


def test_labels_are_rendered_for_people():
    intent = get_task("snips_intent")
    assert label_text(intent, "PlayMusic") == "play music"
    circa = get_task("circa")
    assert label_text(circa, "yes-upon-condition") == "yes upon condition"
    clinc = get_task("clinc150")
    assert label_text(clinc, "change_ai_name") == "change ai name" and label_text(clinc, "oos") == "oos"


def test_colliding_labels_stay_verbatim():
    task = replace(get_task("snips_intent"), labels=("play_music", "PlayMusic", "stop"))
    assert label_text(task, "play_music") == "play_music" and label_text(task, "PlayMusic") == "PlayMusic"
    assert label_text(task, "stop") == "stop"


def test_circa_prompt_uses_all_three_inputs_and_target_template_wraps():
    task = replace(get_task("circa"), templates=(Template("{context} | {question} | {answer} | {labels}", "Meaning: {target}."),))
    ex = example("circa", {"context": "C", "question": "Q?", "answer": "A."}, "probably-no")
    out = render(task, ex, seed=3)
    assert out.prompt.startswith("C | Q? | A. | yes, no, probably yes, probably no")
    assert out.target == "Meaning: probably no." and out.template_index == 0


def test_render_is_deterministic_per_seed():
    task = get_task("clinc150")
    ex = example("clinc150", {"text": "what is my balance"}, "balance", uid="clinc150:train:99")
    assert render(task, ex, 5) == render(task, ex, 5)
    indices = {render(task, example("clinc150", {"text": "x"}, "balance", uid=f"u{i}"), 5).template_index
               for i in range(40)}
    assert indices == set(range(len(task.templates)))


def test_generation_target_is_the_text():
    task = get_task("dialogsum")
    ex = example("dialogsum", {"dialogue": "#Person1#: hi\n#Person2#: hello"}, "They greet each other.")
    out = render(task, ex, 0)
    assert out.target == "They greet each other." and "#Person1#: hi" in out.prompt

"""The EBNF a tagging answer must match, so /v1/tasks/{task}/predict's slots always read back.

A tagging target is "slot: value; slot: value" or "none" (tasks/render.py, slots_text),
inside the template's target wrapper. Free decoding may name a slot the task lacks or a
value that is not in the input, which the parser can only call invalid. The grammar built
here allows only the task's slot types and values that are contiguous spans of the input
words, each optionally followed by its own word position " [N]" (render writes one where a
forward search would find another occurrence). One rule a start word keeps it linear in
the input length: s_i ::= word_i (" " s_{i+1})?. Overlapping or out-of-order spans still
parse as invalid; the grammar does not track which words are taken.
"""

from __future__ import annotations

import json


def _literal(text: str) -> str:
    """An EBNF string literal (JSON's escapes, which xgrammar reads)."""
    return json.dumps(text, ensure_ascii=False)


def slot_grammar(slot_types: tuple[str, ...] | list[str], tokens: list[str], prefix: str = "",
                 suffix: str = "") -> str:
    """xgrammar EBNF for `prefix` + ("none" | slot: span (; slot: span)*) + `suffix` over the
    input words `tokens` and the task's slot types."""
    if not slot_types:
        raise ValueError("a tagging task without slot types has nothing to constrain")
    root = f"root ::= {_literal(prefix)} body {_literal(suffix)}" if prefix or suffix else "root ::= body"
    if not tokens:  # no words, no spans
        return f'{root}\nbody ::= "none"\n'
    lines = [root, 'body ::= "none" | pair ("; " pair)*', 'pair ::= slot ": " value',
             "slot ::= " + " | ".join(_literal(s) for s in dict.fromkeys(slot_types))]
    n = len(tokens)
    lines.append("value ::= " + " | ".join(f"v{i}" for i in range(n)))
    for i, word in enumerate(tokens):
        lines.append(f'v{i} ::= s{i} (" [{i + 1}]")?')
        lines.append(f"s{i} ::= {_literal(word)}" + (f' (" " s{i + 1})?' if i + 1 < n else ""))
    return "\n".join(lines) + "\n"

"""Decoding bound to a JSON schema, any JSON object, a regular expression or an EBNF
grammar (vLLM's `guided_json`, `guided_regex`, `guided_grammar`, OpenAI's
`response_format`), through xgrammar, vLLM's default structured-output backend.

A request's grammar is compiled once (`Grammars`, cached by its text); each sequence keeps
its own matcher (`matcher`), which the sampler asks for the tokens allowed next (a bitmask
over the vocabulary; every other logit goes to -inf, `mask_rows`) and which accepts each
token the sequence takes (engine._append). Once the grammar is complete only the end
tokens remain allowed, so a request that is not cut short by max_tokens ends with a whole
match. JSON comes out on one line as `json.dumps` writes it (", " and ": "), the form
tasktune's JSON targets take, instead of xgrammar's default of any whitespace, which lets
weak models loop on blanks.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection, Sequence
from typing import Any

import torch

from tasktune.serve.triton_sample import sample_rows

try:
    import xgrammar as xgr
except ImportError:  # an install without it: guided JSON / regex requests get a clear 400
    xgr = None


class GrammarError(ValueError):
    """A schema or pattern that cannot be compiled (or no xgrammar to compile it)."""


class Grammars:
    """Compiles grammars against one tokenizer (its vocabulary read once, on first use)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Collection[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)

    @functools.cached_property
    def _compiler(self):
        if xgr is None:
            raise GrammarError("guided decoding needs the xgrammar package (pip install xgrammar)")
        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=self.stop_ids)
        return xgr.GrammarCompiler(info, max_threads=1)

    def json_schema(self, schema: dict[str, Any] | str):
        text = schema if isinstance(schema, str) else json.dumps(schema)  # (key order kept: properties come in it)
        return self._compile("json_schema", text)

    def json_object(self):
        return self._compile("json", "")

    def regex(self, pattern: str):
        return self._compile("regex", pattern)

    def ebnf(self, grammar: str):
        """A grammar in xgrammar's EBNF (GBNF-like: `root ::= ...`), vLLM's guided_grammar."""
        return self._compile("ebnf", grammar)

    @functools.lru_cache(maxsize=256)
    def _compile(self, kind: str, text: str):
        compiler = self._compiler
        try:
            if kind == "json_schema":
                json.loads(text)  # a clear message for text that is not JSON at all
                return compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(text)
            if kind == "ebnf":
                return compiler.compile_grammar(text)
            # any object (OpenAI's json_object; xgrammar's built-in grammar takes any value)
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json_schema": "JSON schema", "regex": "regular expression", "ebnf": "EBNF grammar"}.get(kind, kind)
            raise GrammarError(f"invalid {what}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    """xgrammar's C++ errors start with a time, a source location and the failed check:
    keep the message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\] \S+: ", "", text)
    return re.sub(r"^Check failed: \(.*?\) is false: ", "", text)


def matcher(compiled):
    """A fresh matcher of a compiled grammar: one per sequence (it holds the position)."""
    return xgr.GrammarMatcher(compiled)


def mask_rows(rows: torch.Tensor, matchers: Sequence, bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """rows [n, V] float32 (row j a sequence bound to matchers[j]) -> the same rows with
    every token its grammar does not allow next at -inf, in place (`fill_masks`, then
    `apply_masks`)."""
    return apply_masks(rows, fill_masks(matchers, rows.shape[1], bitmask))


def fill_masks(matchers: Sequence, vocab: int, bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """Each matcher's allowed next tokens as bitmask row j, filled on the host one row after
    another (xgrammar's thread pool, BatchGrammarMatcher, was 2.4x slower on an H200 host:
    bench/README.md). bitmask: a host buffer of at least len(matchers) rows to fill
    (`bitmask_buffer`; pinned, its copy to the device does not wait for the running step, and
    the caller must not refill it before that copy is done)."""
    bitmask = bitmask[:len(matchers)] if bitmask is not None else xgr.allocate_token_bitmask(len(matchers), vocab)
    for j, m in enumerate(matchers):
        m.fill_next_token_bitmask(bitmask, j)
    return bitmask


def apply_masks(rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """rows [n, V] float32 -> every token bitmask row j does not allow at -inf in row j, in place."""
    xgr.apply_token_bitmask_inplace(rows, bitmask.to(rows.device, non_blocking=True))
    return rows


def bitmask_buffer(rows: int, vocab: int, pinned: bool) -> torch.Tensor:
    """A host buffer for `fill_masks` of up to `rows` rows over `vocab` tokens."""
    return torch.zeros(rows, -(-vocab // 32), dtype=torch.int32, pin_memory=pinned)


class DeviceMasks:
    """The tokens of rows bound to grammars on the device-side path (DecodeStep.greedy, the
    engine's prefill): a masked argmax, or a draw from the masked rows. Each use has its own
    pinned host bitmask buffer
    (a use refills it only after its last copy to the device is done: after the tokens of
    the step that copied it were read), and the rows' index kept on the device (a copy from
    pageable memory can wait for the running step)."""

    def __init__(self, rows: int, pinned: bool):
        self.rows, self.pinned = rows, pinned
        self._buffers: dict[str, torch.Tensor] = {}
        self._index: dict[tuple[int, ...], torch.Tensor] = {}

    def argmax(self, logits: torch.Tensor, rows: tuple[int, ...], matchers: Sequence, use: str,
               draws: tuple | None = None) -> torch.Tensor:
        """logits [B, V] -> the argmax of each of `rows` over the tokens its matcher allows
        next [len(rows)], on the device. The masks are filled before any device call, so
        that they are filled while the step that makes the logits runs. draws: (which of
        `rows` sample, their KV slots, the positions their tokens go to (by slot, or in
        order), whether by slot, the SamplingTable): those draw from their masked row
        (triton_sample) instead."""
        if use not in self._buffers:
            self._buffers[use] = bitmask_buffer(self.rows, logits.shape[1], self.pinned)
        bitmask = fill_masks(matchers, logits.shape[1], self._buffers[use])
        masked = apply_masks(logits.index_select(0, self.index(rows, logits.device)).float(), bitmask)
        chosen = masked.argmax(dim=-1)
        if draws is not None and draws[0]:
            which, slots, keys, by_slot, table = draws
            sample_rows(masked, self.index(which, logits.device), self.index(slots, logits.device), keys, table,
                        chosen, keys_by_slot=by_slot)
        return chosen

    def index(self, rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """`rows` as a tensor on `device`, made once per set of rows."""
        if rows not in self._index:
            if len(self._index) > 64:
                self._index.clear()
            self._index[rows] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._index[rows]

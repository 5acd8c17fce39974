"""Generated tokens' log-probabilities in OpenAI's two response formats, and a prompt's in
vLLM's (`prompt_logprobs`).

Completions use the legacy lists (tokens, token_logprobs, top_logprobs, text_offset; with
`echo`, the prompt's tokens first, the first of them null: nothing precedes it);
chat uses one object a token with its UTF-8 bytes. A token's text is its own decode
(special tokens shown), so a token that is part of a multi-byte character reads as the
replacement character, as in vLLM; its `bytes` are that text's.
"""

from __future__ import annotations

from dataclasses import replace

from tasktune.serve import schemas as s
from tasktune.serve.sampling import TokenLogprob


class TokenTexts:
    """Token id -> its text, decoded once (a server sees the same few thousand tokens)."""

    def __init__(self, tokenizer, limit: int = 200_000):
        self.tokenizer, self.limit, self._texts = tokenizer, limit, {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            if len(self._texts) < self.limit:
                self._texts[token] = text
        return text


def completion_logprobs(lps: list[TokenLogprob | None], text_of: TokenTexts, top: bool, offset: int = 0,
                        ids: list[int] | None = None) -> s.CompletionLogprobs:
    """offset: the text_offset of the first token (where its text starts in the choice's text);
    ids: the tokens, where an entry is None (an echoed prompt's first token: null entries)."""
    ids = ids if ids is not None else [lp.token for lp in lps]
    tokens = [text_of(t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return s.CompletionLogprobs(
        tokens=tokens, token_logprobs=[lp.logprob if lp is not None else None for lp in lps],
        top_logprobs=[_by_text(lp, text_of) if lp is not None else None for lp in lps] if top else None,
        text_offset=offsets)


def _by_text(lp: TokenLogprob, text_of: TokenTexts) -> dict[str, float]:
    """The alternatives keyed by text; where two tokens share a text (two halves of one UTF-8
    character, say) the more likely one's value stays."""
    out: dict[str, float] = {}
    for i, v in lp.top:
        out.setdefault(text_of(i), v)
    return out


def chat_logprobs(lps: list[TokenLogprob], text_of: TokenTexts) -> s.ChatLogprobs:
    def entry(token: int, logprob: float) -> dict:
        text = text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return s.ChatLogprobs(content=[
        s.ChatTokenLogprob(**entry(lp.token, lp.logprob), top_logprobs=[s.TopLogprob(**entry(i, v)) for i, v in lp.top])
        for lp in lps])


def prompt_logprobs(lps: list[TokenLogprob | None], text_of: TokenTexts, k: int) -> s.PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token (the first None) a dict by token id of the
    token's own entry (its rank counted over the vocabulary) and its k most likely
    alternatives' (ranks 1..k; a token among them appears once)."""
    out: s.PromptLogprobs = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        entry = {lp.token: s.PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=text_of(lp.token))}
        for j, (i, v) in enumerate(lp.top[:k]):
            entry.setdefault(i, s.PromptLogprob(logprob=v, rank=j + 1, decoded_token=text_of(i)))
        out.append(entry)
    return out


def trimmed(lps: list[TokenLogprob | None], k: int) -> list[TokenLogprob | None]:
    """Entries computed with more alternatives than a field asks for, cut to its k."""
    return [lp if lp is None or len(lp.top) <= k else replace(lp, top=lp.top[:k]) for lp in lps]

"""The serving engine: continuous batching of many adapters over one base model.

Each `step()`: admit waiting requests into free KV slots and prefill them (their first
token; on a GPU padded to length buckets and replayed from CUDA graphs of up to 8
prompts, `prefill_graphs.PrefillStep`; on the CPU one prompt eagerly in that step's
layout, more as one eager ragged batch), then one batched decode step over every sequence that was already
running, each row with its own adapter id (`cuda_graphs.DecodeStep`: a replayed CUDA
graph on a GPU).
Finished sequences leave at once. `generate()` drives steps
synchronously (tests, offline use); `async_engine.AsyncEngine` runs them in a background
thread and hands results to asyncio code (the HTTP API).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from tasktune.serve.adapter_pool import AdapterError, AdapterPool
from tasktune.serve.branch_graphs import BranchStep
from tasktune.serve.branch_scoring import InvalidBranches, check_branches
from tasktune.serve.cuda_graphs import DecodeStep
from tasktune.serve.decoder import FUSED, Decoder
from tasktune.serve.detokenize import detokenize_step
from tasktune.serve.forward_batch import make_batch
from tasktune.serve.grammar import Grammars, matcher
from tasktune.serve.weights import load_decoder
from tasktune.serve.kv_cache import KVCache
from tasktune.serve.prefill_graphs import PrefillStep
from tasktune.serve.prompt_scoring import score_prompts
from tasktune.serve.sampling import SamplingParams, TokenLogprob, logprob_table, make_generator, sample
from tasktune.serve.requests import Completion, PromptTooLong, Request, completion_of  # noqa: F401 (the engine's API)
from tasktune.serve.scheduler import Scheduler, Sequence
from tasktune.serve.triton_sample import available as can_draw, sample_rows

log = logging.getLogger(__name__)
# Greedy decode steps launch the next step ahead for the rows that go on, with rows at their last
# token as padding (False: a step where any row has its last token launches nothing ahead, as up
# to session 13; the serve bench's staggered case times both)
AHEAD_PER_ROW = True
# Prefills of prompts within the buckets run as CUDA graph replays of up to 8 prompts each
# (prefill_graphs.PrefillStep; False: every prefill one eager ragged batch, as up to session 13)
PREFILL_STEP = True
# Rows bound to a grammar decode on the device path, steps launched ahead, each mask filled
# while the step runs (False: every such batch through the logits and `sample`, as in session 18)
GRAMMAR_AHEAD = True
# Rows sampled with temperature, top-p and min-p draw on the device right after each step (triton_sample),
# steps launched ahead as for greedy rows (False: through the logits and `sample`, as up to session 18)
DEVICE_SAMPLING = True


def most(ks: list[int | None]) -> int | None:
    """The most alternatives any row asks for (None: no row asks for logprobs)."""
    return max((k for k in ks if k is not None), default=None)


class Engine:
    def __init__(self, model: Decoder, tokenizer, pool: AdapterPool, *, max_running: int = 32,
                 max_waiting: int = 256, max_len: int = 512, max_prefill_tokens: int = 4096,
                 base_name: str = "base", cuda_graphs: bool = True, compile: bool = False):
        self.model, self.tokenizer, self.pool, self.base_name = model, tokenizer, pool, base_name
        cfg, p = model.cfg, next(model.parameters())
        self.device = p.device
        self.max_len = min(max_len, cfg.max_position_embeddings, cfg.sliding_window or max_len)
        self.cache = KVCache(cfg.num_layers, max_running, cfg.num_kv_heads, self.max_len, cfg.head_dim, p.dtype, p.device)
        self.scheduler = Scheduler(max_running, max_waiting, max_prefill_tokens)
        eos = set(cfg.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos
        self.grammars = Grammars(tokenizer, cfg.vocab_size, eos)  # compiles guided_json / guided_regex requests
        self.decode_step = DecodeStep(model, self.cache, pool.stacks, use_graphs=cuda_graphs, compile=compile)
        self.prefill_step = PrefillStep(model, self.cache, pool.stacks, use_graphs=cuda_graphs)
        self.branch_step = BranchStep(model, self.cache, pool.stacks, use_graphs=cuda_graphs)
        self._can_draw = can_draw(self.device)
        self._lock = threading.Lock()  # guards the scheduler's queues
        self._step_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, adapter_root: str | Path | None = None, max_resident: int = 8,
                        max_rank: int = 16, device: str = "cpu", dtype: torch.dtype | None = None,
                        base_name: str | None = None, **kwargs) -> "Engine":
        from transformers import AutoTokenizer

        model = load_decoder(path, device, dtype)
        name = base_name or Path(path).resolve().name
        pool = AdapterPool(num_layers=model.cfg.num_layers, shapes=model.lora_shapes(), groups=FUSED, base_name=name,
                           base_path=path, root=adapter_root, max_resident=max_resident, max_rank=max_rank,
                           device=device, dtype=next(model.parameters()).dtype)
        return cls(model, AutoTokenizer.from_pretrained(path), pool, base_name=name, **kwargs)

    # requests
    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def encode(self, prompt: str | list[int], truncate: int | None = None) -> list[int]:
        """The prompt's token ids (truncate: only its last `truncate` tokens, -1: the most this
        engine takes), checked against the vocabulary and the length limit."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if truncate is not None:
            ids = ids[-(self.max_len - 1 if truncate == -1 else truncate):]
        if not ids:
            raise PromptTooLong("the prompt is empty after tokenisation")
        if len(ids) >= self.max_len:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; this server's limit is {self.max_len - 1}")
        if any(not 0 <= t < self.model.cfg.vocab_size for t in ids):
            raise PromptTooLong("the prompt has token ids outside the vocabulary")
        return ids

    def submit(self, request: Request, on_update: Callable[[Sequence], None] | None = None) -> Sequence:
        """Queue a request; raises QueueFull, AdapterNotFound or PromptTooLong at once."""
        if request.adapter is not None:
            self.pool.info(request.adapter)
        seq = Sequence(self.encode(request.prompt, request.params.truncate_prompt_tokens), request.params,
                       request.adapter, on_update=on_update, stream=request.stream)
        if request.branches is not None:
            if request.params.max_tokens or request.params.prompt_logprobs is not None:
                raise InvalidBranches("branches are scored after the prompt alone: max_tokens must be 0, "
                                      "prompt_logprobs unset")
            seq.branches = check_branches(request.branches, self.model.cfg.vocab_size)
            if seq.prefill_tokens >= self.max_len:
                raise InvalidBranches(f"the prompt and its branches have {seq.prefill_tokens} tokens; this "
                                      f"server's limit is {self.max_len - 1}")
        seq.generator = make_generator(request.params, self.device)
        if request.params.grammar is not None:
            seq.matcher = matcher(request.params.grammar)
        with self._lock:
            self.scheduler.add(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Run requests to completion (submitting as the queue has room); results in order."""
        pending, seqs = list(requests), []
        while pending or self.has_work:
            while pending and self.scheduler.can_accept():
                seqs.append(self.submit(pending.pop(0)))
            self.step()
        return [completion_of(s) for s in seqs]

    # one step
    def step(self) -> list[Sequence]:
        """Admit + prefill new sequences, then decode one token for those already running.
        Thread-safe: concurrent callers (the API's loop, a direct `generate`) take turns."""
        with self._step_lock:
            return self._step()

    def _step(self) -> list[Sequence]:
        with self._lock:
            for s in self.scheduler.running:
                if s.cancelled and not s.finished:
                    s.finish_reason = "cancelled"
            decoding = [s for s in self.scheduler.running if not s.finished]
            admitted = self.scheduler.admit(self._reserve)
        prefill = [s for s in admitted if not s.finished]
        for s in admitted:
            if s.finished and s not in self.scheduler.running:  # cancelled while waiting
                self._notify(s)
        for s in [s for s in prefill if s.branches is not None]:  # scored in a prefill of their own, and done
            s.branch_logprobs = self.branch_step(s.prompt_ids, s.branches, s.kv_slot, s.lora_id)
            s.finish_reason = "length"
            self._notify(s)
        touched = list(prefill)
        prefill = [s for s in prefill if s.branches is None]
        first = self._prefill(prefill) if prefill else None
        if decoding:
            self._decode(decoding)
        elif first is not None:
            self.decode_step.launch_joined()
        if first is not None:  # the prefill's tokens, read after the next step was launched
            for s, (t, lp) in zip(prefill, first()):
                if s.params.max_tokens:
                    self._append(s, t, lp)
                else:  # the prompt only (scored, say): nothing to generate
                    s.finish_reason = "length"
                    self._notify(s)
        touched += decoding
        with self._lock:
            done = self.scheduler.retire()
        seen = set(touched)
        for s in done:
            self._free(s)
            if s not in seen:
                self._notify(s)
        return touched

    def _free(self, s: Sequence) -> None:
        if s.kv_slot >= 0:
            self.decode_step.release(s.kv_slot)  # the slot's next sequence is a new row to a step launched ahead
            self.cache.free(s.kv_slot)
            s.kv_slot = -1
        if s.adapter is not None and s.lora_id >= 0:
            self.pool.release(s.adapter)
            s.lora_id = -1

    def _reserve(self, seq: Sequence) -> bool:
        if self.cache.free_slots == 0:
            return False
        if seq.adapter is not None:
            try:
                lora_id = self.pool.acquire(seq.adapter)
            except AdapterError as e:  # unloaded or unreadable since submission
                seq.finish_reason, seq.error = "error", str(e)
                return True
            if lora_id is None:
                return False
            seq.lora_id = lora_id
        seq.kv_slot = self.cache.alloc()
        return True

    def _prefill(self, seqs: list[Sequence]) -> Callable[[], list[tuple[int, TokenLogprob | None]]]:
        """Prefill the new sequences -> a function giving their first tokens and log-probabilities
        (not appended yet). Where every row takes its token on the device (`_on_device`), the
        tokens (and the log-probabilities asked for) stay there until read, and the rows that
        go on join the decode step launched ahead next (DecodeStep.join)."""
        for s in seqs:  # (before any step that reads them)
            if self._draws(s.params):
                p = s.params
                self.decode_step.sampling.set(s.kv_slot, p.temperature, p.top_p, p.min_p, p.seed, p.top_k)
        if any(s.params.prompt_logprobs is not None for s in seqs):
            logits = score_prompts(self.model, self.cache, self.pool.stacks, seqs, self.device,
                                   self.prefill_step if PREFILL_STEP else None)
        elif PREFILL_STEP and self.prefill_step.takes([len(s.prompt_ids) for s in seqs]):  # graph replays
            logits = self.prefill_step([s.prompt_ids for s in seqs], [s.kv_slot for s in seqs],
                                       [s.lora_id for s in seqs])
        else:
            batch = make_batch([s.prompt_ids for s in seqs], [0] * len(seqs), [s.kv_slot for s in seqs],
                               [s.lora_id for s in seqs], self.device)
            logits = self.model(batch, self.cache, self.pool.stacks)
        if not all(self._on_device(s.params) for s in seqs):
            tokens, lps = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], None,
                                 [s.prompt_ids for s in seqs], self.eos_ids, [s.matcher for s in seqs],
                                 self._draw_keys(seqs), self.decode_step.sampling)
            return lambda: list(zip(tokens, lps))
        first = self._first_tokens(logits, seqs)
        ks = [s.params.logprobs for s in seqs]
        k = most(ks)
        read = self.decode_step.first_tokens(first, logprob_table(logits, first, k) if k is not None else None)
        go_on = [i for i, s in enumerate(seqs) if s.params.max_tokens > 1 and len(s.prompt_ids) + 1 < self.max_len]
        if go_on:
            picked = [seqs[i] for i in go_on]
            index = torch.tensor(go_on, device=first.device)
            self.decode_step.join([s.kv_slot for s in picked], first.index_select(0, index),
                                  [len(s.prompt_ids) for s in picked], [s.lora_id for s in picked],
                                  lambda: [t for i, t in enumerate(read()[0]) if i in go_on],
                                  logprobs=most([s.params.logprobs for s in picked]),
                                  bound=any(s.matcher is not None for s in picked),
                                  sampled=[s.kv_slot for s in picked if s.params.device_sample and s.matcher is None])

        def result() -> list[tuple[int, TokenLogprob | None]]:
            tokens, rows = read()
            return [(t, None if k is None else TokenLogprob.from_row(t, rows[i], k))
                    for i, (t, k) in enumerate(zip(tokens, ks))]
        return result

    def _first_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """A prefill's tokens on the device: the argmax, as `sample` takes a greedy row's; for
        rows bound to a grammar over the tokens it allows first (sampled ones draw from those);
        sampled rows draw theirs. Each draw is keyed by the position its token goes to."""
        first = logits.argmax(dim=-1)
        masks, table, dev = self.decode_step.masks, self.decode_step.sampling, first.device
        bound = tuple(i for i, s in enumerate(seqs) if s.matcher is not None)
        if bound:
            which = tuple(j for j, i in enumerate(bound) if seqs[i].params.device_sample)
            draws = (which, tuple(seqs[bound[j]].kv_slot for j in which),
                     masks.index(tuple(len(seqs[bound[j]].prompt_ids) for j in which), dev), False, table)
            first.index_copy_(0, masks.index(bound, dev),
                              masks.argmax(logits, bound, [seqs[i].matcher for i in bound], "first", draws))
        drawn = tuple(i for i, s in enumerate(seqs) if s.params.device_sample and s.matcher is None)
        if drawn:
            sample_rows(logits, masks.index(drawn, dev), masks.index(tuple(seqs[i].kv_slot for i in drawn), dev),
                        masks.index(tuple(len(seqs[i].prompt_ids) for i in drawn), dev), table, first)
        return first

    def _draw_keys(self, seqs: list[Sequence]) -> list[tuple[int, int] | None]:
        """`sample`'s draws: (KV slot, position of the token) of each row it draws as the device
        path does (a grammar's row from its masked logits), else None."""
        return [(s.kv_slot, s.length) if self._draws(s.params) else None for s in seqs]

    def _decode(self, seqs: list[Sequence]) -> None:
        inputs = ([s.kv_slot for s in seqs], [s.output_ids[-1] for s in seqs], [s.length - 1 for s in seqs],
                  [s.lora_id for s in seqs])
        if all(self._on_device(s.params) for s in seqs):
            # the token is the argmax (of masked logits, for grammar rows): the GPU can run a step ahead
            ahead = [len(s.output_ids) + 1 < s.params.max_tokens and s.length + 1 < self.max_len for s in seqs]
            if not AHEAD_PER_ROW and not all(ahead):
                ahead = False
            ks = [s.params.logprobs for s in seqs]
            k = most(ks)
            tokens = self.decode_step.greedy(*inputs, ahead=ahead, logprobs=k,
                                             matchers=[(s.kv_slot, s.matcher) for s in seqs if s.matcher is not None],
                                             sampled={s.kv_slot for s in seqs if s.params.device_sample})
            rows = self.decode_step.last_logprobs.tolist() if k is not None else None
            for s, t, k in zip(seqs, tokens, ks):
                self._append(s, t, None if k is None else TokenLogprob.from_row(t, rows[s.kv_slot], k))
        else:
            self._sample(seqs, self.decode_step(*inputs))

    def _on_device(self, p: SamplingParams) -> bool:
        """The row's token is made on the device after each step (an argmax, one under a
        grammar's mask, or a draw), so the step after it can be launched before it is read."""
        return p.device_greedy or GRAMMAR_AHEAD and p.grammar_greedy or self._draws(p)

    def _draws(self, p: SamplingParams) -> bool:
        """The row draws with triton_sample, on the device path and on the logits path alike."""
        return DEVICE_SAMPLING and self._can_draw and p.device_sample and (p.grammar is None or GRAMMAR_AHEAD)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens, lps = sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                             [s.output_ids for s in seqs], [s.prompt_ids for s in seqs], self.eos_ids,
                             [s.matcher for s in seqs], self._draw_keys(seqs), self.decode_step.sampling)
        for s, t, lp in zip(seqs, tokens, lps):
            self._append(s, t, lp)

    def warmup(self, progress: bool = False) -> int:
        """Capture the decode and prefill steps' CUDA graphs now rather than on first use
        (no-op on the CPU; ~100 s for a 0.5B model on a fresh machine, so `progress` shows a
        bar); returns how many exist."""
        total = (len(self.decode_step.shapes(self.scheduler.max_running)) + len(self.prefill_step.shapes())
                 + len(self.branch_step.shapes()))
        with self._step_lock, tqdm(total=total, desc="capturing CUDA graphs", unit="graph",
                                   disable=not progress or total == 0) as bar:
            return (self.decode_step.warmup(self.scheduler.max_running, bar.update)
                    + self.prefill_step.warmup(bar.update) + self.branch_step.warmup(bar.update))

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        p = seq.params
        seq.output_ids.append(token)
        if seq.matcher is not None:
            seq.matcher.accept_token(token)
        if p.logprobs is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        is_eos = (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids
        done = is_eos or len(seq.output_ids) >= p.max_tokens or seq.length >= self.max_len
        hits = None
        if seq.stream or p.stop:  # text is needed now: for the client, or to look for stop strings
            searched = len(seq.text)
            if done:  # one full decode: flushes text held back by the incremental window
                ids = seq.output_ids[:-1] if is_eos else seq.output_ids
                seq.text, searched = self.tokenizer.decode(ids, skip_special_tokens=True), 0
            else:
                seq.text += detokenize_step(self.tokenizer, seq)
            if p.stop and len(seq.output_ids) >= p.min_tokens:  # (vLLM: no stop string before min_tokens)
                start = max(0, searched - max(len(s) for s in p.stop) + 1)
                hits = [(i, i + len(s) if p.include_stop_str_in_output else i)
                        for i, s in ((seq.text.find(s, start), s) for s in p.stop) if i >= 0]
        elif done:  # no reader before the result: decoded at the first read (Sequence.text)
            ids = seq.output_ids[:-1] if is_eos else list(seq.output_ids)
            seq.text_later(lambda: self.tokenizer.decode(ids, skip_special_tokens=True))
        if hits:
            seq.text, seq.finish_reason = seq.text[: min(hits)[1]], "stop"  # (the first stop string found)
        elif is_eos:
            seq.finish_reason = "stop"
        elif done:
            seq.finish_reason = "length"
        if seq.stream or seq.finished:
            self._notify(seq)

    def _notify(self, seq: Sequence) -> None:
        if seq.on_update is not None:
            try:
                seq.on_update(seq)
            except Exception:  # a client's callback must not stop the batch
                log.exception("on_update callback failed for %s", seq.request_id)

    def abort_all(self, reason: str) -> None:
        """Fail every queued and running sequence (after an internal error) and free their slots."""
        with self._lock:
            seqs = list(self.scheduler.waiting) + self.scheduler.running
            self.scheduler.waiting.clear()
            self.scheduler.running = []
        for s in seqs:
            if not s.finished:
                s.finish_reason, s.error = "error", reason
            self._free(s)
            self._notify(s)

"""The decode step, bucketed, and on a GPU replayed from CUDA graphs (gpt-fast, vLLM).

A decode step in the decode layout (`Decoder.decode`) has the shape (B, L, use_lora):
rows = KV slots 0..B-1, L cached positions attended; use_lora is False, True, or FEW_LORA
for a step of at most triton_lora_few.FEW distinct adapters through the fused linears,
whose LoRA then runs inside their launches (the adapters' slots and each row's index among
them are a fourth small input, `_few`). B is rounded up to a batch bucket
and L to a multiple of `CONTEXT_STEP`, so a handful of graphs cover every step. Replaying
one costs the host a copy of three small integer rows and one launch, instead of the
~1,200 kernel launches of an eager step that kept the GPU idle most of the time.

Inputs live in one static device tensor [3, slots] (tokens, positions, adapter ids);
rows of free slots are padding: token 0, position max_len - 1 (never read), no adapter.
Capturing runs the step twice on a side stream first; the step writes the KV cache,
which is harmless because it writes the same values the replay writes again.
On the CPU (and with `use_graphs=False`) the same bucketed step runs eagerly, so the CPU
tests exercise exactly the code the graphs capture.
"""

from __future__ import annotations

from typing import Callable, Collection

import torch

from tasktune.serve import triton_argmax, triton_lm_head
from tasktune.serve.decoder import Decoder
from tasktune.serve.decoder_lora import LoraStacks
from tasktune.serve.graph_capture import capture
from tasktune.serve.grammar import DeviceMasks
from tasktune.serve.kv_cache import KVCache
from tasktune.serve.sampling import logprob_table
from tasktune.serve.step_ahead import AheadStep, JoiningRows
from tasktune.serve.triton_linear import MAX_ROWS, few_table
from tasktune.serve.triton_lora_few import FEW
from tasktune.serve.triton_sample import SamplingTable, sample_rows

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
FEW_LORA = 2  # use_lora of a step whose LoRA runs inside the fused linears (at most FEW adapters)
CONTEXT_STEP = 128
FUSED_HEAD = True  # greedy_tail in one launch where the decode linears are fused (off: a serve bench variant)


def batch_bucket(rows: int, limit: int) -> int:
    """The smallest bucket >= rows, never above limit (the number of KV slots)."""
    return min(next((b for b in BATCH_BUCKETS if b >= rows), limit), limit)


def context_bucket(needed: int, max_len: int) -> int:
    """needed positions rounded up to a multiple of CONTEXT_STEP, capped at max_len."""
    return min(-(-needed // CONTEXT_STEP) * CONTEXT_STEP, max_len)


def greedy_tail(model: Decoder, x: torch.Tensor, next_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's last-layer rows -> (logits in the model's dtype, argmax), the argmax also
    written into next_inputs (tokens; positions += active). With the fused decode linears
    (GPU) in one launch (triton_lm_head: final norm, LM head, argmax), else the norm, the
    LM head and an argmax (one Triton launch on a GPU, triton_argmax)."""
    norm, head = model.model.norm, model.lm_head
    if FUSED_HEAD and model.linear_kernel and head.bias is None and triton_lm_head.usable(x, head.weight):
        return triton_lm_head.lm_head_argmax(x, norm.weight, norm.eps, head.weight, next_inputs)
    logits = head(norm(x))
    if logits.is_cuda and triton_argmax.available(logits.device):
        return logits, triton_argmax.argmax_rows(logits, next_inputs)
    argmax = logits.argmax(dim=-1)
    triton_argmax.feed_next(argmax, next_inputs)
    return logits, argmax


class DecodeStep:
    def __init__(self, model: Decoder, cache: KVCache, lora: LoraStacks | None, *, use_graphs: bool,
                 compile: bool = False):
        """compile: run each block of the step through torch.compile (`Decoder.compile_decode`:
        a few fused kernels per layer); each bucket is then captured as usual."""
        self.model, self.cache, self.lora = model, cache, lora
        if compile:
            model.compile_decode()
        device = cache.k.device
        self.use_graphs = use_graphs and device.type == "cuda"
        n = cache.num_slots
        self.inputs = torch.zeros(3, n, dtype=torch.long, device=device)  # tokens, positions, adapter ids
        self._active = torch.zeros(n, dtype=torch.long, device=device)  # 1 on rows of running sequences
        self._few = torch.full((FEW + n,), -1, dtype=torch.int32, device=device)  # FEW_LORA: slots, then rows'
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pool = None
        self._ahead: AheadStep | None = None  # the step launched ahead by `greedy`
        self._joining: JoiningRows | None = None  # rows prefilled this step that join it (`join`)
        self._first_host = torch.zeros(n, dtype=torch.long, pin_memory=self.use_graphs)  # `first_tokens`
        self._host = [torch.zeros(n, dtype=torch.long, pin_memory=self.use_graphs) for _ in range(2)]
        self._lp_hosts: dict[tuple[str, int], torch.Tensor] = {}  # pinned buffers for logprob_table, by (turn, k)
        self.last_logprobs: torch.Tensor | None = None  # the last `greedy` step's logprob_table rows, by slot
        self._flip, self._last_use_lora = 0, False
        self._gens = [0] * n  # each slot's generation: a freed slot's next sequence is another row
        self._rows_on: set[int] = set()  # rows the device inputs hold as running (_active 1)
        self.masks = DeviceMasks(n, self.use_graphs)  # grammar rows' masked argmax (`_finish`, the engine's prefill)
        self.sampling = SamplingTable(n, device)  # each slot's draw (`_draw`; the engine sets a slot's row)
        self.ahead_used = self.ahead_wasted = 0  # steps launched ahead: taken, or discarded

    def __call__(self, slots: list[int], tokens: list[int], positions: list[int], lora_ids: list[int]) -> torch.Tensor:
        """One decode step for the sequences in KV `slots` (each fed `tokens[i]` at
        `positions[i]` under adapter `lora_ids[i]`) -> logits [len(slots), vocab] float32,
        in the order given."""
        self._ahead = self._joining = None
        logits, _ = self._launch(slots, tokens, positions, lora_ids)
        index = torch.tensor(slots, dtype=torch.long).to(logits.device, non_blocking=True)
        return logits.index_select(0, index).float()

    def greedy(self, slots: list[int], tokens: list[int], positions: list[int], lora_ids: list[int], *,
               ahead: bool | list[bool], logprobs: int | None = None, matchers: list[tuple[int, object]] | None = None,
               sampled: Collection[int] = ()) -> list[int]:
        """The same step for rows that all take their token on the device -> each row's token:
        its argmax, or for the `sampled` slots a draw (triton_sample, each slot with the
        parameters and seed its row of `sampling` holds), made right after each step, so
        the step after it is launched ahead as for greedy rows.

        matchers: (slot, grammar matcher) of the rows bound to a grammar (grammar.py): their
        token is the argmax of their logits masked by the tokens the matcher allows (or, for
        sampled ones, a draw from them), which `_finish` makes on the device between this
        step and the one launched ahead. A step
        launched ahead for such rows stops at its logits: their masks are filled when the
        call that takes it comes (the matchers have accepted this step's tokens by then),
        while it runs, as vLLM overlaps structured outputs with the forward pass.

        logprobs: also each row's `logprob_table` row with this many alternatives
        (`last_logprobs[slot]` after the call), made on the device after the step and copied
        back with its tokens (a step launched ahead makes it too when this call or a joining
        row asks; with only the token's own log-probability, k = 0, it costs a log-sum-exp).

        ahead (one flag a row, or one for all): the row goes on at least one more step unless
        it samples an end token (False: nothing is launched ahead, rows joining from a
        prefill neither). Before reading this step's tokens back, the next step is
        launched on the device for those rows with this step's tokens as inputs, so the GPU
        computes step n+1 while the host handles step n; rows at their last token become
        padding in it. The next call takes that result if every row it asks for was in it,
        fed what was assumed (same slot generation and adapter, position one further, this
        step's token), else it runs afresh. A discarded step, and the row of a sequence that
        ended with an end token, only wrote KV entries that a real step rewrites before any
        read: rows past a prefill's length are written by the sequence itself before it
        attends to them."""
        gens = [self._gens[s] for s in slots]
        ahead_step, self._ahead = self._ahead, None
        masked = bool(matchers)
        bound = {s for s, _ in matchers or ()}  # (their draws wait for their masks: `_finish`)
        plain = [s for s in slots if s in sampled and s not in bound]
        deferred = ahead_step is not None and ahead_step.outputs is not None  # (its tokens wait for masks)
        if (ahead_step is not None and ahead_step.matches(slots, tokens, positions, lora_ids, gens)
                and (deferred or not masked and (logprobs is None or (ahead_step.lp_k or 0) >= logprobs
                                                 and ahead_step.lp_host is not None))):
            self.ahead_used += 1
            if deferred:
                host, done, lp_host = self._finish(*ahead_step.outputs, matchers, logprobs, sampled)
            else:
                host, done, lp_host = ahead_step.host, ahead_step.done, ahead_step.lp_host
        else:
            self.ahead_wasted += ahead_step is not None
            outputs = self._launch(slots, tokens, positions, lora_ids)
            self._draw(*outputs, plain)
            host, done, lp_host = self._finish(*outputs, matchers, logprobs, sampled)
        joining, self._joining = self._joining, None
        go = [ahead] * len(slots) if isinstance(ahead, bool) else list(ahead)
        on = [i for i, g in enumerate(go) if g]
        if ahead is not False and (on or joining):  # the step just run left its tokens and positions + 1 in the inputs (_step)
            self._launch_ahead([slots[i] for i in on], [positions[i] + 1 for i in on], [lora_ids[i] for i in on],
                               joining, logprobs, masked, [slots[i] for i in on if slots[i] in plain])
        if done is not None:
            done.synchronize()
        out = host.tolist()
        self.last_logprobs = lp_host
        if self._ahead is not None:
            self._ahead.tokens = [out[slots[i]] for i in on] + (joining.read() if joining else [])
        return [out[s] for s in slots]

    def first_tokens(self, argmax: torch.Tensor, table: torch.Tensor | None = None
                     ) -> Callable[[], tuple[list[int], list[list[float]] | None]]:
        """A prefill's argmax [n] on the device (and its logprob_table, if made) -> a function
        that returns them as lists: copied now without waiting (pinned buffers and an event on
        a GPU), so that reading them later does not wait for steps launched in between."""
        host, done, lp_host = self._to_host(argmax, self._first_host, table, "first")

        def read() -> tuple[list[int], list[list[float]] | None]:
            if done is not None:
                done.synchronize()
            return host.tolist(), lp_host.tolist() if lp_host is not None else None
        return read

    def join(self, slots: list[int], tokens: torch.Tensor, positions: list[int], lora_ids: list[int],
             read: Callable[[], list[int]], logprobs: int | None = None, bound: bool = False,
             sampled: Collection[int] = ()) -> None:
        """Rows prefilled in this engine step that decode greedily from the next one: the step
        `greedy` launches ahead next includes them (tokens: their first tokens as the prefill's
        device argmax, not read yet, `read` giving them as a list; positions: where those
        tokens go), so the first decode step after a prefill is launched before the host reads
        the prefill. With no `greedy` call in this engine step, `launch_joined` launches it
        for them alone. logprobs: the most alternatives one of them asks for (that step makes them);
        bound: some of them are bound to a grammar (that step stops at its logits, as `greedy`'s
        steps for such rows do); sampled: the slots of those that sample there."""
        self._joining = JoiningRows(list(slots), tokens, list(positions), list(lora_ids), read, logprobs, bound,
                                    tuple(sampled))

    def launch_joined(self) -> None:
        """The step ahead for the rows `join` named alone (an engine step with no decode rows)."""
        joining, self._joining = self._joining, None
        if joining is None:
            return
        self.ahead_wasted += self._ahead is not None
        self._launch_ahead([], [], [], joining)
        self._ahead.tokens = joining.read()

    def _launch_ahead(self, slots: list[int], positions: list[int], lora_ids: list[int], joining: JoiningRows | None,
                      logprobs: int | None = None, masked: bool = False, sampled: list[int] = ()) -> None:
        """Launch the next step for `slots`, whose inputs the step before left in place (its
        argmax, positions + 1), and the joining rows, whose inputs are put in first. Every
        other row the inputs hold as running (sequences at their last token, or finished)
        becomes padding, as `_launch` makes it: fed on, it would write KV entries of a slot
        that a new sequence may have been prefilled into since."""
        gone = sorted(self._rows_on.difference(slots))
        if joining is not None:
            j_slots, j_positions, j_lora = joining.slots, joining.positions, joining.lora_ids
            logprobs = max((k for k in (logprobs, joining.logprobs) if k is not None), default=None)
            masked, sampled = masked or joining.bound, list(sampled) + list(joining.sampled)
            gone = [r for r in gone if r not in j_slots]
        if gone:
            index = torch.tensor(gone, dtype=torch.long).to(self.inputs.device, non_blocking=True)
            pad = torch.tensor([0, self.cache.max_len - 1, -1], dtype=torch.long, device=self.inputs.device)
            self.inputs.index_copy_(1, index, pad[:, None].expand(3, len(gone)))
            self._active.index_fill_(0, index, 0)
        if joining is not None:
            B = batch_bucket(max(slots, default=-1) + 1, self.cache.num_slots) if slots else 0
            slots, positions, lora_ids = slots + j_slots, positions + j_positions, lora_ids + j_lora
            top = batch_bucket(max(slots) + 1, self.cache.num_slots)
            if top > B:  # rows no launch has set since they were padding: padding, as `_launch` makes them
                pad = torch.tensor([[0], [self.cache.max_len - 1], [-1]], dtype=torch.long).expand(3, top - B)
                self.inputs[:, B:top].copy_(pad, non_blocking=True)
                self._active[B:top].zero_()
            index = torch.tensor(j_slots, dtype=torch.long).to(self.inputs.device, non_blocking=True)
            rows = torch.tensor([j_positions, j_lora], dtype=torch.long).to(self.inputs.device, non_blocking=True)
            self.inputs[0].index_copy_(0, index, joining.tokens.to(torch.long))
            self.inputs[1:].index_copy_(1, index, rows)
            self._active.index_fill_(0, index, 1)
        self._rows_on = set(slots)
        B = batch_bucket(max(slots) + 1, self.cache.num_slots)
        self._last_use_lora = self._lora_mode(B, slots, lora_ids)
        logits, argmax = self._run(B, context_bucket(max(positions) + 1, self.cache.max_len), self._last_use_lora)
        self._draw(logits, argmax, sampled)
        gens = [self._gens[s] for s in slots]
        if masked:  # its grammar rows' tokens wait for their masks (`greedy`)
            self._ahead = AheadStep(slots, lora_ids, positions, gens, None, None, outputs=(logits, argmax))
            return
        table = logprob_table(logits, argmax, logprobs) if logprobs is not None else None
        self._ahead = AheadStep(slots, lora_ids, positions, gens, *self._to_host(argmax, table=table), logprobs)

    def release(self, slot: int) -> None:
        """A sequence left KV `slot`: the next one there is a new row to a step launched ahead."""
        self._gens[slot] += 1

    def drop_ahead(self) -> None:
        """Forget the step launched ahead (a bench replaying graphs by hand rewrites the inputs)."""
        if self._ahead is not None:
            self._ahead, self.ahead_wasted = None, self.ahead_wasted + 1

    def _launch(self, slots, tokens, positions, lora_ids) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        B = batch_bucket(max(slots) + 1, cache.num_slots)
        L = context_bucket(max(positions) + 1, cache.max_len)
        use_lora = self._lora_mode(B, slots, lora_ids)
        rows = [[0] * B, [cache.max_len - 1] * B, [-1] * B, [0] * B]
        for s, t, p, a in zip(slots, tokens, positions, lora_ids):
            rows[0][s], rows[1][s], rows[2][s], rows[3][s] = t, p, a, 1
        staged = torch.tensor(rows, dtype=torch.long)
        self.inputs[:, :B].copy_(staged[:3], non_blocking=True)
        self._active[:B].copy_(staged[3], non_blocking=True)
        self._rows_on = set(slots)
        self._last_use_lora = use_lora
        return self._run(B, L, use_lora)

    def few_lora(self) -> bool:
        """Whether steps of at most FEW distinct adapters run their LoRA inside the fused linears."""
        return self.lora is not None and self.lora.few_linears and self.model.linear_kernel

    def _lora_mode(self, B: int, slots: list[int], lora_ids: list[int]) -> int | bool:
        """The step's use_lora (False, True or FEW_LORA); for FEW_LORA, `_few` set for its rows."""
        distinct = {a for a in lora_ids if a >= 0} if self.lora is not None else set()
        if not distinct:
            return False
        if len(distinct) > FEW or B > MAX_ROWS or not self.few_lora():
            return True
        ids = [-1] * B
        for s, a in zip(slots, lora_ids):
            ids[s] = a
        self._few[:FEW + B].copy_(torch.tensor(few_table(ids), dtype=torch.int32), non_blocking=True)
        return FEW_LORA

    def _draw(self, logits: torch.Tensor, argmax: torch.Tensor, slots: Collection[int]) -> None:
        """The sampled rows' tokens of a step just run, written over its argmax and over the
        next step's input tokens (keyed by the positions its tail moved on: where they go)."""
        if slots:
            index = self.masks.index(tuple(sorted(slots)), argmax.device)
            sample_rows(logits, index, index, self.inputs[1], self.sampling, argmax, self.inputs[0])

    def _finish(self, logits: torch.Tensor, argmax: torch.Tensor, matchers: list[tuple[int, object]] | None,
                logprobs: int | None, sampled: Collection[int] = ()
                ) -> tuple[torch.Tensor, torch.cuda.Event | None, torch.Tensor | None]:
        """A step's outputs -> its tokens (and logprob_table) on their way to the host
        (`_to_host`). Rows bound to a grammar take the argmax of their masked logits, written
        over the graph's argmax and over the next step's input tokens, so that a step
        launched after this call feeds them (those in `sampled` draw from their masked row);
        their log-probabilities stay the raw logits'."""
        if matchers:
            slots = tuple(s for s, _ in matchers)
            which = tuple(i for i, s in enumerate(slots) if s in sampled)
            draws = (which, tuple(slots[i] for i in which), self.inputs[1], True, self.sampling)
            chosen = self.masks.argmax(logits, slots, [m for _, m in matchers], "step", draws)
            index = self.masks.index(slots, argmax.device)
            argmax.index_copy_(0, index, chosen)
            self.inputs[0].index_copy_(0, index, chosen)
        table = logprob_table(logits, argmax, logprobs) if logprobs is not None else None
        return self._to_host(argmax, table=table)

    def _to_host(self, argmax: torch.Tensor, buffer: torch.Tensor | None = None, table: torch.Tensor | None = None,
                 table_key: str | None = None) -> tuple[torch.Tensor, torch.cuda.Event | None, torch.Tensor | None]:
        """Copy this step's tokens (and its logprob_table, if made) into host buffers without
        waiting (pinned buffers and an event on a GPU); the graph's outputs are overwritten by
        the next replay. buffer: the tokens' pinned buffer (default: the two that decode steps
        take in turn), table_key its table buffer's name (default: the turn's)."""
        B = argmax.shape[0]
        if not self.use_graphs:
            return argmax, None, table
        if buffer is None:
            self._flip ^= 1
            buffer = self._host[self._flip]
        host = buffer[:B]
        host.copy_(argmax, non_blocking=True)
        lp_host = None
        if table is not None:
            key = (table_key or str(self._flip), table.shape[1])
            if key not in self._lp_hosts:
                self._lp_hosts[key] = torch.zeros(self.cache.num_slots, table.shape[1], pin_memory=True)
            lp_host = self._lp_hosts[key][:table.shape[0]]
            lp_host.copy_(table, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done, lp_host

    def _run(self, B: int, L: int, use_lora: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.use_graphs:
            return self._step(B, L, use_lora)
        key = (B, L, use_lora)
        if key not in self.graphs:
            self.graphs[key] = self._capture(B, L, use_lora)
        graph, outputs = self.graphs[key]
        graph.replay()
        return outputs  # static memory of the graph: read before the next replay

    @torch.no_grad()  # (the tail after the decoder's forward would otherwise record autograd history)
    def _step(self, B: int, L: int, use_lora: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The step; at its end, its argmax tokens and the positions one on (rows of running
        sequences) are already the inputs of the step after it, for `greedy`'s step ahead
        (a launch that recomputes or samples rewrites them first)."""
        tokens, positions, ids = self.inputs[0, :B], self.inputs[1, :B], self.inputs[2, :B]
        few = (self._few[:FEW], self._few[FEW:FEW + B]) if use_lora == FEW_LORA else None
        x = self.model.decode(tokens, positions, ids, L, self.cache, self.lora, bool(use_lora), head=False, few=few)
        return greedy_tail(self.model, x, (tokens, positions, self._active[:B]))

    def _capture(self, B: int, L: int, use_lora: bool):
        inputs = self.inputs.clone()  # a step moves its inputs on; the replay after must see these
        graph, outputs = capture(lambda: self._step(B, L, use_lora), self._pool, lambda: self.inputs.copy_(inputs))
        self._pool = graph.pool()
        return graph, outputs

    def shapes(self, max_rows: int) -> list[tuple[int, int, bool]]:
        """Every (batch, context, with adapters) bucket of steps of up to max_rows rows."""
        if not self.use_graphs:
            return []
        top = batch_bucket(max_rows, self.cache.num_slots)
        batches = [b for b in BATCH_BUCKETS if b < top] + [top]
        contexts = sorted({context_bucket(n, self.cache.max_len)
                           for n in range(CONTEXT_STEP, self.cache.max_len + CONTEXT_STEP, CONTEXT_STEP)})
        lora = ((False, True) + ((FEW_LORA,) if self.few_lora() else ())) if self.lora is not None else (False,)
        return [(B, L, use_lora) for B in batches for L in contexts for use_lora in lora
                if use_lora != FEW_LORA or B <= MAX_ROWS]

    def warmup(self, max_rows: int, tick: Callable[[], object] = lambda: None) -> int:
        """Capture every bucket of `shapes`, so no request pays for a capture (tick() after
        each). Returns the number of graphs."""
        if not self.use_graphs:
            return 0
        self._ahead = None
        self.inputs[0].zero_()
        self.inputs[1].fill_(self.cache.max_len - 1)  # padding rows only: writes nothing that is read
        self.inputs[2].fill_(-1)
        for key in self.shapes(max_rows):
            if key not in self.graphs:
                self.graphs[key] = self._capture(*key)
            tick()
        return len(self.graphs)

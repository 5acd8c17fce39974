"""One forward's inputs for the served decoder, built once per step on the device.

Flat layout for the linears (one row per new token, whatever its sequence) and a padded
layout for attention: `make_batch` for ragged prefill chunks, `decode_batch` for the
decode step (one token per sequence, row b = KV slot b, device tensors only, so a CUDA
graph can capture it). See decoder.py for how the layers read them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from tasktune.lora.ops import SegmentPlan
from tasktune.serve.triton_linear import MAX_ROWS


@dataclass
class Batch:
    """One forward's inputs, built once per step on the device.

    Flat layout (linears): tokens, positions, lora_ids, token_slots: [N].
    Padded layout (attention): B sequences x T query tokens over L cached positions.
    """

    tokens: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    lora_ids: torch.Tensor  # [N], -1 = base model
    token_slots: torch.Tensor  # [N] KV-cache slot of each token
    slots: torch.Tensor  # [B]
    pad_index: torch.Tensor  # [B*T] flat row feeding each padded query (0 for padding)
    valid: torch.Tensor  # [B*T] indices of real queries in padded order = flat order
    mask: torch.Tensor | None  # [B, 1, T, L] key position <= query position (None: the decode
    # attention kernel masks by position itself)
    last: torch.Tensor | None  # [B] flat index of each sequence's last token (None: every row)
    use_lora: bool
    shape: tuple[int, int, int]  # (B, T, L)
    decode: bool = False  # the decode layout: T == 1, row b is KV slot b, no gathers
    attention_kernel: bool = False  # decode: attention through triton_attention (no mask needed)
    linear_kernel: bool = False  # decode: each linear, with its norm, LoRA and residual, one triton_linear launch
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # ... which rotates q, k itself with these tables
    plan: SegmentPlan | None = None  # rows of each distinct adapter, built on the host (no sync)
    lora_rows: tuple[torch.Tensor, ...] | None = None  # decode: ops.gather_rows, once per forward
    # decode with the fused linears and at most triton_lora_few.FEW distinct adapters: (their
    # slots int32 [FEW], each row's index among them int32 [B]): LoRA inside the launches
    few: tuple[torch.Tensor, torch.Tensor] | None = None
    active: torch.Tensor | None = None  # prefill: the distinct adapters of the batch [k] ...
    active_ids: torch.Tensor | None = None  # ... and each token's index among them [N] (-1: none)
    lora_mask: torch.Tensor | None = None  # prefill: adapter_column_mask of active_ids, once per forward
    bgmv: bool = False  # LoRA through the Triton kernels in any layout (a prefill in a CUDA graph: SGMV or BGMV)
    causal: bool = False  # B sequences from position 0, T rows each, L == T: SDPA's is_causal (no mask)
    seg_ids: torch.Tensor | None = None  # causal: each sequence's adapter [B] (its T rows one segment)
    # where each token's key and value go in its slot when that is not its position: the
    # branches of a `tree_batch` share positions but not cache rows (None: positions)
    cache_positions: torch.Tensor | None = None


def make_batch(
    chunks: list[list[int]], starts: list[int], slots: list[int], lora_ids: list[int], device: torch.device
) -> Batch:
    """chunks[b]: the new tokens of sequence b, written from position starts[b] into KV slot slots[b]."""
    lens = [len(c) for c in chunks]
    B, T, L = len(chunks), max(lens), max(s + n for s, n in zip(starts, lens))
    tokens = [t for c in chunks for t in c]
    positions = [s + i for s, n in zip(starts, lens) for i in range(n)]
    token_slots = [sl for sl, n in zip(slots, lens) for _ in range(n)]
    token_lora = [a for a, n in zip(lora_ids, lens) for _ in range(n)]
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    pad_index, valid, q_pos = [], [], []
    for b, (s, n) in enumerate(zip(starts, lens)):
        for t in range(T):
            pad_index.append(offsets[b] + t if t < n else 0)
            q_pos.append(s + t if t < n else 0)  # padding attends to key 0 only: no empty rows
            if t < n:
                valid.append(b * T + t)
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    distinct = sorted({a for a in lora_ids if a >= 0})
    if len(distinct) == 1 and min(lora_ids) >= 0:
        plan = [(distinct[0], None)]
    else:
        plan = [(a, as_long([i for i, x in enumerate(token_lora) if x == a])) for a in distinct]
    where = {a: i for i, a in enumerate(distinct)}
    q = as_long(q_pos).view(B, 1, T, 1)
    mask = torch.arange(L, device=device).view(1, 1, 1, L) <= q
    return Batch(
        tokens=as_long(tokens),
        positions=as_long(positions),
        lora_ids=as_long(token_lora),
        token_slots=as_long(token_slots),
        slots=as_long(slots),
        pad_index=as_long(pad_index),
        valid=as_long(valid),
        mask=mask,
        last=as_long([o - 1 for o in offsets[1:]]),
        use_lora=bool(distinct),
        shape=(B, T, L),
        plan=plan,
        active=as_long(distinct),
        active_ids=as_long([where.get(a, -1) for a in token_lora]),
    )


def tree_mask(owner: torch.Tensor, prompt_len: int | torch.Tensor) -> torch.Tensor:
    """[1, 1, T, T] bool: row q sees key k <= q that is in the prompt (k < prompt_len) or in
    q's own branch (owner: each row's branch, -1 for the prompt's rows)."""
    T = owner.shape[0]
    rows = torch.arange(T, device=owner.device)
    mask = (rows[None, :] <= rows[:, None]) & ((rows[None, :] < prompt_len) | (owner[None, :] == owner[:, None]))
    return mask.view(1, 1, T, T)


def tree_rows(prompt: list[int], branches: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """A tree's rows, prompt then branch after branch: each row's token, its position (a
    branch's continue the prompt's, as if it alone followed it) and its branch (-1: the
    prompt), as `tree_batch` and branch_graphs.BranchStep lay them out."""
    P = len(prompt)
    return (prompt + [t for b in branches for t in b],
            list(range(P)) + [P + j for b in branches for j in range(len(b))],
            [-1] * P + [i for i, b in enumerate(branches) for _ in b])


def tree_batch(prompt: list[int], branches: list[list[int]], slot: int, lora_id: int, device: torch.device) -> Batch:
    """A prompt and its branches as one prefill into one slot. The branches follow the
    prompt in the slot's cache rows, but each sits at positions P, P + 1, ... as if it alone
    followed the prompt, and each branch token attends to the prompt and to its own
    branch's earlier tokens only (`tree_mask`): every branch's outputs are those of prompt
    + branch run alone, for one prompt's worth of prefill (branch_scoring.py)."""
    tokens, positions, owner = tree_rows(prompt, branches)
    batch = make_batch([tokens], [0], [slot], [lora_id], device)
    return replace(batch, positions=torch.tensor(positions, dtype=torch.long, device=device),
                   cache_positions=torch.arange(len(tokens), device=device),
                   mask=tree_mask(torch.tensor(owner, device=device), len(prompt)))


@functools.lru_cache(maxsize=None)
def _rows(n: int, device: torch.device) -> torch.Tensor:
    """0..n-1 on `device`, made once (never written): a decode step's graph reads it instead
    of launching an arange every step (DecodeStep warms up before it captures)."""
    return torch.arange(n, device=device)


def decode_batch(tokens: torch.Tensor, positions: torch.Tensor, lora_ids: torch.Tensor, context: int,
                 use_lora: bool, attention_kernel: bool = False, linear_kernel: bool = False,
                 few: tuple[torch.Tensor, torch.Tensor] | None = None) -> Batch:
    """The decode layout from device tensors only (capturable): tokens, positions,
    lora_ids: [B], row b = KV slot b; attention covers cache positions [0, context).
    linear_kernel: fused linears where they apply (with the attention kernel, B <= MAX_ROWS);
    few: their LoRA inside the launches (Batch.few; with linear_kernel only)."""
    B, device = tokens.shape[0], tokens.device
    rows = _rows(B, device)
    mask = None if attention_kernel else \
        torch.arange(context, device=device).view(1, 1, 1, context) <= positions.view(B, 1, 1, 1)
    return Batch(tokens=tokens, positions=positions, lora_ids=lora_ids, token_slots=rows, slots=rows,
                 pad_index=rows, valid=rows, mask=mask, last=None, use_lora=use_lora,
                 shape=(B, 1, context), decode=True, attention_kernel=attention_kernel,
                 linear_kernel=linear_kernel and attention_kernel and B <= MAX_ROWS,
                 few=few if linear_kernel and attention_kernel and B <= MAX_ROWS and use_lora else None)


@functools.lru_cache(maxsize=None)
def _positions(seqs: int, T: int, device: torch.device) -> torch.Tensor:
    """0..T-1 once per sequence, made once (never written): the padded prefill's positions."""
    return torch.arange(T, device=device).repeat(seqs)


def prefill_batch(tokens: torch.Tensor, lora_ids: torch.Tensor, token_slots: torch.Tensor, last: torch.Tensor,
                  seg_ids: torch.Tensor, slots: torch.Tensor, use_lora: bool, plan: SegmentPlan | None = None,
                  bgmv: bool = True) -> Batch:
    """S sequences' prefills from position 0, each padded to T tokens, from device tensors
    only (capturable: prefill_graphs.py): tokens, lora_ids, token_slots [S * T] (sequence s
    on rows s * T ...: its slot and adapter on every row, rows past its length padding),
    last [S] each one's last token's row, seg_ids [S] each one's adapter, slots [S] its KV
    slot. Attention is causal over each sequence's T rows (SDPA's is_causal: a flash kernel
    on a GPU where a mask would take the math path). Padding rows write keys past the
    sequence's length into its own slot, which its decode steps rewrite before attending to
    them. bgmv: the LoRA deltas take the Triton kernels (the segmented pair where the rows
    tile, else BGMV: no host data, a graph); else plan, the torch path's segments."""
    S, N, device = slots.shape[0], tokens.shape[0], tokens.device
    T = N // S
    rows = _rows(N, device)
    return Batch(tokens=tokens, positions=_positions(S, T, device), lora_ids=lora_ids, token_slots=token_slots,
                 slots=slots, pad_index=rows, valid=rows, mask=None, last=last, use_lora=use_lora, shape=(S, T, T),
                 plan=plan, bgmv=bgmv, causal=True, seg_ids=seg_ids)

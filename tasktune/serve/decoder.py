"""The served model: a plain-PyTorch Llama / Qwen2 / Mistral decoder with mixed-adapter LoRA.

One forward takes a flat batch of tokens from many sequences (ragged prefill or one token
per sequence in decode). Linear layers work on the flat rows, so every token pays only for
itself, and every adapted linear (q, k, v, o, gate, up, down) computes
`base(x) + lora_delta(x, A, B, scaling, ids)` with ids per token from the adapter pool's
stacked, device-resident weights.

Two attention layouts (`forward_batch.py` builds their inputs):
- prefill (`make_batch`): ragged chunks padded to [sequences, query_len], the cache rows
  of their slots gathered;
- decode (`Decoder.decode`): one token per row and row b IS KV slot b, so attention reads
  a view of the first B slots (no gather) and every shape depends only on (B, L). That
  is what `serve/cuda_graphs.py` captures; rows of free slots are padding that writes
  position max_len - 1, which no sequence ever reads (it finishes at max_len).
Grouped-query attention folds the query heads of a KV head into the query axis instead
of repeating keys and values.

Parameter names mirror Hugging Face's, except that q, k, v become one `qkv_proj` and gate,
up one `gate_up_proj` (as vLLM stacks them): one GEMM each instead of three and two, and
rotary embedding applied to q and k in one pass. `weights.load_decoder` concatenates the
checkpoint's weights; LoRA still adds each module's own delta to its slice of the output.

On a GPU the decode step reads its adapters through Triton BGMV kernels (one launch pair
per fused linear, lora/triton_ops.py; a prefill replayed from a CUDA graph,
prefill_graphs.py, through the segmented pair of lora/triton_sgmv.py) and attends
through a Triton kernel that also writes the step's keys and values
(triton_attention.py); steps of up to 64 rows run each linear with its norm, activation
and residual as one launch (`Block.forward_fused`, triton_linear.py), which adds the BGMV
pair's LoRA delta before rounding; larger ones run cuBLAS with the pair adding in place;
`compile_decode` runs each block through one torch.compile'd `Block.forward`. The CPU
runs the torch paths, and the tests run the kernels under Triton's interpreter against
them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from tasktune.lora.ops import adapter_column_mask, gather_rows
from tasktune.serve import triton_attention, triton_linear  # noqa: F401  (registers the decode ops)
from tasktune.serve.decoder_config import SUPPORTED_TYPES, DecoderConfig, UnsupportedModel  # noqa: F401
from tasktune.serve.decoder_lora import LayerLora, LoraStacks, add_lora_, kernel_lora_, takes_kernels
from tasktune.serve.forward_batch import Batch, decode_batch
from tasktune.serve.kv_cache import KVCache

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTN_MODULES + MLP_MODULES
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Prefill with several adapters: each adapted linear runs one masked matmul pair over the
# batch's adapters (ops.lora_delta_masked: the rows' own rank columns kept) while they have
# at most this many columns together, instead of a matmul pair and a scatter per adapter.
PREFILL_MASKED_MAX_COLS = 1024
# A padded prefill (prefill_graphs.py, Batch.causal) runs its blocks through the
# compiled block too, when the decoder has one (compile_decode)
COMPILE_PREFILL = True


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: [B, H, T, hd], k, v: [B, kv_heads, L, hd], mask: bool [B, 1, T, L] -> [B, H, T, hd].
    Query head h reads KV head h // (H / kv_heads), as Hugging Face's repeat_kv does, but
    the group's heads become extra query rows of one KV head: K and V are never copied."""
    B, H, T, hd = q.shape
    kvh, L = k.shape[1], k.shape[2]
    groups = H // kvh
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    qg = q.reshape(B, kvh, groups * T, hd)
    m = mask if T == 1 else mask.unsqueeze(2).expand(B, 1, groups, T, L).reshape(B, 1, groups * T, L)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=m).reshape(B, H, T, hd)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in float32 and rounded to the model's dtype, then times the weight in
        # that dtype, as Hugging Face's Llama does (F.rms_norm computes in float32 inside:
        # no copies in and out, and one fused kernel on recent GPUs)
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Hugging Face's x * cos + rotate_half(x) * sin with the sign of rotate_half folded into
    sin_signed = cat(-sin_1, sin_2): the same values from 4 ops instead of 5 (roll, no cat)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class Block(nn.Module):
    """One pre-norm transformer layer; `lin` applies base + LoRA to a (fused) linear."""

    def __init__(self, cfg: DecoderConfig, index: int):
        super().__init__()
        self.index, self.cfg = index, cfg
        hd, h, kvh = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        attn = nn.Module()
        attn.qkv_proj = nn.Linear(cfg.hidden_size, (h + 2 * kvh) * hd, bias=cfg.attention_bias)
        attn.o_proj = nn.Linear(h * hd, cfg.hidden_size, bias=cfg.o_proj_bias)
        mlp = nn.Module()
        mlp.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        mlp.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.self_attn, self.mlp = attn, mlp
        # each LoRA module's (name, first output column, width) inside its fused linear
        widths = {"q_proj": h * hd, "k_proj": kvh * hd, "v_proj": kvh * hd,
                  "gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}
        self.parts = {}
        for fused, modules in FUSED.items():
            starts = [sum(widths[m] for m in modules[:i]) for i in range(len(modules))]
            self.parts[fused] = tuple((m, start, widths[m]) for m, start in zip(modules, starts))

    def lin(self, parent: nn.Module, name: str, x: torch.Tensor, batch: Batch, lora: LoraStacks | None,
            stacks: LayerLora | None) -> torch.Tensor:
        layer: nn.Linear = getattr(parent, name)
        y = F.linear(x, layer.weight, layer.bias)  # x: [N, d_in] -> [N, d_out]
        if stacks is None or not batch.use_lora:
            return y
        parts = self.parts.get(name, ((name, 0, y.shape[1]),))
        if name in stacks.fused and takes_kernels(batch, lora):  # one launch pair for the fused linear
            kernel_lora_(y, x, stacks.fused[name], lora, batch, [start for _, start, _ in parts[1:]])
            return y
        for module, start, width in parts:
            ab = stacks.weights.get(module)
            if ab is not None:
                add_lora_(y[:, start:start + width], x, ab, lora, batch)
        return y

    def forward(self, x, batch: Batch, cos, sin, kv: tuple[torch.Tensor, torch.Tensor], lora: LoraStacks | None,
                stacks: LayerLora | None) -> torch.Tensor:
        """kv: this layer's cache (KVCache.layer); stacks: its adapters (LoraStacks.layer).
        Nothing here reads the layer's index, so one compiled code serves every layer."""
        cfg, a = self.cfg, self.self_attn
        H, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        N = x.shape[0]
        if batch.linear_kernel and (stacks is None or not batch.use_lora or lora.kernels):
            return self.forward_fused(x, batch, kv, lora, stacks)
        h = self.input_layernorm(x)
        qkv = self.lin(a, "qkv_proj", h, batch, lora, stacks)  # [N, (H + 2 kv_heads) * hd]
        kc, vc = kv
        L = batch.shape[2]
        if batch.decode and batch.attention_kernel:  # row b = slot b: rotates, writes and reads its keys in place
            return self.rest(x, self.attend_decode(qkv, batch, kv), batch, lora, stacks)
        qk = qkv[:, :(H + kvh) * hd].view(N, H + kvh, hd)
        qk = apply_rope(qk, cos, sin)  # q and k heads together; cos, sin: [N, 1, head_dim]
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + kvh) * hd:].view(N, kvh, hd)
        rows = batch.positions if batch.cache_positions is None else batch.cache_positions
        kc[batch.token_slots, :, rows] = k.to(kc.dtype)
        vc[batch.token_slots, :, rows] = v.to(vc.dtype)
        if batch.decode:  # row b = slot b, one query each: attend to a view of the first N slots
            o = grouped_attention(q.unsqueeze(2), kc[:N, :, :L], vc[:N, :, :L], batch.mask).reshape(N, -1)
        else:
            B, T = batch.shape[:2]
            kb, vb = kc[:, :, :L].index_select(0, batch.slots), vc[:, :, :L].index_select(0, batch.slots)
            if batch.causal:  # sequences from position 0, T rows each: no mask, SDPA's flash kernel on a GPU
                o = F.scaled_dot_product_attention(q.view(B, T, H, hd).transpose(1, 2), kb, vb, is_causal=True,
                                                   enable_gqa=H != kvh)
                o = o.transpose(1, 2).reshape(N, -1)  # rows already in flat order
            else:
                qp = q.index_select(0, batch.pad_index).view(B, T, H, hd).transpose(1, 2)
                o = grouped_attention(qp, kb, vb, batch.mask)  # [B, H, T, hd]
                o = o.transpose(1, 2).reshape(B * T, -1).index_select(0, batch.valid)  # [N, H*hd]
        return self.rest(x, o, batch, lora, stacks)

    def attend_decode(self, qkv: torch.Tensor, batch: Batch, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Decode attention in Triton on views of the qkv output: row b = slot b, which it
        rotates, writes into the cache and attends to in place -> [N, H * hd]."""
        cfg, N = self.cfg, qkv.shape[0]
        H, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = (qkv[:, lo * hd:hi * hd].view(N, -1, hd) for lo, hi in ((0, H), (H, H + kvh), (H + kvh, H + 2 * kvh)))
        L = batch.shape[2]
        return torch.ops.tasktune.decode_attention(q, k, v, *kv, batch.positions, L, *batch.rope).reshape(N, -1)

    def forward_fused(self, x, batch: Batch, kv: tuple[torch.Tensor, torch.Tensor], lora: LoraStacks | None,
                      stacks: LayerLora | None) -> torch.Tensor:
        """The decode step through four fused linear launches (serve/triton_linear.py): RMSNorm +
        qkv; attention; o + residual; RMSNorm + gate_up + silu * up; down + residual. Norms,
        activation and residual adds need no kernels of their own. With adapters, each
        linear's rows' LoRA deltas come from the BGMV pair (`lora.triton_ops.lora_delta`, the
        norm's weight inside its shrink) and join the projection in the fused launch's
        epilogue, before the 1 / rms that scales both (triton_linear.DELTA_BEFORE_RMS), or
        the fused launch computes them itself: for a step of at most FEW distinct adapters
        (`batch.few`, triton_lora_few.py), or always (`LoraStacks.fused_linears`)."""
        a, m = self.self_attn, self.mlp
        rms = not triton_linear.DELTA_BEFORE_RMS  # whether the BGMV shrink applies a norm's 1 / rms itself

        def lin(parent: nn.Module, name: str, x_in: torch.Tensor, norm: RMSNorm | None, residual=None,
                swiglu: bool = False) -> torch.Tensor:
            layer: nn.Linear = getattr(parent, name)
            nw = norm.weight if norm is not None else None
            A = B = scaling = ids = delta = few = None
            bounds: list[int] = []
            ab = (stacks.fused if name in self.parts else stacks.weights).get(name) \
                if stacks is not None and batch.use_lora else None
            if ab is not None:
                (A, B), scaling, ids = ab, lora.scaling, batch.lora_ids
                bounds = [start for _, start, _ in self.parts[name][1:]] if name in self.parts else []
                if batch.few is not None and triton_linear.few_fits(*layer.weight.shape, bounds, swiglu):
                    few = batch.few  # at most FEW adapters: LoRA inside the launch (triton_lora_few.py)
                elif not lora.fused_linears:
                    delta = torch.ops.tasktune.bgmv_delta(x_in, A.contiguous(), B, scaling, ids, bounds, nw,
                                                          self.cfg.rms_norm_eps, rms)
                    A = B = scaling = ids = None
            return torch.ops.tasktune.decode_linear(x_in, layer.weight, layer.bias, residual, nw, self.cfg.rms_norm_eps,
                                                    swiglu, A, B, scaling, ids, bounds, delta, rms,
                                                    *(few if few is not None else (None, None)))

        qkv = lin(a, "qkv_proj", x, self.input_layernorm)
        o = self.attend_decode(qkv, batch, kv)
        x = lin(a, "o_proj", o, None, residual=x)
        act = lin(m, "gate_up_proj", x, self.post_attention_layernorm, swiglu=True)
        return lin(m, "down_proj", act, None, residual=x)

    def rest(self, x, o, batch: Batch, lora: LoraStacks | None, stacks: LayerLora | None) -> torch.Tensor:
        """After attention: output projection, residual, MLP, residual."""
        cfg, a = self.cfg, self.self_attn
        x = x + self.lin(a, "o_proj", o, batch, lora, stacks)
        h = self.post_attention_layernorm(x)
        gu = self.lin(self.mlp, "gate_up_proj", h, batch, lora, stacks)  # [N, 2 * intermediate]
        inter = cfg.intermediate_size
        return x + self.lin(self.mlp, "down_proj", F.silu(gu[:, :inter]) * gu[:, inter:], batch, lora, stacks)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._compiled_block = None  # decode steps run each block through this (compile_decode)
        self.attention_kernel = False  # decode attention in Triton (load_decoder: on a GPU with Triton)
        self.linear_kernel = False  # decode linears fused in Triton (triton_linear; load_decoder: on a GPU)

    def can_use_attention_kernel(self) -> bool:
        """Triton runs here and the head size suits the kernel (a power of two)."""
        hd = self.cfg.head_dim
        return triton_attention.available(self.lm_head.weight.device) and hd & (hd - 1) == 0 and hd >= 16

    def compile_decode(self, autotune: bool = False, **options) -> None:
        """Decode steps run every block through one torch.compile'd Block.forward (Inductor
        fuses the norms, rotary embedding, residual adds and activation; residual adds are
        kept out of cuBLAS, compile_passes.py); blocks differ only in their weights, which
        the compiled code takes as inputs. Shapes start dynamic
        (batch and context buckets). Prefill stays eager. `options` go to torch.compile
        (e.g. backend="aot_eager" where there is no C compiler). autotune: Inductor times
        its Triton GEMM templates against cuBLAS for each projection (max_autotune; the
        decode GEMMs are small and latency-bound) at the price of a longer compile."""
        options.setdefault("dynamic", True)
        if options.get("backend", "inductor") == "inductor" and "mode" not in options:
            from tasktune.serve.compile_passes import UnfuseResidualAddmm

            inductor = options.setdefault("options", {})
            inductor.setdefault("post_grad_custom_post_pass", UnfuseResidualAddmm())
            if autotune:
                inductor.setdefault("max_autotune", True)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        self._compiled_block = torch.compile(Block.forward, **options)

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """module name -> (d_in, d_out) of every adaptable linear (Hugging Face's names)."""
        b = self.model.layers[0]
        shapes = {}
        for parent in (b.self_attn, b.mlp):
            for name, layer in parent.named_children():
                for module, _, width in b.parts.get(name, ((name, 0, layer.out_features),)):
                    shapes[module] = (layer.in_features, width)
        return {n: shapes[n] for n in LORA_MODULES}

    def rope_table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin_signed: [length, head_dim] in float32, computed as Hugging Face does; the
        first half of sin negated (see apply_rope)."""
        if self._rope is None or self._rope[0].shape[0] < length or self._rope[0].device != device:
            dim = self.cfg.head_dim
            inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
            freqs = torch.arange(length, device=device).float()[:, None] * inv[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin()
            sin[:, : dim // 2].neg_()
            self._rope = (emb.cos(), sin)
        return self._rope

    @torch.no_grad()  # not inference_mode: torch.compile cannot write the KV cache under it
    def forward(self, batch: Batch, cache: KVCache, lora: LoraStacks | None = None, float_logits: bool = True,
                head: bool = True) -> torch.Tensor:
        """-> logits of each sequence's last new token: [B, vocab] float32 (float_logits=False:
        in the model's dtype, as the LM head computed them; head=False: the last layer's
        output rows before the final norm, for a tail of the caller's own)."""
        x = self.model.embed_tokens(batch.tokens)  # [N, hidden]
        if batch.mask is not None and batch.mask.dtype == torch.bool:  # additive once, instead of inside every layer's attention
            additive = torch.zeros(batch.mask.shape, dtype=x.dtype, device=x.device)
            batch = replace(batch, mask=additive.masked_fill_(~batch.mask, float("-inf")))
        if (lora is not None and batch.use_lora and not batch.decode and batch.active is not None
                and not takes_kernels(batch, lora)):
            k, r = batch.active.shape[0], lora.rank
            if 1 < k and k * r <= PREFILL_MASKED_MAX_COLS:  # else one matmul pair per adapter (segmented)
                batch = replace(batch, lora_mask=adapter_column_mask(batch.active_ids, k, r))
        if lora is not None and batch.use_lora and batch.decode and not lora.kernels:
            safe, scale, none = gather_rows(batch.lora_ids, lora.scaling)  # once, for every linear
            batch = replace(batch, lora_rows=(safe, scale.to(x.dtype), none))
        cos_t, sin_t = self.rope_table(cache.max_len, x.device)
        if batch.decode and batch.attention_kernel:  # the attention kernel rotates q and k itself
            batch, cos, sin = replace(batch, rope=(cos_t, sin_t)), None, None
        else:
            cos = cos_t.index_select(0, batch.positions).to(x.dtype).unsqueeze(1)  # [N, 1, head_dim]
            sin = sin_t.index_select(0, batch.positions).to(x.dtype).unsqueeze(1)
        compiled = self._compiled_block if batch.decode or (batch.causal and COMPILE_PREFILL) else None
        for i, layer in enumerate(self.model.layers):
            kv, stacks = cache.layer(i), (lora.layer(i) if lora is not None else None)
            x = compiled(layer, x, batch, cos, sin, kv, lora, stacks) if compiled else layer(x, batch, cos, sin, kv, lora, stacks)
        if not head:
            return x if batch.last is None else x.index_select(0, batch.last)
        h = self.model.norm(x if batch.last is None else x.index_select(0, batch.last))
        logits = self.lm_head(h)
        return logits.float() if float_logits else logits

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, lora_ids: torch.Tensor, context: int,
               cache: KVCache, lora: LoraStacks | None, use_lora: bool, head: bool = True,
               few: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One decode step in the decode layout (`decode_batch`) -> logits [B, vocab] in the
        model's dtype (a greedy step takes their argmax: casting all B x vocab of them to
        float32 first is a copy it does not need; DecodeStep casts the rows it returns), or
        with head=False the rows before the final norm (DecodeStep's tail: cuda_graphs.greedy_tail).
        Only device work after the rope table exists, so it can be captured in a CUDA graph."""
        return self(decode_batch(tokens, positions, lora_ids, context, use_lora, self.attention_kernel,
                                 self.linear_kernel, few), cache, lora, float_logits=False, head=head)

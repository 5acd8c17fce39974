"""Sharded data parallelism (FSDP2) for strategy `full` on causal LMs: `train.fsdp: true`.

Under DDP every rank holds the whole model, its gradients and both AdamW moments: for full
fine-tuning that is 16 bytes a parameter on every GPU. With torch's `fully_shard` each
decoder block and the rest of the model (embeddings, final norm, LM head) are sharded
over the ranks: parameters, gradients and optimizer state are 1/W each, a block's weights
are gathered just before it runs and freed after. Gradients are averaged over ranks as DDP
does, so `GlobalLosses` and the loss curve are those of the DDP run (tests/test_ddp.py
checks 2 sharded processes against 1 plain one).

What reads or writes whole tensors goes through full state dicts, gathered on every rank
(collectives: every rank calls them) and kept on rank 0's CPU: checkpoints (weights and
AdamW state; a resumed run shards them again), the early-stopping snapshot, and the
saved model (`full_weights`, which rank 0 writes).

The runner computes the causal loss from the base model and the LM head on the scored
positions only, not through the model's `forward`, so that method is registered as an
FSDP forward (`register_fsdp_forward_method`): the root's parameters are gathered for it.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from tasktune.errors import TasktuneError
from tasktune.model.runner import SHARDED_FORWARD, scored_token_losses


def check_fsdp(runner, world: int) -> None:
    why = [
        reason for reason, bad in (
            ("strategy `full` only (LoRA adapters are small: their strategies train data-parallel, DDP)",
             runner.handle is not None),
            ("causal LMs only (encoder heads would stay unsharded)", runner.family != "causal"),
        ) if bad
    ]
    if why:
        raise TasktuneError("train.fsdp: " + "; ".join(why))


def shard(runner, blocks: nn.ModuleList) -> None:
    """fully_shard each block, then the whole model as the root group (in place)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in blocks:
        fully_shard(block)
    fully_shard(runner.model)
    setattr(runner.model, SHARDED_FORWARD, types.MethodType(scored_token_losses, runner.model))
    register_fsdp_forward_method(runner.model, SHARDED_FORWARD)


def is_sharded(runner) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(runner.model, FSDPModule)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_weights(runner) -> dict[str, torch.Tensor]:
    """The model's whole state dict on rank 0's CPU ({} on the other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(runner.model, options=_options(cpu_offload=True))


def trainable_state(runner) -> dict[str, torch.Tensor]:
    """What the loop snapshots and checkpoints (`loop._trainable_state`), gathered: names as
    `runner.named_parameters()` gives them. Collective; {} except on rank 0."""
    return {f"model.{k}": v for k, v in full_weights(runner).items()}


def load_trainable(runner, tensors: dict[str, torch.Tensor]) -> None:
    """Rank 0's whole tensors (a snapshot or a checkpoint) broadcast to every rank, each
    keeping its shard; what the other ranks pass is not read. Collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    own = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    set_model_state_dict(runner.model, own, options=_options(broadcast_from_rank0=True))


class OptimizerState:
    """The optimizer as `save_checkpoint` / `load_checkpoint` see it: whole tensors keyed by
    parameter name instead of one rank's shards keyed by index."""

    def __init__(self, runner, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = runner.model, optimizer
        self._gathered: dict | None = None

    def gather(self) -> None:
        """Collective (every rank calls it); `state_dict` then returns it on rank 0."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        self._gathered = get_optimizer_state_dict(self.model, self.optimizer, options=_options(cpu_offload=True))

    def state_dict(self) -> dict:
        if self._gathered is None:
            raise RuntimeError("OptimizerState.gather() must run on every rank before state_dict()")
        state, self._gathered = self._gathered, None
        return state

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=_options())

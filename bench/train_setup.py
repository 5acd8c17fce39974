"""What train_bench.py's cases share: the DU data, PEFT's padded batches, the FLOP count,
our Runner and PEFT's model built from one pristine base, their training steps, and the
loss check that both start from the same LoRA weights."""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass

import torch

from common import LORA_TARGETS, linear_shapes, profile_text, sync

TARGETS = LORA_TARGETS
DU_TASKS = ["clinc150", "snips_intent", "snips_slots", "circa", "dialogsum"]
SINGLE_TASKS = ["clinc150", "snips_intent", "snips_slots", "circa"]
IGNORE = -100


# --- tokenizer and data ----------------------------------------------------------------------
def load_du(per_task: int, seed: int):
    from tasktune.data.load import load_tasks
    from tasktune.tasks.builtin import builtin_tasks

    bt = builtin_tasks()
    loaded = load_tasks([bt[n] for n in DU_TASKS], max_examples={"train": per_task}, seed=seed)
    tasks = {n: loaded[n]["train"].task for n in DU_TASKS}
    examples = {n: list(loaded[n]["train"].examples) for n in DU_TASKS}
    return tasks, examples


def mixture(examples: dict[str, list], names: list[str], seed: int) -> list:
    """Every example of the named tasks, shuffled together (the natural, size-proportional mix)."""
    out = [ex for n in names for ex in examples[n]]
    random.Random(seed).shuffle(out)
    return out


def padded_batch(tokenizer, tasks, examples, max_length, seed):
    """PEFT's batch: the same encoded examples, padded to the longest (right), labels IGNORE
    on prompt and padding (HF shifts them inside the loss)."""
    from tasktune.data.tokenize import encode_causal
    from tasktune.tasks.render import render

    enc = [encode_causal(tokenizer, render(tasks[ex.task], ex, seed), max_length) for ex in examples]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(enc), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    lens = [len(e) for e in enc]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, lens, enc


# --- FLOPs -----------------------------------------------------------------------------------
def step_flops(config, lens: list[int], n_labelled: int, r: int) -> float:
    shapes = linear_shapes(config)
    L = config.num_hidden_layers
    p_lin = L * sum(a * b for a, b in shapes)
    lora = L * sum(6 * r * (a + b) for a, b in shapes)
    head = config.hidden_size * config.vocab_size
    tokens = sum(lens)
    pairs = sum(n * (n + 1) // 2 for n in lens)
    d_attn = config.hidden_size  # heads * head_dim
    attn = L * 12 * d_attn * pairs
    return tokens * (4 * p_lin + lora) + n_labelled * 4 * head + attn


# --- ours and PEFT ---------------------------------------------------------------------------
@dataclass
class Setup:
    """Everything the cases share: settings from the command line and what was built once."""

    device: torch.device
    config: object
    pristine: object  # the base model every variant deep-copies
    tokenizer: object
    tasks: dict
    examples: dict
    warmup: int
    steps: int
    du_batch: int
    dense_shape: tuple[int, int]
    max_length: int
    pack_tokens: int
    pack_multiple: int
    compile: str | None  # torch.compile backend for our blocks, or None
    profile: bool
    check_steps: int
    peak: float
    peak_measured: float | None
    r: int = 16
    alpha: float = 32.0
    lr: float = 1e-4
    seed: int = 0
    cuda_graphs: bool = False  # our steps through train/graphed_step.py (one CUDA graph per batch shape)


def make_runner(s: Setup, strategy: str, task_names: list[str], max_length: int, pack_tokens: int):
    from tasktune.config import LoRASettings
    from tasktune.model.load import LoadedModel
    from tasktune.model.plan import plan_for
    from tasktune.model.runner import Runner

    base = copy.deepcopy(s.pristine)
    loaded = LoadedModel(model=base, tokenizer=s.tokenizer, family="causal", name="random-qwen2.5-0.5b", path="",
                         max_length=max_length)
    plan = plan_for(strategy, task_names)
    lora = LoRASettings(r=s.r, alpha=s.alpha, dropout=0.0, target_modules=list(TARGETS))
    runner = Runner(loaded, [s.tasks[n] for n in task_names if n in s.tasks], plan, lora, max_length=max_length,
                    pack_tokens=pack_tokens, pack_multiple=s.pack_multiple)
    if s.compile:
        runner.compile_blocks(backend=s.compile)
    runner.train()
    return runner


def compile_warmup(s: "Setup", step, batches) -> float | None:
    """With --compile: one untimed step per distinct batch shape, so the timed steps measure
    compiled code and not compilation (Dynamo recompiles once per new shape, then goes
    dynamic). Returns the seconds this took, or None without --compile."""
    if not (s.compile or s.cuda_graphs):
        return None
    t0 = time.perf_counter()
    seen = set()
    for b in batches:
        shape = step.key(b) if hasattr(step, "key") else tuple(b.input_ids.shape)  # graphs: one per key
        if shape not in seen:
            seen.add(shape)
            step(b)
    sync(s.device)
    return time.perf_counter() - t0


def ours_step_fn(runner, opt, device, autocast=True, graphs=False):
    if graphs:  # opt from ours_optimizer(graphs=True)
        from tasktune.train.graphed_step import GraphedStep

        graphed = GraphedStep(runner, opt, autocast=torch.bfloat16 if autocast else None)

        def step(batch):
            return float(sum(graphed(batch).values()))

        step.key, step.graphed = graphed.key, graphed
        return step

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            losses = runner.task_losses(batch)
        loss = sum(losses.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def dense_batch(input_ids):
    from tasktune.model.batches import Batch

    B = input_ids.shape[0]
    # row_tasks: a task the runner knows (CUDA-graphed steps check it; the loss is the same)
    return Batch(row_tasks=[SINGLE_TASKS[0]] * B, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 adapter_ids=torch.zeros(B, dtype=torch.long), labels=input_ids.clone())


def make_peft(base, r, alpha):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.train()
    return model


def peft_step_fn(model, opt, device, autocast):
    def step(batch):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())
    return step


def make_optimizer(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def ours_optimizer(s: "Setup", params):
    """The same AdamW; with CUDA graphs the capturable fused one with a tensor lr."""
    if s.cuda_graphs:
        from tasktune.train.graphed_step import graphable_adamw

        return graphable_adamw(list(params), s.lr, s.device, weight_decay=0.0)
    return make_optimizer(params, s.lr)


def graph_counts(step) -> dict | None:
    """How many steps a graphed step captured, replayed and ran eagerly (None: no graphs)."""
    g = getattr(step, "graphed", None)
    return None if g is None else {"graphs": len(g.graphs), "captured": g.captured, "replayed": g.replayed, "eager": g.eager}


def set_lr(group: dict, lr) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(float(lr))  # a captured graph reads this tensor
    else:
        group["lr"] = lr


def copy_peft_lora_into_ours(peft_model, runner):
    """Our single adapter slot 0 := PEFT's default adapter (A random, B zero at init)."""
    inner = peft_model.base_model.model
    for path, layer in runner.handle.layers.items():
        p = inner.get_submodule(path)
        layer.set_adapter(0, p.lora_A["default"].weight.detach(), p.lora_B["default"].weight.detach(),
                          float(p.scaling["default"]))


def loss_check(ours_step, peft_step, ours_batch, peft_batch, opts, n_steps=6, lr=1e-3) -> dict:
    """Same weights (LoRA A copied from PEFT, B = 0): the loss at step 0 and after each of
    `n_steps` AdamW steps (lr raised to `lr` for the check) on the same batch, ours and
    PEFT's (plain). The two curves must agree at steps 0 and 1 and both fall."""
    saved = [[float(g["lr"]) for g in o.param_groups] for o in opts]
    for o in opts:
        for g in o.param_groups:
            set_lr(g, lr)
    ours = [ours_step(ours_batch) for _ in range(n_steps)]
    peft = [peft_step(peft_batch) for _ in range(n_steps)]
    for o, lrs in zip(opts, saved):
        for g, v in zip(o.param_groups, lrs):
            set_lr(g, v)
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, peft)]
    return {
        "ours_losses": ours, "peft_losses": peft, "rel_diff": rel, "check_lr": lr,
        "ours_step0": ours[0], "peft_step0": peft[0], "ours_step1": ours[1], "peft_step1": peft[1],
        "ok": rel[0] < 2e-2 and rel[1] < 2e-2 and ours[-1] < ours[0] and peft[-1] < peft[0],
    }


def check_text(check: dict) -> str:
    if "error" in check:
        return check["error"]
    n = len(check["ours_losses"])
    return (f"{check['ours_step0']:.4f}/{check['peft_step0']:.4f}, {check['ours_step1']:.4f}/{check['peft_step1']:.4f}; "
            f"{n} steps lr 1e-3: ours {check['ours_losses'][0]:.3f}->{check['ours_losses'][-1]:.3f}, "
            f"PEFT {check['peft_losses'][0]:.3f}->{check['peft_losses'][-1]:.3f} ({'ok' if check['ok'] else 'MISMATCH'})")


def max_memory(res: dict, device) -> None:
    if device.type == "cuda" and "error" not in res:
        res["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30


def reset_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def profile_rows(case: str, res: dict, keys) -> list[tuple[str, str]]:
    """Table rows for the profiles the case took (see common.profile_text)."""
    return [(f"{case} {k} profile per step", profile_text(res[k]["profile"])) for k in keys if "profile" in res.get(k, {})]

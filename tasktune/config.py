"""The project config: one YAML file names the model, the tasks, the mixture and training.

Validated once here (pydantic); everything downstream trusts the types. Errors name the
file, the line and the key, e.g. `du.yaml:7: tasks.1.kind: Input should be ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from tasktune.errors import ConfigError

MixingPolicy = Literal["proportional", "capped", "temperature", "uniform", "explicit", "curriculum", "dynamic"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskEntry(_Strict):
    """A task in the YAML: `builtin: NAME` (optionally overriding a few fields) or a
    user's own task declared by its data and fields."""

    builtin: str | None = None
    name: str | None = None
    kind: Literal["classification", "tagging", "generation", "yesno"] | None = None
    path: str | None = None  # train split: jsonl | csv | tsv
    eval_path: str | None = None  # test split
    validation_path: str | None = None
    dataset: str | None = None  # Hugging Face dataset name or local folder
    splits: dict[str, str] | None = None  # for `dataset`: our split -> dataset split name
    format: Literal["jsonl", "csv", "tsv"] | None = None
    input: str | list[str] | None = None
    target: str | None = None
    references: list[str] | None = None  # extra reference fields (multi-reference test sets)
    labels: list[str] | None = None
    label_map: dict[str, str] | None = None
    templates: list[str | dict[str, str]] | None = None
    metric: str | None = None
    max_examples: dict[str, int] | int | None = None  # subset per split (first N, deterministic)
    weight: float = 1.0  # weight in the aggregate score and static loss weighting

    @model_validator(mode="after")
    def _one_source(self) -> "TaskEntry":
        if self.builtin is None:
            if not self.name:
                raise ValueError("a task needs `builtin: NAME` or its own `name:`")
            if not (self.path or self.dataset):
                raise ValueError(f"task '{self.name}' needs `path:` (jsonl/csv/tsv) or `dataset:`")
            if not self.kind:
                raise ValueError(f"task '{self.name}' needs `kind:` (classification, tagging, generation, yesno)")
            if not self.input or not self.target:
                raise ValueError(f"task '{self.name}' needs `input:` and `target:` field names")
        return self

    @property
    def task_name(self) -> str:
        return self.name or str(self.builtin)


class CurriculumStage(_Strict):
    steps: int = Field(gt=0)
    policy: Literal["proportional", "capped", "temperature", "uniform", "explicit"] = "proportional"
    rates: dict[str, float] | None = None
    temperature: float = 1.0
    cap: int = 3000


class MixingConfig(_Strict):
    """Mixing policy. `cap` is T5's K for capped proportional; `rates` for explicit;
    `stages` for curriculum; `dynamic_*` for the policy that raises lagging tasks."""

    policy: MixingPolicy = "proportional"
    temperature: float = Field(default=2.0, gt=0)
    cap: int = Field(default=3000, gt=0)
    rates: dict[str, float] | None = None
    stages: list[CurriculumStage] | None = None
    dynamic_base: Literal["proportional", "uniform", "temperature"] = "temperature"
    dynamic_strength: float = Field(default=1.0, ge=0)


class LoRASettings(_Strict):
    r: int = Field(default=8, gt=0)
    alpha: float = 16.0
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: every attention and feed-forward linear
    # CGC-LoRA (strategy `cgc`): expert ranks add up to `r` per task
    k_common: int = Field(default=1, ge=0)
    k_specific: int = Field(default=1, ge=0)
    input_gate: bool = False  # ablation: gate also reads the input (cannot be folded for serving)


class WeightingConfig(_Strict):
    method: Literal["static", "uncertainty", "dwa", "gradnorm", "pcgrad"] = "static"
    weights: dict[str, float] | None = None
    dwa_temperature: float = 2.0
    dwa_window: int = Field(default=50, ge=0)  # steps per DWA period (0: per epoch)
    gradnorm_alpha: float = 1.5


class TrainSettings(_Strict):
    lr: float = Field(default=5e-4, gt=0)  # LoRA adapters
    head_lr: float | None = None  # encoder task heads (default: lr)
    gate_lr: float | None = Field(default=None, gt=0)  # CGC gates (gate_logits, gate_proj; default: lr)
    full_lr: float = Field(default=5e-5, gt=0)  # all weights, strategy `full`
    max_grad_norm: float = 1.0
    val_examples: int = Field(default=256, gt=0)  # per task, for validation loss
    weight_decay: float = 0.0
    batch_size: int = Field(default=32, gt=0)
    max_tokens: int = Field(default=2048, gt=0)  # packing budget per row for causal LMs
    grad_accum: int = Field(default=1, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = None
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_every: int = 0  # 0: only at the end
    early_stopping_patience: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    deterministic: bool = False  # torch deterministic algorithms (also: TASKTUNE_DETERMINISTIC=1)
    compile: bool = False  # torch.compile the model's repeated blocks (Runner.compile_blocks); needs a C compiler
    # causal LMs: each batch shape's whole step replayed as one CUDA graph (train/graphed_step.py);
    # static loss weights, grad_accum 1, one process. Without a GPU the same step runs eagerly.
    cuda_graphs: bool = False
    # strategy `full` on causal LMs under torchrun / accelerate launch: the model, gradients and
    # AdamW state sharded over the processes (FSDP2, train/sharded.py) instead of DDP copies
    fsdp: bool = False
    head_dropout: float = Field(default=0.1, ge=0, lt=1)  # encoder task heads, before the linear layer
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)


class ProjectConfig(_Strict):
    model: str = "minilm"
    tasks: list[TaskEntry]
    mixing: MixingConfig = Field(default_factory=MixingConfig)
    seed: int = 0
    max_length: int = Field(default=256, gt=0)
    lora: LoRASettings = Field(default_factory=LoRASettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    strategies: list[str] = Field(default_factory=lambda: ["single", "multi"])
    groups: list[list[str]] | None = None  # strategy `grouped`: explicit task groups
    group_k: int | None = None  # else cluster the affinity matrix into k groups (None: by silhouette)
    # Where the config came from: relative data paths resolve against this folder.
    base_dir: str = "."
    # The YAML file and the line of each task entry, for errors found after validation.
    _source: str | None = PrivateAttr(default=None)
    _task_lines: list[int] = PrivateAttr(default_factory=list)

    def task_where(self, index: int) -> str:
        """'file.yaml:LINE: tasks.INDEX' for a config read from YAML, else 'tasks.INDEX'."""
        if self._source and index < len(self._task_lines):
            return f"{self._source}:{self._task_lines[index]}: tasks.{index}"
        return f"tasks.{index}"

    @model_validator(mode="after")
    def _unique_names(self) -> "ProjectConfig":
        seen: set[str] = set()
        for entry in self.tasks:
            if entry.task_name in seen:
                raise ValueError(f"task name '{entry.task_name}' appears twice")
            seen.add(entry.task_name)
        return self


def _line_of(node: yaml.Node, loc: tuple[Any, ...]) -> int | None:
    """Walk a composed YAML node tree along a pydantic error location to a 1-based line."""
    line = node.start_mark.line + 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == key), None)
            if match is None:
                match = next((k for k, _ in node.value if k.value == key), None)
            if match is None:
                break
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def load_config(path: str | Path) -> ProjectConfig:
    """Read and validate a project YAML; relative paths in it resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping with at least `tasks:`")
    raw.setdefault("base_dir", str(path.parent.resolve()))
    try:
        cfg = ProjectConfig.model_validate(raw)
        cfg._source = str(path)
        cfg._task_lines = [_line_of(root, ("tasks", i)) or 1 for i in range(len(cfg.tasks))]
        return cfg
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"])
            line = _line_of(root, loc) if root is not None else None
            key = ".".join(str(p) for p in loc) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{path}:{line}: {key}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def config_from_dict(raw: dict[str, Any], base_dir: str | Path = ".") -> ProjectConfig:
    """The Python entry point: the same schema as the YAML."""
    raw = dict(raw)
    raw.setdefault("base_dir", str(Path(base_dir).resolve()))
    try:
        return ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(str(exc)) from None

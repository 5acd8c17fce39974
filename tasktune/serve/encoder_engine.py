"""Serve an encoder run: every task's adapter and head, many tasks in one forward.

The engine answers with the evaluator's model, not a copy: `restore_runner` rebuilds the
run, `encoder_logits` runs one forward over a batch that mixes tasks (the batch's per-row
adapter ids route each row through its task's adapter inside the shared LoRA layers, then
each row meets its own head) and `decode_encoder` turns a row into the label or tags that
`tasktune eval` reports. Which adapter serves a task (`single`, `multi`, `grouped`, a
folded `cgc`) is the run's plan; the engine never looks.

Micro-batching: a batch is up to `max_batch` requests, padded to the longest. `submit`
is the entry point for concurrent callers (the API's worker threads): requests that
arrive while a forward runs wait, and the next forward takes them all. Loading and every
forward run on the engine's one `TorchThread` (torch_thread.py: on a CPU, torch ops from
several threads ran 2-3x slower).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from tasktune.errors import TasktuneError
from tasktune.model.predict import decode_encoder, encoder_logits
from tasktune.model.restore import read_run, restore_runner
from tasktune.model.runner import Runner
from tasktune.serve.task_predictor import named_inputs
from tasktune.serve.torch_thread import TorchThread
from tasktune.tasks.render import bio_spans, label_text, slots_text
from tasktune.tasks.spec import Example, FieldValue, Origin, Task

Inputs = FieldValue | Mapping[str, FieldValue]


@dataclass(frozen=True)
class SlotSpan:
    """One slot of a tagging answer: words[start:end] joined by spaces."""

    slot: str
    value: str
    start: int
    end: int


@dataclass(frozen=True)
class Answer:
    """One served prediction. `value` is what `tasktune eval` predicts for the same input:
    a label (classification, yesno) or one BIO tag per word (tagging)."""

    task: str
    adapter: str | None  # the adapter that served it; None for a `full` run
    value: str | list[str]
    text: str  # the value as a causal model writes it: the label, or "slot: value; ..."
    score: float | None = None  # the label's probability
    top: tuple[tuple[str, float], ...] = ()  # the top-k labels with probabilities, most probable first
    slots: tuple[SlotSpan, ...] = ()


@dataclass
class _Pending:
    example: Example
    top_k: int
    done: Future


class EncoderEngine:
    def __init__(self, runner: Runner | Callable[[], Runner], *, name: str = "encoder", max_batch: int = 32):
        """runner: the run's model, or a function that loads it (called on the engine's thread)."""
        if max_batch < 1:
            raise TasktuneError("max_batch must be at least 1")
        self.name = name
        self.max_batch = max_batch
        self.running = 0  # rows in the forward now
        self._model = threading.Lock()  # one forward at a time
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._thread = TorchThread("tasktune-encoder", lambda: self._forward_queued if self._queue else None)
        try:
            runner = runner if isinstance(runner, Runner) else self._thread.call(runner)
            if runner.family != "encoder":
                raise TasktuneError(f"EncoderEngine serves encoder runs, not a {runner.family} model")
        except BaseException:
            self._thread.close()
            raise
        self.runner = runner.eval()
        # tasks with a head: a generation task never gets one on an encoder
        self.tasks: dict[str, Task] = {t: runner.tasks[t] for t in runner.heads}

    @classmethod
    def from_run(cls, run_dir: Path, *, device: str = "cpu", max_batch: int = 32) -> "EncoderEngine":
        cfg, record = read_run(run_dir)
        if record.get("family") != "encoder":
            raise TasktuneError(f"{run_dir}: a {record.get('family')} run, not an encoder run")
        return cls(lambda: restore_runner(run_dir).to(device), name=Path(cfg.model).name, max_batch=max_batch)

    @property
    def adapters(self) -> list[str]:
        return list(self.runner.plan.adapters)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def adapter_of(self, task: str) -> str | None:
        return self.runner.plan.task_adapter.get(task)

    # --- the boundary: a request's inputs -> an Example the runner reads ----------------
    def example(self, task: str, inputs: Inputs) -> Example:
        """Raises LookupError for a task this run does not serve, ValueError for inputs it
        cannot read. A plain text (or word list) is the task's one input field; a tagging
        task reads `tokens` (words, or a sentence split on whitespace) or `text`."""
        spec = self.tasks.get(task)
        if spec is None:
            raise LookupError(f"task {task!r} is not served here; tasks: {', '.join(self.tasks)}")
        inputs = named_inputs(spec, inputs)
        if spec.kind == "tagging":
            words = inputs.get("tokens", inputs.get("text"))
            words = words.split() if isinstance(words, str) else words
            if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
                raise ValueError(f"task {task!r} needs 'tokens' (a list of words or a sentence) or 'text'")
            fields: dict[str, FieldValue] = {"tokens": list(words)}
        else:
            wrong = [f for f in spec.input_fields if not isinstance(inputs.get(f), str)]
            if wrong:
                raise ValueError(f"task {task!r} needs the text field(s) {wrong}")
            fields = {f: inputs[f] for f in spec.input_fields}
        return Example(task=task, uid="serve", inputs=fields, target="", origin=Origin("serve", 0))

    # --- prediction ---------------------------------------------------------------------
    def predict(self, examples: Sequence[Example], *, top_k: int = 5) -> list[Answer]:
        """Answers in request order, `max_batch` requests per forward. Thread-safe."""

        def run() -> list[Answer]:
            answers: list[Answer] = []
            with self._model:
                for i in range(0, len(examples), self.max_batch):
                    chunk = list(examples[i : i + self.max_batch])
                    answers += self._forward(chunk, [top_k] * len(chunk))
            return answers

        return self._thread.call(run)

    def submit(self, example: Example, *, top_k: int = 5) -> Answer:
        """One request from one of many concurrent threads: it waits for the engine's next
        forward, which takes the waiting requests (up to `max_batch`, oldest first)."""
        mine = _Pending(example, top_k, Future())
        with self._queue_lock:
            self._queue.append(mine)
        self._thread.wake()
        return mine.done.result()

    def _forward_queued(self) -> None:
        """On the engine's thread: one forward over the oldest waiting requests."""
        with self._model:
            with self._queue_lock:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                answers = self._forward([p.example for p in batch], [p.top_k for p in batch])
            except Exception as e:  # every caller in the batch hears of it
                for p in batch:
                    p.done.set_exception(e)
            else:
                for p, a in zip(batch, answers):
                    p.done.set_result(a)

    def _forward(self, examples: list[Example], top_ks: list[int]) -> list[Answer]:
        self.running = len(examples)
        try:
            logits = encoder_logits(self.runner, examples)
            return [self._answer(ex, row, k) for ex, row, k in zip(examples, logits, top_ks)]
        finally:
            self.running = 0

    def _answer(self, example: Example, logits: torch.Tensor, top_k: int) -> Answer:
        spec = self.runner.heads[example.task].spec
        pred = decode_encoder(self.runner, spec, logits, example)
        adapter = self.adapter_of(example.task)
        if spec.kind == "sequence":
            probs, idx = logits.float().softmax(-1).topk(min(top_k, len(spec.labels)))  # [k]
            top = tuple((spec.labels[i], p) for i, p in zip(idx.tolist(), probs.tolist()))
            text = label_text(self.tasks[example.task], pred.value)
            return Answer(example.task, adapter, pred.value, text, score=pred.score, top=top)
        words, tags = list(example.inputs["tokens"]), pred.value
        slots = tuple(SlotSpan(slot, " ".join(words[a:b]), a, b) for slot, a, b in bio_spans(tags))
        return Answer(example.task, adapter, tags, slots_text(words, tags), slots=slots)

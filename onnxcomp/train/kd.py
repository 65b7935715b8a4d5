"""Knowledge distillation by training: the student (the twin of the compressed model) learns the
teacher's outputs (the original model, in ONNX Runtime), on unlabeled data.

- Teacher: ONNX Runtime with its optimizations on (thread pool not spinning), outputs cached
  per data batch (up to ``TEACHER_CACHE_BYTES``). Measured on tiny-clip (8 pairs, 2 busy
  cores): ORT 2.6 ms a batch, the frozen twin (no grad) 17 ms, so the twin runs only the student.
- Losses: ``onnxcomp.train.losses`` (chosen from the output kind, or ``loss``), plus hint
  terms on intermediate tensors present with the same shape in both graphs.
- A step reads data batches (in a seeded order, reshuffled every pass over the data) until
  ``batch`` samples are in, accumulating gradients, so inputs of different shapes (PP-OCR lines
  of different widths) need no padding; ``batch = 0``: one data batch a step.
- AdamW (weight decay 1e-4), linear warm-up over the first 5 % of the budget then cosine decay to
  zero, gradients clipped to norm 1. The budget is ``steps`` or ``max_minutes``, whichever ends
  first (``budget.py``): a run the clock stops still warms up and decays.
- Evaluation every ``eval_every`` steps (default: at each tenth of the budget) and at the end:
  the student is written back into ONNX and scored in ONNX Runtime by
  ``measure.compare.Reference`` (lowest over outputs of the mean per-sample cosine to the
  teacher) on the evaluation data (held out), else on the calibration data (then the figure is
  optimistic, and a note says so). The best weights seen are kept; ``patience`` evaluations
  without a gain stop the run.
- Quantized students train with fake quantization (``onnxcomp.train.qat``).
- Checkpoints: ``checkpoint_dir/kd_checkpoint.pt`` after each evaluation (weights, optimizer,
  schedule, data position, best so far); a run finding one that fits the same student resumes
  from its step. A loss that is not finite stops the run and gives back the input weights.
- Budget: ``steps`` and ``max_minutes`` (checked after each step).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from onnxcomp import runtime
from onnxcomp.calibration import Dataset, with_outputs
from onnxcomp.errors import UserError
from onnxcomp.measure.compare import Reference
from onnxcomp.model import Model
from onnxcomp.progress import as_progress
from onnxcomp.train import losses, qat
from onnxcomp.train.budget import Budget
from onnxcomp.train.twin import Twin

TEACHER_CACHE_BYTES = 256 << 20
CHECKPOINT = "kd_checkpoint.pt"
WEIGHT_DECAY = 1e-4
CLIP_NORM = 1.0
# The best weights of a student with more trainable bytes than this wait in a file, not in
# memory (a second copy of them through the run: 0.6 GB for clip-vit-b32 pruned).
BEST_IN_FILE_BYTES = 256 << 20
BEST = "kd_best.pt"


@dataclass(frozen=True)
class Options:
    steps: int = 300
    batch: int = 16
    lr: float = 1e-3
    temperature: float = 1.0
    loss: str = "auto"
    hint_tensors: tuple[str, ...] = ()
    max_minutes: float | None = None
    seed: int = 0
    checkpoint_dir: str | None = None
    device: str = "cpu"
    eval_every: int = 0
    eval_batches: int = 16
    patience: int = 3


@dataclass
class Result:
    model: Model                # the trained student, or the input when the run gave up
    trained: bool               # False: NaN loss, or nothing trainable
    steps: int = 0
    seconds: float = 0.0
    before: float = float("nan")   # evaluation cosine of the input student
    after: float = float("nan")    # of the returned model
    best_step: int = 0
    stopped: str = "steps"      # steps | time | early stop | nan loss
    held_out: bool = True
    losses: list[float] = field(default_factory=list)
    terms: list[str] = field(default_factory=list)
    qat_weights: int = 0
    qat_activations: int = 0
    resumed_from: int | None = None
    notes: list[str] = field(default_factory=list)
    evaluations: int = 0        # scored during training (besides the input's score)
    lr_peak: float = 0.0        # the highest learning rate a step used


def _samples(batch: dict[str, np.ndarray]) -> int:
    first = next(iter(batch.values()))
    return int(first.shape[0]) if np.ndim(first) else 1


class _Teacher:
    """The teacher in ONNX Runtime, its outputs (and hint tensors) cached per data batch."""

    def __init__(self, teacher: Model, names: list[str], data: Dataset):
        extra = [n for n in names if n not in {o.name for o in teacher.graph.output}]
        # (a copy only for hint tensors: one more copy of the weights while it is built)
        self.session = _quiet_session(with_outputs(teacher, extra) if extra else teacher)
        self.names, self.data = names, data
        self.cache: dict[int, dict[str, np.ndarray]] = {}
        self.bytes = 0

    def __call__(self, index: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        batch = self.data.make_batch(index)
        if index in self.cache:
            return batch, self.cache[index]
        values = runtime.run(self.session, batch, self.names)
        size = sum(v.nbytes for v in values.values())
        if self.bytes + size <= TEACHER_CACHE_BYTES:
            self.cache[index] = values
            self.bytes += size
        return batch, values


def _quiet_session(model: Model) -> ort.InferenceSession:
    """ONNX Runtime with its thread pool not spinning between runs: a spinning pool kept the
    two cores busy while torch trained, 2.5 s against 0.8 s for 100 steps of a small MLP."""
    return runtime.session(model, optimize=True, spinning=False)


class _Best:
    """The trainable weights at the best evaluation so far; none kept means the input's own.
    Small ones in memory (and in the checkpoint); large ones in a file: in the checkpoint
    folder when there is one (a resumed run finds them there), else in a temporary one."""

    def __init__(self, twin: Twin, folder: Path | None):
        size = sum(p.numel() * p.element_size() for p in twin.parameters() if p.requires_grad)
        self.in_memory: dict[str, torch.Tensor] | None = None
        self.path: Path | None = None
        self._temporary = None
        if size > BEST_IN_FILE_BYTES:
            if folder is None:
                self._temporary = tempfile.TemporaryDirectory(prefix="onnxcomp-kd-")
                folder = Path(self._temporary.name)
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / BEST

    def keep(self, twin: Twin) -> None:
        if self.path is None:
            self.in_memory = _trainable_state(twin)
            return
        # torch.save writes each tensor's storage as it is: no copy in memory
        tmp = self.path.with_suffix(".tmp")
        torch.save({n: p.detach() for n, p in twin.named_parameters() if p.requires_grad}, tmp)
        tmp.replace(self.path)
        self.in_memory = None

    def restore(self, twin: Twin) -> None:
        if self.in_memory is not None:  # (also a checkpoint written before _Best, resumed)
            twin.load_state_dict(self.in_memory, strict=False)
            return
        twin.load_state_dict(torch.load(self.path, weights_only=True), strict=False)

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()


class _Order:
    """Data batch indices in a seeded order, reshuffled each pass; ``position`` resumes it."""

    def __init__(self, count: int, seed: int, position: int = 0):
        self.count, self.seed, self.position = count, seed, position

    def next(self) -> int:
        epoch, offset = divmod(self.position, self.count)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
        self.position += 1
        return int(order[offset])


def _fingerprint(twin: Twin) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in twin.named_parameters()]


def _device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for, but torch sees no CUDA device")
    return torch.device(name)


def check_hints(teacher: Model, student: Model, hints: tuple[str, ...]) -> None:
    """Hint tensors must be computed by nodes (or be inputs) in both graphs."""
    for model, who in ((teacher, "teacher"), (student, "student")):
        names = {o for n in model.graph.node for o in n.output}
        missing = [h for h in hints if h not in names]
        if missing:
            raise UserError(f"hint tensor(s) {', '.join(map(repr, missing))} not in the {who}")


def train(teacher: Model, student: Model, data: Dataset, options: Options,
          evaluation: Dataset | None = None, progress=None) -> Result:
    """Distill ``teacher`` into ``student`` (same inputs and outputs) on ``data``."""
    started = time.perf_counter()
    bar_owner = as_progress(progress)
    if len(data) == 0:
        raise UserError("distill kd: the calibration data has no batches")
    outputs = [o.name for o in student.graph.output]
    missing = [n for n in outputs if n not in {o.name for o in teacher.graph.output}]
    if missing:
        raise UserError(f"distill kd: the teacher has no output {', '.join(map(repr, missing))}")
    check_hints(teacher, student, options.hint_tensors)
    device = _device(options.device)
    torch.manual_seed(options.seed)
    twin = Twin(student)
    quant = qat.prepare(twin, student)
    twin.to(device)
    params = [p for p in twin.parameters() if p.requires_grad]
    result = Result(student, trained=False, qat_weights=len(quant.sites),
                    qat_activations=len(quant.activations))
    if not params:
        result.notes.append("nothing to train: the student has no trainable float weights")
        return result
    wanted = outputs + list(options.hint_tensors)
    teacher_run = _Teacher(teacher, wanted, data)
    _, first = teacher_run(0)
    terms = losses.choose({n: first[n] for n in outputs}, options.loss)
    result.terms = [t.describe() for t in terms]
    eval_data = evaluation if evaluation is not None and len(evaluation) else data
    result.held_out = eval_data is evaluation
    eval_count = min(options.eval_batches, len(eval_data))
    reference = Reference(teacher, eval_data, eval_count)
    runtime.release_free_memory()  # its session's heap (500 MB for clip-vit-b32)

    def write(source: Twin) -> Model:
        return quant.write_back(student) if quant else source.write_back(student)

    def score() -> float:
        candidate = write(twin)
        if candidate.weight_bytes() <= runtime.FILE_SESSION_BYTES:
            return reference.min_cosine(candidate, eval_count)
        # A large student: its copy goes to a file and is let go before ONNX Runtime reads
        # it, so the copy and the session are not both resident beside the training state.
        with tempfile.TemporaryDirectory(prefix="onnxcomp-kd-") as tmp:
            path = runtime.save_for_session(candidate, Path(tmp))
            del candidate
            runtime.release_free_memory(collect=True)
            value = reference.min_cosine(path, eval_count)
        runtime.release_free_memory()
        return value

    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=WEIGHT_DECAY)
    order = _Order(len(data), options.seed)
    state = {"step": 0, "best": None, "best_step": 0, "stale": 0, "losses": [],
             "progress": 0.0}
    budget = Budget(options.steps, options.max_minutes)
    # The rate for the step after the current one, from the budget's progress (budget.py).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: budget.lr_factor(state["step"] + 1))
    checkpoint = Path(options.checkpoint_dir) / CHECKPOINT if options.checkpoint_dir else None
    best = _Best(twin, checkpoint.parent if checkpoint else None)
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        if saved.get("fingerprint") != _fingerprint(twin):
            raise UserError(f"{checkpoint}: a checkpoint of another student (its weights do "
                            "not match this model's); remove it or name another folder")
        twin.load_state_dict(saved["twin"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        order.position = saved["position"]
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
        # (a checkpoint written before _Best kept the weights in its state)
        best.in_memory = saved.get("best_state", state.pop("best_state", None))
        budget.done, budget.start = state["step"], state.get("progress", 0.0)
        result.before = saved["before"]
        result.resumed_from = state["step"]
    else:
        result.before = score()
        state["best"] = result.before  # with the input's weights: nothing for ``best`` to keep
    result.after = state["best"]
    deadline = started + options.max_minutes * 60 if options.max_minutes else None
    budget.until(deadline)
    with bar_owner.task("distill kd", total=options.steps, unit="step") as bar:
        bar.set(state["step"])
        while state["step"] < options.steps:
            twin.train()
            optimizer.zero_grad(set_to_none=True)
            seen, step_loss = 0, 0.0
            wanted_samples = max(options.batch, 1)
            while seen < wanted_samples:
                batch, target = teacher_run(order.next())
                n = _samples(batch)
                got = twin.run(batch, wanted)
                loss = losses.total(terms, got, {k: torch.as_tensor(v).to(device)
                                                 for k, v in target.items()},
                                    options.temperature, options.hint_tensors)
                share = n / wanted_samples if options.batch > 0 else 1.0
                (loss * share).backward()
                step_loss += float(loss.detach()) * share
                seen += n if options.batch > 0 else wanted_samples
            norm = torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            if not (math.isfinite(step_loss) and math.isfinite(float(norm))):
                return _gave_up(result, student, state["step"] + 1, started, bar_owner)
            result.lr_peak = max(result.lr_peak, optimizer.param_groups[0]["lr"])
            optimizer.step()
            # The gradients are let go now, not at the next step: else they stay resident
            # through an evaluation (a copy of the student and its session).
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            budget.ran()
            scheduler.step()
            state["losses"].append(step_loss)
            # (a checkpoint from before the budget has no progress: from the step share)
            before, state["progress"] = state.get("progress", 0.0), budget.progress(state["step"])
            bar.advance()
            bar.note(f"loss {step_loss:.4g}, eval cosine {state['best']:.4f}")
            out_of_time = deadline is not None and time.perf_counter() > deadline
            due = (state["step"] % options.eval_every == 0 if options.eval_every
                   else budget.crossed(before, state["progress"]))
            if due or state["step"] == options.steps or out_of_time:
                current = score()
                result.evaluations += 1
                if not math.isfinite(current):
                    return _gave_up(result, student, state["step"], started, bar_owner)
                if current > state["best"]:
                    state.update(best=current, best_step=state["step"], stale=0)
                    best.keep(twin)
                else:
                    state["stale"] += 1
                bar.note(f"loss {step_loss:.4g}, eval cosine {current:.4f} "
                         f"(best {state['best']:.4f})")
                if checkpoint is not None:
                    _save(checkpoint, twin, optimizer, scheduler, order, state, result.before,
                          best.in_memory)
                if state["stale"] >= options.patience:
                    result.stopped = "early stop"
                    break
            if out_of_time:
                result.stopped = "time"
                break
    result.trained = state["best_step"] > 0
    if result.trained:
        best.restore(twin)
        result.model = write(twin)
    best.close()
    result.after, result.best_step = state["best"], state["best_step"]
    result.steps, result.losses = state["step"], list(state["losses"])
    result.seconds = time.perf_counter() - started
    if not result.trained:
        result.model = student
    return result


def _trainable_state(twin: Twin) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in twin.named_parameters() if p.requires_grad}


def _save(path: Path, twin, optimizer, scheduler, order: _Order, state: dict, before: float,
          best_state: dict[str, torch.Tensor] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": _fingerprint(twin), "twin": twin.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "position": order.position, "rng": torch.get_rng_state(),
                "state": copy.deepcopy(state), "before": before, "best_state": best_state}, tmp)
    tmp.replace(path)


def _gave_up(result: Result, student: Model, step: int, started: float, progress) -> Result:
    message = (f"distill kd: the loss or its gradients became NaN/inf at step {step}; the "
               "input weights are kept (try a lower lr)")
    progress(message)
    result.model, result.trained, result.stopped = student, False, "nan loss"
    result.steps, result.seconds = step, time.perf_counter() - started
    result.after = result.before
    result.notes.append(message)
    return result

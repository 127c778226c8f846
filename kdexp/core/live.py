"""What a run leaves in its directory while it runs, for ``python -m kdexp.dashboard`` (docs/dashboard.md).

- ``train_log.jsonl``: one JSON line per Trainer log (loss, loss_ce, loss_kd, learning_rate, ...), appended and
  flushed as it is logged, so a run killed mid-training keeps its curve up to its last logged step.
- ``heartbeat.json``: ``{"pid", "host", "time", "step", "status"}``, rewritten by a daemon thread every
  ``interval_s`` seconds while the process lives (also during evaluation and long steps) and on every log.
  ``status`` is "setup", "training", "evaluating", then "complete" once ``results.json`` exists, or "failed" when
  the process exits (an exception, ``sys.exit``, Ctrl-C) without a complete ``results.json``.

The status rule the dashboard applies: a complete ``results.json`` wins; a heartbeat that says "failed" is a failed
run; a fresh heartbeat (younger than the dashboard's stale window, and on this host a live pid) is a running run; any
other heartbeat stopped without an exit being recorded, i.e. the process was killed (SIGKILL, the OOM killer, a lost
node). No separate failure marker is needed.

- ``disagreements.jsonl``: per eval example, the teacher's and the student's top-k next tokens at each gold answer
  token and the per-token KL(p_T‖p_S), written at evaluation time so the dashboard never loads a model.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from kdexp.core.losses import forward_kl
from kdexp.core.models import answer_logits, collate, encode, same_vocabulary

log = logging.getLogger(__name__)
TRAIN_LOG, HEARTBEAT, DISAGREEMENTS = "train_log.jsonl", "heartbeat.json", "disagreements.jsonl"
RESULTS = "results.json"
_LOCK = threading.Lock()
_ACTIVE: dict[Path, Heartbeat] = {}  # run dir -> its heartbeat; a sweep runs many jobs in one process
_WARNED: set[str] = set()


def _json_safe(value):
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON readers (the browser) reject NaN / Infinity
    return value


def _warn_once(message: str) -> None:
    what = message.split(":")[0]  # one warning per file and directory, not one per step
    if what not in _WARNED:
        _WARNED.add(what)
        log.warning("%s", message)


def _complete(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / RESULTS).read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


class Heartbeat:
    """``heartbeat.json`` of one run dir, rewritten by a daemon thread until the run completes or the process ends."""

    def __init__(self, run_dir: Path, interval_s: float = 10.0):
        self.run_dir, self.interval_s = Path(run_dir), interval_s
        self.fields = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "step": 0,
                       "status": "setup"}
        self._lock = threading.Lock()  # the final status must not be overwritten by a timer write in flight
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"kdexp-heartbeat-{self.run_dir.name}", daemon=True)

    def start(self) -> Heartbeat:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            _warn_once(f"heartbeat not written in {self.run_dir}: {err}")
        self.update()
        self._thread.start()
        return self

    def update(self, final: bool = False, **fields) -> None:
        with self._lock:
            if self._stop.is_set() and not final:
                return
            self.fields.update(fields)
            # Write-then-rename: the dashboard never reads a half-written heartbeat.
            tmp = self.run_dir / f".{HEARTBEAT}.{os.getpid()}"
            try:
                tmp.write_text(json.dumps({**self.fields, "time": time.time()}))
                os.replace(tmp, self.run_dir / HEARTBEAT)
            except OSError as err:  # a full disk or a moved directory must not stop training
                _warn_once(f"heartbeat not written in {self.run_dir}: {err}")

    def set_step(self, step: int) -> None:
        self.fields["step"] = step  # the timer writes it: no file I/O per optimizer step

    def close(self) -> None:
        """Final status: "complete" with a complete results.json, else "failed" (the run ended without one)."""
        with self._lock:
            self._stop.set()
        self.update(final=True, status="complete" if _complete(self.run_dir) else "failed")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if _complete(self.run_dir):  # main wrote results.json: nothing left to watch in this run
                self.close()
                return
            self.update()


def beat(run_dir: Path | str, status: str, interval_s: float = 10.0, **fields) -> Heartbeat:
    """Start (or update) the heartbeat of ``run_dir`` in this process. Starting one for a new run dir ends the
    previous run's heartbeat: a sweep runs its jobs one after another in one process."""
    run_dir = Path(run_dir).resolve()
    with _LOCK:
        current = _ACTIVE.get(run_dir)
        if current is None:
            for other in [d for d in _ACTIVE if d != run_dir]:
                _ACTIVE.pop(other).close()
            current = _ACTIVE[run_dir] = Heartbeat(run_dir, interval_s).start()
    current.update(status=status, **fields)
    return current


@atexit.register
def _close_all() -> None:
    with _LOCK:
        for run_dir in list(_ACTIVE):
            _ACTIVE.pop(run_dir).close()


class LiveLog(TrainerCallback):
    """Append every Trainer log to ``<run_dir>/train_log.jsonl`` and keep ``<run_dir>/heartbeat.json`` fresh.

    Create one per run and pass it to every stage's Trainer: ``global_step`` then counts on across stages (each
    stage's Trainer restarts ``step`` at 0). Only the main process writes (``state.is_world_process_zero``).
    """

    def __init__(self, run_dir: Path | str, interval_s: float = 10.0):
        self.run_dir, self.interval_s = Path(run_dir), interval_s
        self.offset, self.last_step = 0, 0
        self.heartbeat: Heartbeat | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.offset += self.last_step  # a later stage: its steps follow the previous stage's
        self.last_step = state.global_step
        self.heartbeat = beat(self.run_dir, "training", self.interval_s, step=self.offset + state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step = state.global_step
        if self.heartbeat is not None:
            self.heartbeat.set_step(self.offset + state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        step = self.offset + state.global_step
        row = {"time": round(time.time(), 3), "step": state.global_step, "global_step": step,
               **{k: _json_safe(v) for k, v in logs.items()}}
        try:
            with open(self.run_dir / TRAIN_LOG, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()  # a killed run keeps every line written so far
        except OSError as err:  # the live curve is a convenience: never stop training for it
            _warn_once(f"{TRAIN_LOG} not written in {self.run_dir}: {err}")
        if self.heartbeat is not None:
            self.heartbeat.update(step=step)

    def on_train_end(self, args, state, control, **kwargs):
        self.last_step = state.global_step
        if self.heartbeat is not None:
            self.heartbeat.update(status="evaluating", step=self.offset + state.global_step)


def callbacks(run_dir: Path | str | None) -> list[TrainerCallback]:
    """The live-logging callbacks for a Trainer of the run in ``run_dir`` (none without a run dir)."""
    return [LiveLog(run_dir)] if run_dir else []


# ---- teacher ↔ student disagreements -------------------------------------------------------------------------

def _top(probs: torch.Tensor, tokenizer, k: int) -> list[dict]:
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return [{"token": tokenizer.decode([i]), "id": i, "prob": round(p, 6)} for p, i in zip(values.tolist(),
                                                                                            ids.tolist(), strict=True)]


@torch.no_grad()
def token_disagreements(student_logits: torch.Tensor, teacher_logits: torch.Tensor, answer_ids, tokenizer,
                        k: int = 5) -> list[dict]:
    """Per answer token (rows of ``(n, vocab)`` logits that predict ``answer_ids``): the token, both models' top-k
    next tokens with probabilities, both models' probability of the token, and KL(p_T‖p_S) at T=1, largest first.

    Teacher and student must share the vocabulary; a head padded past the tokenizer is cut to the common size.
    """
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    student, teacher = student_logits[..., :vocab].float(), teacher_logits[..., :vocab].float()
    kl = forward_kl(student, teacher, temperature=1.0, reduction="none").tolist()
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    rows = []
    for pos, token_id in enumerate(torch.as_tensor(answer_ids).tolist()):
        rows.append({"position": pos, "token": tokenizer.decode([token_id]), "id": token_id, "kl": round(kl[pos], 6),
                     "student_prob": round(float(p_s[pos, token_id]), 6),
                     "teacher_prob": round(float(p_t[pos, token_id]), 6),
                     "student_top": _top(p_s[pos], tokenizer, k), "teacher_top": _top(p_t[pos], tokenizer, k)})
    return sorted(rows, key=lambda r: -r["kl"])


def _logits(model, batch: dict) -> torch.Tensor:
    device = next(model.parameters()).device
    logits, _ = answer_logits(model, {key: v.to(device) for key, v in batch.items()})
    return logits.float().cpu()


@torch.no_grad()
def disagreement_samples(student, teacher, tokenizer, examples, task_cfg, n: int, k: int = 5, batch_size: int = 4,
                         teacher_tokenizer=None) -> list[dict]:
    """The first ``n`` examples with both models teacher-forced on the gold answer: one JSON-able row each (id,
    prompt, gold, answer tokens, :func:`token_disagreements`, the sum and max of the per-token KL), for
    ``disagreements.jsonl``. With different vocabularies the rows carry a note and no tokens."""
    examples = list(examples)[:n]
    base = [{"id": ex.id, "prompt": ex.prompt, "gold": ex.answers} for ex in examples]
    if teacher_tokenizer is not None and not same_vocabulary(tokenizer, teacher_tokenizer):
        return [{**row, "tokens": [], "note": "teacher and student vocabularies differ: no per-token comparison"}
                for row in base]
    feats = encode(examples, tokenizer, task_cfg)
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        for start in range(0, len(feats), batch_size):
            chunk = feats[start:start + batch_size]
            batch = collate(chunk, tokenizer.pad_token_id)
            s_logits, t_logits = _logits(student, batch), _logits(teacher, batch)
            window = batch["labels"].shape[1]
            for row, f in enumerate(chunk):
                span = slice(window - len(f.answer_ids), window)  # answers are right-aligned in the window
                tokens = token_disagreements(s_logits[row, span], t_logits[row, span], f.answer_ids, tokenizer, k)
                base[f.index].update(answer_tokens=[tokenizer.decode([i]) for i in f.answer_ids], tokens=tokens,
                                     kl_sum=round(sum(t["kl"] for t in tokens), 6),
                                     kl_max=max((t["kl"] for t in tokens), default=0.0))
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return base


def write_jsonl(path: Path | str, rows: list[dict]) -> None:
    """Write rows as JSON lines via a temporary file, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, default=_json_safe) + "\n" for r in rows))
    os.replace(tmp, path)

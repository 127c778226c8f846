"""Plan and build the teacher artefacts of a sweep: every run's list from its method's ``teacher_artefacts``,
de-duplicated by content key, the missing ones built in teacher order through the runs' own functions.

Planning loads tokenizers and task data (shared by configs that load the same ones) but no model; building loads
each teacher once, only when one of its artefacts is missing.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kdexp import methods
from kdexp.cache.expand import ConfigError, job_configs
from kdexp.core.artefacts import content_hash, seed_everything
from kdexp.core.models import load_tokenizer, tokenizer_source
from kdexp.core.runner import Context
from kdexp.core.tasks import load_task
from kdexp.core.teacher import teacher_identity, teacher_with_fallback
from kdexp.experiments.preflight import check_environment
from kdexp.methods.artefacts import Artefact

log = logging.getLogger("kdexp.cache")


@dataclass
class Entry:
    """One distinct artefact of the sweep, with the context of the first run that needs it (what builds it)."""

    artefact: Artefact
    ctx: Context
    teacher: str
    runs: int = 1
    status: str = ""
    seconds: float = 0.0


class Contexts:
    """A run's Context without its teacher; configs that load the same tokenizer or task data share the objects."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.tokenizers, self.data = out_dir, {}, {}

    def tokenizer(self, model_cfg):
        key = (tokenizer_source(model_cfg), model_cfg.revision)
        if key not in self.tokenizers:
            self.tokenizers[key] = load_tokenizer(model_cfg)
        return self.tokenizers[key]

    def __call__(self, cfg) -> Context:
        tok = self.tokenizer(cfg.student)
        # As runner.setup: one tokenizer object when both presets name the same source.
        t_tok = tok if tokenizer_source(cfg.teacher) == tokenizer_source(cfg.student) else self.tokenizer(cfg.teacher)
        # The methods with a transfer set hand runner.setup method.unlabeled_samples; the others have no such knob.
        unlabeled = cfg.method.get("unlabeled_samples", 0)
        key = content_hash([OmegaConf.to_container(cfg.task, resolve=True), unlabeled])
        if key not in self.data:
            self.data[key] = load_task(cfg.task, unlabeled_samples=unlabeled)
        return Context(cfg=cfg, out_dir=self.out_dir, run_key="kdexp.cache", tokenizer=tok, teacher_tokenizer=t_tok,
                       data=self.data[key])


def teacher_of(cfg) -> str:
    """What decides which loaded teacher a build can use."""
    return content_hash([teacher_identity(cfg), tokenizer_source(cfg.teacher), cfg.hardware.dtype,
                         cfg.hardware.device])


class Teachers:
    """The loaded teacher, one at a time (the builds come ordered by teacher, so each one loads once)."""

    def __init__(self):
        self.which, self.loaded = None, None

    def attach(self, ctx: Context) -> None:
        if ctx.teacher_loaded:
            return
        cfg = ctx.cfg
        if self.which != teacher_of(cfg):
            self.which, self.loaded = None, None
            gc.collect()
            seed_everything(cfg.seed)  # as main does before a run's first teacher use
            log.info("teacher: loading %s", cfg.teacher.name)
            # Vocabularies were checked when the plan was made; a fallback teacher is checked by the run itself.
            self.loaded = teacher_with_fallback(cfg, ctx.tokenizer, ctx.teacher_tokenizer, ctx.data,
                                                check_vocab=lambda tok, t_tok: None)
            self.which = teacher_of(cfg)
        model, info, ctx.teacher_tokenizer = self.loaded
        ctx.teacher = model
        ctx.teacher_info = {**info, "loaded": True}


def compose_all(overrides: list[str], out_dir: Path) -> list[tuple[list[str], object]]:
    """Every run's config, composed and validated as ``main.run`` validates it, before anything is loaded."""
    jobs = job_configs(overrides, out_dir)
    for i, (job, cfg) in enumerate(jobs):
        try:
            methods.validate(cfg)
            check_environment(cfg)
        except ValueError as err:
            raise ConfigError(f"{err} (run {i}: {' '.join(job)})") from None
    return jobs


def plan(jobs: list, contexts: Contexts) -> list[Entry]:
    """The sweep's distinct artefacts in build order: by teacher, then as the runs list them (dependencies first)."""
    entries: dict[tuple[str, str], Entry] = {}
    for i, (job, cfg) in enumerate(jobs):
        ctx = contexts(cfg)
        try:
            needed = methods.teacher_artefacts(ctx)
        except ValueError as err:
            raise ConfigError(f"{err} (run {i}: {' '.join(job)})") from None
        for artefact in needed:
            found = entries.get((artefact.kind, artefact.key))
            if found is None:
                entries[artefact.kind, artefact.key] = Entry(artefact, ctx, teacher_of(cfg))
            else:
                found.runs += 1
    order = list(dict.fromkeys(e.teacher for e in entries.values()))
    return sorted(entries.values(), key=lambda e: order.index(e.teacher))


def check(entries: list[Entry]) -> None:
    """Mark what is already there (verified as a run's build would verify it)."""
    for e in entries:
        e.status = "exists" if e.artefact.ready() else "missing"


def build(entries: list[Entry]) -> None:
    """Build every missing artefact, under an overall bar (done / total, elapsed, ETA) above the builders' own."""
    teachers = Teachers()
    missing = [e for e in entries if e.status == "missing"]
    for e in entries:
        e.status = "reused" if e.status == "exists" else e.status
    with logging_redirect_tqdm(), tqdm(total=len(entries), initial=len(entries) - len(missing), unit="artefact",
                                       desc="teacher artefacts", position=0) as bar:
        for e in missing:
            bar.set_postfix_str(f"{e.artefact.kind} {e.artefact.key}")
            start = time.perf_counter()
            threads = e.ctx.cfg.hardware.torch_threads
            previous = torch.get_num_threads()
            if threads:  # the run's thread count: a prepared teacher's bits depend on it (docs/design.md)
                torch.set_num_threads(threads)
            try:
                built = _build_one(e, teachers)
            finally:
                torch.set_num_threads(previous)
            e.status, e.seconds = ("built" if built else "reused"), time.perf_counter() - start
            bar.update(1)


def _build_one(e: Entry, teachers: Teachers) -> bool:
    if e.artefact.ready():  # a concurrent run built it since the plan was made
        return False
    teachers.attach(e.ctx)
    built, path = e.artefact.build()
    if e.artefact.path is None:  # a provisional key: now the real one
        e.artefact.path, e.artefact.key = path, path.stem
    return built


def summary(entries: list[Entry]) -> list[str]:
    """One line per artefact: kind, key, what happened, seconds, how many runs need it, where it is."""
    lines = []
    for e in entries:
        a = e.artefact
        where = str(a.path) if a.path is not None else f"(key known once teacher answers {a.after} exist)"
        lines.append(f"{a.kind:<16} {a.key:<16} {e.status:<7} {e.seconds:7.1f}s  {e.runs:>3} run(s)  {where}")
    return lines


def run(overrides: list[str], dry_run: bool = False) -> list[Entry]:
    """Compose and validate every run of the sweep, plan its artefacts, build the missing ones (not with dry_run)."""
    with tempfile.TemporaryDirectory(prefix="kdexp-cache-") as tmp:
        jobs = compose_all(overrides, Path(tmp))
        log.info("%d run(s) composed and validated; listing what they need from the teacher", len(jobs))
        entries = plan(jobs, Contexts(Path(tmp)))
        check(entries)
        todo = sum(e.status == "missing" for e in entries)
        log.info("%d distinct teacher artefact(s) for %d run(s): %d to build", len(entries), len(jobs), todo)
        if not dry_run:
            build(entries)
    return entries

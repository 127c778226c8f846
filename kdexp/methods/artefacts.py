"""What a run needs from the teacher, named before any model loads: the content-addressed artefacts of
docs/teacher_cache.md, each with its key, its path, a readiness check and a build through the run's own function.

Each method module lists its own in ``teacher_artefacts(ctx)`` (``kdexp.methods.teacher_artefacts`` dispatches);
``python -m kdexp.cache build`` (docs/sweeps_and_report.md) de-duplicates them over a sweep and builds the missing
ones, so the sweep's runs find them all and never load the teacher. ``ctx`` is a :class:`kdexp.core.runner.Context`
with tokenizers and data and, only while something is built, the loaded teacher.

The readiness checks are those ``build_once`` applies under its lock (checksums, meta, layout), without the lock and
without the warning: an artefact that fails one is what a run would rebuild.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path

from kdexp.core.answers import answers_meta, check_digest, decoding_spec, read_answers, teacher_answers
from kdexp.core.artefacts import content_hash
from kdexp.core.models import same_vocabulary
from kdexp.core.runner import Context
from kdexp.core.teacher import teacher_key
from kdexp.core.teacher import unverified_reason as teacher_unverified
from kdexp.core.teacher_cache import CacheInvalid, Layout, open_teacher_cache
from kdexp.core.teacher_eval import eval_meta, teacher_evaluation
from kdexp.core.teacher_eval import unverified_reason as eval_unverified

TEACHER, ANSWERS, CACHE, EVALUATION = "prepared teacher", "teacher answers", "teacher cache", "teacher eval"


@dataclass
class Artefact:
    """One content-addressed artefact. ``build()`` makes it through the function a run calls (so under the same
    lock, into the same path, with the same bytes) and returns (built here, its path); it needs ``ctx.teacher``."""

    kind: str
    key: str
    path: Path | None
    ready: Callable[[], bool]
    build: Callable[[], tuple[bool, Path]]
    # The key of the artefact this one's key waits for (a logit cache's inputs hold the teacher's answers): ``key``
    # is then provisional, equal for every config whose final key will be equal, and ``path`` is None.
    after: str | None = None


def prepared_teacher(ctx: Context) -> list[Artefact]:
    """``teachers/<key>/`` when the config prepares its teacher (none for a hub or random-weights teacher)."""
    cfg = ctx.cfg
    if not cfg.teacher.prepare.enabled:
        return []
    key = teacher_key(cfg)
    path = Path(cfg.cache_dir) / "teachers" / key

    def build() -> tuple[bool, Path]:
        ctx.teacher  # noqa: B018 -- loading prepares it (build_once under the teacher's lock)
        return not ctx.teacher_info.get("reused", True), path

    return [Artefact(TEACHER, key, path, lambda: path.is_dir() and teacher_unverified(path) is None, build)]


def answers(ctx: Context, examples: list, spec: dict) -> Artefact:
    """``answers/<key>.jsonl``: the teacher's answers to ``examples`` under the decoding ``spec``."""
    cfg = ctx.cfg
    key = content_hash(answers_meta(cfg, examples, spec))
    path = Path(cfg.cache_dir) / "answers" / f"{key}.jsonl"

    def ready() -> bool:
        try:
            read_answers(path, examples)
            check_digest(path)
        except ValueError:
            return False
        return True

    def build() -> tuple[bool, Path]:
        _, info = teacher_answers(ctx, examples, spec)
        return not info["reused"], path

    return Artefact(ANSWERS, key, path, lambda: path.is_file() and ready(), build)


def transfer_answers(ctx: Context) -> Artefact | None:
    """The teacher's labels for the unlabelled transfer set (KD1 and the methods that train on its features)."""
    return answers(ctx, ctx.data.unlabeled, decoding_spec(ctx.cfg.task)) if ctx.data.unlabeled else None


def evaluation(ctx: Context) -> list[Artefact]:
    """``teacher_eval/<key>/`` when the run scores its teacher (``eval_teacher``)."""
    cfg = ctx.cfg
    if not cfg.eval_teacher:
        return []
    meta = eval_meta(cfg, ctx.data.eval, same_vocabulary(ctx.tokenizer, ctx.teacher_tokenizer))
    key = content_hash(meta)
    path = Path(cfg.cache_dir) / "teacher_eval" / key

    def build() -> tuple[bool, Path]:
        return not teacher_evaluation(ctx, ctx.data.eval).reused, path

    return [Artefact(EVALUATION, key, path, lambda: path.is_dir() and eval_unverified(path, meta) is None, build)]


def teacher_cache_ready(path: Path, meta: dict, n_examples: int, layout: Layout) -> bool:
    """Whether ``load_or_build_teacher_cache`` would reuse ``path``: it verifies, its meta and layout match."""
    if not path.is_file():
        return False
    try:
        cache = open_teacher_cache(path, expected_meta=meta)
    except CacheInvalid:
        return False
    try:
        return (cache.n_examples, *astuple(cache.layout)) == (n_examples, *astuple(layout))
    finally:
        cache.close()


def teacher_cache(key_material: Callable[[list[str] | None], tuple[dict, Path, Callable[[], bool]]],
                  build: Callable[[list[str] | None], None], ctx: Context, needs: Artefact | None) -> Artefact:
    """A logit cache whose inputs include the answers of ``needs`` (None: no transfer set).

    ``key_material(answers)`` gives (meta, path, ready) for the answers it is handed (None when the transfer set is
    empty); ``build(answers)`` builds through the run's own function. While ``needs`` is not built, the key is a
    provisional hash of the cache's meta without the transfer set, and of the answers' key.
    """
    def current() -> list[str] | None:
        return read_answers(needs.path, ctx.data.unlabeled) if needs is not None else None

    def built() -> tuple[bool, Path]:
        answers_now = current()
        _, path, ready = key_material(answers_now)
        if ready():
            return False, path
        build(answers_now)
        return True, path

    if needs is None or needs.ready():
        meta, path, ready = key_material(current())
        return Artefact(CACHE, content_hash(meta), path, ready, built)
    labelled_only, _, _ = key_material(None)
    key = content_hash({"cache without the transfer set": labelled_only, "answers": needs.key})
    return Artefact(CACHE, key, None, lambda: False, built, after=needs.key)


def with_teacher(ctx: Context, *needed: Artefact | None) -> list[Artefact]:
    """The prepared teacher first (everything else is built from it), then ``needed``, then the evaluation."""
    return [*prepared_teacher(ctx), *(a for a in needed if a is not None), *evaluation(ctx)]


def for_teacher_eval(ctx: Context) -> list[Artefact]:
    """Methods whose only use of the teacher is scoring it (B0, eval): with ``eval_teacher`` the prepared teacher
    and its evaluation; else none."""
    return with_teacher(ctx) if ctx.cfg.eval_teacher else []


def for_online_kd(ctx: Context) -> list[Artefact]:
    """Methods that train on KD1's features with the teacher online (KD3, KD4): the prepared teacher, the transfer
    set's answers, the evaluation."""
    return with_teacher(ctx, transfer_answers(ctx))

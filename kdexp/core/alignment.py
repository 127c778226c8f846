"""Aligning the answer tokens of two tokenizations of the same text (teacher and student vocabularies differ).

An alignment is a list of spans ``(s0, s1, t0, t1)``: student answer tokens ``[s0, s1)`` and teacher answer tokens
``[t0, t1)`` are compared as one unit by the cross-tokenizer loss (kdexp/core/uld.py). Indices count answer tokens
from the answer's first token. Two modes (``method.alignment``, docs/cross_tokenizer.md):

- ``truncate`` (ULD, Boizard et al. 2024): position i with position i, for i < min(n_student, n_teacher). Free, and
  exact when both sides split the answer into the same number of pieces (SST-2's label words, one token each in
  both vocabularies); otherwise later positions compare distributions over different pieces of text.
- ``offsets`` (GOLD-style): cut both token sequences only where both have a token ending at the same character
  offset, so that each span covers the same text on both sides (``return_offsets_mapping`` of a fast tokenizer). A
  span of several tokens is later scored as one joint event. Right whenever the texts split differently (SQuAD
  answers, rare words, non-ASCII); costs one offsets pass per example.
"""

from __future__ import annotations

import torch

ALIGNMENTS = ("truncate", "offsets")
Span = tuple[int, int, int, int]


def truncate_spans(n_student: int, n_teacher: int) -> list[Span]:
    """Position i ↔ position i, truncated to the shorter sequence (the ULD paper's alignment)."""
    return [(i, i + 1, i, i + 1) for i in range(min(n_student, n_teacher))]


def _cuts(ends: list[int], common: set[int]) -> list[int]:
    # Byte-level BPE splits a multi-byte character over tokens that all report the character's end offset: cut only
    # after the last of them, never inside a character.
    return [i + 1 for i, e in enumerate(ends) if e in common and (i + 1 == len(ends) or ends[i + 1] > e)]


def offset_spans(student_offsets: list[tuple[int, int]], teacher_offsets: list[tuple[int, int]]) -> list[Span]:
    """Spans covering the same characters on both sides, from each token's ``(start, end)`` character offsets.

    A span ends where both sequences have a token boundary at the same character; tokens after the last common
    boundary (a truncated answer) are dropped, so every returned span's two texts are equal.
    """
    s_ends, t_ends = [e for _, e in student_offsets], [e for _, e in teacher_offsets]
    common = set(s_ends) & set(t_ends)
    s_cuts, t_cuts = _cuts(s_ends, common), _cuts(t_ends, common)
    by_end_t = {t_ends[c - 1]: c for c in t_cuts}
    spans, s_prev, t_prev = [], 0, 0
    for c in s_cuts:
        t_c = by_end_t.get(s_ends[c - 1])
        if t_c is None:
            continue
        spans.append((s_prev, c, t_prev, t_c))
        s_prev, t_prev = c, t_c
    return spans


def answer_spans(text: str, student_tok, teacher_tok, n_student: int, n_teacher: int, mode: str,
                 eos: bool = False) -> list[Span]:
    """The alignment of one answer whose token sequences (as :func:`kdexp.core.models.encode` made them, possibly
    truncated, ``eos`` appended on both sides) have ``n_student`` / ``n_teacher`` tokens."""
    if mode not in ALIGNMENTS:
        raise ValueError(f"method.alignment={mode!r} must be one of {', '.join(ALIGNMENTS)}")
    if mode == "truncate":
        return truncate_spans(n_student, n_teacher)
    text_s, text_t = n_student - int(eos), n_teacher - int(eos)  # tokens of text, the EOS excluded
    s_off = student_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][:text_s]
    t_off = teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][:text_t]
    spans = offset_spans(s_off, t_off)
    full = spans and spans[-1][1] == text_s and spans[-1][3] == text_t
    if eos and full:  # EOS is the same event on both sides once all the text has been aligned
        spans.append((text_s, n_student, text_t, n_teacher))
    return spans


def span_index(spans_per_row: list[list[Span]], n_student: list[int], n_teacher: list[int], window_s: int,
               window_t: int) -> dict[str, torch.Tensor]:
    """Flatten one batch's spans into index tensors over the ``(B·window)`` answer slots of each side.

    Answers are right-aligned in their window (kdexp.core.models.collate), so answer token j of row b is slot
    ``b·window + window − n_b + j``. Returns, per side x in (s, t): ``x_first`` (K,) the slot whose full
    distribution represents span k, and ``x_rest`` / ``x_rest_span`` (R,) the span's other slots and their span.
    """
    out = {k: [] for k in ("s_first", "t_first", "s_rest", "s_rest_span", "t_rest", "t_rest_span")}
    k = 0
    for b, spans in enumerate(spans_per_row):
        base_s, base_t = b * window_s + window_s - n_student[b], b * window_t + window_t - n_teacher[b]
        for s0, s1, t0, t1 in spans:
            for side, base, lo, hi in (("s", base_s, s0, s1), ("t", base_t, t0, t1)):
                out[f"{side}_first"].append(base + lo)
                out[f"{side}_rest"] += range(base + lo + 1, base + hi)
                out[f"{side}_rest_span"] += [k] * (hi - lo - 1)
            k += 1
    return {name: torch.tensor(v, dtype=torch.long) for name, v in out.items()}

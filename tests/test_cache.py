import multiprocessing as mp
import os
import pickle
import random

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdexp.core.cache_fidelity import cached_forward_kl_error_report
from kdexp.core.teacher_cache import (
    CacheInvalid,
    build_teacher_cache,
    collate_cache_rows,
    load_or_build_teacher_cache,
    open_teacher_cache,
    reconstruct_teacher_probs,
    rows_from_logits,
    tail_entropy_correction,
    teacher_logits_from_cache,
)

TEMPERATURES = (0.5, 1, 2, 4, 8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def peaked_logits(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g) * 3
    z[:, torch.randint(vocab, (3,), generator=g)] += 8
    return z


def zipf_logits(n, vocab, seed=0):
    # A trained LM's sorted log-probs fall roughly like -alpha*log(rank) (Zipf). alpha in [1.3, 1.9] puts 90-97% of
    # the T=1 mass in the top 64 but only ~25-35% at T=2, what was measured on a trained tiny teacher. Ids get
    # ranks with a frequency bias (low BPE ids are frequent merges); every other row has a dominant answer token.
    g = torch.Generator().manual_seed(seed)
    log_rank = torch.arange(1, vocab + 1, dtype=torch.float64).log().float()
    log_freq = -torch.log(torch.arange(vocab, dtype=torch.float32) + 20)
    out = torch.empty(n, vocab)
    for i in range(n):
        profile = -(1.3 + 0.6 * torch.rand((), generator=g)) * log_rank + 0.5 * torch.randn(vocab, generator=g)
        profile[0] += 4.0 * (i % 2)
        gumbel = -torch.log(-torch.log(torch.rand(vocab, generator=g).clamp_min(1e-12)))
        out[i, torch.argsort(log_freq + 3 * gumbel, descending=True)] = profile + 3 * torch.randn((), generator=g)
    return out


def example_rows(n_examples, vocab, seed=0, max_tokens=4):
    rng = random.Random(seed)
    lengths = [rng.randint(1, max_tokens) for _ in range(n_examples)]
    return {i: peaked_logits(n, vocab, seed * 1000 + i) for i, n in enumerate(lengths)}


def shuffled(rows, seed=0):
    items = list(rows.items())
    random.Random(seed).shuffle(items)
    return items


def build(path, rows, vocab, **kw):
    kw = {"top_k": 16, "meta": {"teacher": "t"}, "progress": False, **kw}
    return build_teacher_cache(path, shuffled(rows), n_examples=len(rows), vocab_size=vocab, **kw)

def _files(folder) -> list[str]:
    """What a cache folder holds besides the lock files (which filelock leaves in place by design)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))



@pytest.mark.parametrize(("vocab", "compression", "bits"),
                         [(5000, "lzf", 13), (5000, "gzip", 13), (5000, None, 13), (70000, "lzf", 17),
                          (200, "lzf", 8)])
def test_round_trip_exact_topk_and_bit_packed_ids(tmp_path, vocab, compression, bits):
    rows = example_rows(7, vocab)
    path = build(tmp_path / "c.h5", rows, vocab, compression=compression, meta={"teacher": "t", "k": 16})
    with h5py.File(path, "r", locking=False) as f:
        # ceil(log2 V) bits per id: 16 ids at 13 bits are 26 bytes, not uint16's 32
        assert f["topk_ids"].dtype == np.uint8 and f["topk_ids"].shape[1] == (16 * bits + 7) // 8
        assert f.attrs["id_bits"] == bits and f["topk_logits"].dtype == np.float16
        assert f["topk_ids"].compression == compression
    cache = open_teacher_cache(path, expected_meta={"k": 16, "teacher": "t"})
    assert (len(cache), cache.vocab_size, cache.top_k, cache.meta) == (7, vocab, 16, {"teacher": "t", "k": 16})
    for i, logits in rows.items():
        got = cache[i]
        vals, ids = torch.topk(logits - logits.max(-1, keepdim=True).values, 16)
        assert torch.equal(got["topk_ids"], ids) and got["topk_ids"].dtype == torch.int64
        assert torch.equal(got["topk_logits"], vals.half().float())
        assert got["tail"].dtype == torch.float32 and got["tail"].shape[:2] == (len(logits), 3)
    with pytest.raises(IndexError):
        cache[7]
    clone = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker gets: reopens lazily
    assert torch.equal(clone[3]["topk_ids"], cache[3]["topk_ids"])
    cache.close()
    clone.close()


def test_top_k_larger_than_vocab_names_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"method\.top_k=20 exceeds the teacher vocabulary size 10"):
        build(tmp_path / "c.h5", {0: torch.randn(1, 10)}, 10, top_k=20)
    assert not _files(tmp_path)


def test_bad_rows_are_rejected_and_leave_no_file(tmp_path):
    with pytest.raises(ValueError, match="repeated"):
        build_teacher_cache(tmp_path / "c.h5", [(0, torch.randn(1, 50)), (0, torch.randn(1, 50))], n_examples=2,
                            vocab_size=50, top_k=4, meta={}, progress=False)
    with pytest.raises(ValueError, match="never came"):
        build_teacher_cache(tmp_path / "c.h5", [(1, torch.randn(1, 50))], n_examples=2, vocab_size=50, top_k=4,
                            meta={}, progress=False)
    assert not _files(tmp_path)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_reconstruction_keeps_topk_probs_and_tail_mass(temperature):
    vocab, k = 20000, 64
    logits = zipf_logits(24, vocab, seed=1)
    rows = rows_from_logits(logits, k)
    p_hat = reconstruct_teacher_probs(rows, vocab, temperature).double()
    assert torch.allclose(p_hat.sum(-1), torch.ones(24, dtype=torch.float64), atol=1e-5)
    ids = rows["topk_ids"]
    # Reference = the true distribution once the top-k logits are rounded to fp16 as stored: isolates the tail summary.
    z = logits.double() - logits.double().max(-1, keepdim=True).values
    p_ref = torch.softmax(z.scatter(-1, ids, rows["topk_logits"].double()) / temperature, -1)
    top_rel = (p_hat.gather(-1, ids) / p_ref.gather(-1, ids) - 1).abs().max()
    mass, mass_ref = p_hat.scatter(-1, ids, 0).sum(-1), p_ref.scatter(-1, ids, 0).sum(-1)
    assert top_rel < 2.5e-3  # documented: the Gaussian bin model + fp16 summary, ~1e-3 of the tail log-partition
    assert ((mass - mass_ref).abs() / mass_ref).max() < (2.5e-3 if temperature != 0.5 else 1e-2)
    # Against the unrounded truth the fp16 top-k logits dominate: |dz| <= 2^-11 |z| for the kept logits.
    p_true = torch.softmax(z / temperature, -1)
    assert (p_hat.gather(-1, ids) / p_true.gather(-1, ids) - 1).abs().max() < 0.012 / temperature + 2.5e-3
    # Tail ids share one probability.
    tail = p_hat.scatter(-1, ids, float("nan"))
    assert torch.allclose(tail.nan_to_num(0).amax(-1), tail.nan_to_num(1).amin(-1), rtol=1e-4)

    corr = tail_entropy_correction(rows, temperature).double()
    plogp = lambda p: (p * p.clamp_min(1e-300).log()).scatter(-1, ids, 0).sum(-1)  # noqa: E731
    assert (corr - (plogp(p_ref) - plogp(p_hat))).abs().max() < 5e-3
    assert (corr >= 0).all()


def test_exactly_uniform_tail_is_reconstructed_exactly():
    vocab, k = 3000, 32
    logits = torch.full((5, vocab), -6.0)
    logits[:, :k] = torch.linspace(0, -4, k)
    student = torch.randn(5, vocab)
    errors = cached_forward_kl_error_report(logits, student, top_k=k, temperatures=TEMPERATURES)
    assert max(errors.values()) < 2e-4, errors


def test_forward_kl_error_report_bounds():
    vocab, k = 20000, 64
    teacher = zipf_logits(48, vocab, seed=2)
    g = torch.Generator().manual_seed(3)
    independent = {"randn": torch.randn(48, vocab, generator=g), "zipf": zipf_logits(48, vocab, seed=4)}
    # Measured (V=20000): randn <= 0.002 nats, independent Zipf model <= 0.03 (T=2 is the worst).
    for name, bound in (("randn", 0.01), ("zipf", 0.05)):
        errors = cached_forward_kl_error_report(teacher, independent[name], top_k=k)
        assert set(errors) == {"1", "2", "4"} and max(errors.values()) < bound, (name, errors)
    # A student close to the teacher shares its tail shape, which the uniform tail discards: the cross term
    # sum_tail (p - p_hat) log q is ~0.2-1 nats here (docs/teacher_cache.md). We pin the bound actually achieved.
    close = teacher + 0.5 * torch.randn(teacher.shape, generator=g)
    errors = cached_forward_kl_error_report(teacher, close, top_k=k)
    assert max(errors.values()) < 1.5 and errors["1"] > 0.05, errors


def test_collate_right_aligns_and_masks():
    vocab, k, window = 300, 8, 5
    rows = [rows_from_logits(peaked_logits(n, vocab, n), k) for n in (1, 3, 5)]
    batch = collate_cache_rows(rows, window)
    assert batch["cache_mask"].tolist() == [[False] * 4 + [True], [False] * 2 + [True] * 3, [True] * 5]
    assert batch["topk_logits"].shape == (3, window, k) and batch["tail"].shape[:3] == (3, window, 3)
    for b, row in enumerate(rows):
        n = len(row["topk_ids"])
        for name in ("topk_logits", "topk_ids", "tail"):
            assert torch.equal(batch[name][b, window - n:], row[name])
            assert not batch[name][b, :window - n].any()
    z = teacher_logits_from_cache(batch, vocab, 2.0)
    assert z.shape == (3, window, vocab) and torch.isfinite(z).all()
    assert not z[~batch["cache_mask"]].any()
    assert torch.allclose(torch.softmax(z[1, 2:] / 2, -1), reconstruct_teacher_probs(rows[1], vocab, 2.0))
    assert not tail_entropy_correction(batch, 2.0)[~batch["cache_mask"]].any()
    with pytest.raises(ValueError, match="window is 2"):
        collate_cache_rows(rows, 2)


def test_crashed_writer_temp_file_is_never_valid(tmp_path):
    path = tmp_path / "c.h5"
    crashed = tmp_path / f".{path.name}.tmp-999-deadbeef"
    with h5py.File(crashed, "w") as f:  # what a writer killed before setting complete leaves behind
        f.create_dataset("topk_logits", data=np.zeros((1, 4), np.float16))
    with pytest.raises(CacheInvalid, match="incomplete"):
        open_teacher_cache(crashed)
    os.link(crashed, path)  # even if it somehow lands at the final path
    with pytest.raises(CacheInvalid, match="incomplete"):
        open_teacher_cache(path)
    rows = example_rows(3, 100)
    with pytest.warns(UserWarning, match="rebuilding teacher cache"):
        cache = load_or_build_teacher_cache(path, lambda: shuffled(rows), n_examples=3, vocab_size=100, top_k=4,
                                            compression="lzf", meta={"a": 1})
    assert torch.equal(cache[2]["topk_ids"], torch.topk(rows[2], 4).indices)


def test_missing_file_is_built_quietly_then_reused(tmp_path, recwarn):
    path, calls = tmp_path / "sub" / "c.h5", []
    rows = example_rows(4, 100)

    def make_rows():
        calls.append(1)
        return shuffled(rows)

    kw = {"n_examples": 4, "vocab_size": 100, "top_k": 4, "compression": "gzip", "meta": {"a": 1}}
    with pytest.raises(CacheInvalid, match="does not exist"):
        open_teacher_cache(path)
    load_or_build_teacher_cache(path, make_rows, **kw)
    load_or_build_teacher_cache(path, make_rows, **kw)
    assert len(calls) == 1 and not recwarn.list
    assert _files(path.parent) == ["c.h5"]  # no temp file left behind



def test_sampling_knobs_do_not_rebuild_a_cache_without_draws(tmp_path, recwarn):
    # head_uniform stores no draws: a sweep over cache_seed / cache_sample_temperature must reuse its one file.
    path, calls = tmp_path / "c.h5", []
    rows = example_rows(4, 100)

    def make_rows():
        calls.append(1)
        return shuffled(rows)

    kw = {"n_examples": 4, "vocab_size": 100, "top_k": 4, "compression": "lzf", "meta": {"a": 1}}
    load_or_build_teacher_cache(path, make_rows, **kw, samples=0, sample_temperature=2.0, sample_seed=0)
    load_or_build_teacher_cache(path, make_rows, **kw, samples=0, sample_temperature=1.0, sample_seed=7)
    assert len(calls) == 1 and not recwarn.list
    load_or_build_teacher_cache(path, make_rows, **kw, samples=3, sample_temperature=1.0, sample_seed=7)
    assert len(calls) == 2  # with draws the knobs do change the stored numbers

def test_truncated_file_is_invalid_and_rebuilt(tmp_path):
    rows = example_rows(40, 2000, max_tokens=8)
    path = build(tmp_path / "c.h5", rows, 2000)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CacheInvalid, match="unreadable") as err:
        open_teacher_cache(path)
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="rebuilding teacher cache"):
        cache = load_or_build_teacher_cache(path, lambda: shuffled(rows), n_examples=40, vocab_size=2000, top_k=16,
                                            compression="lzf", meta={"teacher": "t"})
    assert path.stat().st_size == size and len(cache) == 40


def test_meta_mismatch_names_keys_and_rebuilds(tmp_path):
    rows = example_rows(3, 100)
    path = build(tmp_path / "c.h5", rows, 100, top_k=4, meta={"teacher": "a", "split": "train", "k": 4})
    with pytest.raises(CacheInvalid, match=r"meta differs in: split, teacher"):
        open_teacher_cache(path, expected_meta={"teacher": "b", "split": "val", "k": 4})
    new_rows = example_rows(3, 100, seed=5)
    with pytest.warns(UserWarning, match="split, teacher"):
        cache = load_or_build_teacher_cache(path, lambda: shuffled(new_rows), n_examples=3, vocab_size=100, top_k=4,
                                            compression=None, meta={"teacher": "b", "split": "val", "k": 4})
    assert cache.meta["teacher"] == "b"
    assert torch.equal(cache[1]["topk_ids"], torch.topk(new_rows[1], 4).indices)
    # Same meta but other shapes (e.g. a different k) is not reused either.
    with pytest.warns(UserWarning, match="top_k"):
        cache = load_or_build_teacher_cache(path, lambda: shuffled(new_rows), n_examples=3, vocab_size=100, top_k=6,
                                            compression=None, meta={"teacher": "b", "split": "val", "k": 4})
    assert cache.top_k == 6


def test_second_builder_with_same_meta_keeps_the_first_file(tmp_path):
    first, second = example_rows(3, 100, seed=1), example_rows(3, 100, seed=2)
    path = build(tmp_path / "c.h5", first, 100, top_k=4)
    build(tmp_path / "c.h5", second, 100, top_k=4)  # a loser of a race: the winner's file stands
    assert torch.equal(open_teacher_cache(path)[0]["topk_ids"], torch.topk(first[0], 4).indices)
    build(tmp_path / "c.h5", second, 100, top_k=4, meta={"teacher": "other"})  # a different config replaces it
    assert torch.equal(open_teacher_cache(path)[0]["topk_ids"], torch.topk(second[0], 4).indices)
    assert _files(tmp_path) == ["c.h5"]


def _race_builder(path, barrier, queue):
    rows = example_rows(30, 3000, seed=9, max_tokens=6)
    barrier.wait()
    try:
        cache = load_or_build_teacher_cache(path, lambda: shuffled(rows), n_examples=30, vocab_size=3000, top_k=16,
                                            compression="lzf", meta={"teacher": "t"})
        queue.put(("ok", cache[7]["topk_ids"].tolist()))
    except Exception as e:  # reported to the parent, which fails the test
        queue.put(("error", repr(e)))


def test_two_concurrent_builders_end_with_one_valid_file(tmp_path):
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pool can deadlock
    barrier, queue, path = ctx.Barrier(2), ctx.Queue(), str(tmp_path / "c.h5")
    procs = [ctx.Process(target=_race_builder, args=(path, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=300)
    expected = torch.topk(example_rows(30, 3000, seed=9, max_tokens=6)[7], 16).indices.tolist()
    assert results == [("ok", expected)] * 2
    assert _files(tmp_path) == ["c.h5"]
    assert torch.equal(open_teacher_cache(path, expected_meta={"teacher": "t"})[7]["topk_ids"], torch.tensor(expected))


def test_effective_logits_feed_a_float32_log_softmax_like_online_logits():
    vocab, k, t = 20000, 64, 2.0
    teacher = zipf_logits(8, vocab, seed=6)
    rows = rows_from_logits(teacher, k)
    z = teacher_logits_from_cache(rows, vocab, t)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    logp_hat, logp = F.log_softmax(z / t, -1), F.log_softmax(teacher / t, -1)  # what kdexp.core.losses does
    ids = rows["topk_ids"]
    # The top-k + one-tail-bucket distribution is right; the shape inside the tail is what the cache drops.
    coarse = lambda lp: torch.cat([lp.gather(-1, ids).exp(), 1 - lp.gather(-1, ids).exp().sum(-1, keepdim=True)], -1)  # noqa: E731
    assert 0.5 * (coarse(logp_hat) - coarse(logp)).abs().sum(-1).max() < 5e-3
    assert torch.allclose(logp_hat.exp(), reconstruct_teacher_probs(rows, vocab, t), rtol=1e-3, atol=1e-9)


def test_bf16_logits_and_no_tail_edge_case(tmp_path):
    logits = peaked_logits(3, 40, 0)
    rows = rows_from_logits(logits.bfloat16(), 8)
    assert torch.equal(rows["topk_ids"], torch.topk(logits.bfloat16().float(), 8).indices)
    full = rows_from_logits(logits, 40)  # top_k == vocab: no tail at all, the reconstruction is the softmax itself
    assert full["tail"].shape == (3, 3, 0) and not tail_entropy_correction(full, 2.0).any()
    assert torch.allclose(reconstruct_teacher_probs(full, 40, 2.0), torch.softmax(logits / 2, -1), atol=1e-3)

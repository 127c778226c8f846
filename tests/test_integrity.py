"""Nothing corrupt is ever used: a damaged logit cache, prepared teacher or answers file is detected when opened,
rebuilt with a warning, and what comes back equals a fresh build (issue 11)."""

import json
import logging
import os
import random
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from kdexp.core import answers as answers_service
from kdexp.core import teacher as teacher_mod
from kdexp.core.models import load_tokenizer
from kdexp.core.tasks import load_task
from kdexp.core.teacher_cache import CacheInvalid, build_teacher_cache, load_or_build_teacher_cache, open_teacher_cache
from kdexp.main import run
from tests.conftest import SMOKE, assert_same_student, compose_cfg, results

DATASETS = ("topk_logits", "topk_ids", "tail", "row_start", "row_count")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- teacher logit cache ------------------------------------------------------------------------------------------

def cache_rows(n_examples=300, vocab=2000, seed=0):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    return {i: torch.randn(rng.randint(1, 8), vocab, generator=g) * 3 for i in range(n_examples)}


def cache_kw(rows, vocab=2000):
    return {"n_examples": len(rows), "vocab_size": vocab, "top_k": 16, "compression": "lzf", "meta": {"t": 1}}


def write_cache(path, rows, vocab=2000):
    return build_teacher_cache(path, list(rows.items()), progress=False, **cache_kw(rows, vocab))


def contents(path) -> dict:
    with h5py.File(path, "r", locking=False) as f:
        return {name: f[name][:] for name in DATASETS} | {"attrs": {k: str(v) for k, v in f.attrs.items()}}


def assert_same_contents(a, b) -> None:
    ca, cb = contents(a), contents(b)
    assert ca["attrs"] == cb["attrs"]
    assert all(np.array_equal(ca[name], cb[name]) for name in DATASETS)


def flip(path, offset: int, mask: int = 0x01, n: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(n))
        f.seek(offset)
        f.write(bytes(byte ^ mask for byte in data))


def chunk_offsets(path, name) -> list[int]:
    """File offsets of the middle byte of each stored chunk of one dataset."""
    with h5py.File(path, "r", locking=False) as f:
        ds = f[name]
        infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    return [info.byte_offset + info.size // 2 for info in infos]


def test_four_flipped_bytes_mid_file_are_detected_and_the_cache_is_rebuilt(tmp_path):
    rows = cache_rows()
    path, fresh = write_cache(tmp_path / "c.h5", rows), write_cache(tmp_path / "fresh.h5", rows)
    flip(path, path.stat().st_size // 2, mask=0xFF, n=4)
    with pytest.raises(CacheInvalid, match="damaged|unreadable") as err:
        open_teacher_cache(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    built = []
    with pytest.warns(UserWarning, match="rebuilding teacher cache"):
        load_or_build_teacher_cache(path, lambda: built.append(1) or list(rows.items()), **cache_kw(rows))
    assert built == [1]
    assert_same_contents(path, fresh)
    load_or_build_teacher_cache(path, lambda: built.append(1) or list(rows.items()), **cache_kw(rows))
    assert built == [1]  # the rebuilt file verifies: reused from now on


def test_one_flipped_bit_in_each_of_several_chunks_is_detected(tmp_path):
    path = write_cache(tmp_path / "c.h5", cache_rows())
    targets = [off for name in ("topk_logits", "topk_ids", "tail") for off in chunk_offsets(path, name)[1:4]]
    assert len(targets) == 9
    for offset in targets:
        flip(path, offset)
    with pytest.raises(CacheInvalid, match="is damaged: dataset /topk_logits"):
        open_teacher_cache(path)
    for offset in targets:
        flip(path, offset)  # flipped back: the file is whole again
    open_teacher_cache(path)
    for offset in targets:  # and each flipped bit on its own is caught too
        flip(path, offset)
        with pytest.raises(CacheInvalid, match="damaged"):
            open_teacher_cache(path)
        flip(path, offset)


def test_a_chunk_damaged_after_open_raises_cache_invalid_naming_the_file(tmp_path):
    path = write_cache(tmp_path / "c.h5", cache_rows())
    cache = open_teacher_cache(path)
    first_chunk_example = 0  # row_start of example 0 is 0: its rows lie in the first chunk of every dataset
    flip(path, chunk_offsets(path, "topk_ids")[0])
    with pytest.raises(CacheInvalid, match=rf"teacher cache {path}: example 0 cannot be read"):
        cache[first_chunk_example]
    cache.close()


def test_a_kd1_run_never_trains_on_a_damaged_cache(make_cfg):
    """What the issue saw (a crash at step 31 on every rerun, or silently different targets): now the rerun rebuilds
    the cache with a warning and trains exactly the student the intact cache gave."""
    first = make_cfg(*SMOKE, "method=kd1", "hardware.torch_threads=1", out="first")
    run(first)
    path = Path(results(first)["teacher_cache"]["path"])
    for offset in [off for name in ("topk_logits", "topk_ids", "tail") for off in chunk_offsets(path, name)]:
        flip(path, offset)
    again = make_cfg(*SMOKE, "method=kd1", "hardware.torch_threads=1", "force=true", out="again")
    with pytest.warns(UserWarning, match=rf"rebuilding teacher cache: teacher cache {path} is damaged"):
        run(again)
    assert_same_student(first, again)


def metadata_offsets(path) -> list[int]:
    """File offsets outside every stored chunk: HDF5's own structures (headers, attributes, chunk index), padding."""
    in_chunks = set()
    with h5py.File(path, "r", locking=False) as f:
        for name in DATASETS:
            for i in range(f[name].id.get_num_chunks()):
                info = f[name].id.get_chunk_info(i)
                in_chunks.update(range(info.byte_offset, info.byte_offset + info.size))
    return [i for i in range(path.stat().st_size) if i not in in_chunks]


def test_no_flipped_metadata_byte_is_used_silently(tmp_path):
    """Chunks carry checksums; so must the metadata around them (the 1.10 file format checksums it): a flipped byte
    there is reported at open or changes nothing read (with the pre-1.10 format this test fails: some are used)."""
    rows = cache_rows(n_examples=60, vocab=500)
    path = write_cache(tmp_path / "c.h5", rows, vocab=500)
    reference, blob = [open_teacher_cache(path)[i] for i in range(60)], path.read_bytes()
    damaged, outcomes = tmp_path / "d.h5", {"detected": 0, "harmless": 0}
    for offset in random.Random(0).sample(metadata_offsets(path), 200):
        damaged.write_bytes(blob[:offset] + bytes([blob[offset] ^ 0x10]) + blob[offset + 1:])
        try:
            cache = open_teacher_cache(damaged, expected_meta={"t": 1})
        except CacheInvalid:
            outcomes["detected"] += 1
            continue
        got = [cache[i] for i in range(len(cache))]
        cache.close()
        assert len(got) == 60, offset
        assert all(torch.equal(g[k], r[k]) for g, r in zip(got, reference, strict=True) for k in r), offset
        outcomes["harmless"] += 1
    assert outcomes["detected"] > 50, outcomes


# ---- prepared teacher ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_setup(tmp_path_factory):
    cfg = compose_cfg([*SMOKE, "hardware.torch_threads=1"], tmp_path_factory.mktemp("teacher"))
    tokenizer = load_tokenizer(cfg.teacher)
    return cfg, tokenizer, load_task(cfg.task)


def prepare(setup):
    model, info = teacher_mod.prepare_teacher(*setup)
    return {k: v.clone() for k, v in model.state_dict().items()}, info


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def random_bytes_inside(path, offset: int, n: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(n))


@pytest.mark.parametrize("damage", ["64KiB_inside_weights", "garbage_in_header", "marker_without_files"])
def test_a_damaged_prepared_teacher_is_prepared_again(teacher_setup, damage, caplog):
    fresh, info = prepare(teacher_setup)
    folder = Path(info["path"])
    weights = folder / "model.safetensors"
    assert set(info["files"]) >= {"model.safetensors", "config.json"}
    assert info["files"]["model.safetensors"] == teacher_mod.file_sha256(weights)
    if damage == "64KiB_inside_weights":
        random_bytes_inside(weights, weights.stat().st_size // 2, 64 * 1024)
    elif damage == "garbage_in_header":
        random_bytes_inside(weights, 8, 40)  # the 8-byte length prefix, then the JSON header
    else:  # what a kdexp before weight checksums left: treated as unverified
        marker = json.loads((folder / teacher_mod.MARKER).read_text())
        del marker["files"]
        (folder / teacher_mod.MARKER).write_text(json.dumps(marker))
    with caplog.at_level(logging.WARNING):
        again, info = prepare(teacher_setup)
    assert not info["reused"] and f"prepared teacher {folder} is not usable" in caplog.text
    expected = "older kdexp version" if damage == "marker_without_files" else "model.safetensors do not match"
    assert expected in caplog.text
    assert_same_weights(again, fresh)
    assert teacher_mod.unverified_reason(folder) is None


def test_a_load_error_after_verification_is_one_line_naming_the_directory(teacher_setup, monkeypatch):
    def broken(path, hw_cfg):
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")

    monkeypatch.setattr(teacher_mod, "load_saved", broken)
    with pytest.raises(ValueError, match=r"prepared teacher .*/teachers/\w+ cannot be loaded \(SafetensorError"):
        teacher_mod.prepare_teacher(*teacher_setup)


# ---- teacher answers ----------------------------------------------------------------------------------------------

@pytest.fixture
def answers_ctx(tmp_path, monkeypatch):
    """The answers service with a stand-in teacher: each answer names its prompt, every build is counted."""
    cfg = compose_cfg(SMOKE, tmp_path)
    examples = [SimpleNamespace(id=f"ex{i}", answers=["positive"]) for i in range(20)]
    builds = []

    def fake_answers(teacher, tokenizer, exs, task_cfg, spec, batch_size):
        builds.append(len(exs))
        return [f"answer to {ex.id}" for ex in exs], 0

    monkeypatch.setattr(answers_service, "answer_prompts", fake_answers)
    ctx = SimpleNamespace(cfg=cfg, teacher=None, teacher_tokenizer=None)

    def call():
        return answers_service.teacher_answers(ctx, examples, answers_service.decoding_spec(cfg.task))

    return call, builds


def test_an_altered_but_valid_answers_file_is_rebuilt(answers_ctx, caplog):
    call, builds = answers_ctx
    answers, info = call()
    path = Path(info["path"])
    assert call()[1]["reused"] and builds == [20]
    lines = path.read_text().splitlines()
    row = json.loads(lines[3])
    lines[3] = json.dumps({**row, "teacher": "something else"})  # still valid JSON, same ids
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        again, info = call()
    assert not info["reused"] and builds == [20, 20] and again == answers
    assert f"teacher answers {path} do not match the checksum" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "meta_without_checksum"])
def test_a_truncated_or_unverifiable_answers_file_is_rebuilt_naming_itself(answers_ctx, caplog, damage):
    call, builds = answers_ctx
    answers, info = call()
    path = Path(info["path"])
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # an answers file built before checksums
        meta_path = path.with_suffix(".meta.json")
        meta_path.write_text(json.dumps({k: v for k, v in json.loads(meta_path.read_text()).items() if k != "sha256"}))
    with caplog.at_level(logging.WARNING):
        again, info = call()
    assert not info["reused"] and builds == [20, 20] and again == answers
    assert f"teacher answers {path}" in caplog.text and "rebuilding it" in caplog.text

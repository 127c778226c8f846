import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdexp.experiments.compose import compose

ROOT = Path(__file__).resolve().parent.parent
# A tiny, seconds-long setup on real embedded data: the `smoke` experiment preset plus small eval sets.
SMOKE = ["experiment=smoke"]


def compose_cfg(overrides: list[str], tmp_path: Path | None = None):
    extra = []
    if tmp_path is not None:
        extra = [f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}"]
    return compose(overrides + extra)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Whatever a test sets (a bench's hardware.torch_threads, a fixture), the next test starts with the same thread
    count: in-process reference runs are compared bitwise with subprocess runs, and floats depend on it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: small ops on a shared 2-core box mostly wait for a busy core with two
    (measured 9x), and preparing a teacher is bitwise repeatable only at a fixed thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, out: str = "out"):
        cfg = compose_cfg(list(overrides), tmp_path)
        cfg.output_dir = str(tmp_path / out)
        return cfg

    return _make


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KDEXP_CACHE_DIR": str(cwd / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "kdexp", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def results(cfg) -> dict:
    return json.loads((Path(cfg.output_dir) / "results.json").read_text())


def student_weights(cfg) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(cfg.output_dir) / "student" / "model.safetensors"))


def assert_same_student(a, b) -> None:
    """Two finished runs trained bit for bit the same student: equal weights, equal eval metrics."""
    import torch

    wa, wb = student_weights(a), student_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert results(a)["metrics"] == results(b)["metrics"]

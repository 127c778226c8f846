"""Multi-process runs (hardware=ddp) under torchrun / accelerate launch, through HF Trainer's DDP support.

Every rank runs the whole pipeline (data, teacher, training, evaluation) and HF Trainer shards the training batches;
only rank 0 writes results.json, the run registry, W&B and the saved student. The other ranks write their files into
a throwaway directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState

log = logging.getLogger(__name__)
_scratch: list[Path] = []  # output directories of ranks other than 0
LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def setup_launch(cfg) -> None:
    """Check that hardware=ddp and a launcher come together (else every rank would write results), and bind this
    rank to its GPU, so that the teacher's ``.to("cuda")`` lands on the local device, not on GPU 0 for all ranks."""
    if cfg.hardware.distributed and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"hardware.distributed=true (hardware={cfg.hardware.name}) needs a distributed launcher: "
                         "torchrun --nproc_per_node=N -m kdexp ... or accelerate launch -m kdexp ...; WORLD_SIZE is "
                         "not set")
    if world_size() > 1 and not cfg.hardware.distributed:
        raise ValueError(f"hardware.distributed=false but launched with WORLD_SIZE={world_size()}: add hardware=ddp")
    if cfg.hardware.distributed and cfg.hardware.device == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def outside_process_group() -> Iterator[None]:
    """Run the enclosed work as a plain single process, e.g. teacher preparation (its own HF Trainer) on rank 0.

    The prepared teacher is content-addressed: it must be the same model whether or not the run is distributed, and
    the other ranks, waiting on its lock, could not join a collective anyway. HF Trainer / accelerate read the
    launcher's environment when their first TrainingArguments is built, so hide it here and reset accelerate's
    singleton state on the way out; the student's Trainer then joins the process group as usual.
    """
    if "WORLD_SIZE" not in os.environ:
        yield
        return
    saved = {k: os.environ.pop(k) for k in LAUNCHER_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
        AcceleratorState._reset_state(reset_partial_state=True)


def rank_output_dir(out_dir: Path) -> Path:
    """Rank 0 writes into the run directory; the others into a temporary one, removed when the run succeeds."""
    if is_main_process():
        return out_dir
    _scratch.append(Path(tempfile.mkdtemp(prefix=f"kdexp_rank{os.environ['RANK']}_")))
    return _scratch[-1]


def exit_launched_process() -> None:
    """After a successful distributed run: tear the process group down and leave without interpreter shutdown.

    torch.distributed with gloo can abort (SIGABRT) during interpreter teardown after all the work is done, which
    would make torchrun report a failure; the results are already written, so exit 0 directly.
    """
    if "WORLD_SIZE" not in os.environ:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    for path in _scratch:
        shutil.rmtree(path, ignore_errors=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

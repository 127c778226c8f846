"""``python -m kdexp.bench kd1|kd2|kd3|kd4 [options] [OVERRIDES...]``: run one bench, print one JSON object."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from kdexp.bench.kd1 import BENCH_OVERRIDES as KD1_OVERRIDES
from kdexp.bench.kd1 import SWEEP_OVERRIDES, bench_kd1
from kdexp.bench.kd2 import STRATEGIES, bench_kd2
from kdexp.bench.kd3 import BENCH_OVERRIDES as KD3_OVERRIDES
from kdexp.bench.kd3 import bench_kd3
from kdexp.bench.kd4 import BENCH_OVERRIDES as KD4_OVERRIDES
from kdexp.bench.kd4 import bench_kd4

DEFAULT_STEPS = {"kd1": 10, "kd3": 8, "kd4": 3}


def strategies(value: str) -> tuple[str, ...]:
    picked = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in picked if s not in STRATEGIES]
    if unknown or not picked:
        raise argparse.ArgumentTypeError(f"{value!r}: give a comma-separated subset of {','.join(STRATEGIES)}")
    return picked

DESCRIPTION = """\
Benchmark one method and print one JSON object on stdout (logs go to stderr). The keys of each object are
listed in the docstring of its module: kdexp/bench/kd1.py, kd2.py, kd3.py, kd4.py.

  kd1  teacher-cache size, build and read throughput, cached-vs-full KD loss error, and step time and peak
       memory of B0, cached KD1 and online KD1; the default B0 command's per-run fixed overhead; and the wall
       time of a 12-run sweep, cached vs online (--no-sweep skips it).
  kd2  teacher generation throughput (prompts/s, tokens/s) and answer-cache size per decoding strategy.
  kd3  step time and peak memory of B0, KD1 (cached and online) and KD3, with ratios to KD3.
  kd4  step time of KD4 (every step on-policy) vs a KD1-online step, generation tokens/s and generation share.

Everything is measured on the path a user's command takes: step times on kdexp.main.run in this process, with the
methods interleaved over rounds so machine load hits each alike (compare the ratios, not the seconds); peak memory
on python -m kdexp in a fresh process per method. Torch threads come from hardware.torch_threads."""

EPILOG = f"""\
Overrides are Hydra overrides of the benchmarked config; one that sets a key the bench's own defaults set
replaces that default. The defaults:
  kd1: {' '.join(KD1_OVERRIDES)}
  kd2: method=kd2 task=squad teacher.prepare.enabled=false task.max_train_samples=<prompts>
       method.unlabeled_samples=0
  kd3: {' '.join(KD3_OVERRIDES[:4])}
       {' '.join(KD3_OVERRIDES[4:])}
  kd4: {' '.join(KD4_OVERRIDES[:5])}
       {' '.join(KD4_OVERRIDES[5:])}
Prepared teachers are reused from (and stored in) the configured cache_dir; teacher caches, teacher answers and the
run registry are built fresh in a temporary directory.

Examples:
  python -m kdexp.bench kd1 experiment=smoke hardware.torch_threads=1
  python -m kdexp.bench kd2 --prompts 16 --strategies greedy,beam task.max_new_tokens=8
  python -m kdexp.bench kd3 --steps 4 --rounds 2 task.max_train_samples=64"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdexp.bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["kd1", "kd2", "kd3", "kd4"], help="which bench to run (see above)")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDES",
                   help="Hydra overrides of the benchmarked config, for example experiment=smoke")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="kd1, kd3, kd4: timed optimizer steps per method in each round (default: kd1 10, kd3 8, "
                        "kd4 3); kd3 also trains this many steps in each peak-memory process")
    p.add_argument("--warmup", type=int, default=2, metavar="N",
                   help="kd1, kd3, kd4: steps trained before timing starts in each run, at least 1 (default: 2)")
    p.add_argument("--rounds", type=int, default=3, metavar="N",
                   help="kd1, kd3, kd4: how many times each method is run, interleaved with the others (default: 3)")
    p.add_argument("--rss-steps", type=int, default=20, metavar="N",
                   help="kd1: optimizer steps each peak-memory process trains (default: 20)")
    p.add_argument("--sweep", action="store_true",
                   help="kd1: accepted for compatibility; the 12-run sweep (2 temperatures x 2 alphas x 3 seeds, "
                        "one python -m kdexp -m process per teacher signal, cached vs online, each from a cold cache, "
                        "a teacher >= 4x the student) is part of the default kd1 bench")
    p.add_argument("--no-sweep", dest="no_sweep", action="store_true", help="kd1: skip the 12-run sweep")
    p.add_argument("--sweep-overrides", nargs="*", default=list(SWEEP_OVERRIDES), metavar="OVERRIDE",
                   help="kd1: extra overrides of every sweep run; give this option after the bench "
                        f"overrides (default: {' '.join(SWEEP_OVERRIDES)})")
    p.add_argument("--prompts", type=int, default=64, metavar="N",
                   help="kd2: how many training prompts the teacher answers (default: 64)")
    p.add_argument("--strategies", type=strategies, default=STRATEGIES, metavar="LIST",
                   help=f"kd2: comma-separated decoding strategies to time (default: {','.join(STRATEGIES)})")
    return p


def run_bench(args: argparse.Namespace) -> dict:
    steps = args.steps if args.steps is not None else DEFAULT_STEPS.get(args.what, 0)
    if args.what == "kd1":
        return bench_kd1(args.overrides, steps=steps, warmup=args.warmup, rounds=args.rounds,
                         rss_steps=args.rss_steps, sweep=not args.no_sweep,
                         sweep_overrides=args.sweep_overrides)
    if args.what == "kd2":
        return bench_kd2(prompts=args.prompts, strategies=args.strategies, overrides=tuple(args.overrides))
    if args.what == "kd4":
        return bench_kd4(steps=steps, warmup=args.warmup, rounds=args.rounds, overrides=tuple(args.overrides))
    return bench_kd3(steps=steps, warmup=args.warmup, rounds=args.rounds, overrides=tuple(args.overrides))


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_intermixed_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs: keep stdout for the one JSON object
        result = run_bench(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

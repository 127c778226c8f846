"""Entry point of ``python -m kdexp.cache``: parse the command, run the plan, print one line per artefact."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kdexp.cache.build import run, summary
from kdexp.cache.expand import ConfigError

USAGE = """python -m kdexp.cache build [--dry-run] OVERRIDES...

OVERRIDES are those of the sweep, as given to `python -m kdexp -m` (comma lists, range(), choice(), experiment=
presets with their hydra.sweeper.params); every run's config is composed and validated, the content keys of what it
needs from the teacher are computed as the run computes them, and each distinct missing artefact is built once.
--dry-run lists them (exists / missing) without loading a model. Exit 2 on a config error, 1 on a build error."""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kdexp.cache", usage=USAGE)
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--dry-run", action="store_true", help="list the artefacts, build nothing, load no model")
    # Accepted so that a sweep's command line can be pasted as it is; the grid is always expanded.
    parser.add_argument("-m", "--multirun", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="the sweep's Hydra overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    # Validating a sweep over several methods logs each dropped knob once per run: what a run logs, not news here.
    logging.getLogger("kdexp.methods").setLevel(logging.WARNING)
    try:
        entries = run(args.overrides, dry_run=args.dry_run)
    except ConfigError as err:
        print(f"kdexp.cache: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TimeoutError) as err:  # bad input found once data is known, a lock held too long
        print(f"kdexp.cache: error: {err}", file=sys.stderr)
        return 1
    print("\n".join(summary(entries)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m kdexp.dashboard [DIR ...] [--port N] [--cache-dir DIR | --no-registry]``: serve the dashboard on
127.0.0.1 and print its URL. Streamlit serves its own bundled frontend: nothing is fetched from the internet."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from kdexp.dashboard.sources import CACHE_ENV, DIRS_ENV, default_sources

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def streamlit_command(port: int) -> list[str]:
    app = Path(__file__).with_name("app.py")
    flags = {"server.address": HOST, "server.port": port, "server.headless": "true",
             "browser.gatherUsageStats": "false",  # no usage pings: the dashboard works offline
             "server.fileWatcherType": "none", "global.developmentMode": "false", "client.toolbarMode": "minimal",
             "theme.base": "light"}
    return [sys.executable, "-m", "streamlit", "run", str(app), *(f"--{k}={v}" for k, v in flags.items())]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kdexp.dashboard",
        description="Serve the kdexp dashboard on 127.0.0.1 and print its URL: runs, live curves, run pages with "
                    "teacher/student disagreements, sweep reports. Works offline.")
    parser.add_argument("dirs", nargs="*", type=Path,
                        help="directories searched for runs (default: outputs/ and multirun/ here)")
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache dir whose run registry adds runs (default: the runs' default, $KDEXP_CACHE_DIR, "
                             "else $XDG_CACHE_HOME/kdexp, else ~/.cache/kdexp)")
    parser.add_argument("--no-registry", action="store_true", help="do not list the run registry's runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    defaults = default_sources()
    dirs = [d.resolve() for d in args.dirs] or list(defaults.dirs)
    cache = None if args.no_registry else (args.cache_dir or defaults.cache_dir)
    port = args.port or free_port()
    os.environ[DIRS_ENV] = json.dumps([str(d) for d in dirs])
    os.environ[CACHE_ENV] = str(Path(cache).resolve()) if cache else ""
    print(f"kdexp dashboard: http://{HOST}:{port}  (runs under {', '.join(map(str, dirs))}; Ctrl-C stops it)",
          flush=True)
    os.execv(sys.executable, streamlit_command(port))  # Streamlit takes over this process: Ctrl-C stops it


if __name__ == "__main__":
    main()

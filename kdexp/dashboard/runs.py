"""Finding runs and telling their status from the files in their directories; no model is loaded, no UI here.

A run directory is one that holds any of ``.hydra/``, ``results.json``, ``heartbeat.json``, ``train_log.jsonl`` or
``reused_results.json``; its sweep is the nearest parent holding Hydra's ``multirun.yaml``. The status rule
(``kdexp/core/live.py`` writes the heartbeat):

- complete: ``results.json`` says "complete"; reused: a sweep job the run registry skipped (``reused_results.json``);
- failed: the heartbeat says "failed" (the process exited without a complete ``results.json``);
- running: the heartbeat is younger than ``stale_s`` and, when it was written on this host, its pid is alive;
  its ``status`` ("setup", "training", "evaluating") is the phase;
- killed: any other heartbeat, i.e. the process stopped without recording an exit (SIGKILL, OOM killer, lost node);
- starting / unknown: no heartbeat yet; "starting" while the directory changed within ``stale_s``, else "unknown"
  (runs from before live logging, or killed before their first heartbeat).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdexp.analysis.report import REUSED, SHORT
from kdexp.core.live import HEARTBEAT, RESULTS, TRAIN_LOG
from kdexp.dashboard.sources import Sources
from kdexp.methods import METHODS

MARKERS = (".hydra", RESULTS, HEARTBEAT, TRAIN_LOG, REUSED)
SWEEP_MARKER = "multirun.yaml"
STALE_S = 60.0  # the heartbeat is rewritten every 10 s while its process lives
STATUSES = ("running", "starting", "complete", "reused", "failed", "killed", "unknown")
KNOB_COLUMNS = {"method.temperature": SHORT["method.temperature"], "method.alpha": SHORT["method.alpha"]}


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _is_run_dir(path: Path) -> bool:
    return any((path / m).exists() for m in MARKERS)


def find_run_dirs(dirs) -> list[Path]:
    """Run directories under ``dirs`` (or the dirs themselves); a run's own subfolders are not searched."""
    found: list[Path] = []
    for root in dirs:
        root = Path(root)
        if not root.is_dir():
            continue
        for current, subdirs, _ in os.walk(root):
            path = Path(current)
            if _is_run_dir(path):
                found.append(path.resolve())
                subdirs[:] = []  # student/, trainer/ checkpoints: nothing of another run below
            else:
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return found


def registry_run_dirs(cache_dir: Path | None) -> list[Path]:
    """Run directories the run registry (``<cache_dir>/runs/<key>.json``) points at, where they still exist."""
    if cache_dir is None or not (Path(cache_dir) / "runs").is_dir():
        return []
    out = []
    for pointer in sorted((Path(cache_dir) / "runs").glob("*.json")):
        target = (read_json(pointer) or {}).get("results")
        if target and Path(target).is_file():
            out.append(Path(target).parent.resolve())
    return out


def sweep_of(run_dir: Path) -> Path | None:
    for parent in list(run_dir.parents)[:6]:
        if (parent / SWEEP_MARKER).is_file():
            return parent
    return None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # someone else's process, or no pid to check: trust the heartbeat's age alone
    return True


@dataclass
class Status:
    status: str
    phase: str = ""
    step: int | None = None
    age_s: float | None = None  # seconds since the heartbeat (or the directory) last changed


def run_status(run_dir: Path, now: float | None = None, stale_s: float = STALE_S, results: dict | None = None,
               beat: dict | None = None) -> Status:
    """The module docstring's rule, from ``results.json``, ``reused_results.json`` and ``heartbeat.json`` (pass
    ``results`` / ``beat`` when already read)."""
    now = time.time() if now is None else now
    beat = beat if beat is not None else read_json(run_dir / HEARTBEAT)
    step = beat.get("step") if beat else None
    results = results if results is not None else read_json(run_dir / RESULTS)
    if (results or {}).get("status") == "complete":
        return Status("complete", step=step)
    if (run_dir / REUSED).is_file():
        return Status("reused")
    if beat is None:
        changed = max((p.stat().st_mtime for p in (run_dir, run_dir / "kdexp.log") if p.exists()), default=0.0)
        return Status("starting" if now - changed < stale_s else "unknown", age_s=now - changed)
    age = now - float(beat.get("time", 0))
    if beat.get("status") in ("failed", "complete"):  # "complete" without results.json: it was never written
        return Status("failed", beat.get("status"), step, age)
    alive = beat.get("host") != socket.gethostname() or _pid_alive(beat.get("pid"))
    if age < stale_s and alive:
        return Status("running", beat.get("status", ""), step, age)
    return Status("killed", beat.get("status", ""), step, age)


def _config(run_dir: Path, results: dict | None) -> dict:
    if results and isinstance(results.get("config"), dict):
        return results["config"]
    try:
        return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _name(cfg: dict, key: str):
    value = cfg.get(key)
    return value.get("name") if isinstance(value, dict) else value


def _results(run_dir: Path) -> tuple[dict | None, Path | None]:
    """This run's results, or for a registry skip the results it points at (and where they are)."""
    results = read_json(run_dir / RESULTS)
    if results is None and (run_dir / REUSED).is_file():
        target = (read_json(run_dir / REUSED) or {}).get("results")
        return (read_json(Path(target)), Path(target).parent) if target else (None, None)
    return results, None


def source_dir(run_dir: Path) -> Path:
    """Where a run's files are: for a registry skip the run it reused (when that still exists), else itself."""
    _, source = _results(run_dir)
    return source if source is not None and source.is_dir() else run_dir


def run_row(run_dir: Path, label: str, now: float | None = None, stale_s: float = STALE_S) -> dict:
    """One line of the runs table."""
    results, source = _results(run_dir)
    beat = read_json(run_dir / HEARTBEAT) or {}
    cfg = _config(run_dir, results)
    status = run_status(run_dir, now, stale_s, results=None if source else results, beat=beat or None)
    main = (results or {}).get("main_metric") or {}
    method = _name(cfg, "method")
    knobs = getattr(METHODS.get(method), "LABEL_KNOBS", {})
    started = beat.get("started") or _mtime(run_dir / ".hydra") or _mtime(run_dir)
    return {
        "run": label, "status": status.status, "phase": status.phase, "step": status.step,
        "sweep": str(sweep_of(run_dir) or ""), "method": method, "task": _name(cfg, "task"),
        "teacher": _name(cfg, "teacher"), "student": _name(cfg, "student"), "seed": cfg.get("seed"),
        **{short: _get(cfg, key) for key, short in KNOB_COLUMNS.items()},
        "knobs": " ".join(f"{short}={_get(cfg, f'method.{k}')}" for k, short in knobs.items()
                          if f"method.{k}" not in KNOB_COLUMNS),  # e.g. KD2's gold_mix; T and α have columns
        "metric": main.get("name"), "eval": main.get("value"), "validation": main.get("validation_value"),
        "teacher_value": main.get("teacher_value"), "wall_time_s": (results or {}).get("wall_time_s"),
        "started": started, "heartbeat_age_s": None if status.age_s is None else round(status.age_s, 1),
        "path": str(run_dir), "results_from": str(source or ""),
    }


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def labels(run_dirs: list[Path], roots) -> dict[Path, str]:
    """Short unique names: the path below a searched directory's parent ("multirun/2026-01-02_10-00-00/3")."""
    parents = [Path(r).resolve().parent for r in roots]
    out = {}
    for run_dir in run_dirs:
        base = next((p for p in parents if run_dir.is_relative_to(p)), None)
        out[run_dir] = str(run_dir.relative_to(base)) if base else str(run_dir)
    if len(set(out.values())) < len(out):
        return {d: str(d) for d in run_dirs}
    return out


def discover(sources: Sources) -> dict[str, Path]:
    """label -> run dir for every run under the sources' dirs and in the run registry, newest first."""
    dirs = list(dict.fromkeys([*find_run_dirs(sources.dirs), *registry_run_dirs(sources.cache_dir)]))
    named = labels(dirs, sources.dirs)
    newest = sorted(dirs, key=lambda d: -(_mtime(d / ".hydra") or _mtime(d) or 0.0))
    return {named[d]: d for d in newest}


def runs_table(sources: Sources, now: float | None = None, stale_s: float = STALE_S) -> list[dict]:
    return [run_row(path, label, now, stale_s) for label, path in discover(sources).items()]


def filter_rows(rows: list[dict], text: str = "", statuses=None, methods=None, sort_by: str | None = None,
                descending: bool = False) -> list[dict]:
    """Rows whose fields contain ``text`` (case-insensitive), in ``statuses`` and ``methods``, sorted (None last)."""
    text = text.strip().lower()
    keep = [r for r in rows if (not text or any(text in str(v).lower() for v in r.values()))
            and (not statuses or r["status"] in statuses) and (not methods or r["method"] in methods)]
    if sort_by:
        present = [r for r in keep if r.get(sort_by) is not None]
        missing = [r for r in keep if r.get(sort_by) is None]
        keep = sorted(present, key=lambda r: _sort_key(r[sort_by]), reverse=descending) + missing
    return keep


def _sort_key(value):
    return (0, value, "") if isinstance(value, int | float) else (1, 0, str(value))


def by_sweep(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by sweep directory ("" for single runs), the group with the most recently started run first."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["sweep"], []).append(row)
    return dict(sorted(groups.items(), key=lambda kv: -max(r["started"] or 0.0 for r in kv[1])))


def counts(rows: list[dict]) -> dict[str, int]:
    return {s: sum(r["status"] == s for r in rows) for s in STATUSES if any(r["status"] == s for r in rows)}

"""Sweep report: ``python -m kdexp.report DIR [DIR ...] [--out OUT]`` → CSV + Markdown tables, PNG figures, HTML.

Reads every ``results.json`` with status "complete" under the given directories (and the pointers a job leaves when
the run registry let it skip an already complete run), groups runs by protocol and setting (task + models + data
sizes: tasks are never mixed in one table), and writes to OUT (default ``<first DIR>/report``):

- ``main_results`` — method × setting: mean ± sd over seeds of the EVAL main metric, teacher row, retention %.
  Where a method has several variants (a grid), its row is the variant with the best mean VALIDATION score among
  its variants run on the most seeds.
- ``kd1_ablation`` — the KD1 temperature × alpha grid of eval means.
- ``significance`` — each method and each grid cell vs B0, the other KD methods vs KD1, paired by seed
  (:func:`kdexp.analysis.stats.compare`), Holm-adjusted within each family; ``benchmarks`` — size, latency,
  throughput and memory, teacher/student ratios.
- ``figures/<name>.{png,pdf}`` and ``figures/300dpi/<name>.png`` with captions, ``report.md`` (every table and
  figure) and ``index.html`` (tables and figures, works offline).

Runs flagged degenerate (``results.json["flags"]``) are marked ⚠ in the tables and left out of the significance
tests unless ``--include-flagged``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kdexp import methods
from kdexp.analysis import figures, pages
from kdexp.analysis import tables as report_tables
from kdexp.config import BOOKKEEPING_KEYS
from kdexp.core.tracking import wandb_init

log = logging.getLogger("kdexp.analysis.report")

MANIFEST = "fair_compare.json"
REUSED = "reused_results.json"
# Config keys that say how a run is bookkept, not what it computes: they never split settings or variants.
BOOKKEEPING = {*BOOKKEEPING_KEYS, "seed", "experiment", "num_samples", "save_student", "eval_teacher"}
# A method's label knobs (KD1: temperature and alpha) name every one of its rows, even when a sweep does not vary them.
ALWAYS_SHOWN = {name: tuple(f"method.{k}" for k in m.LABEL_KNOBS) for name, m in methods.METHODS.items()}
SHORT = {"method.temperature": "T", "method.alpha": "α", "train.lr": "lr", "train.epochs": "epochs"}


@dataclass
class Run:
    path: Path
    data: dict
    protocol: str
    flat: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.data["seed"]

    @property
    def method(self) -> str:
        return self.data["method"]

    def main(self, key: str = "value") -> float:
        value = self.data["main_metric"][key]
        return float("nan") if value is None else float(value)


@dataclass
class Scan:
    runs: list[Run]
    incomplete: int = 0
    unfinished_jobs: int = 0
    duplicates: int = 0
    tuning_trials: int = 0
    reused: int = 0
    pointers: int = 0  # registry-skip pointers to a run also found in these directories (counted once, there)
    manifests: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{len(self.runs)} complete run(s) ({self.reused} reused via the run registry from elsewhere, "
                f"{self.pointers} registry skip(s) pointing at runs counted here); ignored: "
                f"{self.incomplete} incomplete results.json, {self.unfinished_jobs} job dir(s) without results "
                f"(killed, failed or running), {self.duplicates} duplicate(s), {self.tuning_trials} fair_compare "
                "tuning trial(s)")


def flatten(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: json.dumps(node) if isinstance(node, list) else node}
    out = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def _protocol(path: Path, scan: Scan) -> str | None:
    """"fair_compare" under a fair_compare manifest's final stage, None for its tuning trials, else "sweep"."""
    for parent in path.parents:
        manifest = parent / MANIFEST
        if manifest.is_file():
            scan.manifests.setdefault(str(parent), json.loads(manifest.read_text()))
            return "fair_compare" if path.relative_to(parent).parts[0] == "final" else None
    return "sweep"


def _read(path: Path) -> tuple[dict | None, Path]:
    """The results dict at path (following a registry-reuse pointer), or None when unreadable."""
    try:
        data = json.loads(path.read_text())
        if path.name == REUSED:
            target = Path(data["results"])
            return json.loads(target.read_text()), target
        return data, path
    except (OSError, ValueError, KeyError):
        return None, path


def scan(dirs: list[Path]) -> Scan:
    result, latest = Scan(runs=[]), {}
    roots = [d.resolve() for d in dirs]
    for root in roots:
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory")
        for path in [*sorted(root.rglob("results.json")), *sorted(root.rglob(REUSED))]:
            protocol = _protocol(path, result)
            data, source = _read(path)
            if data is None or data.get("status") != "complete":
                result.incomplete += 1
                continue
            if protocol is None:
                result.tuning_trials += 1
                continue
            key = (protocol, data["run_key"])
            if key in latest:  # e.g. a registry-reuse pointer to a run found here too, or a forced rerun
                result.duplicates += path.name != REUSED
                if path.name == REUSED:
                    result.pointers += 1
                    continue
            result.reused += path.name == REUSED
            latest[key] = Run(source, data, protocol, _flat_config(data))
        for job in root.rglob(".hydra"):
            has = [(job.parent / n).is_file() for n in ("results.json", REUSED)]
            result.unfinished_jobs += not any(has)
    result.runs = list(latest.values())
    return result


def _flat_config(data: dict) -> dict:
    """Flat config without bookkeeping keys, the method node cut to its schema's keys: results written before the
    per-method schemas held every method's knobs, which would split a baseline into spurious variants."""
    own = methods.knobs(data["method"]) if data["method"] in methods.METHODS else None
    return {k: v for k, v in flatten(data["config"]).items() if k.split(".")[0] not in BOOKKEEPING
            and not (own is not None and k.startswith("method.") and k.split(".")[1] not in own)}


def _varying(dicts: list[dict]) -> list[str]:
    keys = sorted({k for d in dicts for k in d})
    return [k for k in keys if len({json.dumps(d.get(k), default=str) for d in dicts}) > 1]


def _is_variant_key(key: str) -> bool:
    return key.startswith(("method.", "train."))


def group(runs: list[Run], manifests: dict) -> list[report_tables.Group]:
    """Split runs into settings (protocol, task, models, data; never mixing tasks) and variants within each."""
    settings: dict[tuple, list[Run]] = {}
    for run in runs:
        setting = tuple(sorted((k, json.dumps(v)) for k, v in run.flat.items() if not _is_variant_key(k)))
        settings.setdefault((run.protocol, run.data["task"], setting), []).append(run)
    by_task: dict[tuple, list[dict]] = {}
    for protocol, task, setting in settings:
        by_task.setdefault((protocol, task), []).append(dict(setting))
    groups = []
    for (protocol, task, setting), members in settings.items():
        extra = _varying(by_task[(protocol, task)])
        label = f"{task} · {members[0].data['teacher']} → {members[0].data['student']}"
        label += "".join(f" · {k}={json.loads(dict(setting)[k])}" for k in extra if k in dict(setting))
        groups.append(report_tables.Group(protocol, task, label, _variants(members), _protocol_note(protocol,
                                                                                                  manifests)))
    order = {"fair_compare": 0, "sweep": 1}  # the tuned-B0 (fair) comparison comes first
    return sorted(groups, key=lambda g: (order[g.protocol], g.task, g.label))


def _variants(members: list[Run]) -> dict[str, report_tables.Variant]:
    """Variants are named by the knobs that vary: train.* across the setting, method.* within each method."""
    knobs = {r.method: [] for r in members}
    for r in members:
        knobs[r.method].append({k: v for k, v in r.flat.items() if _is_variant_key(k)})
    train = [k for k in _varying([d for ds in knobs.values() for d in ds]) if k.startswith("train.")]
    varying = {m: [*ALWAYS_SHOWN.get(m, ()), *(k for k in _varying(ds) if k.startswith("method.")
                                              and k not in ALWAYS_SHOWN.get(m, ())), *train]
               for m, ds in knobs.items()}
    variants: dict[str, report_tables.Variant] = {}
    for run in sorted(members, key=lambda r: r.path.stat().st_mtime):
        params = {k: run.flat[k] for k in varying[run.method] if k in run.flat}
        key = run.method + json.dumps(params, sort_keys=True)  # exact values: rounding must never merge variants
        variant = variants.setdefault(key, report_tables.Variant(_label(run.method, params, 4), run.method, params))
        variant.runs[run.seed] = run  # a later rerun of the same variant and seed replaces the earlier one
    labels = [v.label for v in variants.values()]
    for v in variants.values():
        if labels.count(v.label) > 1:  # two variants that differ only past 4 significant digits
            v.label = _label(v.method, v.params, None)
    return {v.label: v for v in variants.values()}


def _label(method: str, params: dict, digits: int | None) -> str:
    """"kd1 T=1.383 α=0.156 lr=0.0003678 max_steps=1138": tuned floats shortened (exact values are in the CSV)."""
    def short(v):
        return f"{v:.{digits}g}" if digits and isinstance(v, float) else v

    return method + "".join(f" {SHORT.get(k, k.split('.', 1)[1])}={short(v)}" for k, v in params.items())


def _protocol_note(protocol: str, manifests: dict) -> str:
    if protocol == "sweep":
        return ("plain sweep: every grid cell trained once per seed, no tuning; a method's row is its variant with "
                "the best mean validation score among those run on the most seeds; all numbers are eval-split")
    specs = sorted({f"{m.get('trials')} Optuna trial(s) per method on validation, best config re-run with seeds "
                    f"{m.get('seeds')}" for m in manifests.values()})
    edges = sorted({f"{method}: {edge}" for m in manifests.values() for method, best in m.get("best", {}).items()
                    for edge in best.get("at_edge", [])})
    return ("fair_compare: every method (B0 included) tuned with the same budget — " + "; ".join(specs)
            + (f". WARNING, best trial at the edge of its search range (may be under-tuned): {'; '.join(edges)}"
               if edges else ""))


def build(dirs: list[Path], out: Path | None = None, wandb: bool | None = None, include_flagged: bool = False) -> Path:
    found = scan(dirs)
    if not found.runs:
        raise ValueError(f"no complete results.json under {', '.join(map(str, dirs))} ({found.summary()})")
    log.info("%s", found.summary())
    out = Path(out or Path(dirs[0]) / "report")
    groups = group(found.runs, found.manifests)
    for g in groups:
        g.include_flagged = include_flagged
    tables = pages.write_all(groups, out, found.summary())
    drawn = figures.draw_all(groups, out / "figures")
    pages.append_figures(out / "report.md", drawn)
    pages.write_html(out / "index.html", tables, drawn, found.summary())
    loggers = [r.data["config"].get("logger") or {} for r in found.runs]
    wandb_cfgs = [c for c in loggers if c.get("name") == "wandb"]
    if wandb if wandb is not None else bool(wandb_cfgs):
        log_report(tables, out, wandb_cfgs[0] if wandb_cfgs else {})
    return out


def log_report(tables: dict, out: Path, logger_cfg: dict) -> None:
    """The report's tables as W&B Tables (and its figures as images) in one ``job_type=report`` run."""
    import wandb  # an optional extra: only a report that asks for W&B needs it

    run = wandb_init(logger_cfg, out, name=f"report-{out.resolve().parent.name}", job_type="report")
    for name, per_group in tables.items():
        rows = [{"protocol": g.protocol, "setting": g.label, **r} for g, group_rows in per_group for r in group_rows]
        if rows:
            columns = list(dict.fromkeys(k for r in rows for k in r))
            run.log({name: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
    run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in sorted((out / "figures").glob("*.png"))})
    run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdexp.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep / outputs directories, searched recursively")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default: <first dir>/report)")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="log the main table to W&B (default: when the runs used logger=wandb)")
    parser.add_argument("--include-flagged", action="store_true",
                        help="keep runs flagged degenerate (one class, empty answers, trivial teacher) in the "
                             "significance tests; they are marked in the tables either way")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = build(args.dirs, args.out, args.wandb, include_flagged=args.include_flagged)
    except ValueError as err:
        sys.exit(f"kdexp.analysis.report: error: {err}")
    print(f"report: {out / 'index.html'}")


if __name__ == "__main__":
    main()

"""What the curve, run and sweep pages show, read from run directories; no model is loaded, no UI here.

Curves come from ``train_log.jsonl`` (appended while the run trains, kdexp/core/live.py), or for runs written before
it from ``results.json``'s ``train_log``. The sweep page's tables and figures are ``kdexp.analysis.report.build``'s
own output, built into a temporary directory keyed by the sweep's results files, so nothing is written into a sweep.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kdexp.analysis import report
from kdexp.analysis.tables import EFFICIENCY, GRIDS, TABLES
from kdexp.core.live import DISAGREEMENTS, TRAIN_LOG
from kdexp.dashboard.runs import RESULTS, read_json

CURVE_KEYS = ("loss", "loss_ce", "loss_kd", "learning_rate")
REPORT_CACHE = Path(tempfile.gettempdir()) / "kdexp-dashboard"


def _jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (the writer is mid-append) is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict)]


def _with_global_steps(entries: list[dict]) -> list[dict]:
    """Give entries without ``global_step`` one: each stage's Trainer restarts ``step`` at 0."""
    offset, last_stage, last_step = 0, None, 0
    for e in entries:
        if "global_step" not in e:
            if last_stage is not None and e.get("stage", 0) != last_stage:
                offset += last_step
            last_stage, last_step = e.get("stage", 0), e.get("step", 0)
            e["global_step"] = offset + e.get("step", 0)
    return entries


def train_log(run_dir: Path) -> list[dict]:
    """The run's logged training steps (entries with a ``loss``), each with a ``global_step``."""
    entries = _jsonl(run_dir / TRAIN_LOG)
    if not entries:
        entries = list((read_json(run_dir / RESULTS) or {}).get("train_log") or [])
    return _with_global_steps([dict(e) for e in entries if "loss" in e])


def _number(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def curve_rows(runs: dict[str, Path], keys=CURVE_KEYS) -> list[dict]:
    """Long format for charts: one row per (run, step, key) with a finite value."""
    rows = []
    for label, run_dir in runs.items():
        for e in train_log(run_dir):
            for key in keys:
                value = _number(e.get(key))
                if value is not None:
                    rows.append({"run": label, "step": e["global_step"], "metric": key, "value": value,
                                 "stage": e.get("stage", 0)})
    return rows


def curve_summary(run_dir: Path) -> dict:
    """How far the curve has got: logged points, last step, last loss."""
    log = train_log(run_dir)
    last = log[-1] if log else {}
    return {"points": len(log), "last_step": last.get("global_step"), "last_loss": _number(last.get("loss"))}


# ---- run page ------------------------------------------------------------------------------------------------

def composed_config(run_dir: Path) -> str:
    """The composed config as Hydra saved it, else the resolved one from results.json."""
    path = run_dir / ".hydra" / "config.yaml"
    if path.is_file():
        return path.read_text()
    config = (read_json(run_dir / RESULTS) or {}).get("config")
    return json.dumps(config, indent=2) if config else ""


def metric_rows(results: dict) -> list[dict]:
    """Student (eval and validation) vs teacher, per metric."""
    student = results.get("metrics") or {}
    validation = results.get("validation_metrics") or {}
    teacher = results.get("teacher_metrics") or {}
    rows = []
    for key in dict.fromkeys([*student, *teacher]):
        s, t = _number(student.get(key)), _number(teacher.get(key))
        rows.append({"metric": key, "student (eval)": s, "student (validation)": _number(validation.get(key)),
                     "teacher (eval)": t, "student / teacher %": 100 * s / t if s is not None and t else None})
    return rows


def efficiency_rows(results: dict) -> list[dict]:
    eff = results.get("efficiency") or {}
    student, teacher = eff.get("student") or {}, eff.get("teacher") or {}
    rows = []
    for key in dict.fromkeys([*EFFICIENCY, *student, *teacher]):
        s, t = student.get(key), teacher.get(key)
        if s is None and t is None:
            continue
        ratio = _number(t) / _number(s) if _number(s) and _number(t) is not None else None
        rows.append({"measure": EFFICIENCY.get(key, key), "student": _short(s), "teacher": _short(t),
                     "teacher / student": _short(ratio)})
    return rows


def _short(value) -> str:
    """Mixed columns (counts, MB, device names) as text: 4 significant digits for fractions, whole numbers whole."""
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1e4 else f"{value:.4g}"
    return "" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def samples(run_dir: Path) -> list[dict]:
    """samples.jsonl (prompt, gold, teacher and student answers) joined by id with disagreements.jsonl (per-token
    top-k and KL), the examples with the largest single-token KL first."""
    rows = {str(r.get("id")): dict(r) for r in _jsonl(run_dir / "samples.jsonl")}
    for d in _jsonl(run_dir / DISAGREEMENTS):
        row = rows.setdefault(str(d.get("id")), {"id": d.get("id"), "prompt": d.get("prompt"), "gold": d.get("gold")})
        row.update({k: d[k] for k in ("tokens", "answer_tokens", "kl_sum", "kl_max", "note") if k in d})
    return sorted(rows.values(), key=lambda r: -(r.get("kl_max") or 0.0))


def _topk(entries) -> str:
    return "  ".join(f"{json.dumps(e['token'])} {e['prob']:.3g}" for e in entries or [])


def token_rows(sample: dict) -> list[dict]:
    """A sample's answer tokens as table rows, largest KL(p_T‖p_S) first."""
    return [{"pos": t["position"], "token": json.dumps(t["token"]), "KL(T‖S)": t["kl"],
             "p_teacher(token)": t.get("teacher_prob"), "p_student(token)": t.get("student_prob"),
             "teacher top-5": _topk(t.get("teacher_top")), "student top-5": _topk(t.get("student_top"))}
            for t in sorted(sample.get("tokens") or [], key=lambda t: -t["kl"])]


# ---- sweep page ----------------------------------------------------------------------------------------------

@dataclass
class SweepReport:
    out: Path | None
    summary: str = ""
    tables: dict[str, str] = field(default_factory=dict)  # table name -> its Markdown, as the report writes it
    figures: list[Path] = field(default_factory=list)
    error: str = ""


def _signature(sweep_dir: Path) -> str:
    files = sorted([*sweep_dir.rglob(RESULTS), *sweep_dir.rglob(report.REUSED)])
    stamp = [(str(p), p.stat().st_mtime_ns) for p in files]
    return hashlib.sha1(json.dumps([str(sweep_dir.resolve()), stamp]).encode()).hexdigest()[:16]


def sweep_report(sweep_dir: Path, cache: Path = REPORT_CACHE) -> SweepReport:
    """``kdexp.analysis.report.build`` over one sweep directory, rebuilt only when its results files change."""
    out = cache / _signature(sweep_dir)
    if not (out / "report.md").is_file():
        try:
            report.build([sweep_dir], out, wandb=False)
        except ValueError as err:
            return SweepReport(None, error=str(err))
    summary = (out / "report.md").read_text().split("\n")[2]  # "# kdexp report", "", summary
    tables = {name: (out / f"{name}.md").read_text() for name in TABLES if (out / f"{name}.md").is_file()}
    return SweepReport(out, summary, tables, sorted((out / "figures").glob("*.png")))


def heatmap_rows(report_dir: Path) -> dict[str, list[dict]]:
    """Per method with a two-knob grid (KD1: T × α), its ablation table's cells from the report's CSV:
    {"setting", "other", "row" (first knob), "col" (second knob), "mean", "sd", "n"}."""
    out = {}
    for method, ((row_knob, _), (col_knob, _)) in GRIDS.items():
        path = report_dir / f"{method}_ablation.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            cells = [{"setting": r["setting"], "other": r.get("other", ""), "row": _number(r[row_knob]),
                      "col": _number(r[col_knob]), "mean": _number(r["mean"]), "sd": _number(r["sd"]),
                      "n": int(float(r["n_seeds"]))} for r in csv.DictReader(f) if r.get(row_knob)]
        if cells:
            out[method] = cells
    return out


def grid_knobs(method: str) -> tuple[str, str]:
    """Short names of a grid's row and column knobs ("T", "α")."""
    (_, row_short), (_, col_short) = GRIDS[method]
    return row_short, col_short

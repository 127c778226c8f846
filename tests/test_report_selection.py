"""Which variant stands for a method in the report's main table and tests: best mean validation, among the
variants run on the method's most seeds."""

from kdexp.analysis.report import Run
from kdexp.analysis.tables import Group, Variant, main_rows


def _variant(label: str, method: str, validation: dict[int, float]) -> Variant:
    v = Variant(label, method, {})
    for seed, val in validation.items():
        data = {"seed": seed, "method": method, "main_metric": {"name": "acc", "value": val - 0.05,
                                                                 "validation_value": val, "teacher_value": 0.8}}
        v.runs[seed] = Run(path=None, data=data, protocol="sweep")
    return v


def _group(*variants: Variant) -> Group:
    return Group(protocol="sweep", task="t", label="t", variants={v.label: v for v in variants}, note="")


def test_a_cell_on_fewer_seeds_does_not_win_the_selection():
    five = {s: 0.60 for s in range(1, 6)}
    full = _variant("kd1 T=2", "kd1", five)
    better_but_partial = _variant("kd1 T=1", "kd1", {1: 0.90, 4: 0.90})  # a 2-seed cell added later
    worse_full = _variant("kd1 T=4", "kd1", {s: 0.50 for s in range(1, 6)})
    g = _group(_variant("b0", "b0", five), full, better_but_partial, worse_full)
    assert g.selected()["kd1"] is full
    row = next(r for r in main_rows(g) if r["method"] == "kd1")
    assert row["n_seeds"] == 5 and row["selection"] == "best of 2 by validation"


def test_with_equal_seeds_the_best_validation_mean_wins_and_ties_keep_the_first():
    a = _variant("kd1 T=1", "kd1", {1: 0.7, 2: 0.7, 3: 0.7})
    b = _variant("kd1 T=2", "kd1", {1: 0.8, 2: 0.8, 3: 0.8})
    c = _variant("kd1 T=4", "kd1", {1: 0.8, 2: 0.8, 3: 0.8})
    assert _group(a, b, c).selected()["kd1"] is b
    only = _variant("b0", "b0", {1: 0.5})
    assert list(_group(b, only).selected()) == ["b0", "kd1"]  # B0 first

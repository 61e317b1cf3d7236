"""Paired differences over seeds (the ablation harness's intervals)."""

import pytest

from cmd_demo.stats import paired_difference, seeds_to_resolve


def test_paired_difference_interval_matches_a_worked_example():
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027 -> half-width 4.3027 / sqrt(3) = 2.4841
    out = paired_difference({1: 11.0, 2: 12.0, 3: 13.0, 9: 0.0}, {1: 10.0, 2: 10.0, 3: 10.0})
    assert out["seeds"] == [1, 2, 3] and out["n"] == 3 and out["mean"] == pytest.approx(2.0)
    assert out["low"] == pytest.approx(2.0 - 2.4841, abs=1e-3) and out["high"] == pytest.approx(4.4841, abs=1e-3)
    assert out["resolved"] is False and out["seeds_needed"] == 4  # t(0.975, 3) * 1 / 2 = 1.59 < 2


def test_resolved_and_unresolvable_differences():
    out = paired_difference({s: 5.0 + 0.1 * s for s in range(5)}, {s: 1.0 for s in range(5)})
    assert out["resolved"] is True and out["low"] > 0
    assert seeds_to_resolve(0.0, 1.0) is None and seeds_to_resolve(0.001, 10.0, limit=50) is None
    assert paired_difference({1: 2.0}, {1: 1.0})["low"] is None  # one seed: no interval
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({1: 1.0}, {2: 1.0})


def test_the_ablation_table_pairs_every_row_with_sic_by_seed(tmp_path):
    from cmd_demo.ablation import format_paired, paired_vs, plot_paired

    def record(value):
        return {"test": {"recall": {"mean_r1": value}}}

    runs = {
        "sic": {1: record(10.0), 2: record(12.0), 3: record(11.0)},
        "cmd-qkv": {1: record(11.0), 2: record(14.0), 3: record(12.0), 4: record(50.0)},
    }
    paired = paired_vs(runs)
    assert list(paired) == ["cmd-qkv"] and paired["cmd-qkv"]["seeds"] == [1, 2, 3]  # seed 4 has no pair
    assert paired["cmd-qkv"]["mean"] == pytest.approx(4 / 3)
    text = format_paired(paired)
    assert text.startswith("  cmd-qkv - sic: +1.33 [") and "3 paired seeds" in text
    pytest.importorskip("matplotlib")  # the plot extra: environment A (environment B lacks it)
    assert plot_paired(paired, str(tmp_path / "p.png"), "t") and (tmp_path / "p.png").stat().st_size > 0


def test_the_alpha_figure_shares_sic_as_alpha_zero_and_counts_seeds(tmp_path):
    from cmd_demo.ablation import alpha_series, plot_alpha

    table = {
        "sic": {"mean_r1": (44.0, 2.0), "num_seeds": 5},
        "cmd-qkv": {"mean_r1": (41.0, 1.0), "num_seeds": 5},
        "cmd-qkv-a0.25": {"mean_r1": (46.0, 0.5), "num_seeds": 2},
        "cmd-literal": {"mean_r1": (42.0, 0.0), "num_seeds": 1},
        "c2f": {"mean_r1": (47.0, 4.0), "num_seeds": 5},
    }  # not a CMD row: not on the figure
    series = alpha_series(table)
    assert series == {
        "literal": [(0.0, 44.0, 2.0, 5), (1.0, 42.0, 0.0, 1)],
        "qkv": [(0.0, 44.0, 2.0, 5), (0.25, 46.0, 0.5, 2), (1.0, 41.0, 1.0, 5)],
    }
    assert alpha_series({"sic": table["sic"]}) == {}
    pytest.importorskip("matplotlib")  # the plot extra: environment A (environment B lacks it)
    assert plot_alpha(table, str(tmp_path / "a.png"), "t") == series and (tmp_path / "a.png").stat().st_size > 0


def test_paired_p_value_holm_and_power_match_worked_examples():
    from cmd_demo.stats import holm_adjust, paired_power, seeds_for_power

    # differences 1, 2, 3: t = 2 / (1 / sqrt 3) = 3.4641 on 2 df -> two-sided p = 0.0742
    out = paired_difference({1: 11.0, 2: 12.0, 3: 13.0}, {1: 10.0, 2: 10.0, 3: 10.0})
    assert out["p"] == pytest.approx(0.0742, abs=1e-4)
    # Holm: sorted .01 .03 .04 .5 -> x4 .04, x3 .09, x2 .08 -> .09 (monotone), x1 .5
    assert holm_adjust({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5}) == pytest.approx(
        {"a": 0.04, "b": 0.09, "c": 0.09, "d": 0.5}
    )
    assert holm_adjust({"a": 0.4, "b": 0.3}) == pytest.approx({"a": 0.6, "b": 0.6})  # capped by the step-down max
    # a standardised effect of 1 needs 10 pairs for 80 % at 0.05 (power 0.803; 9 pairs give 0.75)
    assert paired_power(1.0, 1.0, 10, 0.05) == pytest.approx(0.803, abs=2e-3)
    assert paired_power(1.0, 1.0, 9, 0.05) < 0.8
    assert seeds_for_power(1.0, 1.0, 0.05) == 10
    assert seeds_for_power(2.0, 1.0, 0.05) < seeds_for_power(1.0, 1.0, 0.05) < seeds_for_power(1.0, 1.0, 0.005)
    assert seeds_for_power(0.0, 1.0, 0.05) is None and seeds_for_power(1.0, 0.0, 0.05) == 2


def test_declared_comparisons_are_corrected_together_and_a_missing_one_still_counts():
    from cmd_demo.ablation import format_primary, primary_tests

    def record(r1, mp=None):
        return {"test": {"recall": {"mean_r1": r1}}, "minimal_pairs": {"mp_mean": mp} if mp is not None else {}}

    runs = {
        "sic": {s: record(40.0 + s % 2, 60.0) for s in range(1, 7)},
        "cmd-qkv": {s: record(45.0 + s % 3, 60.0 + (s % 2)) for s in range(1, 7)},
        "c2f": {s: record(41.0) for s in range(1, 7)},
    }
    tests = primary_tests(runs, [("cmd-qkv", "sic"), ("c2f", "cmd-qkv")])
    assert list(tests) == [
        "cmd-qkv - sic on test mean R@1",
        "cmd-qkv - sic on minimal-pairs mean",
        "c2f - cmd-qkv on test mean R@1",
        "c2f - cmd-qkv on minimal-pairs mean",
    ]
    r1 = tests["cmd-qkv - sic on test mean R@1"]
    assert r1["n"] == 6 and r1["significant"] and r1["p_holm"] >= r1["p"]
    # c2f has no minimal pairs: missing, kept in the family with p = 1, so the others are corrected for 4 tests
    assert tests["c2f - cmd-qkv on minimal-pairs mean"]["missing"] is True
    smallest = min(t["p"] for t in tests.values() if not t["missing"])
    assert min(t["p_holm"] for t in tests.values()) == pytest.approx(min(1.0, 4 * smallest))
    text = format_primary(tests)
    assert "not run yet" in text and "significant at 0.05 after Holm" in text


def test_the_plan_reads_the_spread_of_recorded_sweeps():
    from cmd_demo.ablation import plan_seeds
    from cmd_demo.stats import seeds_for_power

    def seed(r1, mp):
        return {"test": {"mean_r1": r1}, "minimal_pairs": {"mp_mean": mp}}

    diffs = [1.0, 3.0, -1.0, 2.0]
    record = {
        "rows": {
            "sic": {"per_seed": {str(i): seed(40.0, 60.0) for i in range(4)}},
            "cmd-qkv": {"per_seed": {str(i): seed(40.0 + d, 60.0 + 2 * d) for i, d in enumerate(diffs)}},
        }
    }
    plan = plan_seeds([("r.json", record)], [("cmd-qkv", "sic")], {"test mean R@1": 2.0, "minimal-pairs mean": 2.0})
    r1, mp = plan["cmd-qkv - sic on test mean R@1"], plan["cmd-qkv - sic on minimal-pairs mean"]
    assert r1["sd"] == pytest.approx(1.7078, abs=1e-4) and mp["sd"] == pytest.approx(2 * 1.7078, abs=1e-3)
    assert r1["seeds"] == seeds_for_power(2.0, r1["sd"], 0.05 / 2) and mp["seeds"] > r1["seeds"]
    missing = plan_seeds([("r.json", record)], [("c2f", "sic")], {"test mean R@1": 2.0})
    assert missing["c2f - sic on test mean R@1"]["sd"] is None

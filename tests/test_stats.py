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

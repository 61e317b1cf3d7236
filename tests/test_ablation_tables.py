"""The ablation harness's pure parts: row names, mean ± sd over seeds, the selected validation line."""

import pytest

from cmd_demo.ablation import aggregate, best_valid_line, format_table, row_overrides


def test_row_names_map_to_overrides():
    assert row_overrides("sic") == (["method=sic"], 0.0, None)
    assert row_overrides("cmd-qkv") == (["criterion.cmd_weight=1.0", "model.fusion_attention=qkv"], 1.0, "qkv")
    assert row_overrides("cmd-cosine-a0.25")[1:] == (0.25, "cosine")
    for bad in ("cmd-dot", "cmd-cosine-a0", "sic-a1", "cosine"):
        with pytest.raises(ValueError, match="row"):
            row_overrides(bad)


def _record(r1):
    keys = [f"{d}_r{k}" for d in ("s2i", "i2s", "mean") for k in (1, 5, 10)]
    return {"recall": {k: r1 + i for i, k in enumerate(keys)}}


def test_aggregate_gives_mean_and_sample_sd_over_seeds():
    runs = {
        "sic": {
            1: {"test": _record(10.0), "valid": _record(20.0), "sim": {"sim_auc_hard": 0.6}},
            2: {"test": _record(14.0), "valid": _record(22.0), "sim": {"sim_auc_hard": 0.8}},
        }
    }
    table = aggregate(runs)
    assert table["sic"]["sim_auc_hard"] == pytest.approx((0.7, 0.1414214))
    assert "sim_auc_random" not in table["sic"]  # only what every seed logged
    assert table["sic"]["s2i_r1"] == pytest.approx((12.0, 2.8284271))
    assert table["sic"]["valid_mean_r1"] == pytest.approx((27.0, 1.4142136))  # mean_r1 is key 6 of 9
    assert table["sic"]["num_seeds"] == 2
    assert "12.0±2.8" in format_table(table)


def test_one_seed_shows_its_mean_without_a_spread():
    table = aggregate({"sic": {1: {"test": _record(10.0), "valid": _record(20.0)}}})
    assert table["sic"]["s2i_r1"] == (10.0, 0.0)
    cells = [c.strip() for c in format_table(table).splitlines()[2].split("|")]
    assert cells[:3] == ["sic", "1", "10.0"] and not any("±" in c for c in cells)


def test_best_valid_line_is_the_last_of_equal_best_mean_r1():
    log = "\n".join(
        [
            "x | INFO | valid | epoch 001 | valid on 'valid' subset | loss 3.1 | attn_entropy 0.99 | mean_r1 10.0 | wps 5",
            "x | INFO | train | epoch 001 | loss 3.0",
            "x | INFO | valid | epoch 002 | valid on 'valid' subset | loss 2.9 | attn_entropy 0.80 | mean_r1 12.5",
            "x | INFO | valid | epoch 003 | valid on 'valid' subset | loss 2.8 | attn_entropy 0.70 | sim_auc_hard 0.61 | mean_r1 12.5",
            "x | INFO | valid | epoch 004 | valid on 'valid' subset | loss 2.7 | attn_entropy 0.60 | mean_r1 11.0",
        ]
    )
    best = best_valid_line(log)
    assert best["attn_entropy"] == 0.70 and best["loss"] == 2.8 and best["sim_auc_hard"] == 0.61
    assert best_valid_line("no validation here") is None


def test_coarse_to_fine_rows_map_to_method_groups_and_reranking_reuses_the_trained_run():
    from cmd_demo.ablation import C2F_ROWS, row_spec

    assert row_spec("c2f") == {
        "overrides": ["method=c2f"],
        "alpha": 0.0,
        "variant": None,
        "base": None,
        "rerank_k": 0,
        "rerank_score": "sim",
    }
    assert row_spec("c2f-cmd")["overrides"] == ["method=c2f_cmd"] and row_spec("c2f-cmd")["alpha"] == 1.0
    assert row_spec("cmd-qkv")["overrides"] == ["criterion.cmd_weight=1.0", "model.fusion_attention=qkv"]
    # re-ranked rows train nothing of their own: they re-score the base row's checkpoint
    spec = row_spec("c2f-rerank50")
    assert (spec["base"], spec["rerank_k"], spec["rerank_score"]) == ("c2f", 50, "sim")
    spec = row_spec("c2f-cmd-rerank10-simsic")
    assert (spec["base"], spec["rerank_k"], spec["rerank_score"]) == ("c2f-cmd", 10, "sim+sic")
    assert spec["overrides"] == ["method=c2f_cmd"]
    spec = row_spec("c2f-rerank10-simsiclogit")
    assert (spec["base"], spec["rerank_k"], spec["rerank_score"]) == ("c2f", 10, "sim+sic_logit")
    assert all(row_spec(row) for row in C2F_ROWS)
    for bad in ("sic-cmd", "c2f-rerank5", "c2f-rerank", "c2f-cmd-simsic", "c2f-a0.5", "sic-rerank10"):
        with pytest.raises(ValueError, match="row"):
            row_spec(bad)


def test_each_coarse_to_fine_part_alone_is_a_row_on_sic():
    from cmd_demo.ablation import C2F_PART_ROWS, row_spec

    assert row_overrides("sic-queue") == (["method=sic", "model.queue_size=1024"], 0.0, None)
    assert row_spec("sic-sim")["overrides"] == ["method=sic", "model.multimodal_layers=2", "criterion.sim_weight=1.0"]
    assert row_spec("sic-distill")["base"] is None
    for row in C2F_PART_ROWS:  # each switches on exactly one part on top of method=sic
        assert row_overrides(row)[0][0] == "method=sic" and len(row_overrides(row)[0]) >= 2
    with pytest.raises(ValueError, match="sic-queue"):
        row_overrides("sic-momentum")
    # the paper's SIM input (every frame and patch) against the tiny config's summary tokens and pooling
    assert row_overrides("c2f-every-frame")[0] == [
        "method=c2f",
        "model.multimodal_speech_tokens=0",
        "model.multimodal_patch_pool=1",
    ]


def test_valid_curve_reads_every_validation_in_order():
    from cmd_demo.ablation import mean_curve, valid_curve

    log = "\n".join(
        [
            "[v][INFO] - epoch 001 | valid on 'valid' subset | loss 3.1 | mean_r1 10.0 | num_updates 157",
            "[t][INFO] - epoch 001 | loss 3.0 | num_updates 157",
            "[v][INFO] - epoch 002 | valid on 'valid' subset | loss 2.9 | mean_r1 12.5 | num_updates 314 | best_mean_r1 12.5",
        ]
    )
    assert valid_curve(log) == [(157, 10.0), (314, 12.5)]
    assert valid_curve("nothing") == []
    # seeds are averaged where all of them validated
    curve = mean_curve([[(157, 10.0), (314, 12.0)], [(157, 14.0), (314, 12.0), (471, 20.0)]])
    assert [u for u, _, _ in curve] == [157, 314]
    assert [v for _, m, sd in curve for v in (m, sd)] == pytest.approx([12.0, 2.8284271, 12.0, 0.0])
    assert mean_curve([[(1, 2.0)], []]) == []


def test_selection_summary_finds_the_selected_update_and_the_fall_after_it():
    from cmd_demo.ablation import selection_summary

    # a run that peaks mid-way and falls: the last of equal bests is the one fairseq keeps
    curve = [(157, 50.0), (314, 70.0), (471, 68.0), (628, 70.0), (785, 66.5)]
    assert selection_summary(curve) == {"best_update": 628, "best_valid": 70.0, "final_valid": 66.5, "valid_drop": 3.5}
    assert selection_summary([(157, 10.0), (314, 12.0)])["valid_drop"] == 0.0
    assert selection_summary([]) == {}
    # aggregated over seeds next to the recall, only when every seed has a curve
    recall = {
        k: 1.0 for k in ("s2i_r1", "s2i_r5", "s2i_r10", "i2s_r1", "i2s_r5", "i2s_r10", "mean_r1", "mean_r5", "mean_r10")
    }
    run = lambda c: {"test": {"recall": recall}, "valid": {"recall": recall}, "valid_curve": c}  # noqa: E731
    table = aggregate({"cmd-qkv": {1: run(curve), 2: run([(157, 60.0), (314, 64.0)])}})
    assert table["cmd-qkv"]["best_update"] == pytest.approx((471.0, 222.0306), rel=1e-5)
    assert table["cmd-qkv"]["valid_drop"][0] == pytest.approx(1.75)
    assert "best_update" not in aggregate({"sic": {1: run(curve), 2: run([])}})["sic"]


def test_last_train_line_reads_the_last_epoch_summary_not_the_inner_lines():
    from cmd_demo.ablation import last_train_line

    log = "\n".join(
        [
            "[2026][train][INFO] - epoch 001 | loss 1.7 | sic_loss 1.7 | num_updates 157",
            "[2026][train_inner][INFO] - epoch 002:  10 / 157 loss=0.9, sic_loss=0.9, num_updates=167",
            "[2026][valid][INFO] - epoch 002 | valid on 'valid' subset | loss 2.0 | sic_loss 2.0 | mean_r1 50.0",
            "[2026][train][INFO] - epoch 002 | loss 0.95 | sic_loss 0.25 | cmd_loss 0.7 | num_updates 314",
        ]
    )
    assert last_train_line(log) == {"loss": 0.95, "sic_loss": 0.25, "cmd_loss": 0.7, "num_updates": 314.0}
    assert last_train_line("no training here") == {}


def test_minimal_pairs_summary_and_its_table():
    from cmd_demo.ablation import format_minimal_pairs, minimal_pairs_summary

    record = {
        "attributes": {"colour": {"accuracy": 80.0}, "shape": {"accuracy": 50.0}},
        "mean_accuracy": 65.0,
        "group_r1": 20.0,
    }
    assert minimal_pairs_summary(record) == {"mp_colour": 80.0, "mp_shape": 50.0, "mp_mean": 65.0, "mp_group_r1": 20.0}
    runs = {
        "sic": {
            s: {
                "test": _record(10.0),
                "valid": _record(20.0),
                "minimal_pairs": minimal_pairs_summary(dict(record, mean_accuracy=60.0 + 10 * s)),
            }
            for s in (1, 2)
        }
    }
    table = aggregate(runs)
    assert table["sic"]["mp_mean"] == pytest.approx((75.0, 7.0710678))
    text = format_minimal_pairs(table)
    head = text.splitlines()[0]
    assert head.index("colour") < head.index("mean") < head.index("group_r1")
    assert "75.0±7.1" in text and "80.0±0.0" in text
    # a coarse-to-fine checkpoint's record also holds the figures by its re-ranking score
    c2f = minimal_pairs_summary(dict(record, reranked={"mean_accuracy": 70.0, "group_r1": 30.0}))
    assert c2f["mp_reranked_mean"] == 70.0 and c2f["mp_reranked_group_r1"] == 30.0 and c2f["mp_mean"] == 65.0
    runs["c2f"] = {1: {"test": _record(10.0), "valid": _record(20.0), "minimal_pairs": c2f}}
    text = format_minimal_pairs(aggregate(runs))
    head = text.splitlines()[0]
    assert head.index("group_r1") < head.index("reranked_mean") < head.index("reranked_group_r1")
    sic_line = next(line for line in text.splitlines() if line.startswith("sic"))
    assert sic_line.rstrip().endswith("-")  # a cosine-only row has no re-ranked figures


def test_a_run_counts_as_finished_only_with_every_record_its_row_reads(tmp_path):
    from cmd_demo.ablation import row_spec, run_finished

    for name in ("recall_valid.json", "recall_test.json"):
        assert not run_finished(str(tmp_path), row_spec("c2f"))
        (tmp_path / name).write_text("{}")
    assert run_finished(str(tmp_path), row_spec("c2f"))
    # the re-ranked row of the same run also needs its re-scored records, per score
    assert not run_finished(str(tmp_path), row_spec("c2f-rerank10-simsic"))
    for split in ("valid", "test"):
        (tmp_path / f"recall_{split}_rerank10_simsic.json").write_text("{}")
    assert run_finished(str(tmp_path), row_spec("c2f-rerank10-simsic"))
    assert not run_finished(str(tmp_path), row_spec("c2f-rerank10"))


def test_plot_valid_curves_reads_harness_records_and_refuses_a_wrong_row(tmp_path, capsys):
    import importlib.util
    import json
    import os

    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location(
        "plot_valid_curves", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "plot_valid_curves.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    record = {
        "rows": {
            "sic": {
                "per_seed": {
                    "1": {"valid_curve": [[10, 50.0], [20, 60.0]]},
                    "2": {"valid_curve": [[10, 54.0], [20, 62.0]]},
                }
            }
        }
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    out = tmp_path / "c.png"
    assert module.main(["--out", str(out), f"SIC long={path}:sic"]) == 0
    assert "SIC long: 10 52.0±2.8, 20 61.0±1.4" in capsys.readouterr().out
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="no row 'cmd'"):
        module.main(["--out", str(out), f"x={path}:cmd"])


def test_other_paired_comparisons_name_two_rows_of_the_sweep():
    from cmd_demo.ablation import format_paired, parse_comparison
    from cmd_demo.stats import paired_difference

    rows = ["sic", "cmd-qkv", "cmd-uniform"]
    assert parse_comparison("cmd-qkv:cmd-uniform", rows) == ("cmd-qkv", "cmd-uniform")
    for bad in ("cmd-qkv", "cmd-qkv:c2f", "sic:sic", "cmd-qkv-cmd-uniform"):
        with pytest.raises(ValueError, match="ROW:BASE"):
            parse_comparison(bad, rows)
    d = paired_difference({1: 12.0, 2: 14.0, 3: 13.0}, {1: 10.0, 2: 11.0, 3: 11.5})
    line = format_paired({"cmd-qkv - cmd-uniform": d}, base=None)
    assert line.startswith("  cmd-qkv - cmd-uniform: +2.17 [") and "3 paired seeds" in line


def test_a_report_from_the_committed_records_gives_re_ranked_rows_their_own_figures(tmp_path):
    """--report-only on records alone (no checkpoint, no work dir): a re-ranked row reads its re-scored
    record, not its base run's SIC one."""
    pytest.importorskip("matplotlib", reason="the report draws its figures (the plot extra; not in environment B)")
    import json
    import os
    import shutil
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(repo, "benchmarks", "results", "powered", "u2400", "c2f")
    for seed in ("1", "2"):
        shutil.copytree(os.path.join(src, f"seed{seed}"), tmp_path / "u2400" / "c2f" / f"seed{seed}")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "examples", "ablation.py"),
            "--work-dir",
            str(tmp_path / "none"),
            "--out-dir",
            str(tmp_path),
            "--max-update",
            "2400",
            "--seeds",
            "1",
            "2",
            "--no-minimal-pairs",
            "--rows",
            "c2f",
            "c2f-rerank10-simsiclogit",
            "--report-only",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "ablation_u2400.json") as f:
        record = json.load(f)
    rows = record["rows"]
    # the record names the checkout and the command that made it
    assert record["commit"] and f"(checkout {record['commit']})" in proc.stdout
    assert record["command"].endswith("--rows c2f c2f-rerank10-simsiclogit --report-only")
    for seed in ("1", "2"):
        with open(os.path.join(src, f"seed{seed}", "recall_test_rerank10_simsiclogit.json")) as f:
            reranked = json.load(f)["rerank"]["recall"]
        with open(os.path.join(src, f"seed{seed}", "recall_test.json")) as f:
            sic = json.load(f)["recall"]
        assert rows["c2f-rerank10-simsiclogit"]["per_seed"][seed]["test"] == reranked
        assert rows["c2f"]["per_seed"][seed]["test"] == sic
        assert reranked["mean_r1"] != sic["mean_r1"]
    assert not (tmp_path / "none").exists()

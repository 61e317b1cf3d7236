"""The ablation harness of the CPU demo (``examples/ablation.py``): rows (method variants) x training seeds.

A row name maps to fairseq-hydra-train overrides (:func:`row_spec`, :func:`row_overrides`): ``sic``
(alpha = 0), ``cmd-VARIANT[-aALPHA]`` (the fusion's ``model.fusion_attention`` and
``criterion.cmd_weight``), ``c2f`` / ``c2f-cmd`` (the tiny config's method groups) and
``c2f[-cmd]-rerankK[-simsic|-simsiclogit]`` (the same checkpoint re-scored with eval_recall.py ``--rerank-k K``).
:func:`run_ablation` trains and scores every (row, seed) with the demo's stages
(:mod:`cmd_demo.demo`), reusing runs whose records exist; :func:`aggregate` gives mean and sample
standard deviation over seeds, :func:`format_table` the printed table and :func:`plot_alpha` the
figure of test mean R@1 against alpha.
"""

import gzip
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Optional

from cmd_demo.demo import EXAMPLES, build_inputs, minimal_pairs_stage, run, train_and_score
from cmd_demo.stats import holm_adjust, paired_difference, seeds_for_power
from cmd_plugin.files import atomic_write, atomic_write_json
from cmd_plugin.modules.fusion import FUSION_ATTENTION_CHOICES
from cmd_plugin.progress import fairseq_log_fields

DEFAULT_ROWS = ["sic", "cmd-literal", "cmd-cosine", "cmd-qkv", "cmd-qkv-a0.25", "cmd-qkv-a0.5"]
C2F_ROWS = ["sic", "cmd-qkv", "c2f", "c2f-cmd", "c2f-rerank10", "c2f-rerank50"]
REPORTED = [f"{d}_r{k}" for d in ("s2i", "i2s", "mean") for k in (1, 5, 10)]
ROW_PATTERN = re.compile(r"^cmd-(?P<variant>[a-z]+)(?:-a(?P<alpha>[0-9]*\.?[0-9]+))?$")
C2F_PATTERN = re.compile(r"^(?P<base>c2f(?:-cmd)?)(?:-rerank(?P<k>[0-9]+)(?P<score>-simsic|-simsiclogit)?)?$")
RERANK_ROW_SCORES = {None: "sim", "-simsic": "sim+sic", "-simsiclogit": "sim+sic_logit"}  # row suffix -> score
C2F_METHODS = {"c2f": ("method=c2f", 0.0), "c2f-cmd": ("method=c2f_cmd", 1.0)}
# each coarse-to-fine part alone on SIC, with the tiny config's sizes and schedule (queue_start, SIM curriculum)
C2F_PART_ROWS = {
    "sic-queue": ["method=sic", "model.queue_size=1024"],
    "sic-distill": ["method=sic", "model.c2f_momentum=true", "criterion.distill_alpha=0.4"],
    "sic-sim": ["method=sic", "model.multimodal_layers=2", "criterion.sim_weight=1.0"],
}
# C2F with the paper's SIM input (every speech frame, every patch) instead of the tiny config's cheaper one
C2F_VARIANT_ROWS = {
    "c2f-every-frame": ["method=c2f", "model.multimodal_speech_tokens=0", "model.multimodal_patch_pool=1"],
}


def row_spec(row: str):
    """A row name -> {"overrides", "alpha", "variant", "base", "rerank_k", "rerank_score"}: ``base`` is the
    row whose checkpoint a re-ranked row re-scores (None for a row that trains), ``rerank_k`` its K."""
    match = C2F_PATTERN.match(row)
    if match:
        overrides, alpha = C2F_METHODS[match["base"]]
        k = int(match["k"]) if match["k"] else 0
        if match["k"] and k < 10:
            raise ValueError(f"row {row!r}: re-ranking K must be >= 10 (R@10 is reported)")
        return {
            "overrides": [overrides],
            "alpha": alpha,
            "variant": None,
            "base": match["base"] if k else None,
            "rerank_k": k,
            "rerank_score": RERANK_ROW_SCORES[match["score"]],
        }
    overrides, alpha, variant = row_overrides(row)
    return {
        "overrides": overrides,
        "alpha": alpha,
        "variant": variant,
        "base": None,
        "rerank_k": 0,
        "rerank_score": None,
    }


def row_overrides(row: str):
    """A row name -> (fairseq-hydra-train overrides, alpha, fusion variant or None)."""
    if row == "sic":
        return ["method=sic"], 0.0, None
    if row in C2F_PART_ROWS or row in C2F_VARIANT_ROWS:
        return list({**C2F_PART_ROWS, **C2F_VARIANT_ROWS}[row]), 0.0, None
    if C2F_PATTERN.match(row):
        spec = row_spec(row)
        return spec["overrides"], spec["alpha"], spec["variant"]
    match = ROW_PATTERN.match(row)
    if not match or match["variant"] not in FUSION_ATTENTION_CHOICES:
        raise ValueError(
            f"unknown row {row!r}: expected 'sic', 'cmd-VARIANT[-aALPHA]' with VARIANT in "
            f"{FUSION_ATTENTION_CHOICES} (e.g. cmd-cosine-a0.5), 'c2f', 'c2f-cmd', "
            f"'c2f[-cmd]-rerankK[-simsic|-simsiclogit]' (e.g. c2f-rerank10), one C2F part on SIC {sorted(C2F_PART_ROWS)} "
            f"or {sorted(C2F_VARIANT_ROWS)}"
        )
    alpha = float(match["alpha"]) if match["alpha"] else 1.0
    if alpha <= 0:
        raise ValueError(f"row {row!r}: alpha must be positive (use 'sic' for alpha = 0)")
    return ([f"criterion.cmd_weight={alpha}", f"model.fusion_attention={match['variant']}"], alpha, match["variant"])


ATTENTION_KEYS = ("attn_entropy", "attn_max", "attn_cos_mean_pool")
SIM_KEYS = ("sim_auc_hard", "sim_auc_random", "sim_loss", "sim_prior")  # the matching head on valid (C2F)


def best_valid_line(log_text: str):
    """The fields of the validation line whose mean_r1 selected checkpoint_best.pt (fairseq keeps
    the last of equal bests), from a fairseq-hydra-train log; None when there is none."""
    best = None
    for line in log_text.splitlines():
        if "valid on 'valid' subset" not in line:
            continue
        fields = fairseq_log_fields(line)
        if "mean_r1" in fields and (best is None or fields["mean_r1"] >= best["mean_r1"]):
            best = fields
    return best


FINAL_TRAIN_KEYS = ("sic_loss", "cmd_loss")


def last_train_line(log_text: str):
    """The fields of the last end-of-epoch training line (fairseq's ``[train]`` epoch summary) of a
    fairseq-hydra-train log, as floats; {} when there is none."""
    last = {}
    for line in log_text.splitlines():
        if "][train][INFO] - epoch " not in line:
            continue
        last = fairseq_log_fields(line)
    return last


def valid_curve(log_text: str):
    """[(num_updates, valid mean R@1)] of every validation in a fairseq-hydra-train log, in order."""
    curve = []
    for line in log_text.splitlines():
        if "valid on 'valid' subset" not in line:
            continue
        fields = dict(part.strip().rpartition(" ")[::2] for part in line.split(" | "))
        if "mean_r1" in fields and "num_updates" in fields:
            curve.append((int(float(fields["num_updates"])), float(fields["mean_r1"])))
    return curve


def selection_summary(curve):
    """A valid curve [(update, mean R@1)] -> {"best_update", "best_valid", "final_valid", "valid_drop"}:
    where the selected checkpoint was (the last of equal bests, as fairseq keeps it) and how far valid
    mean R@1 fell from it by the last validation (0 when the best is the last); {} for no curve."""
    if not curve:
        return {}
    best_update, best_valid = max(reversed(curve), key=lambda point: point[1])
    final_valid = curve[-1][1]
    return {
        "best_update": best_update,
        "best_valid": best_valid,
        "final_valid": final_valid,
        "valid_drop": best_valid - final_valid,
    }


def minimal_pairs_summary(record):
    """The figures of a score_minimal_pairs.py record the table keeps: pairwise accuracy per
    attribute, their mean, and the base image's R@1 in its group (all in %)."""
    summary = {f"mp_{attr}": v["accuracy"] for attr, v in record["attributes"].items()}
    summary["mp_mean"] = record["mean_accuracy"]
    summary["mp_group_r1"] = record["group_r1"]
    reranked = record.get("reranked")
    if reranked:  # a coarse-to-fine checkpoint: also scored by its re-ranking score within each group
        summary["mp_reranked_mean"] = reranked["mean_accuracy"]
        summary["mp_reranked_group_r1"] = reranked["group_r1"]
    return summary


def mean_sd(values):
    """(mean, sample standard deviation; 0 for one value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_sd(stat, num_seeds: int, digits: int = 1) -> str:
    """``mean±sd``; the mean alone for one seed, whose spread is unknown, not 0 (the tables give the
    number of seeds)."""
    mean, sd = stat
    return f"{mean:.{digits}f}±{sd:.{digits}f}" if num_seeds > 1 else f"{mean:.{digits}f}"


def aggregate(runs):
    """runs: {row: {seed: {"test": record, "valid": record}}} -> {row: {key: (mean, sd)}} over seeds
    for the test split's REPORTED keys and ``valid_mean_r1``."""
    table = {}
    for row, by_seed in runs.items():
        seeds = sorted(by_seed)
        stats = {key: mean_sd([by_seed[s]["test"]["recall"][key] for s in seeds]) for key in REPORTED}
        stats["valid_mean_r1"] = mean_sd([by_seed[s]["valid"]["recall"]["mean_r1"] for s in seeds])
        for group, keys in (("attention", ATTENTION_KEYS), ("sim", SIM_KEYS)):  # on valid at the selected checkpoint
            for key in keys:
                values = [by_seed[s].get(group, {}).get(key) for s in seeds]
                if all(v is not None for v in values):
                    stats[key] = mean_sd(values)
        selections = [selection_summary(by_seed[s].get("valid_curve", [])) for s in seeds]
        if all(selections):  # where each seed's checkpoint was selected, and how valid ended
            for key in ("best_update", "valid_drop"):
                stats[key] = mean_sd([sel[key] for sel in selections])
        for key in FINAL_TRAIN_KEYS:  # the training losses of the last epoch
            values = [by_seed[s].get("final_train", {}).get(key) for s in seeds]
            if all(v is not None for v in values):
                stats[f"train_{key}"] = mean_sd(values)
        mp_keys = set.intersection(*(set(by_seed[s].get("minimal_pairs", {})) for s in seeds))
        for key in sorted(mp_keys):  # minimal pairs of the selected checkpoint (S_cls cosine)
            stats[key] = mean_sd([by_seed[s]["minimal_pairs"][key] for s in seeds])
        stats["num_seeds"] = len(seeds)
        table[row] = stats
    return table


def format_table(table) -> str:
    """Rows of mean±sd (x100 recall), test split, plus the selection metric (valid mean R@1)."""
    head = ["row", "seeds"] + [k.replace("_r", " R@") for k in REPORTED] + ["valid mean R@1"]
    lines = []
    for row, stats in table.items():
        cells = [row, str(stats["num_seeds"])]
        cells += [format_mean_sd(stats[k], stats["num_seeds"]) for k in REPORTED + ["valid_mean_r1"]]
        lines.append(cells)
    return _aligned(head, lines)


def format_minimal_pairs(table) -> str:
    """Rows of mean±sd over seeds of the minimal-pairs figures (:func:`minimal_pairs_summary`)."""
    last = ("mp_mean", "mp_group_r1", "mp_reranked_mean", "mp_reranked_group_r1")  # after the attributes
    keys = sorted(
        {k for st in table.values() for k in st if k.startswith("mp_")},
        key=lambda k: (last.index(k) + 1 if k in last else 0, k),
    )
    head = ["row"] + [k[3:] for k in keys]
    lines = [
        [row] + [format_mean_sd(st[k], st["num_seeds"]) if k in st else "-" for k in keys] for row, st in table.items()
    ]
    return _aligned(head, lines)


def _aligned(head, lines) -> str:
    """A text table: the first column left-aligned, the others right-aligned, a rule under the head."""
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]

    def fmt(cells):
        return " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(c) for c in lines])


def mean_curve(curves):
    """Seeds' valid curves [(update, mean R@1)] -> [(update, mean, sd)] at the updates every seed validated."""
    if not curves or not all(curves):
        return []
    common = set.intersection(*({u for u, _ in c} for c in curves))
    out = []
    for update in sorted(common):
        m, sd = mean_sd([dict(c)[update] for c in curves])
        out.append((update, m, sd))
    return out


def plot_curves(curves, path, title):
    """Valid mean R@1 against updates (mean ± sd over seeds) per row that trained; False if none."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {row: mean_curve(c) for row, c in curves.items()}
    rows = {row: c for row, c in rows.items() if c}
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for row, c in rows.items():
        ax.errorbar(
            [u for u, _, _ in c], [m for _, m, _ in c], yerr=[sd for _, _, sd in c], marker=".", capsize=2, label=row
        )
    ax.set_xlabel("updates")
    ax.set_ylabel("valid mean R@1 (mean ± sd over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def alpha_series(table):
    """{fusion variant: [(α, mean, sd, seeds)]} of test mean R@1 sorted by α, with ``sic`` (α = 0)
    shared by every variant: the points of the paper's Figure 2 (:func:`plot_alpha`)."""
    base = table.get("sic")
    alpha_variant = {row: row_overrides(row)[1:] for row in table if row != "sic"}
    series = {}
    for variant in FUSION_ATTENTION_CHOICES:
        points = sorted(
            (alpha, *table[row]["mean_r1"], table[row]["num_seeds"])
            for row, (alpha, v) in alpha_variant.items()
            if v == variant
        )
        if points:
            series[variant] = ([(0.0, *base["mean_r1"], base["num_seeds"])] if base else []) + points
    return series


def plot_alpha(table, path, title):
    """Test mean R@1 (mean ± sd over seeds) against α for each fusion variant, each point labelled
    with its number of seeds; returns :func:`alpha_series`'s points."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq leaves the root logger at DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = alpha_series(table)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (variant, points) in enumerate(series.items()):
        alphas, means, sds, seeds = zip(*points)
        dodge = 0.012 * (i - (len(series) - 1) / 2)  # side by side, so that the error bars stay apart
        line = ax.errorbar(
            [a + dodge for a in alphas], means, yerr=sds, marker="o", capsize=3, label=f"fusion: {variant}"
        )
        for a, m, n in zip(alphas, means, seeds):
            if a == 0.0 and i:  # sic, shared: labelled once
                continue
            ax.annotate(
                f"n={n}",
                (a + dodge, m),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.lines[0].get_color(),
            )
    ax.set_xlabel("α (weight of L_cmd)")
    ax.set_ylabel("test mean R@1 (mean ± sd over n seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if series:  # no CMD row: an empty plot, no legend
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return series


def paired_vs(runs, base: str = "sic", key: str = "mean_r1", split: str = "test"):
    """{row: paired difference of ``key`` on ``split`` against ``base`` over common seeds} (cmd_demo.stats)."""
    if base not in runs:
        return {}
    ref = {s: r[split]["recall"][key] for s, r in runs[base].items()}
    return {
        row: paired_difference({s: r[split]["recall"][key] for s, r in by_seed.items()}, ref)
        for row, by_seed in runs.items()
        if row != base
    }


def parse_comparison(text: str, rows, option: str = "--compare"):
    """``ROW:BASE`` (both among ``rows``) -> (ROW, BASE): a paired difference to report besides those against sic."""
    row, sep, base = text.partition(":")
    if not sep or row not in rows or base not in rows or row == base:
        raise ValueError(f"{option} {text!r}: expected ROW:BASE with two different rows of --rows {rows}")
    return row, base


# the metrics of a declared (primary) comparison: each row's per-seed value, None where the run lacks it
PRIMARY_METRICS = {
    "test mean R@1": lambda record: record["test"]["recall"]["mean_r1"],
    "minimal-pairs mean": lambda record: (record.get("minimal_pairs") or {}).get("mp_mean"),
}


def primary_tests(runs, primaries, alpha: float = 0.05):
    """The declared comparisons: every (ROW, BASE) of ``primaries`` on every metric of
    :data:`PRIMARY_METRICS` -> {"ROW - BASE on METRIC": paired difference with its two-sided p and
    Holm's adjusted p across ALL of them ("p_holm"), "significant" (p_holm <= alpha)}. A declared
    test without paired seeds yet stays in the family with p = 1 (so the correction never shrinks
    because a run is missing) and is marked "missing"."""
    tests, pvalues = {}, {}
    for row, base in primaries:
        for metric, value in PRIMARY_METRICS.items():
            name = f"{row} - {base} on {metric}"
            a = {s: value(r) for s, r in runs.get(row, {}).items() if value(r) is not None}
            b = {s: value(r) for s, r in runs.get(base, {}).items() if value(r) is not None}
            if len(set(a) & set(b)) < 2:
                tests[name] = {"missing": True, "n": len(set(a) & set(b))}
                pvalues[name] = 1.0
                continue
            tests[name] = {**paired_difference(a, b), "missing": False}
            pvalues[name] = tests[name]["p"]
    adjusted = holm_adjust(pvalues)
    for name, test in tests.items():
        test["p_holm"] = adjusted[name]
        test["significant"] = (not test["missing"]) and adjusted[name] <= alpha
    return tests


def plan_seeds(records, primaries, deltas, alpha: float = 0.05, power: float = 0.8):
    """How many paired seeds each declared test needs: for every (ROW, BASE) of ``primaries`` and
    metric of ``deltas`` ({metric of PRIMARY_METRICS: the smallest difference worth detecting}), the
    spread (sd) of the per-seed differences in the ablation ``records`` (their "rows" -> "per_seed";
    the first record holding both rows with at least 3 common seeds), and the seeds for ``power``
    at Bonferroni's alpha / (number of tests), the level Holm's first step applies (so enough for
    every step). Returns {name: {"sd", "seeds_measured", "source", "delta", "seeds"}}."""
    values = {
        "test mean R@1": lambda seed: seed["test"]["mean_r1"],
        "minimal-pairs mean": lambda seed: (seed.get("minimal_pairs") or {}).get("mp_mean"),
    }
    tests = len(primaries) * len(deltas)
    plan = {}
    for row, base in primaries:
        for metric, delta in deltas.items():
            name = f"{row} - {base} on {metric}"
            plan[name] = {"sd": None, "seeds_measured": 0, "source": None, "delta": delta, "seeds": None}
            for source, record in records:
                per = record.get("rows", {})
                if row not in per or base not in per:
                    continue
                a = {s: values[metric](v) for s, v in per[row]["per_seed"].items()}
                b = {s: values[metric](v) for s, v in per[base]["per_seed"].items()}
                common = [s for s in a if s in b and a[s] is not None and b[s] is not None]
                if len(common) < 3:
                    continue
                sd = statistics.stdev([a[s] - b[s] for s in common])
                plan[name].update(
                    sd=sd,
                    seeds_measured=len(common),
                    source=source,
                    seeds=seeds_for_power(delta, sd, alpha / tests, power),
                )
                break
    return plan


def format_primary(tests, alpha: float = 0.05) -> str:
    """One line per declared test: difference, 95 % interval, p, Holm-adjusted p and the verdict."""
    lines = []
    for name, d in tests.items():
        if d["missing"]:
            lines.append(f"  {name}: not run yet ({d['n']} paired seeds; counted with p = 1)")
            continue
        verdict = f"significant at {alpha:g} after Holm" if d["significant"] else "not significant after Holm"
        lines.append(
            f"  {name}: {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] ({d['n']} paired seeds, "
            f"sd {d['sd']:.2f}; p {d['p']:.4f}, Holm p {d['p_holm']:.4f}: {verdict})"
        )
    return "\n".join(lines)


def format_paired(paired, base: Optional[str] = "sic") -> str:
    """One line per difference; ``base`` None: the keys already read 'ROW - BASE'."""
    lines = []
    for row, d in paired.items():
        name = row if base is None else f"{row} - {base}"
        if d["low"] is None:
            lines.append(f"  {name}: {d['mean']:+.2f} ({d['n']} seed: no interval)")
            continue
        verdict = (
            "excludes 0"
            if d["resolved"]
            else (
                f"straddles 0; ~{d['seeds_needed']} seeds would resolve it at this spread"
                if d["seeds_needed"]
                else "straddles 0"
            )
        )
        lines.append(
            f"  {name}: {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] "
            f"(95 %, {d['n']} paired seeds, sd {d['sd']:.2f}; {verdict})"
        )
    return "\n".join(lines)


def plot_paired(paired, path, title, base: str = "sic"):
    """Each row's paired difference of test mean R@1 against ``base`` with its 95 % interval."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r, d in paired.items() if d["low"] is not None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(rows) + 1.5))
    for i, row in enumerate(rows):
        d = paired[row]
        ax.errorbar([d["mean"]], [i], xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], marker="o", capsize=3)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(f"test mean R@1 minus {base} (same seeds; 95 % interval)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def rerank_suffix(k: int, score: str) -> str:
    """The file-name part of a re-scored record: recall_<split>_<this>.json."""
    suffix = {v: k for k, v in RERANK_ROW_SCORES.items()}[score]  # the row's own spelling: -simsic -> _simsic
    return f"rerank{k}" + ("_" + suffix[1:] if suffix else "")


def rescore(inputs, save_dir, k, score, splits=("valid", "test"), timings=None, tag=""):
    """Re-rank the checkpoint_best.pt of a trained coarse-to-fine run with eval_recall.py --rerank-k K;
    returns {split: record} with ``recall`` = the re-ranked figures (the SIC ones kept as ``sic_recall``)."""
    records = {}
    suffix = rerank_suffix(k, score)
    timings = {} if timings is None else timings
    for split in splits:
        path = os.path.join(save_dir, f"recall_{split}_{suffix}.json")
        if not os.path.isfile(path):
            timings[f"rescore {tag} {split}"] = run(
                [
                    sys.executable,
                    os.path.join(EXAMPLES, "eval_recall.py"),
                    "--checkpoint",
                    os.path.join(save_dir, "checkpoint_best.pt"),
                    "--data",
                    inputs["manifests"],
                    "--split",
                    split,
                    "--rerank-k",
                    str(k),
                    "--rerank-score",
                    score,
                    "--output-json",
                    path,
                    "--no-progress",
                ],
                log_path=os.path.join(save_dir, f"eval_{split}_{suffix}.log"),
            )
        with open(path) as f:
            record = json.load(f)
        record["sic_recall"] = record["recall"]
        record["recall"] = record["rerank"]["recall"]
        records[split] = record
    return records


def run_finished(save_dir, spec) -> bool:
    """Whether the run of a row (a spec of :func:`row_spec`) in ``save_dir`` has every record the table
    reads: the valid and test recall, and for a re-ranked row its re-scored recall as well."""
    names = ["recall_valid.json", "recall_test.json"]
    if spec["rerank_k"]:
        suffix = rerank_suffix(spec["rerank_k"], spec["rerank_score"])
        names += [f"recall_{split}_{suffix}.json" for split in ("valid", "test")]
    return all(os.path.isfile(os.path.join(save_dir, n)) for n in names)


def checkout_commit():
    """The commit of the checkout that made a report, with "-dirty" when it has uncommitted changes to
    tracked files; None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=EXAMPLES,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return out.stdout.strip()


def read_train_log(path):
    """A run's training log, or its gzipped copy as the records keep it (``PATH.gz``); None if neither."""
    for name, opener in ((path, open), (path + ".gz", gzip.open)):
        if os.path.isfile(name):
            with opener(name, "rt") as f:
                return f.read()
    return None


def write_json(record, path):
    atomic_write_json(path, record, indent=1)


def print_plan(args):
    """``--plan-from``: the seeds the declared comparisons need, from recorded sweeps; builds nothing."""
    rows = list(dict.fromkeys(args.rows))
    primaries = [parse_comparison(c, rows, "--primary") for c in args.primary]
    if not primaries:
        raise SystemExit("--plan-from needs the declared comparisons (--primary ROW:BASE ...)")
    records = []
    for path in args.plan_from:
        try:
            with open(path) as f:
                records.append((path, json.load(f)))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path}: cannot read an ablation record ({e})") from None
    deltas = {"test mean R@1": args.plan_delta_r1, "minimal-pairs mean": args.plan_delta_mp}
    plan = plan_seeds(records, primaries, deltas, power=args.plan_power)
    tests = len(plan)
    print(
        f"seeds for {args.plan_power:.0%} power, two-sided paired t at 0.05 / {tests} = {0.05 / tests:.4f} "
        "(Bonferroni: Holm's first step), at the spread of the recorded sweeps:"
    )
    for name, p in plan.items():
        if p["sd"] is None:
            print(f"  {name}: no recorded sweep has both rows with 3 or more common seeds")
            continue
        print(
            f"  {name}: delta {p['delta']:g}, sd {p['sd']:.2f} over {p['seeds_measured']} seeds "
            f"({os.path.basename(p['source'])}) -> {p['seeds'] or 'more than 1000'} seeds"
        )
    needed = [p["seeds"] for p in plan.values() if p["seeds"]]
    if needed:
        print(f"the sweep needs max({', '.join(map(str, needed))}) = {max(needed)} paired seeds per row")
    return plan


def run_ablation(args, argv=None):
    """The sweep with the options of ``examples/ablation.py`` (the demo's corpus options, ``rows``,
    ``seeds``, ``out_dir``, ``name``): train or reuse each run, print the table, write NAME_u<updates>.json
    and .png. ``argv`` (default: ``sys.argv[1:]``) goes into the record's ``command``."""
    rows = list(dict.fromkeys(args.rows))
    specs = {row: row_spec(row) for row in rows}  # bad row names fail before any work
    comparisons = [parse_comparison(c, rows) for c in (getattr(args, "compare", None) or [])]
    primaries = [parse_comparison(c, rows, "--primary") for c in (getattr(args, "primary", None) or [])]
    overrides = {row: spec["overrides"] for row, spec in specs.items()}

    timings = {}
    t0 = time.time()
    report_only = getattr(args, "report_only", False)
    # a report reads only the runs' records: nothing is built, the work dir only names the corpus
    inputs = {"work": os.path.abspath(args.work_dir)} if report_only else build_inputs(args, timings)
    out_dir = os.path.abspath(args.out_dir or os.path.join(inputs["work"], "ablation"))
    tag_updates = f"u{args.max_update}" if args.max_update else "udefault"
    runs, trained, rescored, missing = {}, 0, 0, []
    for seed in args.seeds:  # seed-major: every row gets its first seed before any row gets a third
        for row in rows:
            spec = specs[row]
            trained_row = spec["base"] or row  # a re-ranked row re-scores its base row's run
            save_dir = os.path.join(out_dir, tag_updates, trained_row, f"seed{seed}")
            paths = {split: os.path.join(save_dir, f"recall_{split}.json") for split in ("valid", "test")}
            if report_only and not run_finished(save_dir, spec):
                missing.append(f"{row} seed {seed}")
                continue
            rescored_before = spec["rerank_k"] and run_finished(save_dir, spec)
            if (
                spec["rerank_k"]
                and all(os.path.isfile(p) for p in paths.values())
                and (rescored_before or os.path.isfile(os.path.join(save_dir, "checkpoint_best.pt")))
            ):
                # a re-ranked row: its base run's re-scored records, re-scoring the checkpoint if they are missing
                records = rescore(
                    inputs, save_dir, spec["rerank_k"], spec["rerank_score"], timings=timings, tag=f"{row} seed{seed}"
                )
                if not rescored_before:
                    rescored += 1
                print(
                    f"{row} seed {seed}: {'reusing' if rescored_before else 're-scored'} {save_dir}: test mean R@1 "
                    f"{records['test']['recall']['mean_r1']:.1f}",
                    flush=True,
                )
            elif all(os.path.isfile(p) for p in paths.values()):
                records = {}
                for split, p in paths.items():
                    with open(p) as f:
                        records[split] = json.load(f)
                print(f"reusing {row} seed {seed} ({save_dir})", flush=True)
            else:
                os.makedirs(os.path.dirname(save_dir), exist_ok=True)
                records = train_and_score(
                    inputs,
                    save_dir,
                    overrides[row],
                    seed,
                    args.max_update,
                    save_dir + ".train.log",
                    splits=("valid", "test"),
                    timings=timings,
                    tag=f"{trained_row} seed{seed}",
                )
                trained += 1
                if spec["rerank_k"]:
                    records = rescore(
                        inputs,
                        save_dir,
                        spec["rerank_k"],
                        spec["rerank_score"],
                        timings=timings,
                        tag=f"{row} seed{seed}",
                    )
                print(
                    f"{row} seed {seed}: test mean R@1 {records['test']['recall']['mean_r1']:.1f}, "
                    f"valid mean R@1 {records['valid']['recall']['mean_r1']:.1f}",
                    flush=True,
                )
            log_text = read_train_log(save_dir + ".train.log")
            if log_text is not None:
                best = best_valid_line(log_text) or {}
                records["attention"] = {k: best[k] for k in ATTENTION_KEYS if k in best}
                records["sim"] = {k: best[k] for k in SIM_KEYS if k in best}
                records["valid_curve"] = valid_curve(log_text)
                last = last_train_line(log_text)
                records["final_train"] = {k: last[k] for k in FINAL_TRAIN_KEYS if k in last}
            if (
                getattr(args, "minimal_pairs", True) and not spec["rerank_k"]
            ):  # re-ranking leaves S_cls and so these unchanged
                mp_json = os.path.join(save_dir, "minimal_pairs_score.json")
                mp_record = None
                if os.path.isfile(mp_json):
                    with open(mp_json) as f:
                        mp_record = json.load(f)
                elif not report_only:
                    mp_record = minimal_pairs_stage(
                        inputs["work"], os.path.join(save_dir, "checkpoint_best.pt"), timings
                    )
                if mp_record is not None:
                    records["minimal_pairs"] = minimal_pairs_summary(mp_record)
            runs.setdefault(row, {})[seed] = records

    if not runs:
        raise SystemExit(
            f"no finished run under {os.path.join(out_dir, tag_updates)} for rows {rows} and seeds "
            f"{args.seeds} (--report-only trains nothing)"
        )
    rows = [row for row in rows if row in runs]
    table = aggregate(runs)
    first = next(iter(next(iter(runs.values())).values()))["test"]
    counts, chance = first["counts"], first["chance"]
    header = (
        f"Ablation on the generated corpus ({inputs['work']}): test split {counts['num_utterances']} utterances x "
        f"{counts['num_images']} images; checkpoints chosen on valid mean R@1; seeds {args.seeds}; "
        f"max_update {args.max_update or 'of examples/tiny/config.yaml'}"
    )
    print()
    print(header)
    print(format_table(table))
    print(f"chance: mean R@1 {chance['mean_r1']:.1f}, R@10 {chance['mean_r10']:.1f}")
    if missing:
        print(f"not finished yet (left out): {', '.join(missing)}")
    # a re-ranked row has its base run's attention and SIM figures: shown once, with the base row
    attention_rows = [(row, st) for row, st in table.items() if "attn_entropy" in st and not specs[row]["rerank_k"]]
    if attention_rows:
        print("fusion attention on valid at the selected checkpoint (uniform: entropy 1, max 1/N, cos 1):")
        for row, st in attention_rows:
            print(f"  {row}: " + ", ".join(f"{k} {format_mean_sd(st[k], st['num_seeds'], 3)}" for k in ATTENTION_KEYS))
    sim_rows = [(row, st) for row, st in table.items() if "sim_auc_hard" in st and not specs[row]["rerank_k"]]
    if sim_rows:
        print(
            "matching head (SIM) on valid at the selected checkpoint (AUC of positives against the hardest "
            "SIC negative / a random image; loss against the prior's entropy):"
        )
        for row, st in sim_rows:
            print(
                f"  {row}: "
                + ", ".join(f"{k} {format_mean_sd(st[k], st['num_seeds'], 3)}" for k in SIM_KEYS if k in st)
            )
    selection_rows = [(row, st) for row, st in table.items() if "best_update" in st and not specs[row]["rerank_k"]]
    if selection_rows:
        print(
            "checkpoint selection on valid: the update of the selected checkpoint, and how far valid mean R@1 "
            "fell from it by the last validation:"
        )
        for row, st in selection_rows:
            print(
                f"  {row}: selected at update {format_mean_sd(st['best_update'], st['num_seeds'], 0)}, "
                f"valid at the end {format_mean_sd(st['valid_drop'], st['num_seeds'])} below its best"
                + "".join(
                    f"; last epoch's training {k} {format_mean_sd(st['train_' + k], st['num_seeds'], 3)}"
                    for k in FINAL_TRAIN_KEYS
                    if "train_" + k in st
                )
            )
    mp_rows = [(row, st) for row, st in table.items() if "mp_mean" in st]
    if mp_rows:
        print(
            "minimal pairs (pairwise accuracy %, chance 50; group R@1 %, chance 14.3) at the selected checkpoint, "
            "by the cosine (reranked_*: coarse-to-fine rows by their re-ranking score within each group):"
        )
        print(format_minimal_pairs(dict(mp_rows)))
    paired = paired_vs(runs)
    if paired:
        print("paired differences of test mean R@1 against sic (same seeds):")
        print(format_paired(paired))
        print("the same on valid (the selection split):")
        print(format_paired(paired_vs(runs, split="valid")))
    extra = {}
    for row, base in comparisons:
        if row in runs and base in runs and set(runs[row]) & set(runs[base]):
            extra[f"{row} - {base}"] = paired_vs({base: runs[base], row: runs[row]}, base=base)[row]
    if extra:
        print("other paired differences of test mean R@1 (same seeds):")
        print(format_paired(extra, base=None))
    primary = primary_tests(runs, primaries) if primaries else {}
    if primary:
        print(
            f"declared primary comparisons ({len(primary)} tests; Holm's correction across all of them, "
            "family-wise 0.05; every other figure above is exploratory):"
        )
        print(format_primary(primary))
    command = " ".join([os.path.basename(sys.executable), "examples/ablation.py"] + list(argv or sys.argv[1:]))
    print(f"made by: {command} (checkout {checkout_commit()})")
    record = {
        "paired_vs_sic": paired,
        "paired_vs_sic_valid": paired_vs(runs, split="valid") if paired else {},
        "paired_other": extra,
        "primary": primary,
        "command": command,
        "commit": checkout_commit(),
        "header": header,
        "rows": {
            row: {
                "overrides": overrides[row],
                "per_seed": {
                    str(s): {
                        "test": runs[row][s]["test"]["recall"],
                        "valid": runs[row][s]["valid"]["recall"],
                        "attention": runs[row][s].get("attention", {}),
                        "sim": runs[row][s].get("sim", {}),
                        "minimal_pairs": runs[row][s].get("minimal_pairs", {}),
                        "valid_curve": runs[row][s].get("valid_curve", []),
                    }
                    for s in sorted(runs[row])
                },
                "mean_sd": {k: list(v) if isinstance(v, tuple) else v for k, v in table[row].items()},
            }
            for row in rows
        },
        "chance": chance,
        "counts": counts,
        "missing": missing,
    }
    stem = os.path.join(out_dir, f"{args.name}_{tag_updates}")
    write_json(record, stem + ".json")
    plot = stem + ".png"
    corpus = os.path.basename(os.path.normpath(inputs["work"]))
    title = f"{corpus}: {args.max_update or 'default'} updates, seeds {args.seeds}"
    plot_alpha(table, plot, "test mean R@1 against α: " + title)
    if plot_paired(paired, stem + "_paired.png", title):
        plot += f", {stem}_paired.png"
    # a re-ranked row trained nothing: its curve is its base row's, drawn once
    curves = {
        row: [runs[row][s].get("valid_curve", []) for s in sorted(runs[row])]
        for row in rows
        if not specs[row]["rerank_k"]
    }
    if plot_curves(curves, stem + "_curves.png", title):
        plot += f", {stem}_curves.png"
    print(f"record: {stem}.json; plot: {plot}")
    print(
        f"{trained} runs trained, {len(specs) * len(args.seeds) - trained - rescored - len(missing)} reused"
        + (f", {rescored} re-scored" if rescored else "")
        + (f", {len(missing)} not finished" if missing else "")
        + f"; {time.time() - t0:.0f}s"
    )

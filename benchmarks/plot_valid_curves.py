#!/usr/bin/env python
"""Valid mean R@1 against updates for rows of several ablation records in one figure: how the
number of updates was chosen (for example SIC at 1,200 and at 2,400 updates).

    python benchmarks/plot_valid_curves.py --out curves.png \
        "SIC, 1,200 updates=RUNS/sic_curve_udefault.json:sic" "SIC, 2,400 updates=RUNS/cmd_core_u2400.json:sic"

Each curve is LABEL=RECORD:ROW, RECORD a NAME_u<updates>.json written by examples/ablation.py;
mean ± sd over the row's seeds at the updates every seed validated. Prints the curves as text too.
"""

import argparse
import json
import sys

from cmd_demo.ablation import mean_curve, plot_curves


def parse_curve(spec: str):
    label, sep, rest = spec.partition("=")
    path, sep2, row = rest.rpartition(":")
    if not sep or not sep2 or not label or not path or not row:
        raise SystemExit(f"{spec!r}: expected LABEL=RECORD.json:ROW")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read an ablation record ({e})")
    if row not in record.get("rows", {}):
        raise SystemExit(f"{path}: no row {row!r} (rows: {sorted(record.get('rows', {}))})")
    per_seed = record["rows"][row]["per_seed"]
    curves = [[tuple(p) for p in run.get("valid_curve", [])] for run in per_seed.values()]
    if not all(curves):
        raise SystemExit(f"{path}: row {row!r} has a seed without a valid curve (recorded from 2026-12-06 on)")
    return label, curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("curves", nargs="+", help="LABEL=RECORD.json:ROW")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default="valid mean R@1 during training")
    args = parser.parse_args(argv)
    curves = dict(parse_curve(spec) for spec in args.curves)
    for label, c in curves.items():
        print(f"{label}: " + ", ".join(f"{u} {m:.1f}±{sd:.1f}" for u, m, sd in mean_curve(c)))
    plot_curves(curves, args.out, args.title)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

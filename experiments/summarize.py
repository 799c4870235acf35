"""The tables of experiments/RESULTS.md from the runs of run_cuhk03_pair1.sh (runs/<name>/).

    .venv/bin/python experiments/summarize.py [--runs=runs]

Rank-1, rank-5 and mAP (percent) from each run's results.json (what reid-train printed at the
end), mean ± sample standard deviation over seeds, and each run's wall time.
"""

import argparse
import json
import os

import numpy as np


def load(runs, name):
    path = os.path.join(runs, name, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    wall = os.path.join(runs, name, "wall_seconds")
    return {"rank1": 100 * results["rank1"], "rank5": 100 * results["cmc"][4],
            "mAP": 100 * results["mAP"], "images_per_second": results["train_images_per_second"],
            "wall": int(open(wall).read()) if os.path.exists(wall) else None}


def mean_std(values):
    values = np.asarray(values, float)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def per_seed(rows, metric):
    return " / ".join(f"{row[metric]:.1f}" for row in rows)


def main_table(runs, seeds=(0, 1, 2)):
    lines = ["| data | method | rank-1 | rank-5 | mAP | seeds | per-seed rank-1 | per-seed mAP | "
             "wall per run |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    differences = []
    for data in ("labeled", "detected"):
        by_method = {}
        for method, label in (("baseline", "global baseline (K=0)"),
                              ("plnet", "PL-Net (K=4, peaks)")):
            rows = [load(runs, f"cuhk03_pair1_{data}_{method}_s{seed}") for seed in seeds]
            rows = [r for r in rows if r]
            if not rows:
                continue
            by_method[method] = rows
            walls = [r["wall"] for r in rows if r["wall"]]
            lines.append(
                f"| {data} | {label} | {mean_std([r['rank1'] for r in rows])} | "
                f"{mean_std([r['rank5'] for r in rows])} | {mean_std([r['mAP'] for r in rows])} | "
                f"{len(rows)} | {per_seed(rows, 'rank1')} | {per_seed(rows, 'mAP')} | "
                f"{np.mean(walls) / 60:.1f} min |")
        if len(by_method) == 2:
            n = min(len(by_method["baseline"]), len(by_method["plnet"]))
            for metric in ("rank1", "mAP"):
                paired = [p[metric] - b[metric] for b, p in
                          zip(by_method["baseline"][:n], by_method["plnet"][:n])]
                differences.append(f"- {data}, {metric}: PL-Net − baseline = "
                                   f"{np.mean(paired):+.1f} points (per seed: "
                                   f"{', '.join(f'{d:+.1f}' for d in paired)}; PL-Net ahead in "
                                   f"{sum(d > 0 for d in paired)} of {n} seeds)")
    return "\n".join(lines + [""] + differences)


def ablation_table(runs):
    rows = [("global baseline", "cuhk03_pair1_labeled_baseline_s0"),
            ("peaks K=2", "cuhk03_pair1_labeled_peaks_k2_s0"),
            ("peaks K=4 (main)", "cuhk03_pair1_labeled_plnet_s0"),
            ("peaks K=6", "cuhk03_pair1_labeled_peaks_k6_s0"),
            ("activation K=4", "cuhk03_pair1_labeled_activation_k4_s0"),
            ("stripes K=4", "cuhk03_pair1_labeled_stripes_k4_s0")]
    lines = ["| labeled, seed 0 | rank-1 | rank-5 | mAP | train images/s | wall |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, name in rows:
        r = load(runs, name)
        if r:
            lines.append(f"| {label} | {r['rank1']:.1f} | {r['rank5']:.1f} | {r['mAP']:.1f} | "
                         f"{r['images_per_second']:.0f} | {(r['wall'] or 0) / 60:.1f} min |")
    return "\n".join(lines)


def synthetic_table(runs):
    lines = ["| synthetic_persons, seed 0 | rank-1 | rank-5 | mAP | wall |",
             "| --- | --- | --- | --- | --- |"]
    for label, name in (("global baseline (K=0)", "synthetic_baseline_s0"),
                        ("PL-Net (K=4, peaks)", "synthetic_plnet_s0")):
        r = load(runs, name)
        if r:
            lines.append(f"| {label} | {r['rank1']:.1f} | {r['rank5']:.1f} | {r['mAP']:.1f} | "
                         f"{(r['wall'] or 0) / 60:.1f} min |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    runs = parser.parse_args().runs
    print("## Main table\n\n" + main_table(runs))
    print("\n## Ablation\n\n" + ablation_table(runs))
    print("\n## synthetic_persons\n\n" + synthetic_table(runs))


if __name__ == "__main__":
    main()

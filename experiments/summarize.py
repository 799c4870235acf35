"""The tables of experiments/RESULTS.md, built from experiments/results/*.json alone.

    .venv/bin/python experiments/summarize.py                  # print every table
    .venv/bin/python experiments/summarize.py --collect=runs/X --recipe=R --extra="--seed=1"

`--collect` (what run_cuhk03_pair1.sh calls after each run) copies a finished run's results and
flags (results.json, config.json, wall time; never checkpoints or images) into
experiments/results/<run name>.json. The tables pair runs by their recorded seed, never by
position, and check that each run's num_parts, part strategy and recipe are the ones its row
claims.
"""

import argparse
import glob
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")


def collect(workdir, recipe, extra, results_dir=RESULTS_DIR):
    """Writes `<results_dir>/<basename(workdir)>.json` from a finished reid-train workdir."""
    def read(name):
        with open(os.path.join(workdir, name)) as f:
            return json.load(f)

    wall = os.path.join(workdir, "wall_seconds")
    record = {"name": os.path.basename(os.path.normpath(workdir)), "recipe": recipe,
              "extra_flags": extra.split(), "config": read("config.json"),
              "results": read("results.json"),
              "wall_seconds": int(open(wall).read()) if os.path.exists(wall) else None}
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, record["name"] + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


def load_all(results_dir=RESULTS_DIR):
    records = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        records[record["name"]] = record
    return records


def mean_std(values):
    values = np.asarray(values, float)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def _check(record, num_parts=None, recipe=None, embedding_dim=None, strategy=None):
    """Refuses a record whose flags are not those its row claims."""
    config = record["config"]
    claims = {"num_parts": num_parts, "embedding_dim": embedding_dim, "part_strategy": strategy}
    for key, wanted in claims.items():
        if wanted is not None and config[key] != wanted:
            raise ValueError(f"{record['name']}: {key}={config[key]!r}, but its row needs "
                             f"{wanted!r}.")
    if recipe is not None and record["recipe"] != recipe:
        raise ValueError(f"{record['name']}: recipe {record['recipe']!r}, expected {recipe!r}.")
    return record


def _metric(record, descriptor, metric):
    results = record["results"]
    if descriptor == "embedding" or "descriptors" not in results:
        return 100 * results[metric]
    return 100 * results["descriptors"][descriptor][metric]


# Rows of the main table: (label, run name pattern, descriptor, checks).
MAIN_ROWS = [
    ("(a) global baseline", "{R}_{data}_baseline_s{seed}", "embedding", dict(num_parts=0)),
    ("(b) PL-Net, global + parts", "{R}_{data}_plnet_s{seed}", "embedding", dict(num_parts=4)),
    ("(c) PL-Net, global alone", "{R}_{data}_plnet_s{seed}", "global_embedding",
     dict(num_parts=4)),
    ("(d) PL-Net, parts alone", "{R}_{data}_plnet_s{seed}", "part_embeddings", dict(num_parts=4)),
    ("(e) baseline, 1280-d", "{R}_{data}_baseline1280_s{seed}", "embedding",
     dict(num_parts=0, embedding_dim=1280)),
    ("PyTorch peer baseline", "peer_{data}_baseline_s{seed}", "embedding", dict(num_parts=0)),
]


def main_table(records, seeds=(0, 1, 2), prefix="cuhk03_pair1"):
    """Rows (a)-(e) and the peer, per data; paired by each run's recorded seed."""
    lines = ["| data | row | rank-1 | mAP | seeds | per-seed rank-1 | per-seed mAP | "
             "vs (a), per seed (rank-1 / mAP) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for data in ("labeled", "detected"):
        recipe = f"{prefix}_{data}_mobilenetv2_128x64"
        baseline = {}
        for label, pattern, descriptor, checks in MAIN_ROWS:
            by_seed = {}
            for seed in seeds:
                record = records.get(pattern.format(R=prefix, data=data, seed=seed))
                if record is None:
                    continue
                if not record["name"].startswith("peer_"):
                    _check(record, recipe=recipe, **checks)
                    if record["config"]["seed"] != seed:
                        raise ValueError(f"{record['name']}: seed {record['config']['seed']}")
                by_seed[seed] = {m: _metric(record, descriptor, m) for m in ("rank1", "mAP")}
            if not by_seed:
                continue
            if label.startswith("(a)"):
                baseline = by_seed
            rank1 = [v["rank1"] for v in by_seed.values()]
            mAP = [v["mAP"] for v in by_seed.values()]
            if label.startswith("PyTorch"):  # no seed pairs across frameworks
                paired = ["not paired: see the mean against mean below"]
            else:
                paired = [f"s{s}: {v['rank1'] - baseline[s]['rank1']:+.1f} / "
                          f"{v['mAP'] - baseline[s]['mAP']:+.1f}"
                          for s, v in by_seed.items()
                          if s in baseline and not label.startswith("(a)")]
            lines.append(f"| {data} | {label} | {mean_std(rank1)} | {mean_std(mAP)} | "
                         f"{len(by_seed)} | {' / '.join(f'{v:.1f}' for v in rank1)} | "
                         f"{' / '.join(f'{v:.1f}' for v in mAP)} | {'; '.join(paired)} |")
    return "\n".join(lines)


def _by_seed(records, pattern, descriptor, data, seeds=(0, 1, 2), prefix="cuhk03_pair1"):
    """{seed: {"rank1": points, "mAP": points}} of the runs a MAIN_ROWS pattern names."""
    found = {}
    for seed in seeds:
        record = records.get(pattern.format(R=prefix, data=data, seed=seed))
        if record is not None:
            found[seed] = {m: _metric(record, descriptor, m) for m in ("rank1", "mAP")}
    return found


def comparison_lines(records, seeds=(0, 1, 2), prefix="cuhk03_pair1", target=3.0):
    """Per data: each row's paired gain over (a) as mean ± std over seeds, the target verdict
    for (b), and the PyTorch peer against our baseline (agreement within 2 points)."""
    lines = []
    rows = {label[:3]: (label, pattern, descriptor) for label, pattern, descriptor, _ in MAIN_ROWS}
    for data in ("labeled", "detected"):
        baseline = _by_seed(records, rows["(a)"][1], "embedding", data, seeds, prefix)
        if not baseline:
            continue
        for key in ("(b)", "(c)", "(d)", "(e)"):
            label, pattern, descriptor = rows[key]
            runs = _by_seed(records, pattern, descriptor, data, seeds, prefix)
            paired = sorted(set(runs) & set(baseline))
            if not paired:
                continue
            gains = {m: np.array([runs[s][m] - baseline[s][m] for s in paired])
                     for m in ("rank1", "mAP")}
            parts = []
            for metric, values in gains.items():
                spread = f" ± {values.std(ddof=1):.1f}" if len(values) > 1 else ""
                parts.append(f"{'rank-1' if metric == 'rank1' else 'mAP'} "
                             f"{values.mean():+.1f}{spread}")
            line = (f"- {data}, {label} − (a), paired over seeds {paired}: {'; '.join(parts)}")
            if key == "(b)":
                line += "; target (≥ +3 rank-1 and mAP, beyond one std): " + _verdict(
                    gains, target, len(seeds))
            lines.append(line)
        peer = _by_seed(records, "peer_{data}_baseline_s{seed}", "embedding", data, seeds, prefix)
        if peer:
            # Seed k of the peer and seed k of reid-tf share no random draw (different
            # frameworks, initialisers and samplers), so the two are compared as samples:
            # mean against mean over all the seeds each has.
            gaps = {m: float(np.mean([r[m] for r in peer.values()])
                             - np.mean([r[m] for r in baseline.values()]))
                    for m in ("rank1", "mAP")}
            agree = max(abs(v) for v in gaps.values()) <= 2.0
            spread = {m: (min(r[m] for r in baseline.values()),
                          max(r[m] for r in baseline.values())) for m in ("rank1", "mAP")}
            lines.append(
                f"- {data}, PyTorch peer (seeds {sorted(peer)}) − reid-tf (a) (seeds "
                f"{sorted(baseline)}), mean against mean: rank-1 {gaps['rank1']:+.1f}, mAP "
                f"{gaps['mAP']:+.1f}; {'within' if agree else 'NOT within'} 2 points; reid-tf's "
                f"seeds span rank-1 {spread['rank1'][0]:.1f}-{spread['rank1'][1]:.1f}, mAP "
                f"{spread['mAP'][0]:.1f}-{spread['mAP'][1]:.1f} (training speeds: "
                "benchmarks/train_vs_torch.py, one after the other on an idle machine)")
    return "\n".join(lines)


def _verdict(gains, target, wanted_seeds):
    """Met when, on both metrics, the mean paired gain is >= target and exceeds one std of the
    paired gains; also prints mean - std, the stricter reading (>= target there too)."""
    seeds = len(gains["rank1"])
    if seeds < wanted_seeds:
        return f"not decided ({seeds} of {wanted_seeds} seeds)"
    met, lower = [], []
    for metric, values in gains.items():
        mean, spread = values.mean(), values.std(ddof=1)
        met.append(mean >= target and mean - spread > 0)
        lower.append(f"{mean - spread:+.1f}")
    missed = [m for m, ok in zip(gains, met) if not ok]
    return ((
        "met" if all(met) else f"missed on {', '.join(missed)}")
        + f" (mean gain − one std: rank-1 {lower[0]}, mAP {lower[1]})")


LEVELS = ("backbone pooled", "embedding before BatchNorm", "embedding after BatchNorm")


def feature_levels_table(results_dir=RESULTS_DIR, prefix="cuhk03_pair1"):
    """From results/feature_levels/*.json (experiments/feature_levels.py): each model kind's
    global branch at three depths, mean over its seeds (rank-1 / mAP)."""
    levels = load_all(os.path.join(results_dir, "feature_levels"))
    lines = ["| data | model | seeds | " + " | ".join(f"{level} (rank-1 / mAP)" for level in LEVELS)
             + " |", "| --- | --- | --- |" + " --- |" * len(LEVELS)]
    for data in ("labeled", "detected"):
        for kind, label in (("baseline", "(a) baseline, 256-d"),
                            ("plnet", "PL-Net (global branch)"),
                            ("baseline1280", "(e) baseline, 1280-d")):
            runs = [r for name, r in sorted(levels.items())
                    if name.startswith(f"{prefix}_{data}_{kind}_s")]
            if not runs:
                continue
            cells = []
            for level in LEVELS:
                dims = {r["levels"][level]["dim"] for r in runs}
                rank1 = np.mean([100 * r["levels"][level]["rank1"] for r in runs])
                mAP = np.mean([100 * r["levels"][level]["mAP"] for r in runs])
                cells.append(f"{rank1:.1f} / {mAP:.1f} ({'/'.join(map(str, sorted(dims)))}-d)")
            seeds = ", ".join(str(r["seed"]) for r in runs)
            lines.append(f"| {data} | {label} | {seeds} | {' | '.join(cells)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def validation_table(records, prefix="cuhk03_pair1_labeled_val_"):
    """The validation runs: final validation figures per descriptor and part consistency."""
    lines = ["| validation run | epochs | rank-1 | mAP | global alone mAP | parts alone mAP | "
             "part IoU | parts ordered | best mAP (epoch) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, record in sorted(records.items()):
        if not name.startswith(prefix):
            continue
        validation = record["results"]["validation"]
        descriptors = validation["descriptors"]
        consistency = validation.get("part_consistency") or {}
        curve = record["results"]["validation_curve"]
        best = max(curve, key=lambda p: p["mAP"])

        def cell(key):
            return f"{100 * descriptors[key]['mAP']:.1f}" if key in descriptors else "–"

        lines.append(
            f"| {name[len(prefix):]} | {record['results']['epochs']:.0f} | "
            f"{100 * validation['rank1']:.1f} | {100 * validation['mAP']:.1f} | "
            f"{cell('global_embedding')} | {cell('part_embeddings')} | "
            f"{_number(consistency.get('mean_iou'))} | "
            f"{_number(consistency.get('ordered_fraction'))} | "
            f"{100 * best['mAP']:.1f} ({best['epoch']:.0f}) |")
    return "\n".join(lines)


def _number(value):
    return "–" if value is None else f"{value:.2f}"


def plateau(curve, share=0.2):
    """Largest validation-mAP gain (points) over the last `share` of training."""
    last_epoch = curve[-1]["epoch"]
    start = [p for p in curve if p["epoch"] <= (1 - share) * last_epoch]
    if not start:
        return float("nan")
    reference = start[-1]["mAP"]
    return 100 * (max(p["mAP"] for p in curve if p["epoch"] > start[-1]["epoch"]) - reference)


def plateau_lines(records, prefix="cuhk03_pair1_labeled_val_"):
    return "\n".join(
        f"- {name[len(prefix):]}: validation mAP gain over the last 20 % of training "
        f"{plateau(r['results']['validation_curve']):+.1f} points"
        for name, r in sorted(records.items()) if name.startswith(prefix))


def tables(records):
    return "\n\n".join([
        "## Validation (labeled, 20 % of the training identities held out)\n\n"
        + validation_table(records) + "\n\n" + plateau_lines(records),
        "## Main table: test identities, at convergence\n\n" + main_table(records)
        + "\n\n" + comparison_lines(records),
        "## Where the gain sits: the global branch at three depths\n\n"
        + feature_levels_table(),
    ])


def plot_validation(records, path, prefix="cuhk03_pair1_labeled_val_"):
    """Validation mAP against epoch for every validation run (one line each) -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(7, 4.2), dpi=120)
    for name, record in sorted(records.items()):
        if not name.startswith(prefix):
            continue
        curve = record["results"]["validation_curve"]
        style = "--" if record["config"]["num_parts"] == 0 else "-"
        axis.plot([p["epoch"] for p in curve], [100 * p["mAP"] for p in curve], style,
                  label=f"{name[len(prefix):]} (K={record['config']['num_parts']})")
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation mAP (%)")
    axis.set_title("CUHK03 pair 1, labeled: 84 held-out training identities")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", help="a finished run's workdir to copy into results/")
    parser.add_argument("--recipe", default="")
    parser.add_argument("--extra", default="")
    parser.add_argument("--results", default=RESULTS_DIR)
    parser.add_argument("--plot", action="store_true",
                        help="also write figures/validation_map.png (needs matplotlib)")
    args = parser.parse_args()
    if args.collect:
        print(f"   results -> {collect(args.collect, args.recipe, args.extra, args.results)}")
        return
    records = load_all(args.results)
    print(tables(records))
    if args.plot:
        print(plot_validation(records, os.path.join(HERE, "figures", "validation_map.png")))


if __name__ == "__main__":
    main()

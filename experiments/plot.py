"""plot.py: learning curves from the runs of experiments/results.py, one PNG per domain.

    python experiments/plot.py                                  # every settings folder under experiments/runs
    python experiments/plot.py \\
        experiments/runs/ep300-off1000-eval50x200 \\
        --out experiments/plots

Each figure has one column per dataset and two rows: the greedy success rate and the valid-action rate (the
share of turns whose text parsed as an action) against gradient steps, one line per method, the mean over
seeds with a band of +- one standard deviation, and a dashed line at the datasets' own success rate (the
mean over the seeds' `data.pt`). The runs without a dataset (the prompted base, AFSFT online from the base)
have their own column. An afsft-online line starts where its afsft run ended. The
points are the `metrics.jsonl` lines that carry `eval/success_rate`: afsft.py's `--eval-every` evaluations (on
half of `--eval-episodes`) and its final one, of finished runs only (those with an `eval.json`). matplotlib is
an optional extra, needed only here (pip install matplotlib)."""
import argparse
import glob
import json
import os
import textwrap
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {"sft": "tab:gray", "afsft": "tab:blue", "afsft-online": "tab:orange", "online": "tab:green",
          "prompted": "tab:red"}
NO_DATASET = "no dataset"  # the column of the prompted base and of AFSFT online from the base


METRICS = {"eval/success_rate": "greedy success rate", "eval/valid_action_rate": "valid-action rate"}


def curve(metrics_path, online_only=False):
    """{metric: {step: value}} for METRICS; at a step evaluated twice the later line (the final, larger
    evaluation) wins.
    `online_only` drops the offline part, which an afsft-online run copied from its afsft run."""
    points = {metric: {} for metric in METRICS}
    with open(metrics_path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if "eval/success_rate" in row and not (online_only and row["phase"] == "offline"):
                    for metric in METRICS:
                        points[metric][row["step"]] = row[metric]
    return points


def data_success(root, domain, dataset):
    """The mean success rate of the seeds' datasets root/<domain>/<dataset>/seed*/data.pt, or None."""
    from results import dataset_rates  # imported here: it brings torch, which the curves alone do not need

    paths = sorted(glob.glob(os.path.join(root, domain, dataset, "seed*", "data.pt")))
    return float(np.mean([dataset_rates(path)[0] for path in paths])) if paths else None


def load_runs(root):
    """{domain: {dataset: {method: [curve per seed]}}} from
    root/<domain>/<dataset>/seed*/<method>/metrics.jsonl, and from root/<domain>/seed*/<method>/metrics.jsonl
    for the runs without a dataset (their column: NO_DATASET)."""
    runs = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    with_data = glob.glob(os.path.join(root, "*", "*", "seed*", "*", "metrics.jsonl"))
    without = glob.glob(os.path.join(root, "*", "seed*", "*", "metrics.jsonl"))
    for path in sorted(with_data + without):
        method_dir = os.path.dirname(path)
        if not os.path.exists(os.path.join(method_dir, "eval.json")):
            continue  # a run still going, or killed: its curve would end early and look like a result
        above_seed = os.path.dirname(os.path.dirname(method_dir))
        if path in without:
            domain, dataset = os.path.basename(above_seed), NO_DATASET
        else:
            domain, dataset = os.path.basename(os.path.dirname(above_seed)), os.path.basename(above_seed)
        points = curve(path, online_only=os.path.basename(method_dir).startswith("afsft-online"))
        if points["eval/success_rate"]:
            runs[domain][dataset][os.path.basename(method_dir)].append(points)
    return runs


def plot_domain(domain, datasets, out_path, title, root):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(METRICS), len(datasets), figsize=(4.2 * len(datasets), 6.2), sharex="col",
                             sharey=True, squeeze=False)
    for column, (dataset, methods) in enumerate(sorted(datasets.items())):
        for ax, metric in zip(axes[:, column], METRICS):
            for method, curves in sorted(methods.items()):
                color = COLORS.get(method.rstrip("0123456789"))  # afsft-online<K>
                per_seed = [c[metric] for c in curves]
                steps = sorted({s for c in per_seed for s in c})
                values = [[c[s] for c in per_seed if s in c] for s in steps]  # seeds that reached this step
                mean, std = np.array([np.mean(v) for v in values]), np.array([np.std(v) for v in values])
                seeds = f"{len(curves)} seed" + ("s" if len(curves) > 1 else "")
                ax.plot(steps, mean, marker="o", ms=3, color=color, label=f"{method} ({seeds})")
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        baseline = data_success(root, domain, dataset) if dataset != NO_DATASET else None
        if baseline is not None:
            axes[0][column].axhline(baseline, color="black", ls="--", lw=1, label="the data")
        axes[0][column].set_title(dataset)
        axes[0][column].legend(fontsize=8)  # each column has its own methods
        axes[-1][column].set_xlabel("gradient steps")
    for ax, label in zip(axes[:, 0], METRICS.values()):
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="*",
                   help="settings folders made by results.py (default: all under experiments/runs)")
    p.add_argument("--out", default=os.path.join(HERE, "plots"),
                   help="folder for the PNGs (default: experiments/plots)")
    opt = p.parse_args()
    roots = opt.roots or sorted(glob.glob(os.path.join(HERE, "runs", "*")))
    os.makedirs(opt.out, exist_ok=True)
    for root in roots:
        settings = os.path.basename(os.path.normpath(root))
        runs = load_runs(root)
        if not runs:
            print(f"no metrics.jsonl with success rates under {root}")
        for domain, datasets in sorted(runs.items()):
            path = os.path.join(opt.out, f"{domain}.png" if len(roots) == 1 else f"{settings}-{domain}.png")
            plot_domain(domain, datasets, path, domain + "\n" + textwrap.fill(settings, 50), root)
            print(f"wrote {path}")
    if not roots:
        print("no runs found: run experiments/results.py first")


if __name__ == "__main__":
    main()

"""
Metrics (SRCC, late fusion, Fisher CI) and the paper's tables and figure from finished runs.

    python evaluate.py results/                       # Table 5, Table 6 (.md + .csv), fig3.png
    python evaluate.py results/ --fuse-best            # also fuse the best vision and best text run
    python evaluate.py --fuse results/s5-vision results/s6-text --weights 0.5 0.5
"""
import argparse
import csv
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

STRATEGIES = {1: "1 - Unimodal", 2: "2 - Adapted Unimodal", 3: "3 - CLIP-Based",
              4: "4 - Adapted CLIP-Based", 5: "5 - FCLIP-Based", 6: "6 - Adapted FCLIP-Based"}  # Table 6
FAMILIES = ["Unimodal", "Unimodal-SFT", "CLIP", "CLIP-SFT", "FCLIP", "FCLIP-SFT"]  # Fig. 3 x axis
MODALITIES = ["vision", "text"]
CONTRASTIVE_KEYS = ["epochs", "chosen_epoch"]
REGRESS_KEYS = ["strategy", "modality", "checkpoint", "encoder", "lr", "batch_size",
                "srcc_folds", "srcc_mean", "ci", "n_videos"]


# -----------------------------------------------------------------------------
# metrics

def srcc(pred, target):
    """Spearman rank correlation; NaN when either side is constant (no ranking to compare)."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 1:
        raise ValueError(f"srcc needs two 1-d arrays of one length, got shapes {pred.shape} and {target.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(pred, target).statistic)


def fuse(pred, video_ids):
    """Late fusion (paper eq. 2-3): per-frame or per-caption predictions -> per-video mean.
    -> (ids in first-seen order, fused (V,) float64)."""
    pred = np.asarray(pred, dtype=np.float64)
    if len(pred) != len(video_ids):
        raise ValueError(f"fuse: {len(pred)} predictions for {len(video_ids)} video ids")
    uniq, first, inverse = np.unique(np.asarray(video_ids), return_index=True, return_inverse=True)
    mean = np.bincount(inverse, weights=pred) / np.bincount(inverse)
    order = np.argsort(first)
    return uniq[order].tolist(), mean[order]


def fisher_ci(r, n=8500, z=1.96):
    """95% CI of a correlation by the Fisher z transformation (paper eq. 13, n = 8,500)."""
    half = z / math.sqrt(n - 3)
    return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


# -----------------------------------------------------------------------------
# tables and figure

def load_results(folder):
    """every results.json below folder -> (contrastive runs, regression runs), each a list of dicts
    with the run's folder under 'path'."""
    files = sorted(Path(folder).rglob("results.json"))
    if not files:
        raise FileNotFoundError(f"no results.json found below {folder}; run contrastive.py or regress.py first")
    contrastive, regress = [], []
    for f in files:
        with open(f) as fh:
            try:
                run = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f} is not valid JSON: {e}") from e
        kind = run.get("kind")
        if kind not in ("contrastive", "regress"):
            raise ValueError(f"{f}: key 'kind' must be 'contrastive' or 'regress', found {kind!r}")
        for key in CONTRASTIVE_KEYS if kind == "contrastive" else REGRESS_KEYS:
            if key not in run:
                raise KeyError(f"{f}: missing key {key!r} (a {kind} run needs {CONTRASTIVE_KEYS if kind == 'contrastive' else REGRESS_KEYS})")
        if kind == "regress" and (run["strategy"] not in STRATEGIES or run["modality"] not in MODALITIES):
            raise ValueError(f"{f}: strategy must be 1-6 and modality one of {MODALITIES}, found {run['strategy']!r}, {run['modality']!r}")
        if kind == "contrastive":
            for e in run["epochs"]:
                if not {"epoch", "train_loss", "test_loss"} <= set(e):
                    raise KeyError(f"{f}: each entry of 'epochs' needs keys epoch, train_loss, test_loss, found {sorted(e)}")
        elif not isinstance(run["batch_size"], int) or len(run["ci"]) != 2:
            raise ValueError(f"{f}: expected an int batch_size and a [low, high] ci, found {run['batch_size']!r} and {run['ci']!r}")
        run["path"] = str(f.parent)
        (contrastive if kind == "contrastive" else regress).append(run)
    return contrastive, regress


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def table5(runs, out):
    """Table 5: per-epoch train and test loss of each contrastive run; the chosen epoch in bold."""
    md, rows = "", []
    for run in runs:
        body = []
        for e in run["epochs"]:
            train = "–" if e["train_loss"] is None else f"{e['train_loss']:.4f}"
            test = f"{e['test_loss']:.4f}"
            if e["epoch"] == run["chosen_epoch"]:
                test = f"**{test}**"
            body.append(["0 (No training)" if e["epoch"] == 0 else e["epoch"], train, test])
            rows.append([run["path"], e["epoch"], e["train_loss"], e["test_loss"], e["epoch"] == run["chosen_epoch"]])
        md += f"{run['path']} (chosen epoch {run['chosen_epoch']})\n\n" + markdown(["Epoch", "Train Loss", "Test Loss"], body) + "\n"
    write_csv(out / "table5.csv", ["run", "epoch", "train_loss", "test_loss", "chosen"], rows)
    (out / "table5.md").write_text(md)
    return md


def format_lr(lr):
    mantissa, exp = f"{lr:.2e}".split("e")
    return mantissa.rstrip("0").rstrip(".") + "e" + exp  # 2e-03, 2.75e-04 as in Table 6


def table6(runs, out):
    """Table 6: one row per regression run, by strategy then modality; best SRCC per modality in bold."""
    runs = sorted(runs, key=lambda r: (r["strategy"], MODALITIES.index(r["modality"]), r["path"]))
    best = {m: max((r["srcc_mean"] for r in runs if r["modality"] == m), default=None) for m in MODALITIES}
    body, rows, last = [], [], None
    for r in runs:
        cell = f"{r['srcc_mean']:.3f} ({r['ci'][0]:.3f}, {r['ci'][1]:.3f})"
        if r["srcc_mean"] == best[r["modality"]]:
            cell = f"**{cell}**"
        name = STRATEGIES[r["strategy"]] if r["strategy"] != last else ""  # the paper names each strategy once
        last = r["strategy"]
        body.append([name, r["encoder"], format_lr(r["lr"]), f"{r['batch_size']:,}", cell])
        rows.append([r["strategy"], r["modality"], r["encoder"], r["checkpoint"], r["lr"], r["batch_size"],
                     r["srcc_mean"], r["ci"][0], r["ci"][1], r["n_videos"], r["path"]])
    md = markdown(["Strategy", "Encoder Model", "Learning Rate", "Batch Size", "SRCC (CI)"], body)
    write_csv(out / "table6.csv", ["strategy", "modality", "encoder", "checkpoint", "lr", "batch_size",
                                   "srcc_mean", "ci_low", "ci_high", "n_videos", "run"], rows)
    (out / "table6.md").write_text(md)
    return md


def fig3(runs, path):
    """Fig. 3: SRCC per strategy family for vision and text, with CI bars (best run per point)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"fig3 skipped: matplotlib is not installed ({e}); pip install matplotlib to draw it")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, marker in zip(MODALITIES, "os"):
        best = {}
        for r in sorted((r for r in runs if r["modality"] == m), key=lambda r: r["srcc_mean"]):
            best[r["strategy"]] = r  # ascending, so the best run of each strategy is kept
        xs = sorted(best)
        if not xs:
            continue
        y = np.array([best[s]["srcc_mean"] for s in xs])
        err = np.array([[y[i] - best[s]["ci"][0], best[s]["ci"][1] - y[i]] for i, s in enumerate(xs)]).T  # (2, P)
        ax.errorbar([s - 1 for s in xs], y, yerr=err, marker=marker, capsize=4, label=m)
    ax.set_xticks(range(6), FAMILIES)
    ax.set_xlabel("strategy")
    ax.set_ylabel("SRCC (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def tables(folder, out=None):
    contrastive, regress = load_results(folder)
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    if contrastive:
        print("Table 5: contrastive adaptation loss\n\n" + table5(contrastive, out))
    if regress:
        print("Table 6: SRCC per strategy (mean over folds, 95% CI)\n\n" + table6(regress, out))
        if fig3(regress, out / "fig3.png"):
            print(f"wrote {out / 'fig3.png'}")
    return regress


def fuse_best(regress, out):
    """fuse the best vision run with the best text run (highest mean SRCC of each modality)."""
    best = {m: max((r for r in regress if r["modality"] == m), key=lambda r: r["srcc_mean"], default=None) for m in MODALITIES}
    missing = [m for m in MODALITIES if best[m] is None]
    if missing:
        raise ValueError(f"--fuse-best needs a vision and a text run; no {' or '.join(missing)} run found")
    print(f"\nfusion of the best vision run ({best['vision']['path']}) and the best text run ({best['text']['path']})")
    return fuse_runs([best["vision"]["path"], best["text"]["path"]], out=out)


# -----------------------------------------------------------------------------
# fusion of two runs (the multimodal combination the paper leaves for future work)

def read_predictions(run_dir):
    """predictions.csv of a regress.py run -> {video_id: (score, prediction, fold)}."""
    path = Path(run_dir) / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {run_dir} a regress.py output folder?")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"video_id", "score", "prediction", "fold"} - set(reader.fieldnames or [])
        if missing:
            raise KeyError(f"{path}: missing column(s) {sorted(missing)}, found {reader.fieldnames}")
        rows = {r["video_id"]: (float(r["score"]), float(r["prediction"]), int(r["fold"])) for r in reader}
    if not rows:
        raise ValueError(f"{path} holds no predictions")
    return rows


def fold_srcc(score, pred, fold):
    """SRCC per fold (sorted fold ids), as regress.py reports it."""
    return [srcc(pred[fold == k], score[fold == k]) for k in np.unique(fold)]


def fuse_runs(dirs, weights=(0.5, 0.5), out=None):
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--weights must be non-negative with a positive sum, found {list(weights)}")
    runs = [read_predictions(d) for d in dirs]
    files = [Path(d) / "predictions.csv" for d in dirs]
    only = [sorted(set(runs[i]) - set(runs[1 - i])) for i in (0, 1)]
    if only[0] or only[1]:
        raise ValueError(f"video ids do not match: {len(only[0])} only in {files[0]} (e.g. {only[0][:5]}), "
                         f"{len(only[1])} only in {files[1]} (e.g. {only[1][:5]})")
    ids = list(runs[0])
    bad = [v for v in ids if runs[0][v][0] != runs[1][v][0] or runs[0][v][2] != runs[1][v][2]]
    if bad:
        raise ValueError(f"{files[0]} and {files[1]} disagree on the score or fold of {len(bad)} videos (e.g. {bad[:5]}); "
                         "both runs must use the same labels and folds")
    score, fold = (np.array([runs[0][v][i] for v in ids]) for i in (0, 2))
    preds = [np.array([run[v][1] for v in ids]) for run in runs]  # 2 x (V,)
    fused = (weights[0] * preds[0] + weights[1] * preds[1]) / (weights[0] + weights[1])
    result = {"runs": [str(d) for d in dirs], "weights": list(weights), "n_videos": len(ids)}
    for name, p in [("run_a", preds[0]), ("run_b", preds[1]), ("fused", fused)]:
        folds = fold_srcc(score, p, fold)
        mean = float(np.mean(folds))
        result[name] = {"srcc_folds": folds, "srcc_mean": mean, "ci": list(fisher_ci(mean, n=len(ids)))}
        print(f"{name:6s} SRCC {mean:.3f} ({result[name]['ci'][0]:.3f}, {result[name]['ci'][1]:.3f})"
              f"  folds {' '.join(f'{s:.3f}' for s in folds)}")
    out = Path(out or os.path.commonpath([os.path.abspath(d) for d in dirs]))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "fusion.json", "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out / 'fusion.json'}")
    return result


def main(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("folder", nargs="?", default="results", help="folder searched recursively for results.json")
    parser.add_argument("--fuse", nargs=2, metavar="DIR", help="average the out-of-fold predictions.csv of two regress.py runs")
    parser.add_argument("--fuse-best", action="store_true", help="after the tables, fuse the best vision and the best text run")
    parser.add_argument("--weights", nargs=2, type=float, default=[0.5, 0.5], metavar=("A", "B"), help="weights of the two runs in --fuse")
    parser.add_argument("--out", default=None, help="output folder; unset: the results folder, or for --fuse the runs' common parent")
    args = parser.parse_args(argv)
    if args.fuse:
        if args.folder != "results":
            parser.error("give either a results folder or --fuse DIR_A DIR_B, not both")
        fuse_runs(args.fuse, args.weights, args.out)
    else:
        regress = tables(args.folder, args.out)
        if args.fuse_best:
            fuse_best(regress, args.out or args.folder)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"error: {e.args[0] if e.args else e}")

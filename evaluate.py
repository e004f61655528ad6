"""
Metrics (SRCC, late fusion, Fisher CI) and the paper's tables and figure from finished runs.

    python evaluate.py results/                  # Table 5, Table 6 (.md + .csv), fig3.png, curves.png
    python evaluate.py results/ --fuse-best      # also fuse the best vision and best text run -> fusion.json
    python evaluate.py --fuse results/s5-vision results/s6-text   # -> fusion-s5-vision+s6-text.json
    python evaluate.py --fuse results/s5-vision results/s6-text --weights 0.5 0.5   # fixed weights

A fusion is w * A + (1 - w) * B of two runs' out-of-fold predictions, w chosen on the validation
folds (nested: fold k's w is the best of the other folds), written beside each run's SRCC alone.
"""
import argparse
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.stats import ConstantInputWarning, spearmanr

from runs import (HelpFormatter, UserError, atomic_write, finite, read_csv, read_json, script, write_csv,
                  write_json)
from strategies import STRATEGIES, label

matplotlib.use("Agg")  # files only, no window; figures are made as Figure(), outside pyplot: nothing to close
MODALITIES = ["vision", "text"]
CONTRASTIVE_KEYS = ["epochs", "chosen_epoch"]
REGRESS_KEYS = ["strategy", "modality", "checkpoint", "encoder", "lr", "batch_size",
                "srcc_folds", "srcc_mean", "ci", "n_videos"]
OPTIONAL_KEYS = {"demo": bool, "max_epochs": int, "patience": int}  # absent in older runs: unknown
DEMO_NOTE = "demo data: generated toy clips and tiny random encoders, not the paper's results"


# -----------------------------------------------------------------------------
# metrics

def srcc(pred, target):
    """Spearman rank correlation (paper 4.3.1, Table 6), scipy's; NaN when either side is constant (no ranking to
    compare)."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 1:
        raise ValueError(f"srcc needs two 1-d arrays of one length, got shapes {pred.shape} and {target.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)  # the NaN says it
        return float(spearmanr(pred, target).statistic)


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


def summarise_folds(folds, scores):
    """k-fold records ({fold, srcc, val: {video: fused prediction}, test: {video: prediction}, epochs, best_epoch,
    history}) and video_id -> score -> the run's figures: the folds' mean SRCC and its CI (eq. 13) over all validation
    videos, the SRCC of the pooled predictions, and the rows of predictions.csv and test_predictions.csv (a test
    video's prediction is the mean of the folds' models)"""
    rows = [(vid, scores[vid], p, f['fold']) for f in folds for vid, p in f['val'].items()]
    srcc_folds = [float(f['srcc']) for f in folds]
    mean, n = float(np.mean(srcc_folds)), len(rows)
    tests = sorted({vid for f in folds for vid in f['test']})
    return {'srcc_folds': srcc_folds, 'srcc_mean': mean,
            'ci': list(fisher_ci(mean, n)) if abs(mean) < 1 and n > 3 else [mean, mean],
            'srcc_pooled': srcc([r[2] for r in rows], [r[1] for r in rows]), 'n_videos': n, 'n_test_videos': len(tests),
            'epochs_per_fold': [f['epochs'] for f in folds], 'best_epoch_per_fold': [f['best_epoch'] for f in folds],
            'history': [f['history'] for f in folds], 'rows': rows,
            'test_rows': [(vid, float(np.mean([f['test'][vid] for f in folds]))) for vid in tests]}


# -----------------------------------------------------------------------------
# reading the runs

def check_run(run, f):
    """the keys Tables 5-6 and the figures read, with their types; errors name the file and the key"""
    kind = run.get("kind")
    if kind not in ("contrastive", "regress"):
        raise UserError(f"{f}: key 'kind' must be 'contrastive' or 'regress', found {kind!r}")
    for key, type_ in OPTIONAL_KEYS.items():
        if key in run and type(run[key]) is not type_:
            raise UserError(f"{f}: key {key!r} must be {type_.__name__}, found {run[key]!r}")
    need = CONTRASTIVE_KEYS if kind == "contrastive" else REGRESS_KEYS
    for key in need:
        if key not in run:
            raise UserError(f"{f}: missing key {key!r} (a {kind} run needs {need})")
    curve = run.get("lr_curve")
    if curve is not None and not (isinstance(curve, list) and all(isinstance(p, list) and len(p) == 3 for p in curve)):
        raise UserError(f"{f}: 'lr_curve' must be null or a list of [lr, loss, smoothed], found {str(curve)[:80]}")
    if kind == "contrastive":
        if not isinstance(run["epochs"], list) or not all(
                isinstance(e, dict) and {"epoch", "train_loss", "test_loss"} <= set(e) for e in run["epochs"]):
            raise UserError(f"{f}: 'epochs' must be a list of {{epoch, train_loss, test_loss}}, "
                            f"found {str(run['epochs'])[:80]}")
        return kind
    if run["strategy"] not in STRATEGIES or run["modality"] not in MODALITIES:
        raise UserError(f"{f}: strategy must be one of strategies.STRATEGIES {list(STRATEGIES)} and modality one of "
                        f"{MODALITIES}, found {run['strategy']!r}, {run['modality']!r}")
    if not isinstance(run["batch_size"], int) or not isinstance(run["ci"], list) or len(run["ci"]) != 2:
        raise UserError(f"{f}: expected an int batch_size and a [low, high] ci, "
                        f"found {run['batch_size']!r} and {run['ci']!r}")
    scores = [run["srcc_mean"], *run["ci"], *(run["srcc_folds"] if isinstance(run["srcc_folds"], list) else [None])]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        raise UserError(f"{f}: srcc_mean, ci and srcc_folds must hold numbers, found {run['srcc_mean']!r}, "
                        f"{run['ci']!r} and {str(run['srcc_folds'])[:80]}")
    finite({k: run[k] for k in ("srcc_mean", "srcc_folds", "ci")}, f)  # a NaN SRCC would sort anywhere
    history = run.get("history")
    if history is not None and not (isinstance(history, list) and all(
            isinstance(fold, list) and all(isinstance(e, dict) and {"epoch", "val_srcc"} <= set(e) for e in fold)
            for fold in history)):
        raise UserError(f"{f}: 'history' must be one list of {{epoch, train_loss, val_srcc}} per fold, "
                        f"found {str(history)[:80]}")
    return kind


def load_results(folder):
    """the runs in folder (FOLDER/*/results.json, or FOLDER/results.json for one run) -> (contrastive runs,
    regression runs), each a list of dicts with the run's folder under 'path'. Deeper folders are not searched:
    results/demo/ holds the demo's runs, which must not join the tables of results/."""
    paths = sorted(Path(folder).glob("results.json")) + sorted(Path(folder).glob("*/results.json"))
    if not paths:
        raise UserError(f"no results.json in {folder} or its subfolders; run contrastive.py or regress.py "
                        f"first")
    contrastive, regress = [], []
    for f in paths:
        run = read_json(f, expect=dict, what="results.json")
        kind = check_run(run, f)
        run["path"] = str(f.parent)
        (contrastive if kind == "contrastive" else regress).append(run)
    return contrastive, regress


# -----------------------------------------------------------------------------
# tables

def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


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
        md += (f"{run['path']} (chosen epoch {run['chosen_epoch']})\n\n"
               + markdown(["Epoch", "Train Loss", "Test Loss"], body) + "\n")
    write_csv(out / "table5.csv", ["run", "epoch", "train_loss", "test_loss", "chosen"], rows)
    write_text(out / "table5.md", md)
    return md


def format_lr(lr):
    mantissa, exp = f"{lr:.2e}".split("e")
    return mantissa.rstrip("0").rstrip(".") + "e" + exp  # 2e-03, 2.75e-04 as in Table 6


def table6(runs, out):
    """Table 6: one row per regression run, by strategy then modality; best SRCC per modality in bold."""
    runs = sorted(runs, key=lambda r: (r["strategy"], MODALITIES.index(r["modality"]), r["path"]))
    best = {m: max((r["srcc_mean"] for r in runs if r["modality"] == m), default=None) for m in MODALITIES}
    body, rows, last = [], [], None
    twice = {k for k, n in Counter((r["strategy"], r["modality"]) for r in runs).items() if n > 1}
    for r in runs:
        cell = f"{r['srcc_mean']:.3f} ({r['ci'][0]:.3f}, {r['ci'][1]:.3f})"
        if r["srcc_mean"] == best[r["modality"]]:
            cell = f"**{cell}**"
        name = label(r["strategy"]) if r["strategy"] != last else ""  # the paper names each strategy once
        last = r["strategy"]
        encoder = r["encoder"] + (f" [{Path(r['path']).name}]" if (r["strategy"], r["modality"]) in twice else "")
        body.append([name, encoder, format_lr(r["lr"]), f"{r['batch_size']:,}", cell])
        rows.append([r["strategy"], r["modality"], r["encoder"], r["checkpoint"], r["lr"], r["batch_size"],
                     r["srcc_mean"], r["ci"][0], r["ci"][1], r["n_videos"], r["path"]])
    md = markdown(["Strategy", "Encoder Model", "Learning Rate", "Batch Size", "SRCC (CI)"], body)
    md = f"{DEMO_NOTE}\n\n{md}" if any(r.get("demo") for r in runs) else md
    write_csv(out / "table6.csv", ["strategy", "modality", "encoder", "checkpoint", "lr", "batch_size",
                                         "srcc_mean", "ci_low", "ci_high", "n_videos", "run"], rows)
    write_text(out / "table6.md", md)
    return md


# -----------------------------------------------------------------------------
# figures

def save_png(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150))


def encoders(runs):
    """the encoder names of a strategy's runs, vision first: 'ViT / DistilBERT', 'CLIP', 'BERT (all-MiniLM-L6-v2)'"""
    names = [r["encoder"].split(" - ")[0] for r in sorted(runs, key=lambda r: MODALITIES.index(r["modality"]))]
    return " / ".join(dict.fromkeys(names))  # once each, in order


def srcc_limits(low, high):
    """y limits of an SRCC axis from its lowest and highest CI end: a margin around them, kept
    within [0, 1] unless a CI itself goes beyond (an SRCC can be negative)"""
    pad = max(0.1 * (high - low), 0.02)
    bottom = low - pad if low < 0 else max(0.0, low - pad)
    return bottom, high + pad if high > 1 else min(1.0, high + pad)


def fig3(runs, path):
    """Fig. 3: SRCC per strategy for vision and text, with CI bars (best run per point). -> the Figure"""
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    best = {}
    for r in sorted(runs, key=lambda r: r["srcc_mean"]):
        best[r["strategy"], r["modality"]] = r  # ascending, so the best run of each point is kept
    for m, marker, dx in zip(MODALITIES, "os", (-0.12, 0.12)):  # side by side, so the two CIs never hide each other
        xs = sorted(s for s, mod in best if mod == m)
        if not xs:
            continue
        y = [best[s, m]["srcc_mean"] for s in xs]
        err = [[y[i] - best[s, m]["ci"][0] for i, s in enumerate(xs)],
               [best[s, m]["ci"][1] - y[i] for i, s in enumerate(xs)]]
        # hollow markers: a CI narrower than the marker (0.004 at SRCC 0.98) still shows inside it
        ax.errorbar([s + dx for s in xs], y, yerr=err, marker=marker, markersize=6, markerfacecolor="none",
                    linestyle="none", capsize=5, elinewidth=1.5, label=m)
        for s, v in zip(xs, y):
            ax.annotate(f"{v:.3f}", (s + dx, v), xytext=(-7 if dx < 0 else 7, 0), textcoords="offset points",
                        ha="right" if dx < 0 else "left", va="center", fontsize=7)
    ticks = []
    for s, row in STRATEGIES.items():
        names = encoders([r for (k, _), r in best.items() if k == s])
        ticks.append(f"{s} {row.name}".replace("Adapted ", "Adapted\n") + (f"\n({row.figure})" if row.figure else "")
                     + (f"\n{names}" if names else ""))
    ax.set_xticks(list(STRATEGIES), ticks, fontsize=8)
    ax.set_xlim(min(STRATEGIES) - 0.5, max(STRATEGIES) + 0.5)
    lows, highs = zip(*(r["ci"] for r in best.values()))
    ax.set_ylim(*srcc_limits(min(lows), max(highs)))
    ax.set_xlabel("strategy (Table 6), the paper's Fig. 3 name in brackets (SFT: supervised fine-tuning), "
                  "then the encoders of the runs drawn")
    ax.set_ylabel("SRCC (mean over folds, 95% CI)")
    ax.set_title("Fig. 3: SRCC per strategy, vision and text encoders")
    if any(r.get("demo") for r in runs):  # a slide of toy numbers must not pass for the paper's
        fig.suptitle(DEMO_NOTE, color="firebrick", fontweight="bold")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right")
    save_png(fig, path)
    return fig


def run_label(run):
    if run["kind"] == "contrastive":
        return f"contrastive ({Path(run['path']).name})"
    return f"strategy {run['strategy']} {run['modality']} ({Path(run['path']).name})"


def draw_losses(ax, run):
    """Table 5 as curves: train and test loss per epoch, the exported (chosen) epoch marked. Epoch 0's test loss
    (the unchanged model, several times the others) is written in a corner rather than flattening the curves"""
    epochs = run["epochs"]
    train = [(e["epoch"], e["train_loss"]) for e in epochs if e["train_loss"] is not None]  # none at epoch 0
    test = [(e["epoch"], e["test_loss"]) for e in epochs]
    later = [loss for _, loss in train] + [loss for epoch, loss in test if epoch > 0]
    first = dict(test).get(0)
    if later and first is not None and first > 2 * max(later) - min(later):  # off the scale of the others
        test = [(epoch, loss) for epoch, loss in test if epoch > 0]
        ax.text(0.02, 0.97, f"epoch 0 (no training): test loss {first:.4f}, off the scale", transform=ax.transAxes,
                va="top", fontsize=8)
    if train:
        ax.plot(*zip(*train), marker="o", label="train loss")
    ax.plot(*zip(*test), marker="s", label="test loss")
    chosen = [e for e in epochs if e["epoch"] == run["chosen_epoch"]]
    if chosen:
        ax.plot(chosen[0]["epoch"], chosen[0]["test_loss"], "k*", markersize=14,
                label=f"exported (epoch {run['chosen_epoch']})")
    ax.set_xticks(sorted({e["epoch"] for e in epochs}))
    ax.set(xlabel="epoch (0: no training)", ylabel="loss", title=f"Table 5: loss per epoch, {run_label(run)}")


def draw_lr_curve(ax, run):
    """Smith's range test (paper 4.3): loss against lr, the chosen lr marked"""
    lr, loss, smooth = zip(*run["lr_curve"])
    ax.plot(lr, loss, ".", alpha=0.3, label="loss per batch")
    ax.plot(lr, smooth, label="smoothed")
    ax.axvline(run["lr"], color="k", linestyle="--", label=f"chosen lr {format_lr(run['lr'])}")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="training loss", title=f"LR range test, {run_label(run)}")


def carried_mean(history):
    """the mean over the folds at each epoch (1, 2, ... as regress.py records them), a fold that
    stopped early carrying its last value: the same folds at every epoch, so the mean does not
    step when one of them stops -> epochs (E,), mean (E,)"""
    longest = max(len(fold) for fold in history)
    values = [[e["val_srcc"] for e in fold] + [fold[-1]["val_srcc"]] * (longest - len(fold))
              for fold in history]  # (K, E)
    return np.arange(1, longest + 1), np.array(values, dtype=float).mean(0)


def capped(run):
    """how many folds reached the run's epoch cap still improving (best epoch within the last
    --patience epochs, so early stopping had not ended them); None where results.json does not
    say (runs from before it held max_epochs)"""
    if not {"max_epochs", "patience", "epochs_per_fold", "best_epoch_per_fold"} <= set(run):
        return None
    cap = run["max_epochs"]
    return sum(e >= cap and b > cap - run["patience"]
               for e, b in zip(run["epochs_per_fold"], run["best_epoch_per_fold"]))


def draw_history(ax, runs, modality):
    """validation SRCC per epoch of each run, the mean over its folds: a colour per run, solid when
    the encoder is frozen and dashed when fine-tuned; a triangle ends the line of a run that hit
    its epoch cap still improving, and its legend entry says how many folds did"""
    for i, r in enumerate(sorted(runs, key=lambda r: (r["strategy"], r["path"]))):
        epochs, mean = carried_mean(r["history"])
        frozen = STRATEGIES[r["strategy"]].frozen
        name = f"{label(r['strategy'])}, {'frozen' if frozen else 'fine-tuned'}"
        if sum(q["strategy"] == r["strategy"] for q in runs) > 1:
            name += f" [{Path(r['path']).name}]"
        n = capped(r)
        if n:
            name += (f"\n  {n} of {len(r['history'])} folds hit the {r['max_epochs']}-epoch cap "
                     "still improving")
        ax.plot(epochs, mean, color=f"C{i}", linestyle="-" if frozen else "--", linewidth=1.8,
                label=name, marker=">" if n else None, markevery=[len(epochs) - 1], markersize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", title=f"validation SRCC per epoch, {modality}",
           ylabel="validation SRCC, mean over the folds\n(a fold that stopped early keeps its last value)")
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.13))  # below: it hides no curve


def curves(contrastive, regress, path):
    """the curves behind the tables in one PNG, a panel each where there is data: the validation
    SRCC per epoch of each modality (side by side, first), Table 5's losses, every LR range test
    (runs with --lr auto). -> the Figure, or None"""
    panels = []
    for m in MODALITIES:
        with_history = [r for r in regress if r["modality"] == m and r.get("history")]
        if with_history:
            panels.append((draw_history, (with_history, m)))
    panels += [(draw_losses, (r,)) for r in contrastive]
    by_row = sorted(regress, key=lambda r: (r["strategy"], MODALITIES.index(r["modality"]), r["path"]))  # Table 6
    panels += [(draw_lr_curve, (r,)) for r in contrastive + by_row if r.get("lr_curve")]
    if not panels:
        return None
    cols = min(len(panels), 2)  # at most two panels a row: a slide's 4:3 or 16:9, not a strip
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(7 * cols, 7 * rows), layout="constrained")  # room for the legends below
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (draw, args) in zip(axes, panels):
        draw(ax, *args)
        ax.grid(alpha=0.3)
        if ax.get_legend() is None:
            ax.legend(fontsize=9)
    for ax in axes[len(panels):]:
        ax.remove()
    if any(r.get("demo") for r in contrastive + regress):
        fig.suptitle(DEMO_NOTE, color="firebrick", fontweight="bold")
    save_png(fig, path)
    return fig


def tables(folder, out=None):
    contrastive, regress = load_results(folder)
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    if contrastive:
        print("Table 5: contrastive adaptation loss\n\n" + table5(contrastive, out))
    if regress:
        print("Table 6: SRCC per strategy (mean over folds, 95% CI)\n\n" + table6(regress, out))
        fig3(regress, out / "fig3.png")
        print(f"wrote {out / 'fig3.png'}")
    fig = curves(contrastive, regress, out / "curves.png")
    if fig:
        print(f"wrote {out / 'curves.png'}: " + "; ".join(ax.get_title() for ax in fig.axes))
    return regress


# -----------------------------------------------------------------------------
# fusion of two runs (the multimodal combination the paper leaves for future work)

def read_predictions(run_dir):
    """predictions.csv of a regress.py run -> {video_id: (score, prediction, fold)}."""
    path = Path(run_dir) / "predictions.csv"
    if not path.is_file():
        raise UserError(f"{path} not found; is {run_dir} a regress.py output folder?")
    rows = {}
    for line, r in enumerate(read_csv(path, required=["video_id", "score", "prediction", "fold"]), 2):
        try:
            row = float(r["score"]), float(r["prediction"]), int(r["fold"])
        except ValueError:
            raise UserError(f"{path}, line {line}: expected numbers for score, prediction and an int fold, "
                            f"found {r['score']!r}, {r['prediction']!r}, {r['fold']!r}; is it truncated?") from None
        if not all(map(math.isfinite, row[:2])):
            raise UserError(f"{path}, line {line}: score and prediction must be finite, found {row[:2]}")
        if r["video_id"] in rows:
            raise UserError(f"{path}, line {line}: video {r['video_id']!r} appears twice")
        rows[r["video_id"]] = row
    if not rows:
        raise UserError(f"{path} holds no predictions")
    return rows


def fold_srcc(score, pred, fold):
    """SRCC per fold (sorted fold ids), as regress.py reports it."""
    return [srcc(pred[fold == k], score[fold == k]) for k in np.unique(fold)]


def fusion_name(dirs):
    """fusion-A+B.json, A and B the runs' folders relative to their common parent"""
    paths = [os.path.abspath(d) for d in dirs]
    parent = os.path.commonpath(paths)
    names = [os.path.relpath(p, parent).replace(os.sep, "_") if p != parent else os.path.basename(p) for p in paths]
    return f"fusion-{names[0]}+{names[1]}.json"


def read_pair(dirs):
    """two runs' predictions.csv, checked to hold the same videos with the same scores and folds
    -> (ids, score (V,), fold (V,), [predictions of A (V,), of B (V,)])"""
    runs = [read_predictions(d) for d in dirs]
    paths = [Path(d) / "predictions.csv" for d in dirs]
    only = [sorted(set(runs[i]) - set(runs[1 - i])) for i in (0, 1)]
    if only[0] or only[1]:
        raise UserError(f"video ids do not match: {len(only[0])} only in {paths[0]} (e.g. "
                        f"{only[0][:5]}), {len(only[1])} only in {paths[1]} (e.g. {only[1][:5]})")
    ids = list(runs[0])
    bad = [v for v in ids if runs[0][v][0] != runs[1][v][0] or runs[0][v][2] != runs[1][v][2]]
    if bad:
        raise UserError(f"{paths[0]} and {paths[1]} disagree on the score or fold of {len(bad)} "
                        f"videos (e.g. {bad[:5]}); both runs must use the same labels and folds")
    score, fold = (np.array([runs[0][v][i] for v in ids]) for i in (0, 2))
    return ids, score, fold, [np.array([run[v][1] for v in ids]) for run in runs]


WEIGHT_GRID = np.round(np.linspace(0, 1, 21), 2)  # w of w * A + (1 - w) * B: 0, 0.05, ..., 1


def nested_weights(table):
    """table (W, K): the SRCC of fold k's fused predictions for each w of WEIGHT_GRID -> fold k's w,
    the one with the best mean SRCC over the OTHER folds (the smallest of a tie): chosen without
    fold k's videos, so that fold k's fused SRCC is as honest an estimate as a single run's"""
    others = [np.delete(table, k, axis=1).mean(1) for k in range(table.shape[1])]  # K x (W,)
    return [float(WEIGHT_GRID[np.argmax(mean)]) for mean in others]


def fuse_runs(dirs, weights=None, out=None, name=None):
    """w * A + (1 - w) * B of two runs' out-of-fold predictions (A, B: dirs), beside A and B alone.
    Without weights, w is chosen on the validation folds: fold k's by nested_weights, and the one
    of all folds reported for new videos; weights (a, b) fix w = a / (a + b). Writes out/name
    (default fusion-A+B.json, see fusion_name) -> the dict written"""
    if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
        raise UserError(f"--weights must be non-negative with a positive sum, found "
                        f"{list(weights)}")
    ids, score, fold, preds = read_pair(dirs)
    table = np.array([fold_srcc(score, w * preds[0] + (1 - w) * preds[1], fold)
                      for w in WEIGHT_GRID])  # (W, K)
    if weights is None:
        per_fold = nested_weights(table)
        w_all = float(WEIGHT_GRID[np.argmax(table.mean(1))])  # on every fold: for new videos
        chosen, how = [w_all, round(1 - w_all, 2)], "each chosen on the other folds"
    else:
        per_fold = [weights[0] / sum(weights)] * table.shape[1]
        chosen, how = list(weights), "given (--weights)"
    w = np.array(per_fold)[np.searchsorted(np.unique(fold), fold)]  # (V,) each video's fold's w
    result = {"runs": [str(d) for d in dirs], "weights": chosen, "weight_a_per_fold": per_fold,
              "weights_chosen": how, "n_videos": len(ids)}
    print(f"fusion w * A + (1 - w) * B of A = {dirs[0]} and B = {dirs[1]}")
    print(f"{'':9s}SRCC (95% CI)         per fold")
    fused = w * preds[0] + (1 - w) * preds[1]
    for key, p, row in [("run_a", preds[0], "A"), ("run_b", preds[1], "B"), ("fused", fused, "fused")]:
        folds = fold_srcc(score, p, fold)
        mean = float(np.mean(folds))
        if not math.isfinite(mean):
            raise UserError(f"{key} of {dirs[0]} and {dirs[1]}: SRCC per fold {folds}; a fold's "
                            f"predictions or scores are constant")
        n = len(ids)
        ci = list(fisher_ci(mean, n=n)) if abs(mean) < 1 and n > 3 else [mean, mean]  # eq. 13
        result[key] = {"srcc_folds": folds, "srcc_mean": mean, "ci": ci}
        print(f"{row:9s}{mean:.3f} ({ci[0]:.3f}, {ci[1]:.3f})  {' '.join(f'{s:.3f}' for s in folds)}")
    print(f"w per fold, {how}: {' '.join(f'{x:.2f}' for x in per_fold)}; weights of A and B "
          f"{'chosen on all folds ' if weights is None else ''}{chosen[0]:g} and {chosen[1]:g}")
    better = max(("run_a", "run_b"), key=lambda k: result[k]["srcc_mean"])
    result["fused_beats_better_run"] = result["fused"]["srcc_mean"] > result[better]["srcc_mean"]
    if not result["fused_beats_better_run"]:
        b = better == "run_b"
        print(f"the fusion ({result['fused']['srcc_mean']:.3f}) does not beat the better run alone, "
              f"{'AB'[b]} = {dirs[b]} ({result[better]['srcc_mean']:.3f})")
    out = Path(out or os.path.commonpath([os.path.abspath(d) for d in dirs]))
    path = out / (name or fusion_name(dirs))
    write_json(path, result)
    print(f"wrote {path}")
    return result


def fuse_best(regress, out):
    """fuse the best vision run with the best text run (highest mean SRCC of each modality) -> fusion.json"""
    best = {m: max((r for r in regress if r["modality"] == m), key=lambda r: r["srcc_mean"], default=None)
            for m in MODALITIES}
    missing = [m for m in MODALITIES if best[m] is None]
    if missing:
        raise UserError(f"--fuse-best needs a vision and a text run; no {' or '.join(missing)} run found")
    print(f"\nfusion of the best vision run ({best['vision']['path']}) and the best text run ({best['text']['path']})")
    return fuse_runs([best["vision"]["path"], best["text"]["path"]], out=out, name="fusion.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("folder", nargs="?", default="results",
                        help="folder whose runs (FOLDER/*/results.json) make the tables")
    parser.add_argument("--fuse", nargs=2, metavar="DIR",
                        help="fuse the out-of-fold predictions.csv of two regress.py runs, beside "
                             "each alone; writes fusion-A+B.json, named after the two run folders")
    parser.add_argument("--fuse-best", action="store_true",
                        help="after the tables, fuse the best vision and the best text run; writes fusion.json")
    parser.add_argument("--weights", nargs=2, type=float, default=None, metavar=("A", "B"),
                        help="fixed weights of the two runs in --fuse; unset: w * A + (1 - w) * B, "
                             "w chosen on the validation folds (nested: each fold's w on the others)")
    parser.add_argument("--out", default=None,
                        help="output folder; unset: the results folder, or for --fuse the runs' common parent")
    args = parser.parse_args(argv)
    if args.fuse and args.folder != "results":
        parser.error("give either a results folder or --fuse DIR_A DIR_B, not both")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.fuse:
        fuse_runs(args.fuse, args.weights, args.out)
    else:
        regress = tables(args.folder, args.out)
        if args.fuse_best:
            fuse_best(regress, args.out or args.folder)


if __name__ == "__main__":
    script(main, "evaluate.py", "the tables are written whole: run the same command again")

"""
Beyond the paper's tables, from finished runs: curves.png (each modality's validation SRCC per
epoch, Table 5's losses, every LR range test) and the fusion w * A + (1 - w) * B of a vision and a
text run's out-of-fold predictions beside each run alone, the combination the paper leaves for
future work; w is chosen on the validation folds (nested: fold k's w is the best of the other
folds, so the fused SRCC is as honest as a run's).

    python -m tools.report results/      # curves.png, and fusion.json of the best vision and text
    python -m tools.report --fuse results/s5-vision results/s6-text [--weights 0.5 0.5]
"""
import argparse
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import evaluate
from harness import runs

WEIGHT_GRID = np.round(np.linspace(0, 1, 21), 2)  # w of w * A + (1 - w) * B: 0, 0.05, ..., 1

def fuse_runs(dirs, weights=None, path=None):
    """w * A + (1 - w) * B of runs dirs (A, B) beside each alone, w chosen per fold on the other
    folds (or weights (a, b): w = a / (a + b)) -> the dict, written to path or fusion-A+B.json"""
    runs.require(weights is None or not (min(weights) < 0 or sum(weights) <= 0),
                 f"--weights must be non-negative with a positive sum, found {weights}")
    a, b = (evaluate.read_scores(d) for d in dirs)
    ids, pa, pb, true, fold = evaluate.matched(a, b)
    only = [sorted(x.keys() - y.keys()) for x, y in ((a, b), (b, a))]
    runs.require(not any(only), f"video ids differ: {len(only[0])} only in {dirs[0]} (e.g. "
                 f"{only[0][:3]}), {len(only[1])} only in {dirs[1]} (e.g. {only[1][:3]})")
    runs.require(all(b[i][2] == f for i, f in zip(ids, fold)), f"{dirs[0]} and {dirs[1]} disagree on "
                 f"the folds; both runs must use the same folds (--folds, --seed)")
    fold, folds = np.array(fold), sorted(set(fold))
    def per_fold(p):
        return [evaluate.srcc(p[fold == k], true[fold == k]) for k in folds]
    table = np.array([per_fold(w * pa + (1 - w) * pb) for w in WEIGHT_GRID])  # (W, K)
    if weights is None:  # fold k's w: the best mean over the other folds
        chosen = [float(WEIGHT_GRID[np.argmax(np.delete(table, k, 1).mean(1))])
                  for k in range(len(folds))]
        w_all = float(WEIGHT_GRID[np.argmax(table.mean(1))])  # on every fold: for new videos
        weights, how = [w_all, round(1 - w_all, 2)], "each chosen on the other folds"
    else:
        chosen, how = [weights[0] / sum(weights)] * len(folds), "given (--weights)"
    w = np.array(chosen)[np.searchsorted(folds, fold)]  # (V,) each video's fold's w
    result = {"runs": [str(d) for d in dirs], "weights": list(weights), "weights_chosen": how,
              "weight_a_per_fold": chosen, "n_videos": len(ids)}
    print(f"fusion w * A + (1 - w) * B of A = {dirs[0]} and B = {dirs[1]}\n"
          f"{'':9s}SRCC (95% CI)         per fold")
    for name, p in (("run_a", pa), ("run_b", pb), ("fused", w * pa + (1 - w) * pb)):
        mean = float(np.mean(srcc := per_fold(p)))
        runs.require(math.isfinite(mean), f"{name} of {dirs[0]} and {dirs[1]}: SRCC per fold "
                     f"{srcc}; a fold's predictions or scores are constant")
        ci = list(evaluate.fisher_ci(mean, len(ids)))  # eq. 13
        result[name] = {"srcc_folds": srcc, "srcc_mean": mean, "ci": ci}
        print(f"{name[-1].upper() if name != 'fused' else 'fused':9s}{mean:.3f} ({ci[0]:.3f}, "
              f"{ci[1]:.3f})  {' '.join(f'{s:.3f}' for s in srcc)}")
    better = max(("run_a", "run_b"), key=lambda k: result[k]["srcc_mean"])
    result["fused_beats_better_run"] = result["fused"]["srcc_mean"] > result[better]["srcc_mean"]
    print(f"w per fold, {how}: {' '.join(f'{x:.2f}' for x in chosen)}; weights of A and B "
          f"{weights[0]:g} and {weights[1]:g}" + ("" if result["fused_beats_better_run"] else
          f"\nthe fusion ({result['fused']['srcc_mean']:.3f}) does not beat the better run alone, "
          f"{dirs[better == 'run_b']} ({result[better]['srcc_mean']:.3f})"))
    demo = any(runs.read_json(os.path.join(d, 'results.json')).get('demo') for d in dirs)
    result["note"] = evaluate.DEMO_NOTE if demo else "real data"
    parent = os.path.commonpath([os.path.abspath(d) for d in dirs])
    names = [os.path.relpath(os.path.abspath(d), parent).replace(os.sep, "_") for d in dirs]
    path = path or os.path.join(parent, f"fusion-{names[0]}+{names[1]}.json")
    runs.write_json(path, result)
    print(f"wrote {path}")
    return result

def carried_mean(history):
    """each epoch's mean over the folds, a fold that stopped early keeping its last value (so the
    mean does not step when one stops; a NaN epoch keeps the one before) -> epochs, mean"""
    longest, values = max(len(fold) for fold in history), []
    for fold in history:
        srcc = [e["val_srcc"] for e in fold]
        srcc = [s if s is not None else prev for prev, s in zip([math.nan] + srcc, srcc)]
        values.append(srcc + srcc[-1:] * (longest - len(fold)))
    return np.arange(1, longest + 1), np.array(values, dtype=float).mean(0)

def curves(contrastive, regress, path):
    """curves.png: each modality's validation SRCC per epoch (frozen solid, fine-tuned dashed, a
    triangle: capped still improving), Table 5's losses, each LR range test -> the Figure or None"""
    panels = [("srcc", [r for r in regress if r["modality"] == m and r.get("history")], m)
              for m in evaluate.MODALITIES]
    panels = [p for p in panels if p[1]] + [("loss", r, None) for r in contrastive] + [
        ("lr", r, None) for r in contrastive + regress if r.get("lr_curve")]
    if not panels:
        return None
    cols = min(len(panels), 2)  # two panels a row: a slide's shape, not a strip
    fig = Figure(figsize=(7 * cols, 7 * math.ceil(len(panels) / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    for ax, (kind, data, modality) in zip(axes, panels):
        name = Path(data["path"]).name if isinstance(data, dict) else ""
        if kind == "srcc":
            for i, r in enumerate(sorted(data, key=lambda r: (r["strategy"], r["path"]))):
                epochs, mean = carried_mean(r["history"])
                capped = sum(e >= r["max_epochs"] and b > r["max_epochs"] - r["patience"]
                             for e, b in zip(r["epochs_per_fold"], r["best_epoch_per_fold"]))
                label = (f"{r['strategy']} - {r['name']}, {'frozen' if r['frozen'] else 'fine-tuned'}"
                         f" [{Path(r['path']).name}]" + f"\n  {capped} of {len(r['history'])} "
                         f"folds hit the {r['max_epochs']}-epoch cap still improving" * bool(capped))
                ax.plot(epochs, mean, f"C{i}", linestyle="-" if r["frozen"] else "--", label=label,
                        marker=">" if capped else None, markevery=[len(epochs) - 1])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(ylabel="validation SRCC, mean over the folds\n(a fold that stopped early keeps "
                   "its last value)", xlabel="epoch", title=f"validation SRCC per epoch, {modality}")
            ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.13))
        elif kind == "loss":  # epoch 0's test loss, the model as loaded, in a corner if off scale
            train = [(e["epoch"], e["train_loss"]) for e in data["epochs"] if e["epoch"]]
            test = [(e["epoch"], e["test_loss"]) for e in data["epochs"]]
            later = [loss for _, loss in train + test[1:]]
            if later and test[0][1] > 2 * max(later) - min(later):
                ax.text(0.02, 0.97, f"epoch 0 (no training): test loss {test[0][1]:.4f}, off the "
                        f"scale", transform=ax.transAxes, va="top", fontsize=8)
                test = test[1:]
            if train:
                ax.plot(*zip(*train), marker="o", label="train loss")
            ax.plot(*zip(*test), marker="s", label="test loss")
            if (chosen := dict(test).get(data["chosen_epoch"])) is not None:
                ax.plot(data["chosen_epoch"], chosen, "k*", markersize=14,
                        label=f"exported (epoch {data['chosen_epoch']})")
            ax.set(xticks=sorted({e["epoch"] for e in data["epochs"]}), xlabel="epoch (0: no training)",
                   ylabel="loss", title=f"Table 5: loss per epoch, contrastive ({name})")
        else:  # Smith's range test (paper 4.3): loss against lr, the chosen lr marked
            lr, loss, smooth = zip(*data["lr_curve"])
            ax.plot(lr, loss, ".", alpha=0.3, label="loss per batch")
            ax.plot(lr, smooth, label="smoothed")
            ax.axvline(data["lr"], color="k", linestyle="--",
                       label=f"chosen lr {evaluate.format_lr(data['lr'])}")
            ax.set_xscale("log")
            ax.set(xlabel="learning rate", ylabel="training loss", title=f"LR range test ({name})")
        ax.grid(alpha=0.3)
        if ax.get_legend() is None:
            ax.legend(fontsize=9)
    for ax in axes[len(panels):]:
        ax.remove()
    if any(r.get("demo") for r in contrastive + regress):
        fig.suptitle(evaluate.DEMO_NOTE, color="firebrick", fontweight="bold")
    evaluate.save_png(fig, path)
    return fig

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter)
    p.add_argument("folder", nargs="?", default="results", help="the runs' folder (FOLDER/*/)")
    p.add_argument("--fuse", nargs=2, metavar="DIR", help="fuse two regress.py runs' predictions")
    p.add_argument("--weights", nargs=2, type=float, metavar=("A", "B"),
                   help="fixed weights of --fuse's runs (default: w chosen on the folds)")
    args = p.parse_args(argv)
    if args.fuse:
        return fuse_runs(args.fuse, args.weights)
    contrastive, regress = evaluate.load_results(args.folder)
    path = Path(args.folder) / "curves.png"
    if fig := curves(contrastive, regress, path):
        print(f"wrote {path}: " + "; ".join(ax.get_title() for ax in fig.axes))
    best = {m: max((r for r in regress if r["modality"] == m), key=lambda r: r["srcc_mean"],
                   default=None) for m in evaluate.MODALITIES}
    if all(best.values()):  # the best vision run with the best text run
        print("\nfusion of the best vision run and the best text run")
        return fuse_runs([best["vision"]["path"], best["text"]["path"]],
                         path=os.path.join(args.folder, "fusion.json"))

if __name__ == "__main__":
    runs.script(main, "tools/report.py", "its files are written whole: run it again")

"""
The paper's figures from finished runs (evaluate.py writes them with the tables): Fig. 3, the SRCC
of each strategy and modality with its CI, and curves.png, the curves behind the tables (Table 5's
losses, every LR range test, each modality's validation SRCC per epoch). A figure made from
demo.py's data says so in its title.

    python evaluate.py results/          # fig3.png and curves.png beside the tables
"""
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from runs import atomic_write
from strategies import MODALITIES, STRATEGIES, label

matplotlib.use("Agg")  # files only, no window; figures are made as Figure(), outside pyplot
DEMO_NOTE = "demo data: generated toy clips and tiny random encoders, not the paper's results"


def format_lr(lr):
    mantissa, exp = f"{lr:.2e}".split("e")
    return mantissa.rstrip("0").rstrip(".") + "e" + exp  # 2e-03, 2.75e-04 as in Table 6


def save_png(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150))


def encoder_names(runs):
    """the encoder names of a strategy's runs, vision first: 'ViT / DistilBERT', 'CLIP', 'BERT
    (all-MiniLM-L6-v2)'"""
    names = [r["encoder"].split(" - ")[0]
             for r in sorted(runs, key=lambda r: MODALITIES.index(r["modality"]))]
    return " / ".join(dict.fromkeys(names))  # once each, in order


def srcc_limits(low, high):
    """y limits of an SRCC axis from its lowest and highest CI end: a margin around them, kept
    within [0, 1] unless a CI itself goes beyond (an SRCC can be negative)"""
    pad = max(0.1 * (high - low), 0.02)
    bottom = low - pad if low < 0 else max(0.0, low - pad)
    return bottom, high + pad if high > 1 else min(1.0, high + pad)


def fig3(runs, path):
    """Fig. 3: SRCC per strategy for vision and text, with CI bars (best run per point). -> the
    Figure"""
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    best = {}
    for r in sorted(runs, key=lambda r: r["srcc_mean"]):
        best[r["strategy"], r["modality"]] = r  # ascending, so the best run of each point is kept
    # side by side, so the two CIs never hide each other
    for m, marker, dx in zip(MODALITIES, "os", (-0.12, 0.12)):
        xs = sorted(s for s, mod in best if mod == m)
        if not xs:
            continue
        y = [best[s, m]["srcc_mean"] for s in xs]
        err = [[y[i] - best[s, m]["ci"][0] for i, s in enumerate(xs)],
               [best[s, m]["ci"][1] - y[i] for i, s in enumerate(xs)]]
        # hollow markers: a CI narrower than the marker (0.004 at SRCC 0.98) still shows inside it
        ax.errorbar([s + dx for s in xs], y, yerr=err, marker=marker, markersize=6,
                    markerfacecolor="none", linestyle="none", capsize=5, elinewidth=1.5, label=m)
        for s, v in zip(xs, y):
            ax.annotate(f"{v:.3f}", (s + dx, v), xytext=(-7 if dx < 0 else 7, 0),
                        textcoords="offset points", ha="right" if dx < 0 else "left",
                        va="center", fontsize=7)
    ticks = []
    for s, row in STRATEGIES.items():
        names = encoder_names([r for (k, _), r in best.items() if k == s])
        ticks.append(f"{s} {row.name}".replace("Adapted ", "Adapted\n")
                     + (f"\n({row.figure})" if row.figure else "")
                     + (f"\n{names}" if names else ""))
    ax.set_xticks(list(STRATEGIES), ticks, fontsize=8)
    ax.set_xlim(min(STRATEGIES) - 0.5, max(STRATEGIES) + 0.5)
    lows, highs = zip(*(r["ci"] for r in best.values()))
    ax.set_ylim(*srcc_limits(min(lows), max(highs)))
    ax.set_xlabel("strategy (Table 6), the paper's Fig. 3 name in brackets "
                  "(SFT: supervised fine-tuning), then the encoders of the runs drawn")
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
    """Table 5 as curves: train and test loss per epoch, the exported (chosen) epoch marked. Epoch
    0's test loss (the unchanged model, several times the others) is written in a corner rather than
    flattening the curves"""
    epochs = run["epochs"]
    # none at epoch 0
    train = [(e["epoch"], e["train_loss"]) for e in epochs if e["train_loss"] is not None]
    test = [(e["epoch"], e["test_loss"]) for e in epochs]
    later = [loss for _, loss in train] + [loss for epoch, loss in test if epoch > 0]
    first = dict(test).get(0)
    # off the scale of the others
    if later and first is not None and first > 2 * max(later) - min(later):
        test = [(epoch, loss) for epoch, loss in test if epoch > 0]
        ax.text(0.02, 0.97, f"epoch 0 (no training): test loss {first:.4f}, off the scale",
                transform=ax.transAxes, va="top", fontsize=8)
    if train:
        ax.plot(*zip(*train), marker="o", label="train loss")
    ax.plot(*zip(*test), marker="s", label="test loss")
    chosen = [e for e in epochs if e["epoch"] == run["chosen_epoch"]]
    if chosen:
        ax.plot(chosen[0]["epoch"], chosen[0]["test_loss"], "k*", markersize=14,
                label=f"exported (epoch {run['chosen_epoch']})")
    ax.set_xticks(sorted({e["epoch"] for e in epochs}))
    ax.set(xlabel="epoch (0: no training)", ylabel="loss",
           title=f"Table 5: loss per epoch, {run_label(run)}")


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
           ylabel="validation SRCC, mean over the folds\n"
                  "(a fold that stopped early keeps its last value)")
    # below: it hides no curve
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.13))


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
    panels += [(draw_lr_curve, (r,)) for r in contrastive + regress if r.get("lr_curve")]
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

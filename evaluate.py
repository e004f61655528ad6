"""
Metrics (SRCC, late fusion, Fisher CI) and the paper's tables and figure from finished runs.

    python evaluate.py results/              # Table 5, Table 6 (.md + .csv), fig3.png, curves.png
    python evaluate.py results/ --fuse-best  # also fuse the best vision and text runs: fusion.json
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

import numpy as np
from scipy.stats import ConstantInputWarning, spearmanr

from runs import (HelpFormatter, UserError, check_finite, read_csv, read_json, script, write_csv,
                  write_json, write_text)
import figures
from strategies import MODALITIES, STRATEGIES, label

CONTRASTIVE_KEYS = ["epochs", "chosen_epoch"]
REGRESS_KEYS = ["strategy", "modality", "checkpoint", "encoder", "lr", "batch_size",
                "srcc_folds", "srcc_mean", "ci", "n_videos"]
OPTIONAL_KEYS = {"demo": bool, "max_epochs": int, "patience": int}  # absent in older runs: unknown


# -----------------------------------------------------------------------------
# metrics

def srcc(pred, target):
    """Spearman rank correlation (paper 4.3.1, Table 6), scipy's; NaN when either side is constant
    (no ranking to compare)."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 1:
        raise ValueError(f"srcc needs two 1-d arrays of one length, got shapes {pred.shape} "
                         f"and {target.shape}")
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
    """95% CI of a correlation by the Fisher z transformation (paper eq. 13, n = 8,500); (r, r)
    where it is undefined (|r| = 1, or n <= 3)"""
    if abs(r) >= 1 or n <= 3:
        return r, r
    half = z / math.sqrt(n - 3)
    return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


def summarise_folds(folds, scores):
    """k-fold records ({fold, srcc, val: {video: fused prediction}, test: {video: prediction},
    epochs, best_epoch, history}) and video_id -> score -> the run's figures: the folds' mean SRCC
    and its CI (eq. 13) over all validation videos, the SRCC of the pooled predictions, and the rows
    of predictions.csv and test_predictions.csv (a test video's prediction is the mean of the folds'
    models)"""
    rows = [(vid, scores[vid], p, f['fold']) for f in folds for vid, p in f['val'].items()]
    srcc_folds = [float(f['srcc']) for f in folds]
    mean, n = float(np.mean(srcc_folds)), len(rows)
    tests = sorted({vid for f in folds for vid in f['test']})
    return {'srcc_folds': srcc_folds, 'srcc_mean': mean,
            'ci': list(fisher_ci(mean, n)),
            'srcc_pooled': srcc([r[2] for r in rows], [r[1] for r in rows]), 'n_videos': n,
            'n_test_videos': len(tests), 'epochs_per_fold': [f['epochs'] for f in folds],
            'best_epoch_per_fold': [f['best_epoch'] for f in folds],
            'history': [f['history'] for f in folds], 'rows': rows,
            'test_rows': [(vid, float(np.mean([f['test'][vid] for f in folds]))) for vid in tests]}


# -----------------------------------------------------------------------------
# reading the runs

def check_run(run, f):
    """the keys Tables 5-6 and the figures read, with their types; errors name the file and the key
    """
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
    triples = isinstance(curve, list) and all(isinstance(p, list) and len(p) == 3 for p in curve)
    if curve is not None and not triples:
        raise UserError(f"{f}: 'lr_curve' must be null or a list of [lr, loss, smoothed], "
                        f"found {str(curve)[:80]}")
    if kind == "contrastive":
        if not isinstance(run["epochs"], list) or not all(
                isinstance(e, dict) and {"epoch", "train_loss", "test_loss"} <= set(e)
                for e in run["epochs"]):
            raise UserError(f"{f}: 'epochs' must be a list of {{epoch, train_loss, test_loss}}, "
                            f"found {str(run['epochs'])[:80]}")
        return kind
    if run["strategy"] not in STRATEGIES or run["modality"] not in MODALITIES:
        raise UserError(f"{f}: strategy must be one of strategies.STRATEGIES {list(STRATEGIES)} "
                        f"and modality one of {MODALITIES}, found {run['strategy']!r}, "
                        f"{run['modality']!r}")
    if (not isinstance(run["batch_size"], int)
            or not isinstance(run["ci"], list) or len(run["ci"]) != 2):
        raise UserError(f"{f}: expected an int batch_size and a [low, high] ci, "
                        f"found {run['batch_size']!r} and {run['ci']!r}")
    folds = run["srcc_folds"] if isinstance(run["srcc_folds"], list) else [None]
    scores = [run["srcc_mean"], *run["ci"], *folds]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        raise UserError(f"{f}: srcc_mean, ci and srcc_folds must hold numbers, found "
                        f"{run['srcc_mean']!r}, {run['ci']!r} and {str(run['srcc_folds'])[:80]}")
    # a NaN SRCC would sort anywhere
    check_finite({k: run[k] for k in ("srcc_mean", "srcc_folds", "ci")}, f)
    history = run.get("history")
    if history is not None and not (isinstance(history, list) and all(
            isinstance(fold, list)
            and all(isinstance(e, dict) and {"epoch", "val_srcc"} <= set(e) for e in fold)
            for fold in history)):
        raise UserError(f"{f}: 'history' must be one list of {{epoch, train_loss, val_srcc}} "
                        f"per fold, found {str(history)[:80]}")
    return kind


def load_results(folder):
    """the runs in folder (FOLDER/*/results.json, or FOLDER/results.json for one run) ->
    (contrastive runs, regression runs), each a list of dicts with the run's folder under 'path',
    the regression runs in Table 6's order (strategy, modality, folder). Deeper folders are not
    searched: results/demo/ holds the demo's runs, which must not join the
    tables of results/."""
    paths = sorted(Path(folder).glob("results.json")) + sorted(Path(folder).glob("*/results.json"))
    if not paths:
        raise UserError(f"no results.json in {folder} or its subfolders; "
                        "run contrastive.py or regress.py first")
    contrastive, regress = [], []
    for f in paths:
        run = read_json(f, expect=dict, what="results.json")
        kind = check_run(run, f)
        run["path"] = str(f.parent)
        (contrastive if kind == "contrastive" else regress).append(run)
    regress.sort(key=lambda r: (r["strategy"], MODALITIES.index(r["modality"]), r["path"]))
    return contrastive, regress


# -----------------------------------------------------------------------------
# tables

def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


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
            rows.append([run["path"], e["epoch"], e["train_loss"], e["test_loss"],
                         e["epoch"] == run["chosen_epoch"]])
        md += (f"{run['path']} (chosen epoch {run['chosen_epoch']})\n\n"
               + markdown(["Epoch", "Train Loss", "Test Loss"], body) + "\n")
    write_csv(out / "table5.csv", ["run", "epoch", "train_loss", "test_loss", "chosen"], rows)
    write_text(out / "table5.md", md)
    return md


def table6(runs, out):
    """Table 6: a row per regression run, in the order given (load_results': by strategy, then
    modality); the best SRCC of each modality in bold."""
    best = {m: max((r["srcc_mean"] for r in runs if r["modality"] == m), default=None)
            for m in MODALITIES}
    body, rows, last = [], [], None
    twice = {k for k, n in Counter((r["strategy"], r["modality"]) for r in runs).items() if n > 1}
    for r in runs:
        cell = f"{r['srcc_mean']:.3f} ({r['ci'][0]:.3f}, {r['ci'][1]:.3f})"
        if r["srcc_mean"] == best[r["modality"]]:
            cell = f"**{cell}**"
        # the paper names each strategy once
        name = label(r["strategy"]) if r["strategy"] != last else ""
        last = r["strategy"]
        encoder = r["encoder"]
        if (r["strategy"], r["modality"]) in twice:
            encoder += f" [{Path(r['path']).name}]"
        body.append([name, encoder, figures.format_lr(r["lr"]), f"{r['batch_size']:,}", cell])
        rows.append([r["strategy"], r["modality"], r["encoder"], r["checkpoint"], r["lr"],
                     r["batch_size"], r["srcc_mean"], *r["ci"], r["n_videos"], r["path"]])
    md = markdown(["Strategy", "Encoder Model", "Learning Rate", "Batch Size", "SRCC (CI)"], body)
    md = f"{figures.DEMO_NOTE}\n\n{md}" if any(r.get("demo") for r in runs) else md
    write_csv(out / "table6.csv",
              ["strategy", "modality", "encoder", "checkpoint", "lr", "batch_size",
               "srcc_mean", "ci_low", "ci_high", "n_videos", "run"], rows)
    write_text(out / "table6.md", md)
    return md


def tables(folder, out=None):
    contrastive, regress = load_results(folder)
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    if contrastive:
        print("Table 5: contrastive adaptation loss\n\n" + table5(contrastive, out))
    if regress:
        print("Table 6: SRCC per strategy (mean over folds, 95% CI)\n\n" + table6(regress, out))
        figures.fig3(regress, out / "fig3.png")
        print(f"wrote {out / 'fig3.png'}")
    fig = figures.curves(contrastive, regress, out / "curves.png")
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
    records = read_csv(path, required=["video_id", "score", "prediction", "fold"])
    for line, r in enumerate(records, 2):  # line 1 is the header
        try:
            row = float(r["score"]), float(r["prediction"]), int(r["fold"])
        except ValueError:
            raise UserError(f"{path}, line {line}: expected numbers for score, prediction and an "
                            f"int fold, found {r['score']!r}, {r['prediction']!r}, {r['fold']!r}; "
                            "is it truncated?") from None
        if not all(map(math.isfinite, row[:2])):
            raise UserError(f"{path}, line {line}: score and prediction must be finite, "
                            f"found {row[:2]}")
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
    names = [os.path.relpath(p, parent).replace(os.sep, "_") if p != parent else os.path.basename(p)
             for p in paths]
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
    for key, p, row in [("run_a", preds[0], "A"), ("run_b", preds[1], "B"),
                        ("fused", fused, "fused")]:
        folds = fold_srcc(score, p, fold)
        mean = float(np.mean(folds))
        if not math.isfinite(mean):
            raise UserError(f"{key} of {dirs[0]} and {dirs[1]}: SRCC per fold {folds}; a fold's "
                            f"predictions or scores are constant")
        n = len(ids)
        ci = list(fisher_ci(mean, n=n))  # eq. 13
        result[key] = {"srcc_folds": folds, "srcc_mean": mean, "ci": ci}
        print(f"{row:9s}{mean:.3f} ({ci[0]:.3f}, {ci[1]:.3f})  "
              f"{' '.join(f'{s:.3f}' for s in folds)}")
    print(f"w per fold, {how}: {' '.join(f'{x:.2f}' for x in per_fold)}; weights of A and B "
          f"{'chosen on all folds ' if weights is None else ''}{chosen[0]:g} and {chosen[1]:g}")
    better = max(("run_a", "run_b"), key=lambda k: result[k]["srcc_mean"])
    result["fused_beats_better_run"] = result["fused"]["srcc_mean"] > result[better]["srcc_mean"]
    if not result["fused_beats_better_run"]:
        b = better == "run_b"
        print(f"the fusion ({result['fused']['srcc_mean']:.3f}) does not beat the better run "
              f"alone, {'AB'[b]} = {dirs[b]} ({result[better]['srcc_mean']:.3f})")
    out = Path(out or os.path.commonpath([os.path.abspath(d) for d in dirs]))
    path = out / (name or fusion_name(dirs))
    write_json(path, result)
    print(f"wrote {path}")
    return result


def fuse_best(regress, out):
    """fuse the best vision run with the best text run (highest mean SRCC of each modality) ->
    fusion.json"""
    best = {m: max((r for r in regress if r["modality"] == m), key=lambda r: r["srcc_mean"],
                   default=None)
            for m in MODALITIES}
    missing = [m for m in MODALITIES if best[m] is None]
    if missing:
        raise UserError("--fuse-best needs a vision and a text run; "
                        f"no {' or '.join(missing)} run found")
    print(f"\nfusion of the best vision run ({best['vision']['path']}) "
          f"and the best text run ({best['text']['path']})")
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
                        help="after the tables, fuse the best vision and the best text run; "
                             "writes fusion.json")
    parser.add_argument("--weights", nargs=2, type=float, default=None, metavar=("A", "B"),
                        help="fixed weights of the two runs in --fuse; unset: w * A + (1 - w) * B, "
                             "w chosen on the validation folds "
                             "(nested: each fold's w on the others)")
    parser.add_argument("--out", default=None,
                        help="output folder; unset: the results folder, "
                             "or for --fuse the runs' common parent")
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

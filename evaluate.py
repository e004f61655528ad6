"""
The paper's SRCC (4.3.1), its CI (eq. 13), Tables 5-6 and Fig. 3; any model's predictions scored.

    python evaluate.py results/                     # table5.md, table6.md (and .csv), fig3.png
    python evaluate.py --score FILE.csv --pred preds --true true   # SRCC (CI), per fold if any
    python evaluate.py --compare results/s5-vision results/s3-vision   # files or run folders

--compare tests the difference of two SRCCs on the videos both scored (correlated, so narrower than
either CI): Zou's interval (Zou 2007, Psychol. Methods 12(4):399-413), Steiger's test of Fisher's z
(Steiger 1980, Psychol. Bull. 87(2):245-251), a paired bootstrap; read: docs/comparing-models.md
"""
import argparse
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from harness import runs
from harness.runs import UserError

DEMO_NOTE = "demo data: generated toy clips and tiny random encoders, not the paper's results"
MODALITIES = ("vision", "text")

# -----------------------------------------------------------------------------
# the scores
def srcc(pred, true):
    """Spearman's rank correlation (paper 4.3.1); NaN when either side is constant"""
    assert len(pred) == len(true), f"{len(pred)} predictions of {len(true)} scores"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # the NaN says it
        return float(stats.spearmanr(pred, true).statistic)

def fisher_ci(r, n=8500, z=1.96):
    """95% CI of a correlation by Fisher's z (paper eq. 13, n = 8,500); (r, r) where undefined"""
    if abs(r) >= 1 or n <= 3:
        return r, r
    half = z / math.sqrt(n - 3)
    return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)

def compare(a, b, true, z=1.96, resamples=1000):
    """predictions a and b of the same videos, their true scores (arrays (n,)) -> dict: both SRCCs,
    a - b with Zou's 95% interval, Steiger's two-sided p and a paired bootstrap's percentile
    interval (seed 0). Both tests: Spearman's rho as Pearson's r of the ranks, eq. 13's Fisher z."""
    n, (r1, r2, r12) = len(true), (srcc(a, true), srcc(b, true), srcc(a, b))
    (l1, u1), (l2, u2) = fisher_ci(r1, n, z), fisher_ci(r2, n, z)
    if r12 >= 1 - 1e-12:  # one ranking: the difference is exactly 0
        lo, hi, p = 0.0, 0.0, 1.0
    else:  # the correlation of the two correlations (Zou's eq. for overlapping ones)
        c = ((r12 - r1 * r2 / 2) * (1 - r1 ** 2 - r2 ** 2 - r12 ** 2) + r12 ** 3) \
            / ((1 - r1 ** 2) * (1 - r2 ** 2))
        lo = r1 - r2 - math.sqrt(max(0, (r1 - l1) ** 2 + (u2 - r2) ** 2 - 2 * c * (r1 - l1) * (u2 - r2)))
        hi = r1 - r2 + math.sqrt(max(0, (u1 - r1) ** 2 + (r2 - l2) ** 2 - 2 * c * (u1 - r1) * (r2 - l2)))
        mean = (r1 + r2) / 2  # Steiger's z on Fisher's z values, the pooled r in the covariance
        cov = (r12 * (1 - 2 * mean ** 2) - mean ** 2 * (1 - 2 * mean ** 2 - r12 ** 2) / 2) \
            / (1 - mean ** 2) ** 2
        zs = (math.atanh(r1) - math.atanh(r2)) * math.sqrt((n - 3) / (2 - 2 * cov))
        p = float(2 * stats.norm.sf(abs(zs)))
    if not resamples:
        return {'n': n, 'srcc_a': r1, 'srcc_b': r2, 'difference': r1 - r2, 'ci': [lo, hi], 'p': p}
    idx = np.random.default_rng(0).integers(0, n, (resamples, n))  # the resamples, a row each
    ra, rb, rt = (stats.rankdata(x[idx], axis=1) for x in (a, b, true))
    ra, rb, rt = (x - x.mean(1, keepdims=True) for x in (ra, rb, rt))
    with np.errstate(invalid='ignore', divide='ignore'):  # (a constant resample: NaN, left out)
        boot = [(x * rt).sum(1) / np.sqrt((x * x).sum(1) * (rt * rt).sum(1)) for x in (ra, rb)]
    boot = boot[0] - boot[1]  # Spearman's rho of each resample: Pearson's r of its ranks
    return {'n': n, 'srcc_a': r1, 'ci_a': [l1, u1], 'srcc_b': r2, 'ci_b': [l2, u2],
            'srcc_a_b': r12, 'difference': r1 - r2, 'ci': [lo, hi], 'p': p,
            'bootstrap_ci': np.nanpercentile(boot, [2.5, 97.5]).tolist()}

def read_scores(path, pred='prediction', true='score', id='video_id'):
    """a predictions file (a run folder: its predictions.csv) -> {video id: (prediction, true score,
    fold or None)}; a missing column, a non-finite value, a repeated id or < 4 videos: one line"""
    path = os.path.join(path, 'predictions.csv') if os.path.isdir(path) else path
    rows, out = runs.read_csv(path, [id, pred, true]), {}
    for line, r in enumerate(rows, 2):
        try:
            values = float(r[pred]), float(r[true]), int(r['fold']) if 'fold' in r else None
        except ValueError:
            raise UserError(f"{path}, line {line}: expected numbers in {pred!r}, {true!r} (and an int "
                            f"'fold'), found {r[pred]!r}, {r[true]!r} ({r.get('fold')!r})") from None
        if not all(map(math.isfinite, values[:2])) or r[id] in out:
            raise UserError(f"{path}, line {line}: " + (f"video {r[id]!r} appears twice" if r[id]
                            in out else f"{pred} and {true} must be finite, found {values[:2]}"))
        out[r[id]] = values
    if len(out) < 4:
        raise UserError(f"{path}: {len(out)} videos; a rank correlation's CI needs 4 or more")
    return out

def matched(a, b):
    """two read_scores() agreeing on true scores -> (common ids, pred a, pred b, true, a's folds)"""
    ids = sorted(a.keys() & b.keys())
    runs.require(len(ids) >= 4, f"{len(ids)} videos in both files; a comparison needs 4 or more")
    differ = [i for i in ids if a[i][1] != b[i][1]]
    runs.require(not differ, f"the files disagree on the true score of {len(differ)} videos (e.g. "
                 f"{differ[:3]}); both must score the same videos")
    return (ids, *(np.array([x[i][k] for i in ids]) for x, k in ((a, 0), (b, 0), (a, 1))),
            [a[i][2] for i in ids])

# -----------------------------------------------------------------------------
# the tables and the figure
def load_results(folder):
    """FOLDER/results.json, FOLDER/*/results.json -> (contrastive runs, regression runs in Table 6's
    order), each with 'path'; none deeper: results/demo/'s runs must not join results/'s tables"""
    paths = sorted(Path(folder).glob("results.json")) + sorted(Path(folder).glob("*/results.json"))
    runs.require(paths, f"no results.json in {folder} or its subfolders; run contrastive.py or "
                 "regress.py first")
    found = {"contrastive": [], "regress": []}
    need = {"contrastive": ["epochs", "chosen_epoch"],
            "regress": ["strategy", "name", "modality", "encoder", "lr", "batch_size", "srcc_folds",
                        "srcc_mean", "n_videos", "frozen", "max_epochs", "patience",
                        "epochs_per_fold", "best_epoch_per_fold"]}
    for f in paths:
        run = runs.read_json(f, expect=dict, what="results.json")
        runs.require(run.get("kind") in need, f"{f}: key 'kind' must be 'contrastive' or "
                     f"'regress', found {run.get('kind')!r}")
        missing = [k for k in need[run["kind"]] if k not in run]
        if missing or not isinstance(run.get("demo", False), bool):
            raise UserError(f"{f}: missing key {missing[0]!r}" if missing else f"{f}: 'demo' must "
                            f"be true or false, found {run['demo']!r}")
        if run["kind"] == "regress":  # a NaN SRCC would sort anywhere
            scores = [run["srcc_mean"], *run["srcc_folds"]] if isinstance(run["srcc_folds"], list) else [0]
            runs.require(all(type(x) in (int, float) for x in scores), f"{f}: srcc_mean and "
                         f"srcc_folds must be numbers, found {run['srcc_mean']!r}, {run['srcc_folds']!r}")
            runs.check_finite({k: run[k] for k in ("srcc_mean", "srcc_folds")}, f,
                              "a results.json of a diverged run; run it again")
        found[run["kind"]].append(dict(run, path=str(f.parent)))
    found["regress"].sort(key=lambda r: (r["strategy"], MODALITIES.index(r["modality"]), r["path"]))
    return found["contrastive"], found["regress"]

def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"

def format_lr(lr):
    mantissa, exp = f"{lr:.2e}".split("e")
    return mantissa.rstrip("0").rstrip(".") + "e" + exp  # 2e-03, 2.75e-04 as in Table 6

def demo_note(runs_, text):
    return f"{DEMO_NOTE}\n\n{text}" if any(r.get("demo") for r in runs_) else text

def table5(contrastive, out):
    """Table 5: the train and test loss of each contrastive run per epoch, the chosen in bold"""
    md, rows = "", []
    for run in contrastive:
        body = []
        for e in run["epochs"]:
            test, chosen = f"{e['test_loss']:.4f}", e["epoch"] == run["chosen_epoch"]
            body.append(["0 (No training)" if e["epoch"] == 0 else e["epoch"],
                         "–" if e["train_loss"] is None else f"{e['train_loss']:.4f}",
                         f"**{test}**" if chosen else test])
            rows.append([run["path"], e["epoch"], e["train_loss"], e["test_loss"], chosen])
        md += (f"{run['path']} (chosen epoch {run['chosen_epoch']})\n\n"
               + markdown(["Epoch", "Train Loss", "Test Loss"], body) + "\n")
    runs.write_csv(out / "table5.csv", ["run", "epoch", "train_loss", "test_loss", "chosen"], rows)
    runs.write_bytes(out / "table5.md", demo_note(contrastive, md).encode())
    return demo_note(contrastive, md)

def table6(regress, out):
    """Table 6, a row a run: the best SRCC per modality in bold; the difference from strategy 1's"""
    best = {m: max((r["srcc_mean"] for r in regress if r["modality"] == m), default=None)
            for m in MODALITIES}
    base = {r["modality"]: r for r in regress[::-1] if r["strategy"] == 1}
    body, rows, last = [], [], None
    for r in regress:
        ci = fisher_ci(r["srcc_mean"], r["n_videos"])
        cell = f"{r['srcc_mean']:.3f} ({ci[0]:.3f}, {ci[1]:.3f})"
        files = [os.path.join(x["path"], "predictions.csv") for x in (r, base.get(r["modality"], r))]
        diff = "–" if r is base.get(r["modality"], r) else "no predictions.csv"
        if diff != "–" and all(map(os.path.exists, files)):
            d = compare(*matched(*map(read_scores, files))[1:4], resamples=0)
            diff = f"{d['difference']:+.3f} ({d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}), p {d['p']:.2g}"
        twice = sum((x["strategy"], x["modality"]) == (r["strategy"], r["modality"]) for x in regress)
        body.append([f"{r['strategy']} - {r['name']}" if r["strategy"] != last else "",
                     r["encoder"] + f" [{Path(r['path']).name}]" * (twice > 1),
                     format_lr(r["lr"]), f"{r['batch_size']:,}",
                     f"**{cell}**" if r["srcc_mean"] == best[r["modality"]] else cell, diff])
        rows.append([r["strategy"], r["modality"], r["encoder"], r["lr"], r["batch_size"],
                     r["srcc_mean"], *ci, r["n_videos"], diff, r["path"]])
        last = r["strategy"]
    md = demo_note(regress, markdown(["Strategy", "Encoder Model", "Learning Rate", "Batch Size",
                                      "SRCC (CI)", "vs strategy 1: pooled SRCC difference (CI), p"],
                                     body))
    runs.write_csv(out / "table6.csv", ["strategy", "modality", "encoder", "lr", "batch_size",
                                        "srcc_mean", "ci_low", "ci_high", "n_videos",
                                        "vs_strategy_1", "run"], rows)
    runs.write_bytes(out / "table6.md", md.encode())
    return md

def fig3(regress, path):
    """Fig. 3: each strategy's SRCC and CI, vision and text (a point: the best run of each)"""
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    best = {(r["strategy"], r["modality"]): r for r in sorted(regress, key=lambda r: r["srcc_mean"])}
    lows = []
    for m, marker, dx in zip(MODALITIES, "os", (-0.12, 0.12)):  # side by side: no CI hides another
        points = sorted((s, r) for (s, mod), r in best.items() if mod == m)
        for s, r in points:
            y = r["srcc_mean"]
            lo, hi = fisher_ci(y, r["n_videos"])
            lows += [lo, hi]
            ax.errorbar(s + dx, y, yerr=[[y - lo], [hi - y]], marker=marker, markersize=6,
                        markerfacecolor="none", capsize=5, color=f"C{MODALITIES.index(m)}",
                        label=m if s == points[0][0] else None)  # hollow: a narrow CI shows inside
            ax.annotate(f"{y:.3f}", (s + dx, y), xytext=(-7 if dx < 0 else 7, 0), fontsize=7,
                        textcoords="offset points", ha="right" if dx < 0 else "left", va="center")
    names = {}
    for (s, m), r in sorted(best.items(), key=lambda x: (x[0][0], MODALITIES.index(x[0][1]))):
        names.setdefault(s, [r["name"].replace("Adapted ", "Adapted\n"), r.get("figure"), []])
        names[s][2].append(r["encoder"].split(" - ")[0])
    labels = [f"{s} {n}" + (f"\n({fig_})" if fig_ else "") + "\n" + " / ".join(dict.fromkeys(e))
              for s, (n, fig_, e) in names.items()]
    ax.set_xticks(list(names), labels, fontsize=8)
    pad = max(0.1 * (max(lows) - min(lows)), 0.02)
    ax.set_ylim(max(min(lows) - pad, 0) if min(lows) >= 0 else min(lows) - pad,
                min(max(lows) + pad, 1) if max(lows) <= 1 else max(lows) + pad)
    ax.set(xlabel="strategy (Table 6), the paper's Fig. 3 name in brackets (SFT: supervised "
                  "fine-tuning), then the encoders of the runs drawn",
           ylabel="SRCC (mean over folds, 95% CI)",
           title="Fig. 3: SRCC per strategy, vision and text encoders")
    if any(r.get("demo") for r in regress):  # a slide of toy numbers must not pass for the paper's
        fig.suptitle(DEMO_NOTE, color="firebrick", fontweight="bold")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right")
    save_png(fig, path)
    return fig

def save_png(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    runs.write_bytes(path, buf.getvalue())

# -----------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter)
    p.add_argument("folder", nargs="?", default="results",
                   help="folder whose runs (FOLDER/*/results.json) make the tables and the figure")
    p.add_argument("--score", metavar="FILE", help="a predictions CSV (or run folder) to score")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two predictions CSVs or run folders: A - B on the videos both scored")
    p.add_argument("--id", default="video_id", help="--score, --compare: the video id column")
    p.add_argument("--pred", default="prediction", help="--score, --compare: the prediction column")
    p.add_argument("--true", default="score", help="--score, --compare: the true score column")
    p.add_argument("--out", default=None, help="the tables' folder (default: the runs' folder)")
    args = p.parse_args(argv)
    if args.score or args.compare:
        found = [read_scores(f, args.pred, args.true, args.id) for f in args.compare or [args.score]]
        if args.score:
            ids, pred, _, true, fold = matched(found[0], found[0])
            r, ci = srcc(pred, true), fisher_ci(srcc(pred, true), len(ids))
            print(f"{args.score}: {len(ids)} videos\nSRCC {r:.4f} ({ci[0]:.4f}, {ci[1]:.4f})")
            for k in sorted(set(fold) - {None}):
                mine = np.array(fold) == k
                lo, hi = fisher_ci(srcc(pred[mine], true[mine]), mine.sum())
                print(f"  fold {k}: SRCC {srcc(pred[mine], true[mine]):.4f} ({lo:.4f}, {hi:.4f}),"
                      f" {mine.sum()} videos")
            return r
        d = compare(*matched(*found)[1:4])
        print(f"{d['n']} videos in both files; left out: {len(found[0]) - d['n']} only in A, "
              f"{len(found[1]) - d['n']} only in B")
        for name, f, (lo, hi) in zip("AB", args.compare, (d["ci_a"], d["ci_b"])):
            print(f"{name} = {f}: SRCC {d[f'srcc_{name.lower()}']:.4f} ({lo:.4f}, {hi:.4f})")
        print(f"SRCC of A's predictions with B's: {d['srcc_a_b']:.4f}; paired bootstrap over the "
              f"videos (1,000 resamples): A - B in ({d['bootstrap_ci'][0]:.4f}, "
              f"{d['bootstrap_ci'][1]:.4f})")
        print(f"difference A - B: {d['difference']:.4f} ({d['ci'][0]:.4f}, {d['ci'][1]:.4f}), "
              f"p = {d['p']:.3g}")
        return d
    contrastive, regress = load_results(args.folder)
    out = Path(args.out or args.folder)
    if contrastive:
        print("Table 5: contrastive adaptation loss\n\n" + table5(contrastive, out))
    if regress:
        print("Table 6: SRCC per strategy (mean over folds, 95% CI)\n\n" + table6(regress, out))
        fig3(regress, out / "fig3.png")
        print(f"wrote {out / 'fig3.png'}")
    return regress

if __name__ == "__main__":
    runs.script(main, "evaluate.py", "the tables are written whole: run the same command again")

"""Tests for evaluate.py: python -m pytest tests/test_evaluate.py -q"""
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate
import figures
from evaluate import fisher_ci, fuse, srcc
from runs import UserError

ROOT = Path(__file__).resolve().parents[1]

# paper Table 6: (strategy, modality, encoder, lr, batch size, SRCC, CI low, CI high)
TABLE6 = [
    (1, "vision", "ViT", 2e-3, 1024, 0.603, 0.589, 0.616),
    (1, "text", "DistilBERT", 1e-3, 512, 0.574, 0.559, 0.588),
    (2, "vision", "ViT", 3e-5, 128, 0.622, 0.609, 0.635),
    (2, "text", "DistilBERT", 1e-5, 256, 0.629, 0.616, 0.641),
    (3, "vision", "CLIP - Vision", 1e-3, 1024, 0.664, 0.651, 0.675),
    (3, "text", "CLIP - Text", 1e-3, 4096, 0.609, 0.595, 0.622),
    (4, "vision", "CLIP - Vision", 2e-6, 128, 0.670, 0.658, 0.681),
    (4, "text", "CLIP - Text", 2e-6, 256, 0.619, 0.606, 0.632),
    (5, "vision", "FCLIP - Vision", 1e-3, 2048, 0.672, 0.660, 0.683),
    (5, "text", "FCLIP - Text", 2e-3, 512, 0.628, 0.615, 0.640),
    (6, "vision", "FCLIP - Vision", 2e-6, 128, 0.671, 0.659, 0.682),
    (6, "text", "FCLIP - Text", 3e-6, 512, 0.632, 0.619, 0.644),
]


def test_fisher_ci_reproduces_table6():
    # the printed SRCC is rounded to 3 decimals, so the CI can be off by half a unit more
    for *_, r, low, high in TABLE6:
        got = fisher_ci(r)
        assert abs(got[0] - low) <= 0.0011 and abs(got[1] - high) <= 0.0011, (r, got, low, high)
    # eq. 13 by hand for one value: atanh(0.5) = 0.549306, 1.96 / sqrt(97) = 0.199007
    assert fisher_ci(0.5, n=100) == pytest.approx((np.tanh(0.350299), np.tanh(0.748313)), abs=1e-6)


def test_srcc_hand_example():
    # ranks of pred: 1 2 3 4 5, of target: 2 1 4 3 5 -> d^2 = 1+1+1+1+0 = 4
    # rho = 1 - 6*4 / (5*(25-1)) = 0.8
    assert srcc([0.1, 0.2, 0.3, 0.4, 0.5], [0.7, 0.6, 0.9, 0.8, 1.0]) == pytest.approx(0.8)
    assert srcc([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert np.isnan(srcc([1, 1, 1], [1, 2, 3]))
    # ties share their mean rank: ranks 1.5 1.5 3 against 1 2 3 -> cov 1.5 / sqrt(1.5 * 2)
    assert srcc([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3.0))
    with pytest.raises(ValueError, match="one length"):
        srcc([1, 2], [1, 2, 3])


def test_fuse_hand_example():
    ids, fused = fuse([0.2, 0.9, 0.4, 0.5, 0.3, 0.6], ["b", "a", "b", "a", "c", "b"])
    assert ids == ["b", "a", "c"]
    np.testing.assert_allclose(fused, [0.4, 0.7, 0.3])


# -----------------------------------------------------------------------------
# tables

def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def regress_result(strategy, modality, encoder, lr, bs, r, **over):
    return {"kind": "regress", "strategy": strategy, "modality": modality, "checkpoint": f"ckpt-{strategy}",
            "encoder": encoder, "lr": lr, "batch_size": bs, "srcc_folds": [r] * 5, "srcc_mean": r,
            "ci": list(fisher_ci(r)), "n_videos": 8500, "epochs_per_fold": [60] * 5, "wall_time_s": 1.0, **over}


LOSSES = [(None, 1.93658), (0.2187, 0.4209), (0.0912, 0.4538), (0.0610, 0.4814)]  # paper Table 5


def contrastive_result(**over):
    return {"kind": "contrastive", "chosen_epoch": 1, "lr": 1e-5, "lr_curve": None, "batch_size": 128,
            "epochs": [{"epoch": e, "train_loss": tr, "test_loss": te, "lr": 1e-5}
                       for e, (tr, te) in enumerate(LOSSES)], **over}


def lr_curve(lo=1e-8, hi=1.0, n=40):
    lrs = np.logspace(math.log10(lo), math.log10(hi), n)
    loss = 1 / (1 + lrs * 1e4)
    return [[float(a), float(b), float(b)] for a, b in zip(lrs, loss)]


def history(r, folds=5, epochs=6):
    return [[{"epoch": e, "train_loss": 1 / e, "val_srcc": r * e / epochs} for e in range(1, epochs + 1)]
            for _ in range(folds)]


def make_results(root):
    # Table 6 rows, written in a scrambled order, plus the paper's Table 5
    for s, m, enc, lr, bs, r, *_ in reversed(TABLE6):
        write_json(root / f"s{s}-{m}" / "results.json", regress_result(s, m, enc, lr, bs, r))
    write_json(root / "fclip" / "results.json", contrastive_result())


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_tables_from_results(tmp_path, capsys):
    make_results(tmp_path)
    make_results(tmp_path / "demo")  # runs one folder deeper (results/demo/...) are another set: left out
    evaluate.main([str(tmp_path)])
    printed = capsys.readouterr().out
    md6 = (tmp_path / "table6.md").read_text()
    assert md6 in printed
    rows = [line for line in md6.splitlines()[2:]]
    assert len(rows) == 12
    # sorted by strategy then modality (vision first), strategy named once, paper's formatting
    assert rows[0] == "| 1 - Unimodal | ViT | 2e-03 | 1,024 | 0.603 (0.589, 0.616) |"
    assert rows[1] == "|  | DistilBERT | 1e-03 | 512 | 0.574 (0.560, 0.588) |"  # CI from the rounded 0.574
    # the best per modality in bold: FCLIP vision 0.672 (strategy 5), FCLIP text 0.632 (strategy 6)
    bold = [line for line in rows if "**" in line]
    assert bold == ["| 5 - FCLIP-Based | FCLIP - Vision | 1e-03 | 2,048 | **0.672 (0.660, 0.683)** |",
                    "|  | FCLIP - Text | 3e-06 | 512 | **0.632 (0.619, 0.645)** |"]
    with open(tmp_path / "table6.csv") as f:
        table = list(csv.DictReader(f))
    assert [(int(r["strategy"]), r["modality"]) for r in table] == [(s, m) for s, m, *_ in TABLE6]
    assert float(table[8]["srcc_mean"]) == 0.672
    md5 = (tmp_path / "table5.md").read_text()
    assert "| 0 (No training) | – | 1.9366 |" in md5 and "| 1 | 0.2187 | **0.4209** |" in md5
    assert "| 3 | 0.0610 | 0.4814 |" in md5
    assert (tmp_path / "table5.csv").exists()
    # a second run of one strategy and modality (another lr, say): both rows name their folder
    write_json(tmp_path / "s1-vision-lr1e-4" / "results.json", regress_result(1, "vision", "ViT", 1e-4, 1024, 0.58))
    evaluate.main([str(tmp_path)])
    rows = (tmp_path / "table6.md").read_text().splitlines()[2:]
    assert rows[:3] == ["| 1 - Unimodal | ViT [s1-vision] | 2e-03 | 1,024 | 0.603 (0.589, 0.616) |",
                        "|  | ViT [s1-vision-lr1e-4] | 1e-04 | 1,024 | 0.580 (0.566, 0.594) |",
                        "|  | DistilBERT | 1e-03 | 512 | 0.574 (0.560, 0.588) |"]
    assert is_png(tmp_path / "fig3.png")
    assert is_png(tmp_path / "curves.png")  # Table 5's losses: the contrastive run has epochs
    assert not list(tmp_path.glob("*.tmp"))  # every file went through files.atomic_write


def test_matplotlib_is_a_runtime_requirement():
    def names(path):
        lines = [line.split("#")[0].strip() for line in (ROOT / path).read_text().splitlines()]
        return [line.split(">")[0].split("=")[0].strip().lower() for line in lines if line and not line.startswith("-")]
    assert "matplotlib" in names("requirements.txt")
    assert "matplotlib" not in names("requirements-test.txt")  # it comes with -r requirements.txt


def tick_labels(ax):
    return [t.get_text().replace("\n", " ") for t in ax.get_xticklabels()]


def test_fig3_reads_well(tmp_path):
    runs = [regress_result(s, m, enc, lr, bs, r) for s, m, enc, lr, bs, r, *_ in TABLE6]
    runs.append(regress_result(5, "vision", "FCLIP - Vision", 1e-3, 64, 0.5))  # a worse run of one point: not drawn
    fig = figures.fig3(runs, tmp_path / "fig3.png")
    assert is_png(tmp_path / "fig3.png")
    ax, = fig.axes
    assert ax.get_title().startswith("Fig. 3")
    # Table 6's strategy names; the paper's Fig. 3 names the fine-tuned ones -SFT (its caption), in brackets
    # and the encoders of the runs drawn
    assert tick_labels(ax) == ["1 Unimodal ViT / DistilBERT", "2 Adapted Unimodal (Unimodal-SFT) ViT / DistilBERT",
                               "3 CLIP-Based CLIP", "4 Adapted CLIP-Based (CLIP-SFT) CLIP", "5 FCLIP-Based FCLIP",
                               "6 Adapted FCLIP-Based (FCLIP-SFT) FCLIP"]
    assert [t.get_position()[0] for t in ax.get_xticklabels()] == [1, 2, 3, 4, 5, 6]
    points = {}
    for container, label in zip(ax.containers, ax.get_legend_handles_labels()[1]):
        line = container.lines[0]
        assert line.get_linestyle() == "None" and line.get_marker() not in ("None", None, "")  # markers, no lines
        points[label] = (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
    assert sorted(points) == ["text", "vision"]
    xv, yv = points["vision"]
    xt, yt = points["text"]
    np.testing.assert_allclose(np.round(xv), range(1, 7))
    assert np.all(xt - xv > 0.1)  # side by side: a text marker never sits on a vision marker
    np.testing.assert_allclose(yv, [r for _, m, *_, r, _, _ in TABLE6 if m == "vision"])  # the best run per point
    np.testing.assert_allclose(yt, [r for _, m, *_, r, _, _ in TABLE6 if m == "text"])
    # the error bars span each run's CI
    segments = ax.containers[0].lines[2][0].get_segments()
    np.testing.assert_allclose([s[:, 1] for s in segments], [fisher_ci(r) for _, m, *_, r, _, _ in TABLE6
                                                             if m == "vision"])


def test_curves_mark_the_chosen_lr_and_epoch(tmp_path):
    contrastive = [{**contrastive_result(lr_curve=lr_curve()), "path": str(tmp_path / "fclip")}]
    regress = [{**regress_result(1, "vision", "ViT", 2e-3, 64, 0.5, lr_curve=lr_curve(), history=history(0.5),
                                 best_epoch_per_fold=[3] * 5), "path": str(tmp_path / "s1-vision")},
               {**regress_result(1, "text", "DistilBERT", 1e-3, 64, 0.6), "path": str(tmp_path / "s1-text")}]
    fig = figures.curves(contrastive, regress, tmp_path / "curves.png")
    assert is_png(tmp_path / "curves.png")
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert [t.split(",")[0] for t in titles] == ["validation SRCC per epoch", "Table 5: loss per epoch",
                                                 "LR range test", "LR range test"]
    hist, losses, lr_c, lr_r = [ax for ax in fig.axes if ax.axison]
    # the exported epoch: a marker on the test loss at chosen_epoch
    exported = [line for line in losses.lines if line.get_label().startswith("exported")]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in exported] == [([1], [0.4209])]
    # the chosen lr: a vertical line at the run's lr
    for ax, lr in ((lr_c, 1e-5), (lr_r, 2e-3)):
        chosen = [line for line in ax.lines if line.get_label().startswith("chosen lr")]
        assert len(chosen) == 1 and list(chosen[0].get_xdata()) == [lr, lr] and ax.get_xscale() == "log"
    # one run: its fold mean as a line (not one line per fold, no band)
    assert "vision" in titles[0] and len(hist.lines) == 1 and not hist.collections
    mean = np.mean([[e["val_srcc"] for e in fold] for fold in history(0.5)], axis=0)
    np.testing.assert_allclose(hist.lines[0].get_ydata(), mean)
    # nothing to draw: no file
    assert figures.curves([], regress[1:], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def stopping_history(levels, stops):
    """folds whose validation SRCC is levels[k] at every epoch, fold k stopping after stops[k] epochs"""
    return [[{"epoch": e, "train_loss": 0.1, "val_srcc": r} for e in range(1, n + 1)] for r, n in zip(levels, stops)]


def six_runs(tmp_path, modality="vision", **over):
    """a run of each strategy, its folds stopping early at different epochs; strategy 1's folds 0 and 1 reach the
    60-epoch cap, fold 0 still improving (best epoch 58, patience 10), fold 1 long past its best (epoch 20)"""
    stops = [60, 60, 45, 30, 52]
    return [{**regress_result(s, modality, "ViT", 1e-3, 64, 0.5, history=stopping_history([0.1 * k for k in
                                                                                           range(5)], stops),
                              epochs_per_fold=stops, best_epoch_per_fold=[58, 20, 35, 20, 42],
                              max_epochs=60, patience=10, **over),
             "path": str(tmp_path / f"s{s}-{modality}")} for s in range(1, 7)]


def test_curves_read_well(tmp_path):
    regress = six_runs(tmp_path) + six_runs(tmp_path, "text")
    del regress[-1]["max_epochs"]  # a run from before results.json had it: no note, unknown
    fig = figures.curves([], regress, tmp_path / "curves.png")
    width, height = fig.get_size_inches() * 150  # the dpi save_png writes at
    assert width <= 2400 and height <= 2400 and width / height < 3  # two panels side by side, not a 2925 x 675 strip
    vision, text = fig.axes
    for ax in (vision, text):
        assert len(ax.lines) == 6 and not ax.collections  # a line per run, no overlapping bands
        # each run its own colour, and frozen solid, fine-tuned dashed (strategies 1, 3, 5 are frozen)
        assert len({line.get_color() for line in ax.lines}) == 6
        assert [line.get_linestyle() for line in ax.lines] == ["-", "--"] * 3
        # folds stopping early keep their last value: the mean of 0, 0.1, ..., 0.4 at every epoch, no step down
        for line in ax.lines:
            assert list(line.get_xdata()) == list(range(1, 61))
            np.testing.assert_allclose(line.get_ydata(), 0.2)
        assert "keeps its last value" in ax.get_ylabel()
        legend = ax.get_legend()
        assert all(t.get_fontsize() >= 9 for t in legend.get_texts())
    labels = [t.get_text() for t in vision.get_legend().get_texts()]
    assert labels[0] == "1 - Unimodal, frozen\n  1 of 5 folds hit the 60-epoch cap still improving"
    assert labels[1].startswith("2 - Adapted Unimodal, fine-tuned\n  1 of 5")
    assert vision.lines[0].get_marker() == ">"  # the line of a capped run ends in a triangle
    texts = [t.get_text() for t in text.get_legend().get_texts()]
    assert texts[5] == "6 - Adapted FCLIP-Based, fine-tuned" and text.lines[5].get_marker() in ("None", None)
    assert not fig.get_suptitle()  # not demo data
    fig = figures.curves([], six_runs(tmp_path, demo=True), tmp_path / "curves.png")
    assert fig.get_suptitle() == figures.DEMO_NOTE


def test_fig3_axis_and_demo_note(tmp_path):
    runs = [{**regress_result(s, m, enc, lr, bs, r), "demo": True} for s, m, enc, lr, bs, r, *_ in TABLE6]
    runs[1]["srcc_mean"], runs[1]["ci"] = 0.97, [0.96, 0.995]
    ax, = figures.fig3(runs, tmp_path / "fig3.png").axes
    low, high = ax.get_ylim()
    assert high == 1.0 and 0 <= low < 0.589  # within [0, 1], room below the lowest CI (Table 6's 0.589)
    assert ax.figure.get_suptitle() == figures.DEMO_NOTE
    runs[0]["srcc_mean"], runs[0]["ci"] = -0.05, [-0.12, 0.02]  # below 0: the axis goes as far, and a little more
    runs = [{k: v for k, v in r.items() if k != "demo"} for r in runs]
    ax, = figures.fig3(runs, tmp_path / "fig3.png").axes
    assert ax.get_ylim()[0] < -0.12 and ax.get_ylim()[1] == 1.0 and not ax.figure.get_suptitle()
    assert figures.srcc_limits(0.6, 0.7) == pytest.approx((0.58, 0.72))  # the paper's range: zoomed, not 0-1


def test_demo_runs_say_so_in_table6(tmp_path):
    make_results(tmp_path)
    evaluate.main([str(tmp_path)])
    assert figures.DEMO_NOTE not in (tmp_path / "table6.md").read_text()
    run = json.loads((tmp_path / "s1-text" / "results.json").read_text())
    write_json(tmp_path / "s1-text" / "results.json", {**run, "demo": True})
    evaluate.main([str(tmp_path)])
    assert (tmp_path / "table6.md").read_text().splitlines()[0] == figures.DEMO_NOTE
    write_json(tmp_path / "s1-text" / "results.json", {**run, "demo": "yes"})
    with pytest.raises(UserError, match=r"s1-text/results.json: key 'demo' must be bool, found 'yes'"):
        evaluate.main([str(tmp_path)])


def test_format_lr():
    assert [figures.format_lr(x) for x in (2e-3, 2.75e-4, 1e-5)] == ["2e-03", "2.75e-04", "1e-05"]


def test_table_errors(tmp_path):
    with pytest.raises(UserError, match="no results.json"):
        evaluate.main([str(tmp_path)])
    run = regress_result(1, "vision", "ViT", 1e-3, 64, 0.5)
    del run["srcc_mean"]
    write_json(tmp_path / "s1-vision" / "results.json", run)
    with pytest.raises(ValueError, match=r"s1-vision/results.json: missing key 'srcc_mean'"):
        evaluate.main([str(tmp_path)])
    write_json(tmp_path / "s1-vision" / "results.json",
               {**regress_result(1, "vision", "ViT", 1e-3, 64, 0.5), "kind": "x"})
    with pytest.raises(ValueError, match="key 'kind'"):
        evaluate.main([str(tmp_path)])


# each bad results.json -> the error names the file (and the key where there is one)
BAD_RESULTS = {  # run dict -> the file's bytes, and what the error says
    "truncated": (lambda run: json.dumps(run)[:100].encode(), "not valid JSON"),
    "empty": (lambda run: b"", "not valid JSON"),
    "not UTF-8": (lambda run: json.dumps(run).encode("utf-16"), "not UTF-8"),
    "NaN srcc_mean": (lambda run: json.dumps({**run, "srcc_mean": math.nan}).encode(), "srcc_mean is nan"),
    "inf in srcc_folds": (lambda run: json.dumps({**run, "srcc_folds": [math.inf] * 5}).encode(),
                          "srcc_folds.0 is inf"),
    "NaN in ci": (lambda run: json.dumps({**run, "ci": [math.nan, 0.6]}).encode(), "ci.0 is nan"),
    "text srcc_mean": (lambda run: json.dumps({**run, "srcc_mean": "high"}).encode(), "must hold numbers, found 'high'"),
}


@pytest.mark.parametrize("case", BAD_RESULTS)
def test_bad_results_json_names_the_file(tmp_path, case):
    path = tmp_path / "s1-vision" / "results.json"
    path.parent.mkdir()
    broken, message = BAD_RESULTS[case]
    path.write_bytes(broken(regress_result(1, "vision", "ViT", 1e-3, 64, 0.5)))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: .*{message}"):
        evaluate.main([str(tmp_path)])
    res = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(tmp_path)], capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith(f"evaluate.py: error: {path}: ") and message in res.stderr


def test_cli_error_message(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(tmp_path)], capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.startswith("evaluate.py: error: no results.json in")


def test_style_lines_and_docstring():
    text = (ROOT / "evaluate.py").read_text()
    long = [i for i, line in enumerate(text.splitlines(), 1) if len(line) > 120]
    assert not long, f"evaluate.py lines over 120 characters: {long}"
    assert evaluate.__doc__ and "python evaluate.py results/" in evaluate.__doc__


# -----------------------------------------------------------------------------
# fusion of two runs

def write_predictions(folder, ids, score, pred, fold):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "score", "prediction", "fold"])
        w.writerows(zip(ids, score, pred, fold))


def two_runs(root, n=50, seed=0):
    """two runs' predictions.csv (the second in another order) -> ids, score, fold, pred a, pred b"""
    rng = np.random.default_rng(seed)
    ids = [f"v{i:03d}" for i in range(n)]
    score = rng.uniform(0.5, 1.0, n).round(6)
    fold = np.arange(n) % 5
    pa = (score + rng.normal(0, 0.1, n)).round(6)
    pb = (score + rng.normal(0, 0.1, n)).round(6)
    write_predictions(root / "a", ids, score, pa, fold)
    order = rng.permutation(n)  # the second run lists the videos in another order
    write_predictions(root / "b", [ids[i] for i in order], score[order], pb[order], fold[order])
    return ids, score, fold, pa, pb


def test_fuse_runs(tmp_path, capsys):
    ids, score, fold, pa, pb = two_runs(tmp_path)
    n = len(ids)
    evaluate.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.75", "0.25"])
    result = json.loads((tmp_path / "fusion-a+b.json").read_text())
    fused = 0.75 * pa + 0.25 * pb
    from scipy.stats import spearmanr
    want = [spearmanr(fused[fold == k], score[fold == k]).statistic for k in range(5)]
    np.testing.assert_allclose(result["fused"]["srcc_folds"], want)
    assert result["fused"]["srcc_mean"] == pytest.approx(np.mean(want))
    assert result["fused"]["ci"] == pytest.approx(list(fisher_ci(np.mean(want), n=n)))
    want_a = np.mean([spearmanr(pa[fold == k], score[fold == k]).statistic for k in range(5)])
    assert result["run_a"]["srcc_mean"] == pytest.approx(want_a)
    assert result["n_videos"] == n and "fused" in capsys.readouterr().out


def test_fusion_weight_is_chosen_on_the_validation_folds(tmp_path, capsys):
    # score = 3x + y, run A predicts x and run B y: only w = 0.75 (3 : 1) ranks every fold's videos exactly
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, 100), rng.uniform(0, 1, 100)
    ids, fold = [f"v{i:03d}" for i in range(100)], np.arange(100) % 5
    write_predictions(tmp_path / "a", ids, 3 * x + y, x, fold)
    write_predictions(tmp_path / "b", ids, 3 * x + y, y, fold)
    result = evaluate.fuse_runs([tmp_path / "a", tmp_path / "b"])
    assert result["weight_a_per_fold"] == [0.75] * 5 and result["weights"] == [0.75, 0.25]
    assert result["fused"]["srcc_folds"] == pytest.approx([1.0] * 5)
    assert result["run_a"]["srcc_mean"] < 0.96 and result["run_b"]["srcc_mean"] < 0.6  # the single runs beside it
    assert result["fused_beats_better_run"] and "does not beat" not in capsys.readouterr().out
    assert json.loads((tmp_path / "fusion-a+b.json").read_text()) == result


def test_nested_weights_leave_each_fold_out():
    # fold 0 alone is best at w = 1; folds 1 and 2 at w = 0.5: fold 0 gets 0.5 from the others, and folds 1, 2 get
    # 1 (the mean of folds 0 and 2 at w = 1 is 0.5, at w = 0.5 it is 0.45)
    table = np.zeros((21, 3))  # (W, K)
    table[20, 0] = 1.0
    table[10, 1:] = 0.9
    assert evaluate.nested_weights(table) == [0.5, 1.0, 1.0]


def test_fusion_says_when_it_does_not_beat_the_better_run(tmp_path, capsys):
    rng = np.random.default_rng(1)
    score = rng.uniform(0, 1, 60)
    ids, fold = [f"v{i:03d}" for i in range(60)], np.arange(60) % 5
    write_predictions(tmp_path / "a", ids, score, score, fold)  # A ranks every video right: nothing to add
    write_predictions(tmp_path / "b", ids, score, rng.normal(0, 100, 60), fold)  # B: noise, on a large scale
    result = evaluate.fuse_runs([tmp_path / "a", tmp_path / "b"])
    assert result["weights"] == [1.0, 0.0] and result["fused"]["srcc_mean"] == result["run_a"]["srcc_mean"] == 1
    assert result["fused_beats_better_run"] is False
    out = capsys.readouterr().out
    assert f"the fusion (1.000) does not beat the better run alone, A = {tmp_path / 'a'} (1.000)" in out
    assert [line.split()[0] for line in out.splitlines()[2:5]] == ["A", "B", "fused"]  # side by side


def test_fuse_never_overwrites_fuse_best(tmp_path):
    _, _, fold, *_ = two_runs(tmp_path)
    (tmp_path / "a").rename(tmp_path / "s5-vision")
    (tmp_path / "b").rename(tmp_path / "s6-text")
    write_json(tmp_path / "s5-vision" / "results.json", regress_result(5, "vision", "FCLIP - Vision", 1e-3, 64, 0.6))
    write_json(tmp_path / "s6-text" / "results.json", regress_result(6, "text", "FCLIP - Text", 1e-3, 64, 0.6))
    evaluate.main([str(tmp_path), "--fuse-best"])
    best = (tmp_path / "fusion.json").read_bytes()
    assert json.loads(best)["weights_chosen"] == "each chosen on the other folds"
    evaluate.main(["--fuse", str(tmp_path / "s5-vision"), str(tmp_path / "s6-text"), "--weights", "0.9", "0.1"])
    assert (tmp_path / "fusion.json").read_bytes() == best  # untouched
    pair = json.loads((tmp_path / "fusion-s5-vision+s6-text.json").read_text())
    assert pair["weights"] == [0.9, 0.1] and pair["runs"] == [str(tmp_path / "s5-vision"), str(tmp_path / "s6-text")]
    # --out: the same name in that folder
    evaluate.main(["--fuse", str(tmp_path / "s6-text"), str(tmp_path / "s5-vision"), "--out", str(tmp_path / "o")])
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["fusion-s6-text+s5-vision.json"]
    assert (tmp_path / "fusion.json").read_bytes() == best
    # runs of one name in two folders keep their paths apart
    assert evaluate.fusion_name(["x/s5-vision", "y/s5-vision"]) == "fusion-x_s5-vision+y_s5-vision.json"


def test_fuse_runs_mismatch(tmp_path):
    write_predictions(tmp_path / "a", ["v1", "v2", "v3"], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0, 0, 1])
    write_predictions(tmp_path / "b", ["v1", "v2", "v4"], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0, 0, 1])
    with pytest.raises(ValueError, match=r"1 only in .*a/predictions.csv \(e.g. \['v3'\]\).*"
                                         r"b/predictions.csv \(e.g. \['v4'\]\)"):
        evaluate.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "b")])
    write_predictions(tmp_path / "b", ["v1", "v2", "v3"], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match=r"disagree on the score or fold of 1 videos \(e.g. \['v2'\]\)"):
        evaluate.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(UserError, match="c/predictions.csv not found"):
        evaluate.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "c")])


def sorted_rows(run_dir):
    """run_dir's predictions as columns (ids, score, prediction, fold), in id order"""
    with open(run_dir / "predictions.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["video_id"])
    return [[r[k] for r in rows] for k in ("video_id", "score", "prediction", "fold")]


BAD_PREDICTIONS = {  # full text -> broken text, and what the error says
    "truncated mid-row": (lambda t: t[: t.index("v010") + 8], "line 12: expected 4 fields"),
    "truncated after a comma": (lambda t: t[: t.index("v010") + t[t.index("v010"):].index("\n") - 1],
                                "line 12: expected numbers"),
    "not UTF-8": (lambda t: t.replace("v010", "v\xe9010").encode("latin-1"), "not UTF-8"),
    "no header": (lambda t: "", "missing column"),
    "NaN prediction": (lambda t: t.replace("\nv010,", "\nv010,nan,nan,0\nx,", 1), "line 12: score and prediction"),
    "a video twice": (lambda t: t.replace("v011", "v010"), "line 13: video 'v010' appears twice"),
}


@pytest.mark.parametrize("case", BAD_PREDICTIONS)
def test_bad_predictions_name_the_file(tmp_path, case):
    two_runs(tmp_path)
    path = tmp_path / "b" / "predictions.csv"
    write_predictions(tmp_path / "b", *sorted_rows(tmp_path / "a"))  # in id order: v010 on line 12
    broken, message = BAD_PREDICTIONS[case]
    out = broken(path.read_text())
    path.write_bytes(out if isinstance(out, bytes) else out.encode())
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}.*{message}"):
        evaluate.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "b")])
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--fuse", str(tmp_path / "a"), str(tmp_path / "b")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith(f"evaluate.py: error: {path}") and message in res.stderr
    assert not list(tmp_path.glob("fusion*.json"))


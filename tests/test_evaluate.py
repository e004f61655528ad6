"""Tests for evaluate.py (scores, --score, --compare, Tables 5-6, Fig. 3) and tools/report.py (curves.png, fusion):

    python -m pytest tests/test_evaluate.py -q
"""
import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.colors
import numpy as np
import pytest
from scipy import stats

import data
import evaluate
import regress
from evaluate import fisher_ci, srcc
from harness import runs
from harness.runs import UserError
from tools import report

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


def test_srcc_names_a_length_mismatch():
    with pytest.raises(AssertionError, match="2 predictions of 3 scores"):
        srcc([1, 2], [1, 2, 3])


def test_fuse_hand_example():
    ids, fused = data.fuse([0.2, 0.9, 0.4, 0.5, 0.3, 0.6], ["b", "a", "b", "a", "c", "b"])
    assert ids == ["b", "a", "c"]
    np.testing.assert_allclose(fused, [0.4, 0.7, 0.3])


def one_line(argv, capsys, main=evaluate.main, name="evaluate.py"):
    """main(argv) run as its __main__ runs it (runs.script) -> its one line on stderr; exit status 2, no traceback"""
    with pytest.raises(SystemExit) as e:
        runs.script(lambda: main(argv), name, "run the same command again")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# -----------------------------------------------------------------------------
# comparing two models on the same videos (issue 40): compare(), --compare, --score

def zou_overlap(r_jk, r_jh, r_kh, n, z=1.96):
    """Zou (2007, p. 409): the 95% CI of rho_jk - rho_jh, two correlations that share j (here: the true scores), from
    each one's Fisher interval (p. 406) and the correlation of the two correlations"""
    def limits(r):
        zr = 0.5 * math.log((1 + r) / (1 - r))
        return [(math.exp(2 * x) - 1) / (math.exp(2 * x) + 1) for x in (zr - z / math.sqrt(n - 3),
                                                                        zr + z / math.sqrt(n - 3))]
    (l1, u1), (l2, u2) = limits(r_jk), limits(r_jh)
    c = ((r_kh - 0.5 * r_jk * r_jh) * (1 - r_jk ** 2 - r_jh ** 2 - r_kh ** 2) + r_kh ** 3) / (
        (1 - r_jk ** 2) * (1 - r_jh ** 2))
    d = r_jk - r_jh
    return (d - math.sqrt((r_jk - l1) ** 2 + (u2 - r_jh) ** 2 - 2 * c * (r_jk - l1) * (u2 - r_jh)),
            d + math.sqrt((u1 - r_jk) ** 2 + (r_jh - l2) ** 2 - 2 * c * (u1 - r_jk) * (r_jh - l2)))


def steiger_z(r_jk, r_jh, r_kh, n):
    """Steiger (1980, p. 247, eq. 14 with eq. 10's covariance at the mean r): z of Fisher's z_jk - z_jh"""
    mean = (r_jk + r_jh) / 2
    c = (r_kh * (1 - 2 * mean ** 2) - 0.5 * mean ** 2 * (1 - 2 * mean ** 2 - r_kh ** 2)) / (1 - mean ** 2) ** 2
    return (math.atanh(r_jk) - math.atanh(r_jh)) * math.sqrt(n - 3) / math.sqrt(2 - 2 * c)


def two_sided_p(z):
    return math.erfc(abs(z) / math.sqrt(2))  # 2 * (1 - Phi(|z|))


def test_the_tests_own_formulas_reproduce_the_papers():
    # the hand-written references below are checked against published values first (those cocor's tests use):
    # Zou 2007's example of overlapping correlations, Steiger 1980's case A and DEPCOR's (Silver et al. 2006)
    assert np.round(zou_overlap(.396, .179, .088, 66), 3).tolist() == [-0.093, 0.517]
    assert steiger_z(.4, .5, .1, 103) == pytest.approx(-0.8887185, abs=1e-7)
    z = steiger_z(.3, .4, .5, 100)
    assert round(z, 4) == -1.0718 and round(two_sided_p(z), 4) == 0.2838


def two_models(n=1500, seed=0):
    """a true score and two models' predictions of it that share an error (a video both find hard): -> a, b, true"""
    rng = np.random.default_rng(seed)
    true, shared = rng.normal(size=n), rng.normal(size=n)
    a = true + 0.6 * shared + 0.6 * rng.normal(size=n)
    b = true + 0.6 * shared + 0.9 * rng.normal(size=n)
    return a, b, true


@pytest.fixture(scope="module")
def compared():
    a, b, true = two_models()
    return a, b, true, evaluate.compare(a, b, true)


def test_compare_equals_the_formulas(compared):
    a, b, true, d = compared
    n = len(true)
    r1, r2, r12 = (stats.spearmanr(x, y).statistic for x, y in ((a, true), (b, true), (a, b)))
    assert d["n"] == n and (d["srcc_a"], d["srcc_b"], d["srcc_a_b"]) == pytest.approx((r1, r2, r12), abs=1e-12)
    assert d["difference"] == pytest.approx(r1 - r2, abs=1e-12)
    for r, ci in ((r1, d["ci_a"]), (r2, d["ci_b"])):  # eq. 13 by hand
        half = 1.96 / math.sqrt(n - 3)
        assert ci == pytest.approx([math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)], abs=1e-12)
    assert d["ci"] == pytest.approx(zou_overlap(r1, r2, r12, n), abs=1e-12)
    assert d["p"] == pytest.approx(two_sided_p(steiger_z(r1, r2, r12, n)), rel=1e-9)
    assert 0 < d["ci"][0] < d["difference"] < d["ci"][1] and d["p"] < 1e-3  # A is better, and clearly so
    # the shared error makes the difference's interval narrower than the two CIs side by side suggest
    assert d["ci"][1] - d["ci"][0] < (d["ci_a"][1] - d["ci_a"][0]) + (d["ci_b"][1] - d["ci_b"][0])


def test_compare_agrees_with_a_paired_bootstrap(compared):
    a, b, true, d = compared
    n = len(true)
    rng = np.random.default_rng(1)  # not compare's seed: another set of resamples
    boot = [srcc(a[i], true[i]) - srcc(b[i], true[i]) for i in (rng.integers(0, n, n) for _ in range(300))]
    mine = np.percentile(boot, [2.5, 97.5])
    width = d["ci"][1] - d["ci"][0]
    assert np.abs(mine - d["ci"]).max() < 0.25 * width, (mine, d["ci"])  # Zou's interval, roughly
    assert np.abs(mine - d["bootstrap_ci"]).max() < 0.25 * width, (mine, d["bootstrap_ci"])
    # compare's own bootstrap: seed 0, the same videos drawn for A and B, the same interval every time
    a, b, true = a[:300], b[:300], true[:300]
    rng = np.random.default_rng(0)
    seed0 = [srcc(a[i], true[i]) - srcc(b[i], true[i]) for i in (rng.integers(0, 300, 300) for _ in range(200))]
    again = evaluate.compare(a, b, true, resamples=200)["bootstrap_ci"]
    assert again == pytest.approx(np.percentile(seed0, [2.5, 97.5]), abs=1e-12)
    assert evaluate.compare(a, b, true, resamples=200)["bootstrap_ci"] == again


def test_compare_is_antisymmetric(compared):
    a, b, true, d = compared
    swapped = evaluate.compare(b, a, true, resamples=10)
    assert swapped["difference"] == pytest.approx(-d["difference"], abs=1e-12)
    assert swapped["ci"] == pytest.approx([-d["ci"][1], -d["ci"][0]], abs=1e-12)
    assert swapped["p"] == pytest.approx(d["p"], rel=1e-9)


def write_scores(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_a_file_compared_with_itself(tmp_path, capsys):
    a, _, true = two_models(300)
    d = evaluate.compare(a, a, true)
    assert d["difference"] == 0 and d["ci"] == [0, 0] and d["p"] == 1 and d["bootstrap_ci"] == [0, 0]
    path = write_scores(tmp_path / "a.csv", ["video_id", "score", "prediction"],
                        zip([f"v{i}" for i in range(300)], true, a))
    assert evaluate.main(["--compare", str(path), str(path)])["ci"] == [0, 0]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "300 videos in both files; left out: 0 only in A, 0 only in B"
    assert out[-1] == "difference A - B: 0.0000 (0.0000, 0.0000), p = 1"


def test_a_noisier_copy_is_worse(tmp_path, capsys):
    a, _, true = two_models()
    noisier = a + np.random.default_rng(5).normal(0, 0.5, len(a))
    ids = [f"v{i:04d}" for i in range(len(a))]
    clean = write_scores(tmp_path / "clean.csv", ["video_id", "score", "prediction"], zip(ids, true, a))
    order = np.random.default_rng(6).permutation(len(a))[:-100]  # B: another order, 100 videos fewer
    worse = write_scores(tmp_path / "worse.csv", ["video_id", "score", "prediction"],
                         [(ids[i], true[i], noisier[i]) for i in order])
    d = evaluate.main(["--compare", str(clean), str(worse)])
    out = capsys.readouterr().out.splitlines()
    kept = np.sort(order)
    want = evaluate.compare(a[kept], noisier[kept], true[kept])  # matched by id, A's order
    assert d["n"] == len(a) - 100 and d["difference"] == want["difference"] and d["ci"] == want["ci"]
    assert d["ci"][0] > 0 and d["p"] < 0.05 and d["bootstrap_ci"][0] > 0  # A, the clean one, is better
    assert out[0] == "1400 videos in both files; left out: 100 only in A, 0 only in B"
    assert out[-1] == f"difference A - B: {d['difference']:.4f} ({d['ci'][0]:.4f}, {d['ci'][1]:.4f}), p = {d['p']:.3g}"
    assert out[1] == f"A = {clean}: SRCC {d['srcc_a']:.4f} ({d['ci_a'][0]:.4f}, {d['ci_a'][1]:.4f})"


def test_score_a_file(tmp_path, capsys):
    rng = np.random.default_rng(3)
    true = rng.uniform(0.4, 1.0, 1500)
    preds = true + rng.normal(0, 0.1, 1500)
    ids = [f"clip{i}" for i in range(1500)]
    path = write_scores(tmp_path / "mine.csv", ["video_id", "preds", "true"], zip(ids, preds, true))
    r = evaluate.main(["--score", str(path), "--pred", "preds", "--true", "true"])
    want = stats.spearmanr(preds, true).statistic
    lo, hi = (math.tanh(math.atanh(want) + s * 1.96 / math.sqrt(1497)) for s in (-1, 1))
    assert r == pytest.approx(want, abs=1e-12)
    assert capsys.readouterr().out.splitlines() == [f"{path}: 1500 videos", f"SRCC {want:.4f} ({lo:.4f}, {hi:.4f})"]
    # a fold column: a line per fold, each on its own videos
    fold = np.arange(1500) % 3
    path = write_scores(tmp_path / "folds.csv", ["id", "preds", "true", "fold"], zip(ids, preds, true, fold))
    evaluate.main(["--score", str(path), "--pred", "preds", "--true", "true", "--id", "id"])
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"SRCC {want:.4f} ({lo:.4f}, {hi:.4f})" and len(out) == 5
    for k, line in enumerate(out[2:]):
        r = stats.spearmanr(preds[fold == k], true[fold == k]).statistic
        lo, hi = (math.tanh(math.atanh(r) + s * 1.96 / math.sqrt(497)) for s in (-1, 1))
        assert line == f"  fold {k}: SRCC {r:.4f} ({lo:.4f}, {hi:.4f}), 500 videos"


def test_score_takes_regress_predictions_by_default(tmp_path, capsys):
    # the columns regress.py writes (video_id, score, prediction, fold) need no flag, and a run folder stands for
    # its predictions.csv (tests/test_predict.py scores a real run's)
    ids, score, fold, pa, _ = two_runs(tmp_path)
    assert evaluate.main(["--score", str(tmp_path / "a")]) == pytest.approx(stats.spearmanr(pa, score).statistic)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tmp_path / 'a'}: 50 videos" and len(out) == 2 + 5


BAD_SCORES = {  # the file's rows (header first) -> what the one line says after "evaluate.py: error: PATH"
    "a missing column": ([["video_id", "prediction"]] + [[f"v{i}", i] for i in range(5)],
                         ": missing column(s) ['score']; the header has ['video_id', 'prediction']"),
    "not a number": ([["video_id", "prediction", "score"]] + [[f"v{i}", i, i] for i in range(4)] + [["v4", "high", 1]],
                     ", line 6: expected numbers in 'prediction', 'score' (and an int 'fold'), found 'high', '1' (None)"),
    "not finite": ([["video_id", "prediction", "score"]] + [[f"v{i}", i, i] for i in range(4)] + [["v4", "nan", 1]],
                   ", line 6: prediction and score must be finite, found (nan, 1.0)"),
    "an id twice": ([["video_id", "prediction", "score"]] + [[f"v{i}", i, i] for i in range(4)] + [["v1", 5, 5]],
                    ", line 6: video 'v1' appears twice"),
    "3 rows": ([["video_id", "prediction", "score"]] + [[f"v{i}", i, i] for i in range(3)],
               ": 3 videos; a rank correlation's CI needs 4 or more"),
}


@pytest.mark.parametrize("case", BAD_SCORES)
def test_a_bad_file_is_one_line(tmp_path, capsys, case):
    rows, message = BAD_SCORES[case]
    path = write_scores(tmp_path / "bad.csv", rows[0], rows[1:])
    good = write_scores(tmp_path / "good.csv", ["video_id", "prediction", "score"], [[f"v{i}", i, i] for i in range(9)])
    for argv in (["--score", str(path)], ["--compare", str(good), str(path)], ["--compare", str(path), str(good)]):
        assert one_line(argv, capsys) == f"evaluate.py: error: {path}{message}"


def test_compare_needs_the_same_videos_scored_alike(tmp_path, capsys):
    header = ["video_id", "prediction", "score"]
    a = write_scores(tmp_path / "a.csv", header, [[f"v{i}", i, i] for i in range(6)])
    b = write_scores(tmp_path / "b.csv", header, [[f"v{i + 3}", i, i + 3] for i in range(6)])  # v3, v4, v5 shared
    assert one_line(["--compare", str(a), str(b)], capsys) == (
        "evaluate.py: error: 3 videos in both files; a comparison needs 4 or more")
    b = write_scores(tmp_path / "b.csv", header, [[f"v{i}", i, i + (i == 4) * 0.5] for i in range(6)])
    assert one_line(["--compare", str(a), str(b)], capsys) == (
        "evaluate.py: error: the files disagree on the true score of 1 videos (e.g. ['v4']); both must score the "
        "same videos")


# -----------------------------------------------------------------------------
# tables

def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def regress_result(strategy, modality, encoder, lr, bs, r, **over):
    """a results.json as regress.py writes it: the strategy's Table 6 and Fig. 3 names, no 'ci' (evaluate computes
    it from srcc_mean and n_videos)"""
    row = regress.STRATEGIES[strategy]
    return {"kind": "regress", "strategy": strategy, "name": row.name, "figure": row.figure, "frozen": row.frozen,
            "modality": modality, "checkpoint": f"ckpt-{strategy}", "encoder": encoder, "lr": lr, "batch_size": bs,
            "srcc_folds": [r] * 5, "srcc_mean": r, "n_videos": 8500, "epochs_per_fold": [60] * 5,
            "best_epoch_per_fold": [30] * 5, "max_epochs": 60, "patience": 10, "wall_time_s": 1.0, **over}


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


def cells(line):
    """a markdown table row -> its cells"""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_tables_from_results(tmp_path, capsys):
    make_results(tmp_path)
    make_results(tmp_path / "demo")  # runs one folder deeper (results/demo/...) are another set: left out
    evaluate.main([str(tmp_path)])
    printed = capsys.readouterr().out
    md6 = (tmp_path / "table6.md").read_text()
    assert md6 in printed
    assert cells(md6.splitlines()[0]) == ["Strategy", "Encoder Model", "Learning Rate", "Batch Size", "SRCC (CI)",
                                          "vs strategy 1: pooled SRCC difference (CI), p"]
    rows = [cells(line) for line in md6.splitlines()[2:]]
    assert len(rows) == 12
    # sorted by strategy then modality (vision first), strategy named once, paper's formatting; strategy 1: no
    # difference from itself
    assert rows[0] == ["1 - Unimodal", "ViT", "2e-03", "1,024", "0.603 (0.589, 0.616)", "–"]
    assert rows[1] == ["", "DistilBERT", "1e-03", "512", "0.574 (0.560, 0.588)", "–"]  # CI from the rounded 0.574
    # the best per modality in bold: FCLIP vision 0.672 (strategy 5), FCLIP text 0.632 (strategy 6)
    bold = [r[:5] for r in rows if "**" in "".join(r)]
    assert bold == [["5 - FCLIP-Based", "FCLIP - Vision", "1e-03", "2,048", "**0.672 (0.660, 0.683)**"],
                    ["", "FCLIP - Text", "3e-06", "512", "**0.632 (0.619, 0.645)**"]]
    with open(tmp_path / "table6.csv") as f:
        table = list(csv.DictReader(f))
    assert [(int(r["strategy"]), r["modality"]) for r in table] == [(s, m) for s, m, *_ in TABLE6]
    assert float(table[8]["srcc_mean"]) == 0.672
    assert [float(table[8][k]) for k in ("ci_low", "ci_high")] == pytest.approx(fisher_ci(0.672, 8500))
    md5 = (tmp_path / "table5.md").read_text()
    assert "| 0 (No training) | – | 1.9366 |" in md5 and "| 1 | 0.2187 | **0.4209** |" in md5
    assert "| 3 | 0.0610 | 0.4814 |" in md5
    assert (tmp_path / "table5.csv").exists()
    # a second run of one strategy and modality (another lr, say): both rows, in folder order
    write_json(tmp_path / "s1-vision-lr1e-4" / "results.json", regress_result(1, "vision", "ViT", 1e-4, 1024, 0.58))
    evaluate.main([str(tmp_path)])
    rows = [cells(line)[:5] for line in (tmp_path / "table6.md").read_text().splitlines()[2:]]
    assert rows[:3] == [["1 - Unimodal", "ViT [s1-vision]", "2e-03", "1,024", "0.603 (0.589, 0.616)"],
                        ["", "ViT [s1-vision-lr1e-4]", "1e-04", "1,024", "0.580 (0.566, 0.594)"],
                        ["", "DistilBERT", "1e-03", "512", "0.574 (0.560, 0.588)"]]
    assert is_png(tmp_path / "fig3.png")
    report.curves(*evaluate.load_results(tmp_path), tmp_path / "curves.png")
    assert is_png(tmp_path / "curves.png")  # Table 5's losses: the contrastive run has epochs
    assert not list(tmp_path.glob("*.tmp"))  # every file went through runs.write_bytes


def test_two_runs_of_one_row_name_their_folders(tmp_path):
    make_results(tmp_path)
    write_json(tmp_path / "s1-vision-lr1e-4" / "results.json", regress_result(1, "vision", "ViT", 1e-4, 1024, 0.58))
    evaluate.main([str(tmp_path)])
    rows = [cells(line) for line in (tmp_path / "table6.md").read_text().splitlines()[2:]]
    assert [r[1] for r in rows[:3]] == ["ViT [s1-vision]", "ViT [s1-vision-lr1e-4]", "DistilBERT"]


def test_table6_compares_each_strategy_with_strategy_1(tmp_path):
    # each run's out-of-fold predictions of the same 300 videos; the difference from strategy 1 of its modality on
    # them: Zou's interval and Steiger's p (written out above), strategy 1 itself '–'
    rng = np.random.default_rng(2)
    n = 300
    ids = [f"v{i:03d}" for i in range(n)]
    score, fold = rng.uniform(0.5, 1.0, n).round(6), np.arange(n) % 5
    shared = rng.normal(0, 0.1, n)
    noise = {("vision", 1): 0.15, ("vision", 2): 0.08, ("vision", 3): 0.3, ("text", 1): 0.2, ("text", 2): 0.12}
    preds = {}
    for (m, s), sd in noise.items():
        preds[m, s] = (score + shared + rng.normal(0, sd, n)).round(6)
        order = rng.permutation(n)  # each file in its own order: matched by id
        write_predictions(tmp_path / f"s{s}-{m}", [ids[i] for i in order], score[order], preds[m, s][order],
                          fold[order])
        write_json(tmp_path / f"s{s}-{m}" / "results.json", regress_result(s, m, "ViT", 1e-3, 64, 0.6, n_videos=n))
    evaluate.main([str(tmp_path), "--out", str(tmp_path / "tables")])
    rows = [cells(line) for line in (tmp_path / "tables" / "table6.md").read_text().splitlines()[2:]]
    with open(tmp_path / "tables" / "table6.csv") as f:
        table = list(csv.DictReader(f))
    order = [(1, "vision"), (1, "text"), (2, "vision"), (2, "text"), (3, "vision")]
    assert [(int(r["strategy"]), r["modality"]) for r in table] == order
    for row, line, (s, m) in zip(rows, table, order):
        if s == 1:
            want = "–"
        else:
            a, b = preds[m, s], preds[m, 1]
            r1, r2, r12 = (stats.spearmanr(x, y).statistic for x, y in ((a, score), (b, score), (a, b)))
            lo, hi = zou_overlap(r1, r2, r12, n)
            want = f"{r1 - r2:+.3f} ({lo:+.3f}, {hi:+.3f}), p {two_sided_p(steiger_z(r1, r2, r12, n)):.2g}"
        assert row[5] == want == line["vs_strategy_1"], (s, m)
    assert rows[2][5].startswith("+") and rows[4][5].startswith("-")  # 2 beats 1 on vision, 3 does worse


def test_matplotlib_is_a_runtime_requirement():
    def names(path):
        lines = [line.split("#")[0].strip() for line in (ROOT / path).read_text().splitlines()]
        return [line.split(">")[0].split("=")[0].strip().lower() for line in lines if line and not line.startswith("-")]
    assert "matplotlib" in names("requirements.txt")
    assert "matplotlib" not in names("requirements-test.txt")  # it comes with -r requirements.txt


def tick_labels(ax):
    """(position, text) of each x tick, in the order of the axis"""
    return sorted((float(t.get_position()[0]), t.get_text().replace("\n", " ")) for t in ax.get_xticklabels())


def drawn_points(ax):
    """the errorbar points of Fig. 3 by legend label -> (x, y, [(low, high) of its bar]) sorted by x"""
    colours = {matplotlib.colors.to_hex(h.lines[0].get_color()): label
               for h, label in zip(*ax.get_legend_handles_labels())}
    points = {}
    for container in ax.containers:
        line = container.lines[0]
        # markers, no lines: a container a point (a line style joins nothing) or no line style
        assert (len(line.get_xdata()) == 1 or line.get_linestyle() == "None") and line.get_marker() not in (
            "None", None, "")
        (segment,), = [c.get_segments() for c in container.lines[2]]
        x, y = float(line.get_xdata()[0]), float(line.get_ydata()[0])
        points.setdefault(colours[matplotlib.colors.to_hex(line.get_color())], []).append(
            (x, y, tuple(segment[:, 1])))
    return {label: [np.array(v) for v in zip(*sorted(p))] for label, p in points.items()}


def test_fig3_reads_well(tmp_path):
    results = [regress_result(s, m, enc, lr, bs, r) for s, m, enc, lr, bs, r, *_ in TABLE6]
    results.append(regress_result(5, "vision", "FCLIP - Vision", 1e-3, 64, 0.5))  # a worse run of one point: not drawn
    fig = evaluate.fig3(results, tmp_path / "fig3.png")
    assert is_png(tmp_path / "fig3.png")
    ax, = fig.axes
    assert ax.get_title().startswith("Fig. 3")
    # Table 6's strategy names; the paper's Fig. 3 names the fine-tuned ones -SFT (its caption), in brackets
    # and the encoders of the runs drawn
    assert tick_labels(ax) == list(enumerate([
        "1 Unimodal ViT / DistilBERT", "2 Adapted Unimodal (Unimodal-SFT) ViT / DistilBERT", "3 CLIP-Based CLIP",
        "4 Adapted CLIP-Based (CLIP-SFT) CLIP", "5 FCLIP-Based FCLIP", "6 Adapted FCLIP-Based (FCLIP-SFT) FCLIP"], 1))
    points = drawn_points(ax)
    assert sorted(points) == ["text", "vision"]
    xv, yv, bars_v = points["vision"]
    xt, yt, _ = points["text"]
    np.testing.assert_allclose(np.round(xv), range(1, 7))
    assert np.all(xt - xv > 0.1)  # side by side: a text marker never sits on a vision marker
    np.testing.assert_allclose(yv, [r for _, m, *_, r, _, _ in TABLE6 if m == "vision"])  # the best run per point
    np.testing.assert_allclose(yt, [r for _, m, *_, r, _, _ in TABLE6 if m == "text"])
    # the error bars span each run's CI (eq. 13 over its n_videos)
    np.testing.assert_allclose(bars_v, [fisher_ci(r, 8500) for _, m, *_, r, _, _ in TABLE6 if m == "vision"])


def test_curves_mark_the_chosen_lr_and_epoch(tmp_path):
    contrastive = [{**contrastive_result(lr_curve=lr_curve()), "path": str(tmp_path / "fclip")}]
    regressions = [{**regress_result(1, "vision", "ViT", 2e-3, 64, 0.5, lr_curve=lr_curve(), history=history(0.5),
                                     best_epoch_per_fold=[3] * 5), "path": str(tmp_path / "s1-vision")},
                   {**regress_result(1, "text", "DistilBERT", 1e-3, 64, 0.6), "path": str(tmp_path / "s1-text")}]
    fig = report.curves(contrastive, regressions, tmp_path / "curves.png")
    assert is_png(tmp_path / "curves.png")
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert titles == ["validation SRCC per epoch, vision", "Table 5: loss per epoch, contrastive (fclip)",
                      "LR range test (fclip)", "LR range test (s1-vision)"]
    hist, losses, lr_c, lr_r = [ax for ax in fig.axes if ax.axison]
    # the exported epoch: a marker on the test loss at chosen_epoch
    exported = [line for line in losses.lines if line.get_label().startswith("exported")]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in exported] == [([1], [0.4209])]
    # the chosen lr: a vertical line at the run's lr
    for ax, lr in ((lr_c, 1e-5), (lr_r, 2e-3)):
        chosen = [line for line in ax.lines if line.get_label().startswith("chosen lr")]
        assert len(chosen) == 1 and list(chosen[0].get_xdata()) == [lr, lr] and ax.get_xscale() == "log"
    # one run: its fold mean as a line (not one line per fold, no band)
    assert len(hist.lines) == 1 and not hist.collections
    mean = np.mean([[e["val_srcc"] for e in fold] for fold in history(0.5)], axis=0)
    np.testing.assert_allclose(hist.lines[0].get_ydata(), mean)
    # nothing to draw: no file
    assert report.curves([], regressions[1:], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


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
    regressions = six_runs(tmp_path) + six_runs(tmp_path, "text")
    regressions[-1]["best_epoch_per_fold"] = [20] * 5  # no fold at the cap still improving: no note, no triangle
    fig = report.curves([], regressions, tmp_path / "curves.png")
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
    assert labels[0] == "1 - Unimodal, frozen [s1-vision]\n  1 of 5 folds hit the 60-epoch cap still improving"
    assert labels[1].startswith("2 - Adapted Unimodal, fine-tuned [s2-vision]\n  1 of 5")
    assert vision.lines[0].get_marker() == ">"  # the line of a capped run ends in a triangle
    texts = [t.get_text() for t in text.get_legend().get_texts()]
    assert texts[5] == "6 - Adapted FCLIP-Based, fine-tuned [s6-text]" and text.lines[5].get_marker() in ("None", None)
    assert not fig.get_suptitle()  # not demo data
    fig = report.curves([], six_runs(tmp_path, demo=True), tmp_path / "curves.png")
    assert fig.get_suptitle() == evaluate.DEMO_NOTE


def test_fig3_axis_and_demo_note(tmp_path):
    results = [{**regress_result(s, m, enc, lr, bs, r), "demo": True} for s, m, enc, lr, bs, r, *_ in TABLE6]
    results[1]["srcc_mean"] = 0.97
    ax, = evaluate.fig3(results, tmp_path / "fig3.png").axes
    low, high = ax.get_ylim()
    assert high == 1.0 and 0 <= low < 0.589  # within [0, 1], room below the lowest CI (Table 6's 0.589)
    assert ax.figure.get_suptitle() == evaluate.DEMO_NOTE
    results[0]["srcc_mean"], results[0]["n_videos"] = -0.05, 787  # CI (-0.12, 0.02): the axis goes below 0, and more
    results = [{k: v for k, v in r.items() if k != "demo"} for r in results]
    ax, = evaluate.fig3(results, tmp_path / "fig3.png").axes
    assert fisher_ci(-0.05, 787)[0] == pytest.approx(-0.12, abs=0.001)
    assert ax.get_ylim()[0] < -0.12 and ax.get_ylim()[1] == 1.0 and not ax.figure.get_suptitle()
    # the paper's range: zoomed, not 0-1 (a tenth of the CIs' range above and below, 0.02 at least)
    results = [regress_result(s, m, enc, lr, bs, r) for s, m, enc, lr, bs, r, *_ in TABLE6]
    ax, = evaluate.fig3(results, tmp_path / "fig3.png").axes
    lo, hi = min(fisher_ci(r[5])[0] for r in TABLE6), max(fisher_ci(r[5])[1] for r in TABLE6)
    pad = max(0.1 * (hi - lo), 0.02)
    assert ax.get_ylim() == pytest.approx((lo - pad, hi + pad))
    assert 0.5 < ax.get_ylim()[0] and ax.get_ylim()[1] < 0.71


def test_demo_runs_say_so_in_table6(tmp_path):
    make_results(tmp_path)
    evaluate.main([str(tmp_path)])
    assert evaluate.DEMO_NOTE not in (tmp_path / "table6.md").read_text()
    run = json.loads((tmp_path / "s1-text" / "results.json").read_text())
    write_json(tmp_path / "s1-text" / "results.json", {**run, "demo": True})
    evaluate.main([str(tmp_path)])
    assert (tmp_path / "table6.md").read_text().splitlines()[0] == evaluate.DEMO_NOTE


def test_a_demo_flag_that_is_not_bool_names_the_file(tmp_path):
    make_results(tmp_path)
    run = json.loads((tmp_path / "s1-text" / "results.json").read_text())
    write_json(tmp_path / "s1-text" / "results.json", {**run, "demo": "yes"})
    with pytest.raises(UserError, match=r"s1-text/results.json: 'demo' must be true or false, found 'yes'"):
        evaluate.main([str(tmp_path)])


def test_demo_runs_say_so_in_table5_and_fusion(tmp_path):
    # issue 36: every file made of demo runs says so, not only Table 6 and the figures
    write_json(tmp_path / "fclip" / "results.json", contrastive_result())
    evaluate.main([str(tmp_path)])
    assert evaluate.DEMO_NOTE not in (tmp_path / "table5.md").read_text()
    write_json(tmp_path / "fclip" / "results.json", contrastive_result(demo=True))
    evaluate.main([str(tmp_path)])
    assert (tmp_path / "table5.md").read_text().splitlines()[0] == evaluate.DEMO_NOTE
    assert "demo data" in evaluate.DEMO_NOTE
    two_runs(tmp_path)
    assert report.fuse_runs([tmp_path / "a", tmp_path / "b"])["note"] == "real data"
    run = json.loads((tmp_path / "b" / "results.json").read_text())
    write_json(tmp_path / "b" / "results.json", {**run, "demo": True})  # one demo run is enough
    report.fuse_runs([tmp_path / "a", tmp_path / "b"])
    assert json.loads((tmp_path / "fusion-a+b.json").read_text())["note"] == evaluate.DEMO_NOTE


def test_format_lr():
    assert [evaluate.format_lr(x) for x in (2e-3, 2.75e-4, 1e-5)] == ["2e-03", "2.75e-04", "1e-05"]


def test_table_errors(tmp_path):
    with pytest.raises(UserError, match="no results.json"):
        evaluate.main([str(tmp_path)])
    run = regress_result(1, "vision", "ViT", 1e-3, 64, 0.5)
    del run["srcc_mean"]
    write_json(tmp_path / "s1-vision" / "results.json", run)
    with pytest.raises(UserError, match=r"s1-vision/results.json: missing key 'srcc_mean'"):
        evaluate.main([str(tmp_path)])
    write_json(tmp_path / "s1-vision" / "results.json",
               {**regress_result(1, "vision", "ViT", 1e-3, 64, 0.5), "kind": "x"})
    with pytest.raises(UserError, match="key 'kind'"):
        evaluate.main([str(tmp_path)])


# each bad results.json -> the error names the file (and the key where there is one)
BAD_RESULTS = {  # run dict -> the file's bytes, and what the error says
    "truncated": (lambda run: json.dumps(run)[:100].encode(), "not valid JSON"),
    "empty": (lambda run: b"", "not valid JSON"),
    "not UTF-8": (lambda run: json.dumps(run).encode("utf-16"), "not UTF-8"),
    "NaN srcc_mean": (lambda run: json.dumps({**run, "srcc_mean": math.nan}).encode(), "srcc_mean is nan"),
    "inf in srcc_folds": (lambda run: json.dumps({**run, "srcc_folds": [math.inf] * 5}).encode(),
                          "srcc_folds.0 is inf"),
    "text srcc_mean": (lambda run: json.dumps({**run, "srcc_mean": "high"}).encode(), "must be numbers, found 'high'"),
}


@pytest.mark.parametrize("case", BAD_RESULTS)
def test_bad_results_json_names_the_file(tmp_path, capsys, case):
    path = tmp_path / "s1-vision" / "results.json"
    path.parent.mkdir()
    broken, message = BAD_RESULTS[case]
    path.write_bytes(broken(regress_result(1, "vision", "ViT", 1e-3, 64, 0.5)))
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}: .*{message}"):
        evaluate.main([str(tmp_path)])
    err = one_line([str(tmp_path)], capsys)
    assert err.startswith(f"evaluate.py: error: {path}: ") and message in err


def test_cli_error_message(tmp_path):
    # the one real command line of this file: __main__ turns bad input into one line and exit status 2
    res = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith(f"evaluate.py: error: no results.json in {tmp_path}")


def test_style_lines_and_docstring():
    text = (ROOT / "evaluate.py").read_text()
    long = [i for i, line in enumerate(text.splitlines(), 1) if len(line) > 120]
    assert not long, f"evaluate.py lines over 120 characters: {long}"
    assert evaluate.__doc__ and "python evaluate.py results/" in evaluate.__doc__
    assert "--compare" in evaluate.__doc__ and "--score" in evaluate.__doc__


# -----------------------------------------------------------------------------
# fusion of two runs (tools/report.py)

def write_predictions(folder, ids, score, pred, fold):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "score", "prediction", "fold"])  # regress.py's columns
        w.writerows(zip(ids, score, pred, fold))


def two_runs(root, n=50, seed=0):
    """two runs' predictions.csv (the second in another order) and results.json -> ids, score, fold, pred a, pred b"""
    rng = np.random.default_rng(seed)
    ids = [f"v{i:03d}" for i in range(n)]
    score = rng.uniform(0.5, 1.0, n).round(6)
    fold = np.arange(n) % 5
    pa = (score + rng.normal(0, 0.1, n)).round(6)
    pb = (score + rng.normal(0, 0.1, n)).round(6)
    write_predictions(root / "a", ids, score, pa, fold)
    order = rng.permutation(n)  # the second run lists the videos in another order
    write_predictions(root / "b", [ids[i] for i in order], score[order], pb[order], fold[order])
    write_json(root / "a" / "results.json", regress_result(5, "vision", "FCLIP - Vision", 1e-3, 64, 0.6, n_videos=n))
    write_json(root / "b" / "results.json", regress_result(6, "text", "FCLIP - Text", 1e-3, 64, 0.6, n_videos=n))
    return ids, score, fold, pa, pb


def test_fuse_runs(tmp_path, capsys):
    ids, score, fold, pa, pb = two_runs(tmp_path)
    n = len(ids)
    report.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.75", "0.25"])
    result = json.loads((tmp_path / "fusion-a+b.json").read_text())
    fused = 0.75 * pa + 0.25 * pb
    want = [stats.spearmanr(fused[fold == k], score[fold == k]).statistic for k in range(5)]
    np.testing.assert_allclose(result["fused"]["srcc_folds"], want)
    assert result["fused"]["srcc_mean"] == pytest.approx(np.mean(want))
    assert result["fused"]["ci"] == pytest.approx(list(fisher_ci(np.mean(want), n=n)))
    want_a = np.mean([stats.spearmanr(pa[fold == k], score[fold == k]).statistic for k in range(5)])
    assert result["run_a"]["srcc_mean"] == pytest.approx(want_a)
    assert result["weights"] == [0.75, 0.25] and result["weight_a_per_fold"] == [0.75] * 5
    assert result["n_videos"] == n and "fused" in capsys.readouterr().out


def test_fusion_weight_is_chosen_on_the_validation_folds(tmp_path, capsys):
    # score = 3x + y, run A predicts x and run B y: only w = 0.75 (3 : 1) ranks every fold's videos exactly
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, 100), rng.uniform(0, 1, 100)
    ids, fold = [f"v{i:03d}" for i in range(100)], np.arange(100) % 5
    two_runs(tmp_path)  # for results.json
    write_predictions(tmp_path / "a", ids, 3 * x + y, x, fold)
    write_predictions(tmp_path / "b", ids, 3 * x + y, y, fold)
    result = report.fuse_runs([tmp_path / "a", tmp_path / "b"])
    assert result["weight_a_per_fold"] == [0.75] * 5 and result["weights"] == [0.75, 0.25]
    assert result["fused"]["srcc_folds"] == pytest.approx([1.0] * 5)
    assert result["run_a"]["srcc_mean"] < 0.96 and result["run_b"]["srcc_mean"] < 0.6  # the single runs beside it
    assert result["fused_beats_better_run"] and "does not beat" not in capsys.readouterr().out
    assert json.loads((tmp_path / "fusion-a+b.json").read_text()) == result


def test_nested_weights_leave_each_fold_out(tmp_path):
    # fold 0's score is x alone (A predicts it exactly: w = 1 is its best), folds 1 and 2 score x + y (w = 0.5 is
    # exact): fold 0 must get 0.5, chosen on the other folds, never its own 1; each fold's w is the grid's best mean
    # SRCC over the other folds, computed here by hand
    rng = np.random.default_rng(4)
    n = 90
    x, y = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    fold = np.arange(n) % 3
    score = np.where(fold == 0, x, x + y)
    ids = [f"v{i:03d}" for i in range(n)]
    two_runs(tmp_path)  # for results.json
    write_predictions(tmp_path / "a", ids, score, x, fold)
    write_predictions(tmp_path / "b", ids, score, y, fold)
    result = report.fuse_runs([tmp_path / "a", tmp_path / "b"])
    grid = np.round(np.linspace(0, 1, 21), 2)
    table = np.array([[stats.spearmanr(w * x[fold == k] + (1 - w) * y[fold == k], score[fold == k]).statistic
                       for k in range(3)] for w in grid])  # (W, K)
    want = [float(grid[np.argmax(np.delete(table, k, 1).mean(1))]) for k in range(3)]
    assert result["weight_a_per_fold"] == want and want[0] == 0.5 and float(grid[np.argmax(table[:, 0])]) == 1.0
    assert result["weights"][0] == float(grid[np.argmax(table.mean(1))])  # for new videos: chosen on every fold


def test_fusion_says_when_it_does_not_beat_the_better_run(tmp_path, capsys):
    rng = np.random.default_rng(1)
    score = rng.uniform(0, 1, 60)
    ids, fold = [f"v{i:03d}" for i in range(60)], np.arange(60) % 5
    two_runs(tmp_path)  # for results.json
    write_predictions(tmp_path / "a", ids, score, score, fold)  # A ranks every video right: nothing to add
    write_predictions(tmp_path / "b", ids, score, rng.normal(0, 100, 60), fold)  # B: noise, on a large scale
    result = report.fuse_runs([tmp_path / "a", tmp_path / "b"])
    assert result["weights"] == [1.0, 0.0] and result["fused"]["srcc_mean"] == result["run_a"]["srcc_mean"] == 1
    assert result["fused_beats_better_run"] is False
    out = capsys.readouterr().out
    assert f"does not beat the better run alone, {tmp_path / 'a'} (1.000)" in out
    assert [line.split()[0] for line in out.splitlines()[2:5]] == ["A", "B", "fused"]  # side by side


def test_fuse_never_overwrites_fuse_best(tmp_path):
    two_runs(tmp_path)
    (tmp_path / "a").rename(tmp_path / "s5-vision")
    (tmp_path / "b").rename(tmp_path / "s6-text")
    report.main([str(tmp_path)])  # the best vision run with the best text run: fusion.json
    best = (tmp_path / "fusion.json").read_bytes()
    assert json.loads(best)["weights_chosen"] == "each chosen on the other folds"
    assert json.loads(best)["runs"] == [str(tmp_path / "s5-vision"), str(tmp_path / "s6-text")]
    report.main(["--fuse", str(tmp_path / "s5-vision"), str(tmp_path / "s6-text"), "--weights", "0.9", "0.1"])
    assert (tmp_path / "fusion.json").read_bytes() == best  # untouched
    pair = json.loads((tmp_path / "fusion-s5-vision+s6-text.json").read_text())
    assert pair["weights"] == [0.9, 0.1] and pair["runs"] == [str(tmp_path / "s5-vision"), str(tmp_path / "s6-text")]
    # runs of one name in two folders keep their paths apart
    for parent in ("x", "y"):
        shutil.copytree(tmp_path / "s5-vision", tmp_path / parent / "s5-vision")
    report.fuse_runs([tmp_path / "x" / "s5-vision", tmp_path / "y" / "s5-vision"])
    assert (tmp_path / "fusion-x_s5-vision+y_s5-vision.json").is_file()
    assert (tmp_path / "fusion.json").read_bytes() == best


def test_fuse_runs_mismatch(tmp_path, capsys):
    two_runs(tmp_path)  # for results.json
    ids = ["v1", "v2", "v3", "v4", "v5"]
    write_predictions(tmp_path / "a", ids, [0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5], [0, 0, 1, 1, 1])
    write_predictions(tmp_path / "b", ids[:4] + ["v6"], [0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.2, 0.3, 0.4, 0.1],
                      [0, 0, 1, 1, 1])
    fuse = ["--fuse", str(tmp_path / "a"), str(tmp_path / "b")]
    assert one_line(fuse, capsys, report.main, "tools/report.py") == (
        f"tools/report.py: error: video ids differ: 1 only in {tmp_path / 'a'} (e.g. ['v5']), 1 only in "
        f"{tmp_path / 'b'} (e.g. ['v6'])")
    write_predictions(tmp_path / "b", ids, [0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.2, 0.3, 0.4, 0.1], [0, 1, 1, 1, 1])
    err = one_line(fuse, capsys, report.main, "tools/report.py")
    assert err.endswith("disagree on the folds; both runs must use the same folds (--folds, --seed)")
    write_predictions(tmp_path / "b", ids, [0.1, 0.25, 0.3, 0.4, 0.5], [0.5, 0.2, 0.3, 0.4, 0.1], [0, 0, 1, 1, 1])
    assert one_line(fuse, capsys, report.main, "tools/report.py") == (
        "tools/report.py: error: the files disagree on the true score of 1 videos (e.g. ['v2']); both must score "
        "the same videos")
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'c'))}: CSV file not found"):
        report.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "c")])
    assert not list(tmp_path.glob("fusion*.json"))


def test_fuse_names_the_videos_only_in_one_run(tmp_path):
    two_runs(tmp_path)
    ids = ["v1", "v2", "v3", "v4", "v5"]
    write_predictions(tmp_path / "a", ids, [0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5], [0, 0, 1, 1, 1])
    write_predictions(tmp_path / "b", ids[:4] + ["v6"], [0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5],
                      [0, 0, 1, 1, 1])
    with pytest.raises(UserError, match=r"1 only in .*a.* \(e.g. \['v5'\]\).* 1 only in .*b.* \(e.g. \['v6'\]\)"):
        report.fuse_runs([tmp_path / "a", tmp_path / "b"])


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
    "NaN prediction": (lambda t: t.replace("\nv010,", "\nv010,nan,nan,0\nx,", 1),
                       "line 12: prediction and score must be finite"),
    "a video twice": (lambda t: t.replace("v011", "v010"), "line 13: video 'v010' appears twice"),
}


@pytest.mark.parametrize("case", [
    c for c in BAD_PREDICTIONS])
def test_bad_predictions_name_the_file(tmp_path, capsys, case):
    two_runs(tmp_path)
    path = tmp_path / "b" / "predictions.csv"
    write_predictions(tmp_path / "b", *sorted_rows(tmp_path / "a"))  # in id order: v010 on line 12
    broken, message = BAD_PREDICTIONS[case]
    out = broken(path.read_text())
    path.write_bytes(out if isinstance(out, bytes) else out.encode())
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}.*{message}"):
        report.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "b")])
    err = one_line(["--fuse", str(tmp_path / "a"), str(tmp_path / "b")], capsys, report.main, "tools/report.py")
    assert err.startswith(f"tools/report.py: error: {path}") and message in err
    err = one_line(["--compare", str(tmp_path / "a"), str(tmp_path / "b")], capsys)  # the same reader
    assert err.startswith(f"evaluate.py: error: {path}") and message in err
    assert not list(tmp_path.glob("fusion*.json"))

"""Tests for evaluate.py: python -m pytest tests/test_evaluate.py -q"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate
from evaluate import fisher_ci, fuse, srcc

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


def make_results(root):
    # Table 6 rows, written in a scrambled order, plus the paper's Table 5
    for s, m, enc, lr, bs, r, *_ in reversed(TABLE6):
        write_json(root / f"s{s}-{m}" / "results.json", regress_result(s, m, enc, lr, bs, r))
    losses = [(None, 1.93658), (0.2187, 0.4209), (0.0912, 0.4538), (0.0610, 0.4814)]
    write_json(root / "fclip" / "results.json", {
        "kind": "contrastive", "chosen_epoch": 1,
        "epochs": [{"epoch": e, "train_loss": tr, "test_loss": te} for e, (tr, te) in enumerate(losses)]})


def test_tables_from_results(tmp_path, capsys):
    make_results(tmp_path)
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
    pytest.importorskip("matplotlib")
    png = tmp_path / "fig3.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_fig3_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert evaluate.fig3([regress_result(1, "vision", "ViT", 1e-3, 64, 0.5)], tmp_path / "fig3.png") is None
    assert "fig3 skipped: matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "fig3.png").exists()


def test_format_lr():
    assert [evaluate.format_lr(x) for x in (2e-3, 2.75e-4, 1e-5)] == ["2e-03", "2.75e-04", "1e-05"]


def test_table_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        evaluate.main([str(tmp_path)])
    run = regress_result(1, "vision", "ViT", 1e-3, 64, 0.5)
    del run["srcc_mean"]
    write_json(tmp_path / "s1-vision" / "results.json", run)
    with pytest.raises(KeyError, match=r"s1-vision/results.json: missing key 'srcc_mean'"):
        evaluate.main([str(tmp_path)])
    write_json(tmp_path / "s1-vision" / "results.json", {**regress_result(1, "vision", "ViT", 1e-3, 64, 0.5), "kind": "x"})
    with pytest.raises(ValueError, match="key 'kind'"):
        evaluate.main([str(tmp_path)])


def test_cli_error_message(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(tmp_path)], capture_output=True, text=True)
    assert res.returncode != 0 and "error: no results.json found below" in res.stderr and "Traceback" not in res.stderr


# -----------------------------------------------------------------------------
# fusion of two runs

def write_predictions(folder, ids, score, pred, fold):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "score", "prediction", "fold"])
        w.writerows(zip(ids, score, pred, fold))


def test_fuse_runs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 50
    ids = [f"v{i:03d}" for i in range(n)]
    score = rng.uniform(0.5, 1.0, n).round(6)
    fold = np.arange(n) % 5
    pa = (score + rng.normal(0, 0.1, n)).round(6)
    pb = (score + rng.normal(0, 0.1, n)).round(6)
    write_predictions(tmp_path / "a", ids, score, pa, fold)
    order = rng.permutation(n)  # the second run lists the videos in another order
    write_predictions(tmp_path / "b", [ids[i] for i in order], score[order], pb[order], fold[order])
    evaluate.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.75", "0.25"])
    result = json.loads((tmp_path / "fusion.json").read_text())
    fused = 0.75 * pa + 0.25 * pb
    from scipy.stats import spearmanr
    want = [spearmanr(fused[fold == k], score[fold == k]).statistic for k in range(5)]
    np.testing.assert_allclose(result["fused"]["srcc_folds"], want)
    assert result["fused"]["srcc_mean"] == pytest.approx(np.mean(want))
    assert result["fused"]["ci"] == pytest.approx(list(fisher_ci(np.mean(want), n=n)))
    assert result["run_a"]["srcc_mean"] == pytest.approx(np.mean([spearmanr(pa[fold == k], score[fold == k]).statistic for k in range(5)]))
    assert result["n_videos"] == n and "fused" in capsys.readouterr().out


def test_fuse_runs_mismatch(tmp_path):
    write_predictions(tmp_path / "a", ["v1", "v2", "v3"], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0, 0, 1])
    write_predictions(tmp_path / "b", ["v1", "v2", "v4"], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0, 0, 1])
    with pytest.raises(ValueError, match=r"1 only in .*a/predictions.csv \(e.g. \['v3'\]\).*b/predictions.csv \(e.g. \['v4'\]\)"):
        evaluate.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "b")])
    write_predictions(tmp_path / "b", ["v1", "v2", "v3"], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match=r"disagree on the score or fold of 1 videos \(e.g. \['v2'\]\)"):
        evaluate.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(FileNotFoundError, match="c/predictions.csv not found"):
        evaluate.main(["--fuse", str(tmp_path / "a"), str(tmp_path / "c")])

"""teacache-fast sweep: CSV + PNG of speedup vs PSNR / SSIM on the demo model."""
import csv
import math

import pytest
import torch

from teacache_fast import quality
from teacache_fast.cli import main
from teacache_fast.cli.sweep import image_of


def test_sweep_writes_csv_and_png_and_its_psnr_is_quality_psnr(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["sweep", "--smoke", "--thresholds", "0,0.1,10", "--size", "8", "--out", str(out),
               "--save-latents"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["threshold"] for r in rows] == ["none", "0.0", "0.1", "10.0"]
    assert (out / "sweep.png").stat().st_size > 0
    saved = torch.load(out / "latents.pt")
    assert saved["thresholds"] == [0.0, 0.1, 10.0]
    from teacache_fast.cli import sampling
    ids = sampling.latent_image_ids(8, 8)
    ref = image_of(saved["uncached"], ids)
    for row, latent in zip(rows[1:], saved["cached"]):
        img = image_of(latent, ids)
        assert float(row["psnr_db"]) == pytest.approx(quality.psnr(img, ref), rel=1e-12)
        assert float(row["ssim"]) == pytest.approx(quality.ssim(img, ref), rel=1e-12)
    # threshold 0 computes every step: the uncached output exactly
    assert rows[1]["computed"] == rows[1]["total"] and math.isinf(float(rows[1]["psnr_db"]))
    assert float(rows[1]["ssim"]) == pytest.approx(1.0)
    # a huge threshold skips all but the forced steps: a finite PSNR, below 1 SSIM
    assert int(rows[3]["computed"]) < int(rows[3]["total"])
    assert math.isfinite(float(rows[3]["psnr_db"])) and float(rows[3]["ssim"]) < 1
    assert "PSNR dB" in capsys.readouterr().out


def test_sweep_help_and_bad_size(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "--thresholds" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sweep", "--size", "7"])
    assert "--size" in capsys.readouterr().err

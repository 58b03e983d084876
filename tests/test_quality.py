"""teacache_fast.quality: PSNR / SSIM against torchmetrics' definitions and analytic values."""
import builtins
import math

import pytest
import torch

from teacache_fast import quality


def _image(shape=(2, 3, 16, 16), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_identical_tensors_are_inf_and_one():
    a = _image()
    assert quality.psnr(a, a.clone()) == math.inf
    assert quality.ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-12)
    r = quality.compare(a, a.clone())
    assert (r.psnr, r.ssim, r.psnr_worst, r.ssim_worst) == (math.inf, pytest.approx(1.0), math.inf,
                                                             pytest.approx(1.0))


@pytest.mark.parametrize("sigma", [0.1, 0.01, 0.003])
def test_known_noise_gives_the_analytic_psnr(sigma):
    """+-sigma noise (random signs): MSE = sigma^2 exactly, PSNR = 20 log10(range / sigma)
    (to torchmetrics' precision: it scales ln to dB with a float32 constant, ~1e-7)."""
    ref = _image()
    signs = torch.randint(0, 2, ref.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noisy = ref.double() + sigma * signs
    assert quality.psnr(noisy, ref, data_range=1.0) == pytest.approx(20 * math.log10(1 / sigma), rel=1e-6)
    span = float(ref.max() - ref.min())   # the default range: the reference's
    assert quality.psnr(noisy, ref) == pytest.approx(20 * math.log10(span / sigma), rel=1e-6)
    # SSIM drops with the noise, stays in (0, 1)
    assert 0 < quality.ssim(noisy, ref, data_range=1.0) < 1


def test_ssim_of_gaussian_noise_decreases_with_sigma():
    ref = _image((1, 1, 32, 32))
    g = torch.Generator().manual_seed(3)
    values = [quality.ssim(ref + s * torch.randn(ref.shape, generator=g), ref, data_range=1.0)
              for s in (0.01, 0.05, 0.2)]
    assert values[0] > values[1] > values[2]


def test_video_per_frame_mean_and_worst():
    ref = _image((1, 3, 4, 16, 16))      # (B, C, F, H, W)
    out = ref.clone().double()
    out[:, :, 1] += 0.1                   # frame 1: MSE 0.01 -> 20 dB at range 1
    out[:, :, 3] += 0.01                  # frame 3: 40 dB
    r = quality.compare(out, ref, frame_dim=2, data_range=1.0)
    assert r.frames == 4 and r.psnr_frames[0] == math.inf and r.psnr_frames[2] == math.inf
    assert r.psnr_frames[1] == pytest.approx(20.0) and r.psnr_frames[3] == pytest.approx(40.0)
    assert r.psnr_worst == pytest.approx(20.0) and r.psnr == pytest.approx(30.0)
    assert r.ssim_worst == min(r.ssim_frames) < 1 and r.ssim_frames[0] == pytest.approx(1.0)
    assert r.ssim == pytest.approx(sum(r.ssim_frames) / 4)


def test_bad_input_names_the_argument():
    a = _image()
    with pytest.raises(ValueError, match="same shape"):
        quality.psnr(a, a[:1])
    with pytest.raises(TypeError, match="reference must be a torch.Tensor"):
        quality.psnr(a, a.numpy())
    with pytest.raises(ValueError, match="data_range"):
        quality.psnr(a, a, data_range=0)
    with pytest.raises(ValueError, match="finite"):
        quality.ssim(a * math.nan, a)
    with pytest.raises(ValueError, match="frame_dim"):
        quality.compare(a, a, frame_dim=3)
    with pytest.raises(ValueError, match="SSIM takes"):
        quality.ssim(a[None], a[None])


def test_missing_torchmetrics_names_the_extra(monkeypatch):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.startswith("torchmetrics"):
            raise ImportError("No module named 'torchmetrics'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"teacache_fast\[quality\]"):
        quality.psnr(_image(), _image())

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fl.learning.augment import _batched_affine_grid, augment_batch
from fl.learning.data import MEAN, STD

BG = (0 - MEAN) / STD
IDENTITY = dict(rotate=0.0, translate=0.0, scale=(1.0, 1.0))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(b: int = 16, seed: int = 0) -> torch.Tensor:
    """Normalised digit-like batch: background BG, random ink in the centre."""
    x = torch.full((b, 1, 28, 28), BG)
    x[:, :, 6:22, 6:22] = torch.rand(b, 1, 16, 16, generator=_gen(seed)) * 3 + BG
    return x


def _blob(b: int = 8) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    blob = torch.exp(-((yy - 13.5) ** 2 + (xx - 13.5) ** 2) / (2 * 3.0**2)) * 3
    return (blob + BG).expand(b, 1, 28, 28).clone()


def test_identity_params_return_input() -> None:
    x = _batch()
    out = augment_batch(x, _gen(0), **IDENTITY)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_shape_dtype_and_background_preserved() -> None:
    x = _batch(32)
    out = augment_batch(x, _gen(0), rotate=30, translate=0.2, scale=(0.7, 1.3))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= BG - 1e-5  # moved-in pixels are background, not 0
    assert torch.allclose(out[:, :, 0, 0], torch.full((32, 1), BG), atol=1e-5)
    assert (out - x).abs().amax(dim=(1, 2, 3)).min() > 0.1  # every sample changed


def test_reproducible_from_generator() -> None:
    x = _batch()
    a = augment_batch(x, _gen(1))
    assert torch.equal(a, augment_batch(x, _gen(1)))
    assert not torch.allclose(a, augment_batch(x, _gen(2)))


def test_global_rng_fallback_works() -> None:
    torch.manual_seed(0)
    a = augment_batch(_batch())
    torch.manual_seed(0)
    assert torch.equal(a, augment_batch(_batch()))


def test_rotation_keeps_mass_and_moves_pixels() -> None:
    x = torch.full((8, 1, 28, 28), BG)
    x[:, :, 10:18, 6:22] = BG + 3  # wide bar: rotation visibly changes it
    out = augment_batch(x, _gen(0), rotate=45, translate=0.0, scale=(1.0, 1.0))
    mass_in, mass_out = (x - BG).sum(dim=(1, 2, 3)), (out - BG).sum(dim=(1, 2, 3))
    assert torch.all((mass_out / mass_in - 1).abs() < 0.15)
    assert (out - x).abs().amax() > 1.0
    blob = _blob()
    out = augment_batch(blob, _gen(0), rotate=180, translate=0.0, scale=(1.0, 1.0))
    torch.testing.assert_close(out, blob, atol=0.1, rtol=0)  # symmetric blob is invariant


def test_translation_moves_centre_of_mass() -> None:
    blob = _blob(64)
    out = augment_batch(blob, _gen(0), rotate=0, translate=0.1, scale=(1.0, 1.0)) - BG
    xs = torch.arange(28.0)
    com_x = (out.sum(dim=2).squeeze(1) * xs).sum(1) / out.sum(dim=(1, 2, 3))
    shift = com_x - 13.5
    assert shift.abs().max() <= 2.8 + 0.1 and shift.abs().max() > 1.5


def test_hflip_flips_some_samples_exactly() -> None:
    x = _batch(32)
    out = augment_batch(x, _gen(0), hflip=True, **IDENTITY)
    flipped = [torch.allclose(o, xi.flip(-1), atol=1e-5) for o, xi in zip(out, x)]
    same = [torch.allclose(o, xi, atol=1e-5) for o, xi in zip(out, x)]
    assert all(f != s for f, s in zip(flipped, same))  # each sample is exactly one of the two
    assert 5 < sum(flipped) < 27


@pytest.mark.parametrize("h,w", [(28, 28), (20, 36)])
def test_batched_grid_matches_affine_grid(h: int, w: int) -> None:
    theta = torch.randn(16, 2, 3, generator=_gen(0))
    ref = F.affine_grid(theta, [16, 1, h, w], align_corners=False)
    torch.testing.assert_close(_batched_affine_grid(theta, h, w), ref)


def test_rotation_is_true_rotation_on_non_square_images() -> None:
    x = torch.full((1, 1, 40, 80), BG)
    x[:, :, 19:21, 20:60] = BG + 3  # horizontal bar, 40 px long
    out = torch.stack([augment_batch(x, _gen(s), rotate=90, translate=0, scale=(1, 1)) for s in range(20)])
    # some angle near ±90 deg turns the bar vertical; its vertical extent stays ~40 px, not 20
    rows = ((out - BG) > 1).any(dim=-1).sum(dim=-1).max()
    assert 30 <= rows <= 40


def test_rejects_non_batch_input() -> None:
    with pytest.raises(ValueError):
        augment_batch(torch.zeros(1, 28, 28))
    with pytest.raises(ValueError):
        augment_batch(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_natural_images_get_whole_pixel_crops_and_flips_digits_the_affine_moves():
    from fl.learning.augment import crop_flip, for_dataset

    assert for_dataset("cifar10") is crop_flip and for_dataset("mnist") is augment_batch
    assert for_dataset("emnist-letters") is augment_batch and for_dataset("folder") is augment_batch
    x = torch.rand(64, 3, 8, 8) + 1.0  # background (each sample's minimum) well above 0
    out = crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    flips = 0
    for a, b in zip(x, out):  # each output is the input moved by whole pixels (|shift| <= 2), maybe mirrored
        found = [(dx, dy, f) for f in (False, True) for dx in range(-2, 3) for dy in range(-2, 3)
                 if torch.equal(_moved(a.flip(-1) if f else a, dx, dy)[:, 2:6, 2:6], b[:, 2:6, 2:6])]
        assert found, "not a whole-pixel crop of the padded image"
        flips += found[0][2]
    assert 16 < flips < 48  # about half mirrored
    again = crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, again)  # seeded: the same draws


def _moved(img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    return torch.roll(img, shifts=(dy, dx), dims=(1, 2))

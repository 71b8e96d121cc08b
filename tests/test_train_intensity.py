"""Intensity augmentation: drawn parameters within their bounds, the output what they say
(against a NumPy oracle), determinism, and the identity when every bound is zero."""

import math

import numpy as np
import pytest
import torch

from fastcascade.ops.intensity import apply_window
from fastcascade.train.intensity import IntensityAugmenter, IntensityParams

WINDOW = (-200.0, 400.0)


def _image(seed=0, shape=(6, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    return -1100.0 + 1600.0 * torch.rand(shape, generator=g)  # air to bone, past the window


def _oracle(image, window, params, noise):
    lo, hi = window
    c = 0.5 * (lo + hi)
    hu = c + params.gain * (image.double().numpy() - c) + params.offset_hu
    hu = hu + params.noise_std_hu * noise.double().numpy()
    x = (np.clip(hu, lo, hi) - lo) / (hi - lo)
    return 2.0 * x**params.gamma - 1.0


def test_parameters_stay_within_their_bounds():
    aug = IntensityAugmenter(max_offset_hu=30, max_gain=0.2, gamma_range=(0.7, 1.5),
                             noise_std_hu=(2.0, 9.0), p=0.5)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    draws = [aug.sample_params(g) for _ in range(400)]
    offsets = np.array([d.offset_hu for d in draws])
    gains = np.array([d.gain for d in draws])
    gammas = np.array([d.gamma for d in draws])
    noises = np.array([d.noise_std_hu for d in draws])
    assert offsets.min() >= -30 and offsets.max() <= 30 and np.ptp(offsets) > 50
    assert gains.min() >= 0.8 and gains.max() <= 1.2 and np.ptp(gains) > 0.3
    assert gammas.min() >= 0.7 and gammas.max() <= 1.5
    assert np.mean(gammas < 1) == pytest.approx(math.log(1 / 0.7) / math.log(1.5 / 0.7), abs=0.1)
    assert noises.min() >= 2 and noises.max() <= 9
    assert 0.4 < np.mean([d.apply for d in draws]) < 0.6


def test_output_is_what_the_drawn_parameters_say():
    aug = IntensityAugmenter()
    image = _image()
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        out = aug(image, WINDOW, g)
        g = torch.Generator().manual_seed(seed)
        params = aug.sample_params(g)
        noise = torch.randn(image.shape, generator=g)
        assert out.dtype == torch.float32 and out.shape == image.shape
        np.testing.assert_allclose(out.numpy(), _oracle(image, WINDOW, params, noise), atol=2e-6)
        assert float(out.min()) >= -1 and float(out.max()) <= 1
        # the HU change before the window stays within the drawn bounds
        inside = (image > WINDOW[0] + 100) & (image < WINDOW[1] - 100)
        change = (out - apply_window(image, WINDOW))[inside].abs().max()
        assert 0 < float(change) < 1.0  # perturbed, but not beyond recognition


def test_deterministic_for_a_generator_state_and_identity_with_zero_bounds():
    aug = IntensityAugmenter()
    image = _image(2)
    a = aug(image, WINDOW, torch.Generator().manual_seed(7))
    b = aug(image, WINDOW, torch.Generator().manual_seed(7))
    c = aug(image, WINDOW, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    none = IntensityAugmenter(0, 0, (1.0, 1.0), (0.0, 0.0))
    assert torch.equal(none(image, WINDOW, torch.Generator()), apply_window(image, WINDOW))
    skipped = IntensityParams(False, 50.0, 1.5, 2.0, 10.0)
    noise = torch.randn(image.shape)
    assert torch.equal(aug.apply(image, WINDOW, skipped, noise), apply_window(image, WINDOW))


def test_the_same_count_of_numbers_whatever_the_coin():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    IntensityAugmenter(p=0.0)(_image(), WINDOW, g1)
    IntensityAugmenter(p=1.0)(_image(), WINDOW, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_offset_hu=-1), "max_offset_hu"),
        (dict(max_gain=1.0), "max_gain"),
        (dict(gamma_range=(0.0, 1.0)), "gamma_range"),
        (dict(gamma_range=(1.2, 1.0)), "gamma_range"),
        (dict(noise_std_hu=(-1.0, 1.0)), "noise_std_hu"),
        (dict(p=1.5), "p must be"),
    ],
)
def test_bad_bounds_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IntensityAugmenter(**kwargs)


def test_describe_is_plain_json():
    import json

    d = IntensityAugmenter(max_offset_hu=5).describe()
    assert json.loads(json.dumps(d)) == d and d["max_offset_hu"] == 5.0

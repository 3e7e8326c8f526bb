"""Known-answer tests of the Mutual Information Gap."""

import math

import numpy as np
import pytest
import torch

from pyro_vi_ext.datasets import DSprites
from pyro_vi_ext.metrics import MIGResult, mutual_information_gap

N = 5000
SIZES = (3, 6, 10)


@pytest.fixture(scope="module")
def disentangled() -> tuple[np.ndarray, np.ndarray]:
    """Factors of sizes 3, 6, 10; latent j is a noisy monotone map of factor j, plus 2 noise dims.

    The noise (sd 0.003) is far below the gaps between the images of neighbouring factor values
    (at least 0.06), so every value stays in its own bin among 20.
    """
    rng = np.random.default_rng(0)
    v = np.column_stack([rng.integers(0, s, N) for s in SIZES])
    t = v / (np.array(SIZES) - 1.0)
    z = np.column_stack(
        [
            np.tanh(2 * t[:, 0] - 1),
            t[:, 1] ** 2 + t[:, 1],
            np.exp(t[:, 2]),
            rng.normal(size=N),
            rng.normal(size=N),
        ]
    )
    return z + 0.003 * rng.normal(size=z.shape), v


def test_hand_computed_value():
    # Binary factor; z0 = v exactly (MI = log 2); z1 puts one of the two v = 1 points with the
    # v = 0 points: MI = log 2 - (3/4) H(1/3, 2/3).
    v = np.array([0, 0, 1, 1])
    z = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    h13 = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    mi1 = math.log(2) - 0.75 * h13
    result = mutual_information_gap(z, v, num_bins=2, return_details=True)
    np.testing.assert_allclose(result.mutual_information[:, 0], [math.log(2), mi1], rtol=1e-12)
    np.testing.assert_allclose(result.factor_entropy, [math.log(2)], rtol=1e-12)
    assert result.score == pytest.approx((math.log(2) - mi1) / math.log(2), rel=1e-12)
    # Swapping which dimension carries the factor does not change the gap.
    assert mutual_information_gap(z[:, ::-1], v, num_bins=2) == pytest.approx(result.score)


def test_disentangled_code_scores_near_one(disentangled):
    z, v = disentangled
    result = mutual_information_gap(z, v, return_details=True)
    assert isinstance(result, MIGResult) and result.estimator == "histogram"
    # Each informative dimension recovers its factor exactly (MI = H); what keeps the score below
    # 1 is the upward bias of the plug-in MI of the runner-up dimension, about
    # (bins - 1)(values - 1) / (2N) nats = at most 0.017 nats, i.e. under 0.01 once divided by H.
    np.testing.assert_allclose(np.diag(result.mutual_information[:3]), result.factor_entropy)
    assert result.top_latents[:, 0].tolist() == [0, 1, 2]
    assert 0.98 < result.score < 1.0
    assert (result.per_factor > 0.98).all()
    assert result.score == pytest.approx(result.per_factor.mean())
    assert mutual_information_gap(z, v) == result.score
    np.testing.assert_allclose(result.factor_entropy, np.log(SIZES), atol=0.01)  # ~uniform
    assert (result.normalized_mutual_information <= 1 + 1e-12).all()


def test_discretization_caps_factors_with_more_values_than_bins():
    # 32 evenly spaced values in 20 equal-width bins: 12 bins hold two values, so the best
    # dimension keeps only 1 - (24/32) log 2 / log 32 = 0.85 of H, less the runner-up's bias.
    rng = np.random.default_rng(1)
    v = rng.integers(0, 32, N)
    # Noise well below 1/620, the closest a value comes to a bin edge.
    z = np.column_stack([v / 31 + 1e-4 * rng.normal(size=N), rng.normal(size=N)])
    capped = mutual_information_gap(z, v, return_details=True)
    ceiling = 1 - (24 / 32) * math.log(2) / math.log(32)
    assert capped.normalized_mutual_information[0, 0] == pytest.approx(ceiling, abs=0.01)
    assert 0.75 < capped.score < ceiling
    assert mutual_information_gap(z, v, num_bins=64) > 0.93


def test_rotated_code_scores_much_lower():
    rng = np.random.default_rng(2)
    v = rng.integers(0, 10, size=(N, 2))
    aligned = v / 9.0 + 0.01 * rng.normal(size=(N, 2))
    angle = math.pi / 4
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    rotated = aligned @ rotation.T
    assert mutual_information_gap(aligned, v) > 0.98
    result = mutual_information_gap(rotated, v, return_details=True)
    # Each rotated dimension carries about the same information on both factors.
    assert result.score < 0.05
    assert (result.mutual_information > 0.3).all()


def test_constant_code_scores_zero(disentangled):
    _, v = disentangled
    for binning in ("uniform", "quantile"):
        result = mutual_information_gap(
            np.full((N, 4), 2.5), v, binning=binning, return_details=True
        )
        assert result.score == 0.0
        assert (result.mutual_information == 0.0).all()


def test_invariant_to_permutations_and_rescaling(disentangled):
    z, v = disentangled
    base = mutual_information_gap(z, v, return_details=True)
    perm = [4, 2, 0, 3, 1]
    permuted = mutual_information_gap(z[:, perm], v, return_details=True)
    assert permuted.score == base.score
    np.testing.assert_array_equal(permuted.mutual_information, base.mutual_information[perm])
    # Equal-width bins follow shifts and rescalings of either sign.
    affine = z * np.array([3.0, -0.5, 2.0, -7.0, 0.1]) + np.array([1.0, -2.0, 0.0, 5.0, 3.0])
    assert mutual_information_gap(affine, v) == pytest.approx(base.score, abs=1e-9)


def test_quantile_binning_invariant_to_monotone_maps(disentangled):
    z, v = disentangled
    base = mutual_information_gap(z, v, binning="quantile", return_details=True)
    warped = np.column_stack(
        [np.exp(3 * z[:, 0]), -(z[:, 1] ** 3), np.arctan(z[:, 2]), z[:, 3], -np.exp(-z[:, 4])]
    )
    result = mutual_information_gap(warped, v, binning="quantile", return_details=True)
    np.testing.assert_allclose(result.mutual_information, base.mutual_information, atol=1e-12)
    assert result.score == pytest.approx(base.score, abs=1e-12)
    assert base.score > 0.9  # equal-mass bins straddle clusters, see the docstring


def test_outlier_crowds_uniform_bins_but_not_quantile_bins(disentangled):
    z, v = disentangled
    spiked = z.copy()
    spiked[0, 2] = 1e6  # one outlier squeezes the rest of dimension 2 into the first bin
    uniform = mutual_information_gap(spiked, v, return_details=True)
    assert uniform.per_factor[2] < 0.01
    quantile_clean = mutual_information_gap(z, v, binning="quantile")
    quantile_spiked = mutual_information_gap(spiked, v, binning="quantile")
    assert quantile_spiked == pytest.approx(quantile_clean, abs=1e-3)


def test_torch_inputs_and_one_dimensional_factors(disentangled):
    z, v = disentangled
    expected = mutual_information_gap(z[:, [2, 3]], v[:, 2])
    assert expected > 0.98
    got = mutual_information_gap(torch.from_numpy(z[:, [2, 3]]).float(), torch.from_numpy(v[:, 2]))
    assert got == pytest.approx(expected, abs=1e-3)
    # Factor labels are only labels: relabelling them changes nothing.
    relabelled = np.array([7, -3, 100, 4, 5, 6, 8, 9, 10, 11])[v[:, 2]]
    assert mutual_information_gap(z[:, [2, 3]], relabelled) == expected


def test_gaussian_estimator_known_answers():
    rng = np.random.default_rng(3)
    n = 1000
    v = np.column_stack([rng.integers(0, 4, n), rng.integers(0, 5, n)])
    means = np.column_stack([v[:, 0] / 3.0, rng.normal(size=n), v[:, 1] / 4.0])
    stds = np.full_like(means, 0.01)
    stds[:, 1] = 1.0
    gen = torch.Generator().manual_seed(0)
    kwargs = {"code_stds": stds, "num_samples": 300, "return_details": True}
    result = mutual_information_gap(means, v, generator=gen, **kwargs)
    assert result.estimator == "gaussian"
    # Encoder noise (0.01) far below the value spacing (0.25): MI ~ H up to Monte Carlo error.
    np.testing.assert_allclose(
        result.mutual_information[[0, 2], [0, 1]], result.factor_entropy, atol=0.02
    )
    assert result.score > 0.95
    # Reproducible with a seeded generator.
    again = mutual_information_gap(means, v, generator=torch.Generator().manual_seed(0), **kwargs)
    assert again.score == result.score
    # Wide encoder noise erases the information; a 45-degree rotation splits it.
    blurred = mutual_information_gap(
        means, v, code_stds=np.ones_like(means), num_samples=300, generator=gen
    )
    assert blurred < 0.1
    two = means[:, [0, 2]]
    rotated = two @ (np.array([[1.0, -1.0], [1.0, 1.0]]) / math.sqrt(2)).T
    score = mutual_information_gap(
        rotated, v, code_stds=np.full_like(rotated, 0.01), num_samples=300, generator=gen
    )
    assert score < 0.1
    constant = mutual_information_gap(
        np.zeros((n, 2)), v, code_stds=np.ones((n, 2)), num_samples=300, generator=gen
    )
    assert constant < 1e-4  # paired draws: the two log-densities cancel exactly


def test_gaussian_estimator_matches_quadrature():
    # q(z | x_n) = Normal(+-1, 1) for a balanced binary factor: MI(z; v) = H(mixture) - H(normal),
    # computed here by quadrature; a second dimension ignores v.
    n = 2000
    v = np.repeat([0, 1], n // 2)
    means = np.column_stack([2.0 * v - 1.0, np.zeros(n)])
    x = np.linspace(-12.0, 12.0, 200_001)
    mixture = (
        0.5 * (np.exp(-0.5 * (x + 1) ** 2) + np.exp(-0.5 * (x - 1) ** 2)) / math.sqrt(2 * math.pi)
    )
    dx = x[1] - x[0]
    exact = -(mixture * np.log(mixture)).sum() * dx - 0.5 * math.log(2 * math.pi * math.e)
    assert exact == pytest.approx(0.3368, abs=1e-4)
    result = mutual_information_gap(
        means,
        v,
        code_stds=np.ones_like(means),
        num_samples=n,
        generator=torch.Generator().manual_seed(0),
        return_details=True,
    )
    assert result.mutual_information[0, 0] == pytest.approx(exact, abs=0.03)
    assert result.mutual_information[1, 0] < 1e-4
    assert result.score == pytest.approx(exact / math.log(2), abs=0.05)


def test_dsprites_factor_values_as_codes():
    data = DSprites(subgrid={"orientation": 10, "posX": 8, "posY": 8})
    index = torch.randint(0, len(data), (4000,), generator=torch.Generator().manual_seed(4))
    factors = data.latents_classes(index).numpy()
    rng = np.random.default_rng(4)
    codes = np.column_stack([data.latents_values(index).numpy(), rng.normal(size=(4000, 2))])
    assert mutual_information_gap(codes, factors) > 0.97
    # Chen et al. leave the shape factor out on dSprites.
    assert mutual_information_gap(codes[:, 1:], factors[:, 1:]) > 0.97


@pytest.mark.parametrize(
    ("codes", "factors", "kwargs", "error", "match"),
    [
        (np.zeros(10), np.zeros(10, int), {}, ValueError, "codes must be a 2-d"),
        (np.zeros((10, 1)), np.zeros(10, int), {}, ValueError, "codes must have at least 2 latent"),
        (np.full((10, 2), np.nan), np.arange(10) % 2, {}, ValueError, "codes holds NaN"),
        (np.zeros((10, 2)), np.arange(9) % 2, {}, ValueError, "factors has 9 rows"),
        (np.zeros((10, 2)), np.linspace(0, 1, 10), {}, TypeError, "discrete class labels"),
        (np.zeros((10, 2)), np.zeros((10, 2), int), {}, ValueError, "factors column 0 is constant"),
        (np.zeros((10, 2)), np.zeros((10, 2, 1), int), {}, ValueError, "factors must be a 1-d"),
        (np.zeros((10, 2)), np.arange(10) % 2, {"num_bins": 1}, ValueError, "num_bins"),
        (np.zeros((10, 2)), np.arange(10) % 2, {"binning": "kmeans"}, ValueError, "binning"),
        (
            np.zeros((10, 2)),
            np.arange(10) % 2,
            {"code_stds": np.ones((10, 3))},
            ValueError,
            "code_stds must have the shape",
        ),
        (
            np.zeros((10, 2)),
            np.arange(10) % 2,
            {"code_stds": np.zeros((10, 2))},
            ValueError,
            "strictly positive",
        ),
        (np.array([["a", "b"]]), np.zeros(1, int), {}, TypeError, "codes must hold real"),
    ],
)
def test_input_validation(codes, factors, kwargs, error, match):
    with pytest.raises(error, match=match):
        mutual_information_gap(codes, factors, **kwargs)

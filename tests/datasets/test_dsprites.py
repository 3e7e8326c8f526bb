"""Tests of the procedural dSprites dataset: the factor grid, indexing and the rendered images."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pyro_vi_ext.datasets import (
    DSPRITES_FACTOR_NAMES,
    DSPRITES_FACTOR_SIZES,
    DSprites,
    dsprites_factor_values,
    render_dsprites,
)

SQUARE, ELLIPSE, HEART = 0, 1, 2


@pytest.fixture(scope="module")
def full() -> DSprites:
    return DSprites()


def _classes(shape, scale, orientation, pos_x, pos_y) -> torch.Tensor:
    """Stack (broadcast) factor classes into an [n, 5] tensor."""
    cols = torch.broadcast_tensors(
        *(torch.as_tensor(c) for c in (shape, scale, orientation, pos_x, pos_y))
    )
    return torch.stack([c.reshape(-1) for c in cols], dim=-1)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # numpy's check: torch.testing.assert_close costs seconds of lazy imports on its first call.
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-6, atol=1e-9)


def _center_of_mass(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column centre of mass (in pixel-centre coordinates) of [n, H, W] images."""
    h, w = images.shape[-2:]
    mass = images.sum(dim=(-2, -1))
    rows = (images.sum(dim=-1) * torch.arange(h)).sum(dim=-1) / mass
    cols = (images.sum(dim=-2) * torch.arange(w)).sum(dim=-1) / mass
    return rows, cols


# --------------------------------------------------------------------------- grid and indices
def test_full_grid_sizes_and_values(full):
    assert len(full) == 737_280 == 3 * 6 * 40 * 32 * 32
    assert full.factor_names == DSPRITES_FACTOR_NAMES
    assert full.factor_sizes == DSPRITES_FACTOR_SIZES == (3, 6, 40, 32, 32)
    values = dsprites_factor_values()
    _assert_close(values["shape"], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    _assert_close(values["scale"], torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0]).double())
    orientation = values["orientation"]
    assert orientation.shape == (40,)
    assert orientation[0] == 0.0 and orientation[-1] == 2 * math.pi  # ends equal, as the original
    _assert_close(orientation.diff(), torch.full((39,), 2 * math.pi / 39).double())
    for name in ("posX", "posY"):
        _assert_close(values[name], torch.linspace(0, 1, 32, dtype=torch.float64))
    assert {k: v.numel() for k, v in full.factor_values.items()} == dict(
        zip(DSPRITES_FACTOR_NAMES, DSPRITES_FACTOR_SIZES, strict=True)
    )


def test_index_factor_round_trip_matches_original_order(full):
    index = torch.randint(0, len(full), (2000,), generator=torch.Generator().manual_seed(3))
    classes = full.latents_classes(index)
    assert classes.shape == (2000, 5) and classes.dtype == torch.int64
    # Original npz order: C order over (shape, scale, orientation, posX, posY).
    expected = np.stack(np.unravel_index(index.numpy(), DSPRITES_FACTOR_SIZES), axis=-1)
    np.testing.assert_array_equal(classes.numpy(), expected)
    assert torch.equal(full.classes_to_index(classes), index)
    # Values are the grid values at the classes.
    values = full.latents_values(index)
    grid = dsprites_factor_values()
    for k, name in enumerate(DSPRITES_FACTOR_NAMES):
        assert torch.equal(values[:, k], grid[name][classes[:, k]])
    # Known corners and negative indices.
    assert full.latents_classes(0).tolist() == [0, 0, 0, 0, 0]
    assert full.latents_classes(-1).tolist() == [2, 5, 39, 31, 31]
    assert full.latents_classes(1).tolist() == [0, 0, 0, 0, 1]  # posY varies fastest
    assert full.latents_values(-1).tolist() == [3.0, 1.0, 2 * math.pi, 1.0, 1.0]


def test_index_errors(full):
    with pytest.raises(IndexError):
        full.latents_classes(len(full))
    with pytest.raises(IndexError):
        full[-len(full) - 1]
    with pytest.raises(TypeError, match="ints"):
        full[1.5]
    with pytest.raises(ValueError, match="posX"):
        full.classes_to_index([0, 0, 0, 32, 0])
    with pytest.raises(ValueError, match="last dimension of size 5"):
        full.classes_to_index([0, 0, 0, 0])


def test_subgrid_keeps_full_grid_classes_and_images(full):
    small = DSprites(subgrid={"orientation": 10, "posX": 8, "posY": [0, 10, 31], "scale": 3})
    assert small.factor_sizes == (3, 3, 10, 8, 3)
    assert len(small) == 3 * 3 * 10 * 8 * 3
    assert small.grid_classes[3].tolist() == [0, 4, 9, 13, 18, 22, 27, 31]
    assert small.grid_classes[1].tolist() == [0, 2, 5]  # both ends kept
    orientation = small.grid_classes[2]
    assert orientation.numel() == 10 and 39 not in orientation.tolist()  # 10 distinct angles
    assert small.grid_classes[4].tolist() == [0, 10, 31]
    index = torch.arange(len(small))
    classes = small.latents_classes(index)
    assert torch.equal(small.classes_to_index(classes), index)
    assert len({tuple(c) for c in classes.tolist()}) == len(small)
    for k in range(5):
        assert set(classes[:, k].tolist()) == set(small.grid_classes[k].tolist())
    # The subgrid's images are the full grid's images at the same classes.
    some = index[::97]
    assert torch.equal(small.images(some), full.images_from_factors(classes[some]))
    with pytest.raises(ValueError, match="not in this subgrid"):
        small.classes_to_index([0, 1, 0, 0, 0])


def test_subgrid_validation():
    with pytest.raises(ValueError, match="unknown factor"):
        DSprites(subgrid={"pos_x": 4})
    with pytest.raises(ValueError, match="must be in"):
        DSprites(subgrid={"scale": 7})
    with pytest.raises(ValueError, match="repeated"):
        DSprites(subgrid={"posX": [1, 1]})
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        DSprites(subgrid={"posY": [32]})
    with pytest.raises(TypeError, match="integer class"):
        DSprites(subgrid={"posY": [0.5]})
    with pytest.raises(ValueError, match="image_size"):
        DSprites(image_size=4)
    with pytest.raises(ValueError, match="supersample"):
        DSprites(supersample=0)


def test_sample_factors_in_grid_and_reproducible():
    small = DSprites(subgrid={"posX": 4, "posY": 4, "orientation": 5})
    a = small.sample_factors(500, torch.Generator().manual_seed(7))
    b = small.sample_factors(500, torch.Generator().manual_seed(7))
    c = small.sample_factors(500, torch.Generator().manual_seed(8))
    assert a.shape == (500, 5) and torch.equal(a, b) and not torch.equal(a, c)
    for k in range(5):
        assert set(a[:, k].tolist()) == set(small.grid_classes[k].tolist())  # 500 draws cover all
    images = small.images_from_factors(a[:16])
    assert torch.equal(images, small.images(small.classes_to_index(a[:16])))


# ------------------------------------------------------------------------------------ images
def test_items_are_binary_64x64_images(full):
    image, index = full[123_456]
    assert index == 123_456
    assert image.shape == (64, 64) and image.dtype == torch.float32
    assert set(image.unique().tolist()) == {0.0, 1.0}
    flat = DSprites(flatten=True)[123_456][0]
    assert flat.shape == (4096,) and torch.equal(flat, image.reshape(-1))
    batch = full.images(
        torch.randint(0, len(full), (64,), generator=torch.Generator().manual_seed(0))
    )
    assert batch.shape == (64, 64, 64)
    assert ((batch == 0) | (batch == 1)).all()
    assert (batch.sum(dim=(1, 2)) > 20).all()  # every image shows a shape
    assert DSprites(image_size=32).images(torch.arange(4)).shape == (4, 32, 32)


def test_rendering_is_deterministic_and_batch_consistent(full):
    index = torch.randint(0, len(full), (40,), generator=torch.Generator().manual_seed(1))
    batch = full.images(index)
    assert torch.equal(batch, full.images(index))
    assert torch.equal(batch[0], full[int(index[0])][0])
    # Rendering one image alone or in a batch of mixed shapes gives the same pixels.
    assert torch.equal(full.images(index[5:6])[0], batch[5])
    loader = DataLoader(full, batch_size=8, sampler=index.tolist())
    x, idx = next(iter(loader))
    assert torch.equal(idx, index[:8]) and torch.equal(x, batch[:8])


def test_shape_moves_right_with_posx_and_down_with_posy(full):
    for shape in (SQUARE, ELLIPSE, HEART):
        pos = torch.arange(32)
        right = full.images_from_factors(_classes(shape, 3, 7, pos, 12))
        down = full.images_from_factors(_classes(shape, 3, 7, 12, pos))
        rows_r, cols_r = _center_of_mass(right)
        rows_d, cols_d = _center_of_mass(down)
        assert (cols_r.diff() > 0).all() and torch.allclose(rows_r, rows_r[0].expand(32))
        assert (rows_d.diff() > 0).all() and torch.allclose(cols_d, cols_d[0].expand(32))
        # The 32 positions are one pixel apart: each step is an exact one-pixel translation.
        _assert_close(cols_r.diff(), torch.ones(31))
        assert torch.equal(right[1:], torch.roll(right[:-1], 1, dims=-1))
    # posX class c puts the centre at 16.5 + c pixels (pixel i spans [i, i + 1)).
    square = full.images_from_factors(_classes(SQUARE, 5, 0, torch.tensor([0, 15, 31]), 4))
    _assert_close(_center_of_mass(square)[1] + 0.5, torch.tensor([16.5, 31.5, 47.5]))


def test_area_grows_with_scale(full):
    for shape in (SQUARE, ELLIPSE, HEART):
        for orientation in (0, 11, 25):
            images = full.images_from_factors(_classes(shape, torch.arange(6), orientation, 16, 16))
            area = images.sum(dim=(1, 2))
            assert (area.diff() > 0).all()
            # Area goes as scale squared: scale 1 vs 0.5 is 4 times, up to pixelation.
            assert 3.4 < (area[-1] / area[0]).item() < 4.6


def test_scale_one_square_is_about_a_third_of_the_width(full):
    square = full.images_from_factors(_classes(SQUARE, 5, 0, 16, 16))[0]
    cols = torch.nonzero(square.any(dim=0)).squeeze(1)
    rows = torch.nonzero(square.any(dim=1)).squeeze(1)
    width = int(cols.max() - cols.min() + 1)
    assert 18 <= width <= 23 and int(rows.max() - rows.min() + 1) == width
    # Axis-aligned at orientation 0: a full square, but for at most its four corner pixels,
    # which are about half covered at this size.
    assert width * width - 4 <= int(square.sum()) <= width * width


def test_every_shape_stays_inside_the_canvas(full):
    corners = torch.tensor([0, 31])
    classes = _classes(
        torch.arange(3)[:, None, None, None],
        5,
        torch.arange(40)[None, :, None, None],
        corners[None, None, :, None],
        corners[None, None, None, :],
    )
    images = full.images_from_factors(classes)
    border = torch.cat(
        [images[:, :2].flatten(1), images[:, -2:].flatten(1), images[:, :, :2].flatten(1)], 1
    )
    border = torch.cat([border, images[:, :, -2:].flatten(1)], 1)
    assert border.sum() == 0  # two empty pixels all around, at the largest scale
    # Nothing is clipped: the area is the same at every corner.
    area = images.sum(dim=(1, 2)).reshape(3, 40, 4)
    assert (area == area[..., :1]).all()


def test_orientation_ends_render_identically(full):
    ends = torch.tensor([0, 39])
    for shape in (SQUARE, ELLIPSE, HEART):
        images = full.images_from_factors(_classes(shape, 4, ends, 9, 20))
        assert torch.equal(images[0], images[1])
    # ... while a quarter turn changes a heart.
    hearts = full.images_from_factors(_classes(HEART, 4, torch.tensor([0, 10]), 9, 20))
    assert (hearts[0] != hearts[1]).sum() > 50


def test_shapes_differ_and_heart_points_down():
    # Centred on the canvas (pos 0.5 is the corner shared by the four middle pixels), so that
    # flipping the array is a reflection about the shape's centre.
    square, ellipse, heart = render_dsprites(torch.arange(3), 1.0, 0.0, 0.5, 0.5)
    for a, b in ((square, heart), (square, ellipse), (ellipse, heart)):
        assert (a != b).sum() > 80
    # A square has 90-degree symmetry, an ellipse 180-degree symmetry, a heart neither.
    assert torch.equal(square, square.T)
    assert torch.equal(ellipse, torch.flip(ellipse, dims=(0, 1)))
    assert not torch.equal(ellipse, ellipse.T)
    assert (heart != torch.flip(heart, dims=(0,))).sum() > 40
    assert (heart != heart.T).sum() > 40
    # Heart: left-right symmetric, lobes up (its centre of mass lies above the centre).
    assert torch.equal(heart, torch.flip(heart, dims=(1,)))
    rows, cols = _center_of_mass(heart[None])
    assert rows.item() + 0.5 < 32.0 - 1.0 and cols.item() + 0.5 == pytest.approx(32.0)
    # Ellipse long axis is horizontal at orientation 0 and vertical after a quarter turn.
    turned = render_dsprites(ELLIPSE, 1.0, torch.tensor([0.0, math.pi / 2]), 0.5, 0.5)
    assert turned[0].any(dim=0).sum() > 1.5 * turned[0].any(dim=1).sum()
    assert torch.equal(turned[1], turned[0].T)


# ----------------------------------------------------------------------- continuous renderer
def test_render_dsprites_matches_dataset_and_broadcasts(full):
    index = torch.randint(0, len(full), (30,), generator=torch.Generator().manual_seed(5))
    classes = full.latents_classes(index)
    values = full.latents_values(index)
    images = render_dsprites(classes[:, 0], *values[:, 1:].unbind(-1))
    assert torch.equal(images, full.images(index))
    traversal = render_dsprites(HEART, 1.0, torch.linspace(0, math.pi, 7), 0.5, 0.5)
    assert traversal.shape == (7, 64, 64)
    grid = render_dsprites(torch.arange(3)[:, None], torch.linspace(0.5, 1.0, 4), 0.0, 0.2, 0.8)
    assert grid.shape == (3, 4, 64, 64)
    assert render_dsprites(0, 1.0, 0.0, 0.5, 0.5, image_size=128).shape == (128, 128)
    # A continuous position between two grid points lands between them.
    between = render_dsprites(SQUARE, 0.8, 0.0, torch.tensor([0.0, 0.5 / 31, 1 / 31]), 0.3)
    cols = _center_of_mass(between)[1]
    assert cols[0] < cols[1] < cols[2]
    # Off-grid values clip at the border instead of failing.
    clipped = render_dsprites(SQUARE, 1.5, 0.3, 1.2, -0.1)
    assert 0 < clipped.sum() < render_dsprites(SQUARE, 1.5, 0.3, 0.5, 0.5).sum()


def test_render_dsprites_validation():
    with pytest.raises(ValueError, match="shape must hold classes"):
        render_dsprites(3, 1.0, 0.0, 0.5, 0.5)
    with pytest.raises(TypeError, match="integer classes"):
        render_dsprites(torch.tensor([1.0]), 1.0, 0.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="orientation"):
        render_dsprites(0, 1.0, float("nan"), 0.5, 0.5)

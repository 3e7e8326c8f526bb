"""Procedural dSprites: the factor grid of Matthey et al. (2017), rendered on demand.

The original dSprites file holds 737,280 binary 64x64 images, one per point of the grid
shape (3) x scale (6) x orientation (40) x posX (32) x posY (32). This module rebuilds that grid
exactly (same factor values, same index order) and draws each image from its factors when it is
requested, so nothing of size 3 GB is ever held in memory. The pixels do not match the original
file (the shapes are drawn from implicit equations here), the factors and indices do.

References
----------
.. [1] L. Matthey, I. Higgins, D. Hassabis and A. Lerchner (2017). dSprites: Disentanglement
   testing Sprites dataset. https://github.com/deepmind/dsprites-dataset
.. [2] R. T. Q. Chen, X. Li, R. Grosse and D. Duvenaud (2018). Isolating Sources of
   Disentanglement in Variational Autoencoders. NeurIPS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyro_vi_ext.datasets._render import NUM_SHAPES, render_batch

__all__ = [
    "DSPRITES_FACTOR_NAMES",
    "DSPRITES_FACTOR_SIZES",
    "DSPRITES_SHAPE_NAMES",
    "DSprites",
    "dsprites_factor_values",
    "render_dsprites",
]

DSPRITES_FACTOR_NAMES: tuple[str, ...] = ("shape", "scale", "orientation", "posX", "posY")
"""Names of the five varying dSprites factors, in index order (the original's constant ``color``
column is left out)."""

DSPRITES_FACTOR_SIZES: tuple[int, ...] = (3, 6, 40, 32, 32)
"""Number of values of each factor on the full grid (737,280 combinations)."""

DSPRITES_SHAPE_NAMES: tuple[str, ...] = ("square", "ellipse", "heart")
"""Shape of each shape class 0, 1, 2 (the original stores the values 1.0, 2.0, 3.0)."""

IndexLike = int | Sequence[int] | np.ndarray | Tensor

MAX_SCALE = 4.0


def _full_grid_values() -> dict[str, Tensor]:
    f64 = torch.float64
    return {
        "shape": torch.arange(1, NUM_SHAPES + 1, dtype=f64),
        "scale": torch.linspace(0.5, 1.0, 6, dtype=f64),
        "orientation": torch.linspace(0.0, 2.0 * math.pi, 40, dtype=f64),
        "posX": torch.linspace(0.0, 1.0, 32, dtype=f64),
        "posY": torch.linspace(0.0, 1.0, 32, dtype=f64),
    }


_FULL_VALUES = _full_grid_values()


def dsprites_factor_values() -> dict[str, Tensor]:
    """Values of every factor on the full dSprites grid, as in the original ``latents_values``.

    Returns
    -------
    dict of str to Tensor
        float64 tensors keyed by :data:`DSPRITES_FACTOR_NAMES`: ``shape`` is ``[1., 2., 3.]``,
        ``scale`` ``linspace(0.5, 1, 6)``, ``orientation`` ``linspace(0, 2*pi, 40)`` (both ends
        included, so the first and last orientation are the same angle), ``posX`` and ``posY``
        ``linspace(0, 1, 32)``.

    Examples
    --------
    >>> dsprites_factor_values()["scale"]
    tensor([0.5000, 0.6000, 0.7000, 0.8000, 0.9000, 1.0000], dtype=torch.float64)
    """
    return {name: values.clone() for name, values in _FULL_VALUES.items()}


def _check_supersample(supersample: int) -> int:
    if isinstance(supersample, bool) or not isinstance(supersample, int):
        raise TypeError(f"supersample must be an int, got {type(supersample).__name__}")
    if not 1 <= supersample <= 8:
        raise ValueError(f"supersample must be in [1, 8], got {supersample}")
    return supersample


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    return image_size


def render_dsprites(
    shape: IndexLike,
    scale: float | Tensor,
    orientation: float | Tensor,
    pos_x: float | Tensor,
    pos_y: float | Tensor,
    *,
    image_size: int = 64,
    supersample: int = 3,
) -> Tensor:
    """Render dSprites images for arbitrary, possibly continuous, factor values.

    The arguments broadcast against each other, which makes latent-traversal style figures a
    one-liner. Values off the grid are allowed (a scale above 1 or a position outside [0, 1] may
    clip the shape at the border).

    Parameters
    ----------
    shape : int or sequence of int or Tensor
        Shape class: 0 square, 1 ellipse, 2 heart (class indices, not the 1.0/2.0/3.0 values of
        ``latents_values``).
    scale : float or Tensor
        Size factor in (0, 4]; the grid uses 0.5 to 1, where a scale-1 square is about a third
        of the width.
    orientation : float or Tensor
        Counter-clockwise rotation on screen, radians.
    pos_x, pos_y : float or Tensor
        Position in [0, 1]; ``pos_x`` moves the shape right (column index), ``pos_y`` down (row
        index), as the array is displayed by ``imshow``.
    image_size : int, default 64
        Side of the square image in pixels; the geometry is relative to the image width.
    supersample : int, default 3
        Sub-pixel samples per axis, at most 8; a pixel is on when at least half of them are
        inside (a binarised anti-aliasing; 1 is plain point sampling at the pixel centre, about
        four times faster than 3).

    Returns
    -------
    Tensor
        float32 tensor of 0/1 values with shape ``broadcast_shape + (image_size, image_size)``.

    Notes
    -----
    Geometry, relative to the image width ``W``: the centre lies at ``(16.5 + 31 * pos) / 64 * W``
    from the left (top) edge, so on a 64-pixel image the 32 grid positions are the pixel centres
    16.5 to 47.5, one pixel apart, and every grid shape keeps at least two empty pixels to the
    border. At scale 1 the square's side is ``0.32 W`` (20.5 pixels), the ellipse's axes
    ``0.43 W`` by ``0.22 W`` (long axis horizontal at orientation 0) and the heart (the curve
    ``(x^2 + y^2 - 1)^3 = x^2 y^3``, lobes up at orientation 0) about ``0.36 W`` wide. Shapes
    rotate about their centre; orientations are reduced modulo 2*pi in float64, so 0 and 2*pi
    render identically.

    Examples
    --------
    >>> import math, torch
    >>> frames = render_dsprites(2, 1.0, torch.linspace(0, math.pi, 8), 0.5, 0.5)
    >>> frames.shape
    torch.Size([8, 64, 64])
    """
    image_size = _check_image_size(image_size)
    supersample = _check_supersample(supersample)
    shape_t = torch.as_tensor(shape)
    if shape_t.is_floating_point() or shape_t.is_complex() or shape_t.dtype == torch.bool:
        raise TypeError(f"shape must hold integer classes 0, 1, 2, got dtype {shape_t.dtype}")
    if shape_t.numel() and (int(shape_t.min()) < 0 or int(shape_t.max()) >= NUM_SHAPES):
        raise ValueError(
            "shape must hold classes 0 (square), 1 (ellipse) or 2 (heart), got values in "
            f"[{int(shape_t.min())}, {int(shape_t.max())}]"
        )
    values = [
        torch.as_tensor(v, dtype=torch.float64) if not isinstance(v, Tensor) else v.detach()
        for v in (scale, orientation, pos_x, pos_y)
    ]
    for name, v in zip(("scale", "orientation", "pos_x", "pos_y"), values, strict=True):
        if v.is_complex() or not torch.isfinite(v.to(torch.float64)).all():
            raise ValueError(f"{name} must hold finite real values")
    if values[0].numel() and not ((values[0] > 0).all() and (values[0] <= MAX_SCALE).all()):
        raise ValueError(f"scale must lie in (0, {MAX_SCALE:g}]")
    batch_shape = torch.broadcast_shapes(shape_t.shape, *(v.shape for v in values))
    flat = [t.broadcast_to(batch_shape).reshape(-1).cpu() for t in (shape_t, *values)]
    images = render_batch(
        flat[0].to(torch.int64), *flat[1:], image_size=image_size, supersample=supersample
    )
    return images.to(torch.float32).reshape(*batch_shape, image_size, image_size)


def _resolve_subgrid(
    subgrid: Mapping[str, int | Sequence[int]] | None,
) -> tuple[Tensor, ...]:
    """Full-grid classes kept for each factor."""
    subgrid = {} if subgrid is None else dict(subgrid)
    unknown = sorted(set(subgrid) - set(DSPRITES_FACTOR_NAMES))
    if unknown:
        raise ValueError(
            f"subgrid has unknown factor name(s) {unknown}; valid names are "
            f"{list(DSPRITES_FACTOR_NAMES)}"
        )
    kept = []
    for name, size in zip(DSPRITES_FACTOR_NAMES, DSPRITES_FACTOR_SIZES, strict=True):
        spec = subgrid.get(name, size)
        if isinstance(spec, bool):
            raise TypeError(f"subgrid[{name!r}] must be an int or a sequence of ints")
        if isinstance(spec, int | np.integer):
            count = int(spec)
            if not 1 <= count <= size:
                raise ValueError(f"subgrid[{name!r}] = {count} must be in [1, {size}]")
            if count == size:
                classes = np.arange(size)
            elif name == "orientation":
                # `count` distinct angles over one turn; class size - 1 (2*pi) repeats class 0.
                classes = np.round(np.linspace(0, size - 1, count, endpoint=False))
            else:
                classes = np.round(np.linspace(0, size - 1, count))
            classes = classes.astype(np.int64)
        else:
            classes = np.asarray(list(spec) if not isinstance(spec, Tensor) else spec.cpu())
            if classes.ndim != 1 or classes.size == 0:
                raise ValueError(f"subgrid[{name!r}] must be a non-empty 1-d sequence of classes")
            if not np.issubdtype(classes.dtype, np.integer):
                raise TypeError(
                    f"subgrid[{name!r}] must hold integer class indices of the full grid, "
                    f"got dtype {classes.dtype}"
                )
            if classes.min() < 0 or classes.max() >= size:
                raise ValueError(f"subgrid[{name!r}] classes must lie in [0, {size - 1}]")
            if np.unique(classes).size != classes.size:
                raise ValueError(f"subgrid[{name!r}] has repeated classes")
            classes = np.sort(classes).astype(np.int64)
        kept.append(torch.from_numpy(classes))
    return tuple(kept)


def _as_index_tensor(index: IndexLike, name: str) -> Tensor:
    t = torch.as_tensor(index)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.to(torch.int64)


class DSprites(Dataset[tuple[Tensor, int]]):
    """dSprites rendered on demand from the factor index.

    The dataset enumerates a grid of the five dSprites factors (shape, scale, orientation, posX,
    posY), by default the full original grid of 737,280 points in the original order (the last
    factor, posY, varies fastest), so that index ``i`` of ``DSprites()`` carries the factors of
    image ``i`` of the original file. Images are drawn when asked for; a batch of indices is
    rendered in one vectorized call (see :meth:`images`, also used by ``DataLoader`` through
    ``__getitems__``).

    Parameters
    ----------
    subgrid : mapping of str to int or sequence of int, optional
        A smaller grid for quick experiments and tests. For each factor name, either a sequence of
        class indices of the full grid to keep, or an int ``k``: ``k`` classes evenly spread over
        the full range (both ends included; for orientation, ``k`` distinct angles over one turn,
        since the last class repeats the first). Factors not named keep all their values.
    image_size : int, default 64
        Side of the images in pixels (the geometry scales with it).
    flatten : bool, default False
        Return images as ``[image_size ** 2]`` vectors instead of ``[image_size, image_size]``.
    supersample : int, default 3
        Sub-pixel samples per axis, at most 8; a pixel is on when at least half of them are
        inside (a binarised anti-aliasing; 1 is plain point sampling at the pixel centre, about
        four times faster than 3).

    Attributes
    ----------
    factor_names : tuple of str
        ``("shape", "scale", "orientation", "posX", "posY")``.
    factor_sizes : tuple of int
        Number of values of each factor in this dataset's grid.
    grid_classes : tuple of Tensor
        Full-grid class indices kept for each factor.

    Notes
    -----
    An item is ``(image, index)``: a float32 0/1 image and its integer index in this dataset. The
    index is what a Pyro model needs to subsample a data plate; the factors of a batch are
    ``dataset.latents_classes(index)``. ``latents_classes`` and ``latents_values`` follow the
    original ``.npz`` (classes of the full grid; shape values 1., 2., 3.) without its constant
    ``color`` column, whatever the subgrid. Shapes: 0 square, 1 ellipse, 2 heart.

    Examples
    --------
    >>> from torch.utils.data import DataLoader
    >>> data = DSprites(subgrid={"orientation": 10, "posX": 8, "posY": 8})
    >>> len(data)
    11520
    >>> x, idx = next(iter(DataLoader(data, batch_size=256, shuffle=True)))
    >>> x.shape, data.latents_classes(idx).shape
    (torch.Size([256, 64, 64]), torch.Size([256, 5]))

    References
    ----------
    .. [1] L. Matthey, I. Higgins, D. Hassabis and A. Lerchner (2017). dSprites: Disentanglement
       testing Sprites dataset. https://github.com/deepmind/dsprites-dataset
    .. [2] R. T. Q. Chen, X. Li, R. Grosse and D. Duvenaud (2018). Isolating Sources of
       Disentanglement in Variational Autoencoders. NeurIPS.
    """

    factor_names: tuple[str, ...] = DSPRITES_FACTOR_NAMES

    def __init__(
        self,
        subgrid: Mapping[str, int | Sequence[int]] | None = None,
        *,
        image_size: int = 64,
        flatten: bool = False,
        supersample: int = 3,
    ) -> None:
        self.image_size = _check_image_size(image_size)
        self.supersample = _check_supersample(supersample)
        self.flatten = bool(flatten)
        self.grid_classes: tuple[Tensor, ...] = _resolve_subgrid(subgrid)
        self.factor_sizes: tuple[int, ...] = tuple(int(c.numel()) for c in self.grid_classes)
        self._strides = torch.tensor(
            [int(np.prod(self.factor_sizes[k + 1 :])) for k in range(5)], dtype=torch.int64
        )
        self._len = int(np.prod(self.factor_sizes))
        full_values = _FULL_VALUES
        self._grid_values = tuple(
            full_values[name][classes]
            for name, classes in zip(DSPRITES_FACTOR_NAMES, self.grid_classes, strict=True)
        )
        # Position of each full-grid class inside this grid (-1 where not kept).
        self._local = []
        for size, classes in zip(DSPRITES_FACTOR_SIZES, self.grid_classes, strict=True):
            local = torch.full((size,), -1, dtype=torch.int64)
            local[classes] = torch.arange(classes.numel())
            self._local.append(local)

    # ------------------------------------------------------------------ grid
    @property
    def factor_values(self) -> dict[str, Tensor]:
        """Values of each factor in this dataset's grid (float64, keyed by factor name)."""
        return dict(zip(DSPRITES_FACTOR_NAMES, self._grid_values, strict=True))

    def __len__(self) -> int:
        return self._len

    def _check_index(self, index: IndexLike) -> Tensor:
        idx = _as_index_tensor(index, "index")
        if idx.numel() and (int(idx.min()) < -self._len or int(idx.max()) >= self._len):
            raise IndexError(f"index out of range for a DSprites grid of {self._len} images")
        return torch.where(idx < 0, idx + self._len, idx)

    def _local_classes(self, index: IndexLike) -> Tensor:
        idx = self._check_index(index)
        sizes = torch.tensor(self.factor_sizes, dtype=torch.int64)
        return torch.div(idx[..., None], self._strides, rounding_mode="floor") % sizes

    def latents_classes(self, index: IndexLike) -> Tensor:
        """Full-grid class of each factor for ``index``.

        Parameters
        ----------
        index : int or sequence of int or Tensor
            Indices into this dataset (negative indices count from the end).

        Returns
        -------
        Tensor
            int64 tensor of shape ``index.shape + (5,)``, columns in :attr:`factor_names` order,
            as the original ``latents_classes`` without its ``color`` column.
        """
        local = self._local_classes(index)
        cols = [self.grid_classes[k][local[..., k]] for k in range(5)]
        return torch.stack(cols, dim=-1)

    def latents_values(self, index: IndexLike) -> Tensor:
        """Factor values for ``index``, as the original ``latents_values`` without ``color``.

        Returns
        -------
        Tensor
            float64 tensor of shape ``index.shape + (5,)``: shape (1., 2., 3.), scale,
            orientation (radians), posX, posY.
        """
        local = self._local_classes(index)
        cols = [self._grid_values[k][local[..., k]] for k in range(5)]
        return torch.stack(cols, dim=-1)

    def classes_to_index(self, classes: Sequence[Sequence[int]] | np.ndarray | Tensor) -> Tensor:
        """Index in this dataset of full-grid factor classes (inverse of :meth:`latents_classes`).

        Parameters
        ----------
        classes : array-like of int, shape ``[..., 5]``
            Full-grid classes in :attr:`factor_names` order; each must belong to this grid.

        Returns
        -------
        Tensor
            int64 indices of shape ``classes.shape[:-1]``.
        """
        c = _as_index_tensor(classes, "classes")
        if c.ndim == 0 or c.shape[-1] != 5:
            raise ValueError(f"classes must have a last dimension of size 5, got {tuple(c.shape)}")
        index = torch.zeros(c.shape[:-1], dtype=torch.int64)
        for k, (name, size) in enumerate(
            zip(DSPRITES_FACTOR_NAMES, DSPRITES_FACTOR_SIZES, strict=True)
        ):
            col = c[..., k]
            if col.numel() and (int(col.min()) < 0 or int(col.max()) >= size):
                raise ValueError(f"classes[..., {k}] ({name}) must lie in [0, {size - 1}]")
            local = self._local[k][col]
            if bool((local < 0).any()):
                raise ValueError(f"classes[..., {k}] ({name}) holds classes not in this subgrid")
            index = index + local * self._strides[k]
        return index

    def sample_factors(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` factor combinations uniformly from this dataset's grid.

        Parameters
        ----------
        n : int
            Number of draws (with replacement).
        generator : torch.Generator, optional
            Source of randomness, for reproducible draws.

        Returns
        -------
        Tensor
            int64 full-grid classes of shape ``[n, 5]``; render them with
            :meth:`images_from_factors`.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        index = torch.randint(0, self._len, (n,), generator=generator)
        return self.latents_classes(index)

    # ---------------------------------------------------------------- images
    def _render_classes(self, classes: Tensor) -> Tensor:
        full = _FULL_VALUES
        flat = classes.reshape(-1, 5)
        images = render_batch(
            flat[:, 0],
            full["scale"][flat[:, 1]],
            full["orientation"][flat[:, 2]],
            full["posX"][flat[:, 3]],
            full["posY"][flat[:, 4]],
            image_size=self.image_size,
            supersample=self.supersample,
        ).to(torch.float32)
        tail = (self.image_size**2,) if self.flatten else (self.image_size, self.image_size)
        return images.reshape(*classes.shape[:-1], *tail)

    def images(self, index: IndexLike) -> Tensor:
        """Render the images at ``index`` in one vectorized call.

        Returns
        -------
        Tensor
            float32 0/1 tensor of shape ``index.shape + (image_size, image_size)``, or
            ``index.shape + (image_size ** 2,)`` when ``flatten`` is set.
        """
        return self._render_classes(self.latents_classes(index))

    def images_from_factors(self, classes: Sequence[Sequence[int]] | np.ndarray | Tensor) -> Tensor:
        """Render images from full-grid factor classes of shape ``[..., 5]``.

        The classes must belong to this dataset's grid (as :meth:`sample_factors` returns them).
        """
        return self.images(self.classes_to_index(classes))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            if isinstance(index, Tensor) and index.ndim == 0:
                index = int(index)
            else:
                raise TypeError(
                    "DSprites indices must be ints; use .images(indices) for a batch, "
                    f"got {type(index).__name__}"
                )
        idx = int(self._check_index(int(index)))
        return self.images(idx), idx

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """Batched fetch used by ``torch.utils.data.DataLoader`` (renders once per batch)."""
        idx = self._check_index(list(indices))
        batch = self.images(idx)
        return list(zip(batch.unbind(0), idx.tolist(), strict=True))

    def __repr__(self) -> str:
        grid = ", ".join(
            f"{n}={s}" for n, s in zip(DSPRITES_FACTOR_NAMES, self.factor_sizes, strict=True)
        )
        return (
            f"DSprites({grid}; {self._len} images of {self.image_size}x{self.image_size}, "
            f"supersample={self.supersample}, flatten={self.flatten})"
        )

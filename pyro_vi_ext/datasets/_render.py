"""Batched procedural renderer for dSprites-like images (private).

Geometry, in units of the image width (the canvas is the unit square, column ``x`` to the right,
row ``y`` downwards, as an array is displayed by ``matplotlib.pyplot.imshow``):

* every shape is defined in a local frame where the square has half-side 1; at ``scale`` s the
  local unit is ``s * UNIT`` of the image width, so a scale-1 square is about 0.32 of the width
  (about 20.5 pixels of 64);
* shapes: square ``max(|u|, |v|) <= 1``; ellipse ``(u / 1.35)^2 + (v / 0.7)^2 <= 1`` (long axis
  horizontal at orientation 0); heart ``(u^2 + w^2 - 1)^3 - u^2 w^3 <= 0`` with ``w = v + 0.118``
  (the classic implicit heart, recentred on its bounding box, lobes up at orientation 0). Their
  circumradii are sqrt(2), 1.35 and about 1.337 local units;
* the orientation rotates the shape counter-clockwise on screen about its centre;
* ``pos`` in [0, 1] maps to the centre ``MARGIN + pos * (1 - 2 * MARGIN)`` with
  ``MARGIN = 16.5 / 64``: on a 64-pixel canvas the 32 grid positions are the pixel centres 16.5,
  17.5, ..., 47.5, one pixel apart, and a scale-1 shape (circumradius about 14.5 pixels) stays at
  least 2 pixels away from the border in every orientation.

A pixel is on when at least half of its ``supersample ** 2`` sub-pixel samples are inside the
shape (a coverage threshold, i.e. a binarised anti-aliased rendering). Only a square patch around
each shape is evaluated, then scattered into the canvas, so the cost is independent of the canvas
size and about ``(2 * circumradius * supersample) ** 2`` inside-tests per image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

UNIT = 0.16
MARGIN = 16.5 / 64.0
ELLIPSE_AXES = (1.35, 0.7)
HEART_SHIFT = 0.118
# Largest distance from the rotation centre to the shape boundary, in local units (square).
CIRCUMRADIUS = math.sqrt(2.0)

NUM_SHAPES = 3


def _inside(shape: int, ux: Tensor, uy: Tensor, vx: Tensor, vy: Tensor) -> Tensor:
    """Test whether local coordinates lie inside shape ``shape``.

    The coordinates are ``u = ux + uy`` (right) and ``v = vx + vy`` (up), with ``ux``, ``vx`` of
    shape ``[n, 1, W]`` and ``uy``, ``vy`` of shape ``[n, H, 1]``, so that only the sums are full
    ``[n, H, W]`` tensors (updated in place).
    """
    if shape == 0:  # square: max(|u|, |v|) <= 1
        u = (ux + uy).abs_()
        return torch.maximum(u, (vx + vy).abs_(), out=u) <= 1.0
    if shape == 1:  # ellipse: (u / a)^2 + (v / b)^2 <= 1
        a, b = ELLIPSE_AXES
        u2 = (ux / a + uy / a).square_()
        return u2.add_((vx / b + vy / b).square_()) <= 1.0
    # heart: (u^2 + w^2 - 1)^3 <= u^2 w^3 with w = v + shift
    u2 = (ux + uy).square_()
    w = vx + (vy + HEART_SHIFT)
    w2 = w.square()
    r = (u2 + w2).sub_(1.0)
    lhs = r.square().mul_(r)
    return lhs <= u2.mul_(w2).mul_(w)


def _coverage(inside: Tensor, width: int, ss: int) -> Tensor:
    """Count the inside sub-samples per pixel (slice additions beat a strided ``sum`` on CPU)."""
    blocks = inside.view(torch.uint8).reshape(-1, width, ss, width, ss)
    rows = blocks[:, :, 0].clone()
    for i in range(1, ss):
        rows += blocks[:, :, i]
    count = rows[..., 0].clone()
    for j in range(1, ss):
        count += rows[..., j]
    return count


def render_batch(
    shape: Tensor,
    scale: Tensor,
    orientation: Tensor,
    pos_x: Tensor,
    pos_y: Tensor,
    image_size: int,
    supersample: int,
) -> Tensor:
    """Render ``n`` binary images.

    Parameters
    ----------
    shape : Tensor
        Integer shape classes in {0, 1, 2}, shape ``[n]``.
    scale, orientation, pos_x, pos_y : Tensor
        Continuous factor values, shape ``[n]``, any floating dtype (angles are reduced modulo
        2*pi in float64 so that 0 and 2*pi render identically).
    image_size : int
        Side of the square canvas in pixels.
    supersample : int
        Sub-pixel samples per axis.

    Returns
    -------
    Tensor
        Boolean tensor of shape ``[n, image_size, image_size]``.
    """
    n = shape.shape[0]
    size = image_size
    ss = supersample
    out = torch.zeros(n, size * size + 1, dtype=torch.bool)
    if n == 0:
        return out[:, :-1].reshape(0, size, size)

    scale64 = scale.to(torch.float64)
    angle = torch.remainder(orientation.to(torch.float64), 2.0 * math.pi)
    cos = torch.cos(angle).to(torch.float32)
    sin = torch.sin(angle).to(torch.float32)
    # Pixel coordinates are continuous: pixel i covers [i, i + 1).
    unit_px = UNIT * size * scale64
    cx = (MARGIN + pos_x.to(torch.float64) * (1.0 - 2.0 * MARGIN)) * size
    cy = (MARGIN + pos_y.to(torch.float64) * (1.0 - 2.0 * MARGIN)) * size
    anchor_x = torch.floor(cx)
    anchor_y = torch.floor(cy)
    frac_x = (cx - anchor_x).to(torch.float32)
    frac_y = (cy - anchor_y).to(torch.float32)
    inv_unit = (1.0 / unit_px.clamp_min(1e-12)).to(torch.float32)

    # The shape lies within the circumradius of the centre; pixels anchor - half .. anchor + half
    # cover [centre - frac - half, centre - frac + half + 1) with 0 <= frac < 1, enough for it.
    half = int(math.ceil(CIRCUMRADIUS * UNIT * size * float(scale64.abs().max())))
    width = 2 * half + 1
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    sub = (torch.arange(ss, dtype=torch.float32) + 0.5) / ss
    samples = (offsets[:, None] + sub[None, :]).reshape(-1)  # [width * ss], pixel-major

    # Flat canvas index of every patch pixel; pixels off the canvas go to a trash slot.
    pix = torch.arange(-half, half + 1, dtype=torch.int64)
    rows = anchor_y.to(torch.int64)[:, None] + pix[None, :]
    cols = anchor_x.to(torch.int64)[:, None] + pix[None, :]
    row_ok = (rows >= 0) & (rows < size)
    col_ok = (cols >= 0) & (cols < size)
    flat = rows[:, :, None] * size + cols[:, None, :]
    flat = torch.where(row_ok[:, :, None] & col_ok[:, None, :], flat, size * size)
    flat = flat.reshape(n, width * width)

    patch = torch.empty(n, width, width, dtype=torch.bool)
    need = (ss * ss + 1) // 2  # at least half of the sub-samples
    for k in range(NUM_SHAPES):
        sel = torch.nonzero(shape == k).squeeze(1)
        if sel.numel() == 0:
            continue
        # On-screen offsets from the centre: x to the right, y upwards.
        dx = (samples[None, :] - frac_x[sel, None]) * inv_unit[sel, None]
        dy = (frac_y[sel, None] - samples[None, :]) * inv_unit[sel, None]
        c = cos[sel, None]
        s = sin[sel, None]
        # Rotate the sample points clockwise, i.e. the shape counter-clockwise:
        # u = c dx + s dy, v = c dy - s dx, split into per-column and per-row parts.
        inside = _inside(
            k,
            (c * dx)[:, None, :],
            (s * dy)[:, :, None],
            (-s * dx)[:, None, :],
            (c * dy)[:, :, None],
        )
        patch[sel] = _coverage(inside, width, ss) >= need if ss > 1 else inside
    out.scatter_(1, flat, patch.reshape(n, -1))
    return out[:, :-1].reshape(n, size, size)

"""Ground-truth datasets for disentanglement experiments.

:class:`DSprites` rebuilds the dSprites factor grid (Matthey et al., 2017) and renders its binary
images on demand; :func:`render_dsprites` draws sprites for arbitrary factor values.
"""

from pyro_vi_ext.datasets.dsprites import (
    DSPRITES_FACTOR_NAMES,
    DSPRITES_FACTOR_SIZES,
    DSPRITES_SHAPE_NAMES,
    DSprites,
    dsprites_factor_values,
    render_dsprites,
)

__all__ = [
    "DSPRITES_FACTOR_NAMES",
    "DSPRITES_FACTOR_SIZES",
    "DSPRITES_SHAPE_NAMES",
    "DSprites",
    "dsprites_factor_values",
    "render_dsprites",
]

"""Minibatch scaling for models and guides that take only their data (``fit(data_plate=...)``).

A model written in the style of Pyro's tutorials sizes its data plate by its argument::

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        with pyro.plate("data", x.shape[0]):          # or len(x)
            pyro.sample("y", dist.Normal((x * w).sum(-1), 1.0), obs=y)

Given a minibatch of ``B`` rows of an ``N``-row data set, that plate has size ``B`` and scale 1, so
the minibatch log-likelihood would count as if the data had ``B`` rows. :class:`DataPlateScaling`
wraps such a call and turns the named plate into a subsampled plate of full size ``N``: every
sample site inside it gets ``site["scale"]`` multiplied by ``N / B`` and its plate frame's
``full_size`` set to ``N``, exactly the two fields Pyro's own subsampled plate,
``pyro.plate(name, size=N, subsample=idx)``, sets (``SubsampleMessenger._process_message``). So
``Trace_ELBO`` (which reads the scale) and this package's losses (which read the frames) see the
same ``N``. The plate's own indices stay ``arange(B)``: the model indexes its minibatch with them.

The messenger lives in :mod:`pyro_vi_ext.infer._weights`, the one module that computes plate
scales.
"""

from pyro_vi_ext.infer._weights import DataPlateScaling

__all__ = ["DataPlateScaling"]

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
"""

from __future__ import annotations

from typing import Any

from pyro.poutine.messenger import Messenger

__all__ = ["DataPlateScaling"]


class DataPlateScaling(Messenger):
    """Make the plate ``plate_name`` a subsampled plate of full size ``full_size``.

    Inside the plate, each sample site's scale is multiplied by ``full_size / batch_size``
    (:math:`N/B`) and the plate's ``CondIndepStackFrame`` gets ``full_size = N``.

    Parameters
    ----------
    plate_name : str
        Name of the data plate of the model and guide (e.g. ``"data"``).
    full_size : int
        ``N``, the number of rows in the full (global) data set.
    batch_size : int
        ``B``, the number of rows the model and guide receive; the plate must have this size.

    Attributes
    ----------
    found : bool
        Whether any sample site inside the plate was seen.
    plates_seen : set of str
        Names of every plate seen (for the error message when ``plate_name`` is absent).

    Raises
    ------
    ValueError
        At a site whose plate ``plate_name`` has a size other than ``batch_size``, or is already
        subsampled by the model.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)
    >>> with DataPlateScaling("data", full_size=100, batch_size=10):
    ...     trace = pyro.poutine.trace(model).get_trace(torch.zeros(10))
    >>> trace.nodes["x"]["scale"], trace.nodes["x"]["cond_indep_stack"][0].full_size
    (10.0, 100)
    """

    def __init__(self, plate_name: str, full_size: int, batch_size: int) -> None:
        super().__init__()
        self.plate_name = plate_name
        self.full_size = int(full_size)
        self.batch_size = int(batch_size)
        self.found = False
        self.plates_seen: set[str] = set()

    def _process_message(self, msg: Any) -> None:
        if msg["type"] != "sample":
            return
        stack = msg["cond_indep_stack"]
        for position, frame in enumerate(stack):
            self.plates_seen.add(frame.name)
            if frame.name != self.plate_name:
                continue
            if frame.full_size not in (None, frame.size):
                raise ValueError(
                    f"`data_plate={self.plate_name!r}`: site {msg['name']!r} is in plate "
                    f"{self.plate_name!r}, which the model already subsamples (size "
                    f"{frame.full_size}, subsample {frame.size}); pass either `data_plate` or "
                    "the idx/n_data convention, not both"
                )
            if frame.size != self.batch_size:
                raise ValueError(
                    f"`data_plate={self.plate_name!r}`: site {msg['name']!r} is in plate "
                    f"{self.plate_name!r} of size {frame.size}, but the minibatch has "
                    f"{self.batch_size} rows; size the plate by the data it is given, e.g. "
                    f"pyro.plate({self.plate_name!r}, len(x))"
                )
            scaled = frame._replace(full_size=self.full_size)
            msg["cond_indep_stack"] = stack[:position] + (scaled,) + stack[position + 1 :]
            msg["scale"] = msg["scale"] * (self.full_size / self.batch_size)
            self.found = True
            return

    def check_found(self) -> None:
        """Raise when no sample site was inside the plate (a misspelt ``data_plate``).

        Raises
        ------
        ValueError
            Naming the plate and the plates that were seen.
        """
        if not self.found:
            seen = sorted(self.plates_seen) or "none"
            raise ValueError(
                f"`data_plate={self.plate_name!r}`: the model and guide have no sample site in a "
                f"plate named {self.plate_name!r} (plates seen: {seen}); pass the name of the "
                "plate over the rows of the data"
            )

"""SVI runner: :func:`fit`, its result, callbacks, checkpoints and data-parallel training.

Layout
------
``runner.py``
    :func:`fit`: builds a validated configuration and runs the loop.
``_config.py``
    :class:`~._config.FitConfig` (fit's arguments, validated) and :class:`~._config.Batching`.
``_loop.py``
    The loop and its explicit state: ``TrainingSession`` (what does not change),
    ``LoopState`` (progress and history, checkpointed), ``RunStatus`` (stops, saves).
``_step.py``
    One optimizer step: loss and gradients, all-reduce, non-finite checks, clipping, update.
``_evaluation.py``
    Held-out evaluation on its own random stream.
``_rng.py``
    The seed streams: training shuffling, model sampling, evaluation.
``_data_plate.py``
    The N/B scaling of an unmodified model's data plate (``fit(data_plate=...)``).
``checkpoint.py``
    The checkpoint format (version, content hash, callbacks by key), writing, reading, restoring.
``data.py``, ``distributed.py``, ``callbacks.py``, ``result.py``, ``plotting.py``
    Data sources and minibatches, ``torch.distributed`` plumbing, callbacks and early stopping,
    :class:`FitResult`, history plots.

Telling the model N
-------------------
A model and guide that take only their data, in the style of Pyro's tutorials, train on
minibatches with ``fit(..., data_plate="data")``: ``fit`` makes the plate named ``"data"`` (sized
by the data it is given, ``pyro.plate("data", len(x))``) a subsampled plate of full size N, with
scale N/B at every site inside it::

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal((x * w).sum(-1), 1.0), obs=y)

    fit(model, guide, (x, y), Trace_ELBO(), optim, num_epochs=50, batch_size=256,
        data_plate="data")

Without ``data_plate``, the minibatch convention: ``fit`` calls the model and the guide once per
step as::

    model(*batch, idx=idx, n_data=n_data)
    guide(*batch, idx=idx, n_data=n_data)

* ``batch`` is the minibatch: ``(x_b,)`` for unsupervised data given as one tensor, ``(x_b, y_b)``
  for a tuple ``(x, y)`` of tensors, whatever the collate function returns (as a tuple) for a
  ``Dataset``/``DataLoader``; a dict batch is passed as keyword arguments instead.
* ``idx`` is a ``torch.long`` tensor of the rows of the full data set in the minibatch (on the
  data's device), so ``batch[0] == x[idx]``.
* ``n_data`` is the size N of the full training set (the *global* size under data-parallel
  training).

A model written against it puts its local variables in a plate that subsamples with ``idx``; Pyro
then scales the minibatch log-likelihood by N/B::

    def model(x, y=None, *, idx=None, n_data=None):
        n_data = x.shape[0] if n_data is None else n_data
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        with pyro.plate("data", size=n_data, subsample=idx):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

Called by hand as ``model(x, y)`` (``idx`` and ``n_data`` left at ``None``) the same model uses the
full data without subsampling. The guide takes the same arguments (an ``AutoGuide`` accepts them as
is). Full-batch training (``batch_size=None``) passes ``idx = arange(N)``, i.e. a scale of 1.

Reported losses are per data point (``history["loss"]``, ``epoch_history["eval_loss"]``); the
totals are ``loss_total`` and ``eval_loss_total``.

Usage
-----
::

    from pyro_vi_ext.training import EarlyStopping, fit

    result = fit(model, guide, (x, y), Trace_ELBO(), pyro.optim.Adam({"lr": 1e-2}),
                 num_epochs=50, batch_size=256, seed=0, data_plate="data",
                 eval_data=(x_test, y_test), callbacks=[EarlyStopping("eval_loss", patience=5)],
                 checkpoint="run.pt", checkpoint_every=500, resume=True)
    result.history["loss"], result.epoch_history["eval_loss"], result.params
    result.plot()

The same script launched with ``torchrun --nproc_per_node=P script.py`` trains data-parallel
(see :mod:`pyro_vi_ext.training.distributed`).
"""

from .callbacks import Callback, EarlyStopping, EpochInfo, FitInfo, StepInfo
from .checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint
from .distributed import PeerFailure
from .loggers import CSVLogger, TensorBoardLogger
from .plotting import plot_history
from .result import FitResult
from .runner import fit

__all__ = [
    "CSVLogger",
    "Callback",
    "CheckpointError",
    "CheckpointWriteError",
    "EarlyStopping",
    "EpochInfo",
    "FitInfo",
    "FitResult",
    "PeerFailure",
    "StepInfo",
    "TensorBoardLogger",
    "fit",
    "load_checkpoint",
    "plot_history",
]

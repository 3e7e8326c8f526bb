"""The SVI runner :func:`fit`: validate the arguments, then run the training loop."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pyro
import torch
from pyro.optim import PyroOptim
from torch.utils.data import DataLoader, Dataset

from ._config import FitConfig
from ._loop import run_training
from .callbacks import Callback, StepInfo
from .result import FitResult

__all__ = ["fit"]

TrainData = (
    torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | Dataset | DataLoader
)


def fit(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    data: TrainData,
    loss: pyro.infer.ELBO,
    optim: PyroOptim,
    *,
    num_steps: int | None = None,
    num_epochs: int | None = None,
    batch_size: int | None = None,
    shuffle: bool = True,
    drop_last: bool | None = None,
    seed: int | None = 0,
    eval_data: TrainData | None = None,
    eval_loss: pyro.infer.ELBO | None = None,
    eval_every: int = 1,
    eval_batch_size: int | None = None,
    callbacks: Sequence[Callback | Callable[[StepInfo], bool | None]] = (),
    scheduler_interval: Literal["epoch", "step"] = "epoch",
    scheduler_monitor: str | None = None,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    resume: bool | str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    device: str | torch.device | None = None,
    distributed: bool | None = None,
    distributed_timeout: float | None = None,
    data_plate: str | None = None,
) -> FitResult:
    r"""Train ``guide`` (and any parameters of ``model``) by stochastic variational inference.

    Every step draws a minibatch of :math:`B` of the :math:`N` rows, computes
    ``loss.loss_and_grads`` on it, with the data plate scaled by :math:`N/B` so that the loss is
    an unbiased estimate of the full-data loss

    .. math:: \hat{L} = -\Big(\frac{N}{B}\sum_{n \in \text{batch}}
              \mathbb{E}_q[\log p(x_n \mid z)] + \mathbb{E}_q[\log p(z) - \log q(z)]\Big),

    averages gradients over processes under data-parallel training, optionally clips them, and
    steps the Pyro optimizer on every parameter the step touched, as ``pyro.infer.SVI.step``
    does. How the model learns :math:`N` and the minibatch:

    * **the minibatch convention** (default): ``fit`` calls
      ``model(*batch, idx=idx, n_data=N)`` and the guide the same way, and the model puts its
      local variables in ``pyro.plate("data", size=n_data, subsample=idx)`` (see
      :mod:`pyro_vi_ext.training`);
    * **an unmodified model** (``data_plate="data"``): ``fit`` calls ``model(*batch)`` and turns
      the plate named ``"data"``, sized by the data it is given (``pyro.plate("data",
      len(x))``), into a subsampled plate of full size :math:`N` (scale :math:`N/B`, frame
      ``full_size = N``), so Pyro's and this package's losses all see :math:`N`.

    Parameters
    ----------
    model : callable
        Pyro model taking ``(*batch, idx=..., n_data=...)``, or only ``*batch`` with
        ``data_plate``.
    guide : callable
        Guide with the same signature (an ``AutoGuide`` works as is).
    data : tensor, tuple/list or dict of tensors, Dataset or DataLoader
        Training data: a tensor (rows along dim 0), a tuple/list of tensors (e.g. ``(x, y)``),
        a dict of tensors (passed as keyword arguments), a map-style ``Dataset`` or a
        ``DataLoader`` (its batch size, ``drop_last``, collate function and workers are used;
        its sampler is replaced by ``fit``'s seeded order).
    loss : pyro.infer.ELBO
        An ELBO *instance* (``Trace_ELBO()``, this package's losses, ...). Terms it reports in
        ``loss.last_terms`` are logged; if it has ``set_step(int)``, that is called with the
        number of completed steps before each step.
    optim : pyro.optim.PyroOptim
        E.g. ``pyro.optim.Adam({"lr": 1e-2})``, or a ``pyro.optim.PyroLRScheduler``
        (``pyro.optim.ExponentialLR``, or any torch scheduler class wrapped as
        ``PyroLRScheduler(torch_scheduler_cls, {...})``) which ``fit`` steps every
        ``scheduler_interval``.
    num_steps : int, optional
        Total optimizer steps (counting steps before a resume). Give exactly one of
        ``num_steps`` and ``num_epochs``.
    num_epochs : int, optional
        Total epochs; an epoch is one pass over ``data`` in global minibatches.
    batch_size : int, optional
        Global minibatch size (summed over processes). ``None``: the DataLoader's batch size,
        or the full data set (one step per epoch, scale 1) for tensors and datasets.
    shuffle : bool
        Visit rows in a seeded random order each epoch (else in order).
    drop_last : bool, optional
        Drop the last incomplete minibatch of each epoch (default: the DataLoader's setting,
        else ``False``).
    seed : int or None
        Seed of the run: latent samples, the data order and evaluation draw from separate
        streams derived from it (:mod:`pyro_vi_ext.training._rng`), so the same seed
        reproduces the run. ``None`` draws one and records it in the result. Ignored when
        resuming (the checkpoint's seed is used).
    eval_data : same forms as ``data``, optional
        Held-out data evaluated every ``eval_every`` epochs with ``eval_loss``, under
        ``torch.no_grad`` and on its own seeded stream (evaluation does not change the
        training trajectory, and a resumed run evaluates exactly as an uninterrupted one).
    eval_loss : pyro.infer.ELBO, optional
        Loss for evaluation (default: ``loss``); e.g.
        ``ImportanceWeightedELBO(num_particles=100)`` for a test log-likelihood estimate.
        ``eval_loss`` in the epoch history is per held-out point (``eval_loss_total`` is the
        total); terms appear as ``eval_<term>``.
    eval_every : int
        Evaluate every this many epochs (and not on other epochs).
    eval_batch_size : int, optional
        Minibatch size for evaluation (default: the DataLoader's, else all rows).
    callbacks : sequence of Callback or callable
        :class:`Callback` objects (e.g. :class:`EarlyStopping`) or functions
        ``fn(StepInfo) -> bool | None`` called after every step; ``True`` stops training.
    scheduler_interval : {"epoch", "step"}
        When a ``PyroLRScheduler`` ``optim`` is stepped.
    scheduler_monitor : str, optional
        History key passed to the scheduler's ``step`` (required for ``ReduceLROnPlateau``;
        an epoch-history key for ``"epoch"``, e.g. ``"eval_loss"``).
    clip_norm : float, optional
        Clip the global gradient norm (over all parameters of the step) to this value (the norm
        before clipping is logged as ``grad_norm`` in any case).
    clip_value : float, optional
        Clip every gradient element to ``[-clip_value, clip_value]``.
    checkpoint : str or os.PathLike, optional
        Path of the checkpoint file (rewritten atomically). Checked before the first step (a
        writable folder, a regular file or nothing at the path). Written every
        ``checkpoint_every`` steps, when training ends, stops early or is interrupted, but
        never after a non-finite loss, so the file always holds a finite state. A write that
        fails (disk full) warns and training goes on; the result says which writes failed.
    checkpoint_every : int, optional
        Steps between checkpoints (``None``: only at the end).
    resume : bool or str or os.PathLike, optional
        ``True`` resumes from ``checkpoint`` if that file exists (else starts afresh); a path
        resumes from that file. The resumed run ends with the same parameters and history as
        an uninterrupted one (bit for bit on CPU), given the same model, guide, data, loss,
        optimizer settings and a fresh ``optim`` object. Another optimizer class is refused;
        changed optimizer settings, and a checkpoint that already holds a finished run, are
        named in a warning.
    progress : bool, optional
        Show a ``tqdm.auto`` bar (a widget in notebooks) with step, loss and terms; ``None``:
        only when stderr is a terminal. Only rank 0 shows one.
    device : str or torch.device, optional
        Device the data is moved to (``"cuda"`` under torchrun means ``cuda:LOCAL_RANK``).
        Default: the device of tensor data, else CPU. Move ``nn.Module`` parts of the model
        and guide there yourself.
    distributed : bool, optional
        Data-parallel training over ``torch.distributed``; ``None`` turns it on when launched
        by torchrun with more than one process. See :mod:`pyro_vi_ext.training.distributed`.
    distributed_timeout : float, optional
        Seconds a data-parallel collective waits for the other processes before every
        process fails with a message (default 600); a stalled or dead worker thus ends the
        run within this time, the last good checkpoint kept.
    data_plate : str, optional
        Name of the data plate of a model and guide that take only their data (see above).

    Returns
    -------
    FitResult
        A frozen result with the final parameters, the history as numpy arrays (losses per
        data point, totals as ``loss_total``), and how and why training stopped. Pyro's param
        store holds the final parameters too.

    Raises
    ------
    TypeError
        For data, loss, optimizer, model or guide of the wrong kind.
    ValueError
        For inconsistent or out-of-range arguments, NaN in tensor data, an unusable
        checkpoint path, or a checkpoint that is corrupted or does not match the data,
        batching or optimizer (:class:`~pyro_vi_ext.training.checkpoint.CheckpointError`).
    pyro_vi_ext.training.distributed.PeerFailure
        When a data-parallel peer stalls past ``distributed_timeout`` or dies.

    References
    ----------
    .. [1] Hoffman, Blei, Wang and Paisley (2013), "Stochastic variational inference", JMLR 14.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro.infer import Trace_ELBO
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model(x):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("x", dist.Normal(mu, 1.0), obs=x)
    >>> x = torch.randn(1000) + 3.0
    >>> result = fit(model, AutoNormal(model), x, Trace_ELBO(), pyro.optim.Adam({"lr": 0.05}),
    ...              num_epochs=20, batch_size=100, data_plate="data", progress=False)
    >>> result.history["loss"].shape
    (200,)
    """
    config = FitConfig.from_arguments(
        model=model,
        guide=guide,
        loss=loss,
        optim=optim,
        num_steps=num_steps,
        num_epochs=num_epochs,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        seed=seed,
        has_eval_data=eval_data is not None,
        eval_loss=eval_loss,
        eval_every=eval_every,
        eval_batch_size=eval_batch_size,
        callbacks=callbacks,
        scheduler_interval=scheduler_interval,
        scheduler_monitor=scheduler_monitor,
        clip_norm=clip_norm,
        clip_value=clip_value,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=progress,
        device=device,
        distributed=distributed,
        distributed_timeout=distributed_timeout,
        data_plate=data_plate,
    )
    return run_training(config, data, eval_data)

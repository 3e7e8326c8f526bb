"""Held-out evaluation in :func:`~pyro_vi_ext.training.fit`.

Evaluation runs ``eval_loss.loss`` over the whole held-out set in chunks, under ``torch.no_grad``
and on the evaluation random stream (:func:`._rng.evaluation_seed`), then puts the global
generators back, so it never changes the training draws. :func:`warm_up` makes the first call of
``eval_loss`` (which may probe the model once, e.g. Pyro's guess of ``max_plate_nesting``) at set-up
on a throw-away stream: every evaluation, in a fresh run and in a resumed one, then draws the same
numbers.

Reported values: ``eval_loss`` is the loss per held-out data point and ``eval_loss_total`` the
total over all ``M`` held-out rows (the chunk losses summed, each chunk evaluated with the plate
scale of the held-out set, weighted by its share of the rows); each term is the same weighted
average as ``eval_<term>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ._rng import evaluation_seed, isolated_rng
from ._step import term_name
from .data import global_batches

if TYPE_CHECKING:
    from ._loop import TrainingSession

__all__ = ["evaluate", "warm_up"]


def _chunks(session: TrainingSession) -> list[torch.Tensor]:
    source = session.eval_source
    assert source is not None and session.batching.eval_batch_size is not None
    context = session.context
    everything = global_batches(torch.arange(source.n), session.batching.eval_batch_size, False)
    return everything[context.rank :: context.world_size]


def warm_up(session: TrainingSession) -> None:
    """Call ``eval_loss`` once on a small held-out chunk, discarding its draws and value.

    Parameters
    ----------
    session : TrainingSession
        The run; nothing happens without evaluation data or when ``eval_loss`` is the training
        loss (already called at set-up).
    """
    source = session.eval_source
    config = session.config
    if source is None or config.eval_loss is config.loss:
        return
    first = _chunks(session)[:1] or [torch.arange(min(source.n, 1))]
    with isolated_rng(session.cuda), torch.no_grad():
        for batch in source.batches(first, 0):
            with session.call_context(batch, n_data=source.n) as (args, kwargs):
                config.eval_loss.loss(config.model, config.guide, *args, **kwargs)


def evaluate(session: TrainingSession, epoch: int, seed: int) -> dict[str, float]:
    """Evaluate ``eval_loss`` on the held-out data at the end of epoch ``epoch``.

    Parameters
    ----------
    session : TrainingSession
        The run.
    epoch : int
        The 0-based epoch that just ended (part of the evaluation seed).
    seed : int
        The run's seed.

    Returns
    -------
    dict of str to float
        ``eval_loss`` (per held-out point), ``eval_loss_total`` and ``eval_<term>`` for every
        term ``eval_loss`` reports, summed over processes under data-parallel training.
    """
    source = session.eval_source
    assert source is not None
    config, context = session.config, session.context
    total = 0.0
    terms: dict[str, float] = {}
    stream = evaluation_seed(seed, epoch, context.rank)
    with isolated_rng(session.cuda, seed=stream), torch.no_grad():
        for batch in source.batches(_chunks(session), 0):
            weight = batch.idx.shape[0] / source.n
            with session.call_context(batch, n_data=source.n) as (args, kwargs):
                value = config.eval_loss.loss(config.model, config.guide, *args, **kwargs)
            total += weight * float(value)
            for key, term in (getattr(config.eval_loss, "last_terms", None) or {}).items():
                terms[key] = terms.get(key, 0.0) + weight * float(term)
    keys = sorted(terms)
    if context.active:
        keys = sorted(set().union(*context.all_gather_object(keys)))
        buffer = torch.tensor([total] + [terms.get(k, 0.0) for k in keys], dtype=torch.float64)
        buffer = buffer.to(context.comm_device)
        context.all_reduce_(buffer)
        values = buffer.tolist()
        total, terms = values[0], dict(zip(keys, values[1:], strict=True))
    out = {"eval_loss": total / source.n, "eval_loss_total": total}
    out.update({f"eval_{term_name(k)}": terms[k] for k in keys})
    return out

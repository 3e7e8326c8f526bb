r"""The decomposed ELBO (beta-TCVAE loss) as a Pyro loss.

The ELBO of a data point splits into reconstruction, index-code mutual information, total
correlation and dimension-wise KL [1, 2]; :class:`DecomposedELBO` weights the last three. The code
layout lives in :mod:`pyro_vi_ext.infer._code_layout`, the aggregate-posterior estimators in
:mod:`pyro_vi_ext.infer._aggregate` and their fused kernels in :mod:`pyro_vi_ext.infer._kernels`.
The exact decomposition over a whole dataset after training is
:func:`pyro_vi_ext.diagnostics.elbo_surgery`.

References
----------
.. [1] R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud, "Isolating Sources of Disentanglement in
   Variational Autoencoders", NeurIPS 2018.
.. [2] M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the variational
   evidence lower bound", NIPS 2016 Workshop on Advances in Approximate Bayesian Inference.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pyro_vi_ext.infer._aggregate import (
    AGGREGATE_ESTIMATORS,
    NormalCode,
    SampleTerms,
    minibatch_log_aggregate,
    normal_minibatch_log_aggregate,
)
from pyro_vi_ext.infer._code_layout import (
    CodeLayout,
    check_code_sites,
    code_blocks,
    code_log_densities,
    code_log_jacobian,
    code_scale,
    code_sources,
    find_code_layout,
    normal_prior_blocks,
    packed_autoguide_subsampling,
)
from pyro_vi_ext.infer._loss_base import ParticleELBO
from pyro_vi_ext.infer._weights import ParticleWeights, SubsamplingError, trace_particles

Aggregate = Literal["mss", "mws"]
Weight = float | Callable[[int], float]
TERMS = ("reconstruction", "index_code_mi", "total_correlation", "dimwise_kl", "elbo")
_UNSET = object()


def _check_weight(name: str, weight: Weight) -> Weight:
    if callable(weight):
        return weight
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a number or a callable of the step, got {weight!r}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {weight!r}")
    return value


def sample_terms(
    log_q_code: torch.Tensor,
    log_p_code: torch.Tensor,
    log_aggregate: torch.Tensor,
    log_marginals: torch.Tensor,
    log_jacobian: torch.Tensor | None,
) -> SampleTerms:
    r"""Assemble the per-sample terms from the code's densities and the aggregate estimates.

    Parameters
    ----------
    log_q_code, log_p_code : torch.Tensor
        ``[S, B]``: :math:`\log q(z_i \mid x_i)` and :math:`\log p(z_i)`.
    log_aggregate : torch.Tensor
        ``[S, B]``: the estimate of :math:`\log q(z_i)` (on the unconstrained code).
    log_marginals : torch.Tensor
        ``[S, B, D]``: the estimates of :math:`\log q(z_{i,d})` (on the unconstrained code).
    log_jacobian : torch.Tensor or None
        ``[S, B]``: an autoguide's log-Jacobian, added to both estimates.

    Returns
    -------
    SampleTerms
    """
    log_marginals = log_marginals.sum(-1)
    if log_jacobian is not None:
        log_aggregate, log_marginals = log_aggregate + log_jacobian, log_marginals + log_jacobian
    return SampleTerms(log_q_code, log_p_code, log_aggregate, log_marginals)


def reported_terms(
    terms: SampleTerms, log_w: torch.Tensor, code_weight: float, per_point: float
) -> dict[str, torch.Tensor]:
    """Return the terms of :attr:`DecomposedELBO.last_terms` as 0-d tensors (no gradient).

    Each is a mean over particles of the sum over the batch, times ``per_point`` (the loss scale
    over :math:`N`); the code's terms also carry ``code_weight`` (its user scale).

    Parameters
    ----------
    terms : SampleTerms
        ``[S, B]`` per-sample terms.
    log_w : torch.Tensor
        ``[S]``: the log-weight of each particle, summed over the batch.
    code_weight : float
        The factor left on the code's log-densities in ``log_w``.
    per_point : float
        Loss scale over the dataset size.

    Returns
    -------
    dict of str to torch.Tensor
        ``reconstruction``, ``index_code_mi``, ``total_correlation``, ``dimwise_kl``, ``elbo``.
    """
    with torch.no_grad():
        mi = code_weight * terms.index_code_mi.sum(-1).mean()
        tc = code_weight * terms.total_correlation.sum(-1).mean()
        dwkl = code_weight * terms.dimwise_kl.sum(-1).mean()
        elbo = log_w.mean()
        recon = elbo + mi + tc + dwkl
        return {
            "reconstruction": recon * per_point,
            "index_code_mi": mi * per_point,
            "total_correlation": tc * per_point,
            "dimwise_kl": dwkl * per_point,
            "elbo": elbo * per_point,
        }


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Return a detached copy (``None`` stays ``None``)."""
    return None if tensor is None else tensor.detach().clone()


_OUTPUT_PREFIX = "deferred:"


@dataclass(frozen=True)
class DeferredTerms:
    r"""What one step's terms need, detached and copied, for evaluation when they are read.

    With unit weights the loss's value and gradient are the ELBO's, and the ``[B, B, D]``
    aggregate-posterior estimates only serve :attr:`DecomposedELBO.last_terms`; they are computed
    from this snapshot on first read, without gradient. Every tensor is a copy that shares no
    memory with the step's graph or with the parameters (which optimizer steps change in place),
    so a read after later steps still gives this step's terms.

    Attributes
    ----------
    code : NormalCode
        The code's samples and column parameters (a factorized Normal code).
    prior : NormalCode or None
        The model's values of the code sites and their Normal prior, from which
        :math:`\log q(z_i \mid x_i)` and :math:`\log p(z_i)` are computed on read; ``None``
        for another prior family (then ``log_q_code`` and ``log_p_code`` are given).
    log_q_code, log_p_code : torch.Tensor or None
        ``[S, B]``: as for :func:`sample_terms` (``None`` with ``prior``).
    log_w : torch.Tensor
        ``[S]``: as for :func:`reported_terms`.
    log_jacobian : torch.Tensor or None
        ``[S, B]``: an autoguide's log-Jacobian.
    code_weight, per_point : float
        As for :func:`reported_terms`.
    dataset_size : int
        :math:`N`.
    aggregate : {"mss", "mws"}
        The aggregate-posterior estimator.
    chunk_size : int or None
        Rows per block of the kernel.
    """

    code: NormalCode
    prior: NormalCode | None
    log_q_code: torch.Tensor | None
    log_p_code: torch.Tensor | None
    log_jacobian: torch.Tensor | None
    log_w: torch.Tensor
    code_weight: float
    per_point: float
    dataset_size: int
    aggregate: str
    chunk_size: int | None

    def evaluate(self) -> dict[str, float]:
        """Compute the reported terms (nats per data point) from the snapshot."""
        with torch.no_grad():
            log_agg, log_marg = normal_minibatch_log_aggregate(
                self.code, self.aggregate, self.dataset_size, self.chunk_size
            )
            log_q_code, log_p_code = self.log_q_code, self.log_p_code
            if self.prior is not None:
                log_q_code = self.code.log_density()
                if self.log_jacobian is not None:
                    log_q_code = log_q_code + self.log_jacobian
                log_p_code = self.prior.log_density()
            terms = sample_terms(log_q_code, log_p_code, log_agg, log_marg, self.log_jacobian)
            reported = reported_terms(terms, self.log_w, self.code_weight, self.per_point)
        return {name: float(term) for name, term in reported.items()}

    def as_outputs(self) -> dict[str, torch.Tensor]:
        """Return the snapshot as named tensors (the outputs of a compiled graph)."""
        tensors = {
            "values": self.code.values,
            "loc": self.code.loc,
            "scale": self.code.scale,
            "log_w": self.log_w,
            "constants": torch.tensor(
                [self.code_weight, self.per_point, float(self.dataset_size)], dtype=torch.float64
            ),
        }
        if self.prior is not None:
            tensors["prior_values"] = self.prior.values
            tensors["prior_loc"] = self.prior.loc
            tensors["prior_scale"] = self.prior.scale
        optional = {
            "log_q_code": self.log_q_code,
            "log_p_code": self.log_p_code,
            "log_jacobian": self.log_jacobian,
        }
        tensors.update({name: t for name, t in optional.items() if t is not None})
        return {_OUTPUT_PREFIX + name: tensor for name, tensor in tensors.items()}

    @staticmethod
    def is_outputs(outputs: dict[str, torch.Tensor]) -> bool:
        """Whether ``outputs`` hold a snapshot written by :meth:`as_outputs`."""
        return _OUTPUT_PREFIX + "values" in outputs

    @classmethod
    def from_outputs(
        cls, outputs: dict[str, torch.Tensor], aggregate: str, chunk_size: int | None
    ) -> DeferredTerms:
        """Rebuild the snapshot from the tensors of :meth:`as_outputs`."""
        get = {name[len(_OUTPUT_PREFIX) :]: t for name, t in outputs.items()}
        code_weight, per_point, dataset_size = get["constants"].tolist()
        prior = None
        if "prior_values" in get:
            prior = NormalCode(get["prior_values"], get["prior_loc"], get["prior_scale"])
        return cls(
            code=NormalCode(get["values"], get["loc"], get["scale"]),
            prior=prior,
            log_q_code=get.get("log_q_code"),
            log_p_code=get.get("log_p_code"),
            log_jacobian=get.get("log_jacobian"),
            log_w=get["log_w"],
            code_weight=code_weight,
            per_point=per_point,
            dataset_size=round(dataset_size),
            aggregate=aggregate,
            chunk_size=chunk_size,
        )


def _subsampling_refusal(error: SubsamplingError, num_particles: int) -> SubsamplingError:
    """Return the refusal of a subsampled plate that is not the point plate, for this loss."""
    plate = error.plate
    if error.sequential:
        problem = (
            f"Plate '{plate}' is a subsampled sequential plate. DecomposedELBO needs a "
            "vectorized data plate: its terms are per data point of that plate"
        )
        fixes = f"use a vectorized 'with pyro.plate(\"{plate}\", ...)'"
    else:
        problem = (
            f"Plate '{plate}' is subsampled, but {', '.join(error.sites)} lie outside it. "
            "DecomposedELBO computes its loss per point of the data plate (reconstruction and "
            "the codes' KL, split into index-code MI, total correlation and dimension-wise KL "
            "estimated over the batch's codes) and scales the batch sum by N / B; a latent "
            "outside the subsampled plate has no per-point share in it"
        )
        fixes = (
            f"pass the full data to '{plate}' (not subsampled, latents outside the data plate "
            "count in the reconstruction term), move those latents inside the plate"
        )
    return SubsamplingError(
        f"{problem}, so DecomposedELBO cannot estimate its loss from the minibatch, whatever the "
        f"number of particles (num_particles={num_particles}). Instead {fixes}, or train with "
        "Trace_ELBO or ImportanceWeightedELBO(num_particles=1): the plain ELBO, unbiased under "
        "subsampling with global latents, without the decomposed terms.",
        plate,
        error.sites,
        error.sequential,
    )


class DecomposedELBO(ParticleELBO):
    r"""The ELBO split into reconstruction, index-code MI, TC and dimension-wise KL, weighted.

    For a data point :math:`n` with code :math:`z \sim q(z \mid x_n)` (the guide's latent sites in
    the data plate, concatenated into :math:`D` scalars) and aggregate posterior
    :math:`q(z) = \frac1N \sum_n q(z \mid x_n)`, the ELBO decomposes [1]_ [2]_ as

    .. math::

        \mathcal{L}(x_n) = \underbrace{\mathbb{E}[\log p(x_n, y \mid z) - \log q(y)]}_{
            \text{reconstruction}}
        - \underbrace{\mathbb{E}[\log q(z \mid x_n) - \log q(z)]}_{\text{index-code MI}}
        - \underbrace{\mathbb{E}[\log q(z) - \textstyle\sum_d \log q(z_d)]}_{\text{TC}}
        - \underbrace{\mathbb{E}[\textstyle\sum_d \log q(z_d) - \log p(z)]}_{\text{dim-wise KL}},

    where :math:`y` stands for every other latent (its log-density ratio counts as reconstruction),
    and the loss is

    .. math::

        -\frac{N}{B} \sum_{i \in \text{batch}} \frac1S \sum_{s=1}^S
        \big[\text{rec}_i - \alpha\, \text{MI}_i - \beta\, \text{TC}_i - \gamma\, \text{DWKL}_i\big]
        ^{(s)},

    with :math:`N` the data plate's full size (or ``dataset_size``) and :math:`B` its batch size.
    :math:`\log q(z_i)` and :math:`\log q(z_{i,d})` are estimated from the batch through the
    ``[B, B, D]`` tensor :math:`\log q(z_{i,d} \mid x_j)` [1]_ (Sec. 3, App. C), by the
    ``aggregate`` estimator:

    * ``"mss"`` (minibatch stratified sampling): :math:`\log q(z_i) \approx \log \sum_j W_{ij}\,
      q(z_i \mid x_j)` and :math:`\log q(z_{i,d}) \approx \log \sum_j W_{ij}\, q(z_{i,d} \mid
      x_j)`, where, with :math:`M = B - 1`, :math:`W_{ii} = 1/N`, :math:`W_{i,(i+1) \bmod B} =
      (N - M)/(N M)` (the stratum sample) and :math:`W_{ij} = 1/M` otherwise; every row sums to one
      (the reference code's matrix fills a column instead of the diagonal, so its rows do not), and
      :math:`\log W` enters once per density, not once per dimension of the joint;
    * ``"mws"`` (minibatch weighted sampling), the paper's form: :math:`\log q(z_i) \approx
      \operatorname{logsumexp}_j \log q(z_i \mid x_j) - \log(N B)`, and the same per dimension.
      Its constant shifts the reported MI by :math:`+\log N`, the TC by :math:`+(D-1)\log N` and
      the dim-wise KL by :math:`-D \log N` relative to the batch average
      :math:`\log \frac1B \sum_j q(z_i \mid x_j)` (gradients are unaffected; the shifts cancel in
      the ELBO). :attr:`last_term_shifts` holds these constants and :attr:`last_terms_unshifted`
      the terms without them, which read as information quantities (MI between 0 and
      :math:`\log B`); prefer ``"mss"`` to report the terms.

    Special cases and properties:

    * ``alpha = beta = gamma = 1`` is the ordinary ELBO (``Trace_ELBO``) on the same samples: same
      value and gradient; the reported terms still sum to it exactly;
    * ``alpha = gamma = 1`` is beta-TCVAE [1]_; ``alpha = beta = gamma`` is beta-VAE [3]_;
    * with MSS every sample's MI estimate is at most :math:`\log N` (the own point has weight
      :math:`1/N`); :func:`~pyro_vi_ext.diagnostics.elbo_surgery` computes the terms exactly over
      the whole dataset.

    Weights may be schedules: a callable of the step, evaluated at the step last given to
    :meth:`set_step` (0 until then). A training loop calls ``loss.set_step(global_step)`` before
    each step; nothing is counted internally, so evaluation calls never advance a schedule.

    Parameters
    ----------
    alpha : float or callable
        Weight of the index-code mutual information (a number or a callable of the step).
    beta : float or callable
        Weight of the total correlation.
    gamma : float or callable
        Weight of the dimension-wise KL.
    aggregate : {"mss", "mws"}
        Estimator of the aggregate posterior.
    num_particles : int
        Particles ``S`` per data point, vectorized on a particle plate when ``S > 1``; one
        particle is traced without it, as ``Trace_ELBO`` does (the model then need not
        broadcast over a particle dim; the draws are the same).
    code_sites : sequence of str, optional
        The guide sites forming the code (default: every guide latent in the data plate,
        concatenated in trace order; an autoguide's auxiliary sites are looked through).
    data_plate : str, optional
        The plate over data points (default: the subsampled plate holding guide latents, or the
        only plate holding them).
    dataset_size : int, optional
        The dataset size ``N`` for a data plate that is not subsampled (default: the data
        plate's full size). A subsampled plate's own full size must agree with it.
    chunk_size : int, optional
        Rows of the ``[B, B, D]`` tensor per block (default: automatic).
    max_plate_nesting : int, optional
        The model's plate nesting, without the particle plate; guessed by one extra run of model
        and guide when omitted.
    vectorize_particles : bool
        Must be True (particles are always vectorized).
    retain_graph : bool, optional
        Passed to ``backward`` in ``loss_and_grads``.
    jit : bool or {"inductor"}
        Compile model, guide and bound with ``torch.jit.trace`` once per signature (new argument
        shapes, a new model or guide, gradients on/off recompile); same values and gradients as
        the eager path on the same draws, eager fallback with a warning when tracing fails.
        ``"inductor"``: loss and gradients as one graph per signature compiled by torch inductor
        (fastest per step; seconds to compile; uncompiled graph without a C++ compiler).
        Values the model or guide reads from a global or a closure (e.g. a KL-annealing
        factor in ``poutine.scale``) are frozen at the first call: pass them as arguments.
        See :mod:`pyro_vi_ext.infer._compiled`.
    estimator : {"mss", "mws"}, optional
        Deprecated name of ``aggregate`` (a ``FutureWarning``): ``estimator`` is the gradient
        estimator in :class:`~pyro_vi_ext.ImportanceWeightedELBO`.

    Attributes
    ----------
    last_terms : dict of str to float
        After each call: ``reconstruction``, ``index_code_mi``, ``total_correlation``,
        ``dimwise_kl`` and ``elbo`` (nats per data point, unweighted, on the step's samples;
        ``elbo`` = reconstruction - MI - TC - dim-wise KL = -loss / N when all weights are 1).
        With all weights 1 the value and gradient need no aggregate-posterior term, so for a
        factorized Normal code the step keeps a detached copy of its code (and of a Normal
        prior) and the terms are computed, without gradient, when this is first read: the
        same numbers, of that step, however many optimizer steps later.
    last_term_shifts : dict of str to float
        The constant each term of :attr:`last_terms` carries from the estimator (zero for MSS;
        the paper's :math:`\log N` multiples for MWS).

    Notes
    -----
    Validity: the guide's code sites must be reparameterizable (``rsample``) and factorized
    (``Independent`` of univariate distributions, e.g. ``dist.Normal(loc, s).to_event(1)``) or
    Gaussian (``MultivariateNormal``, ``LowRankMultivariateNormal``, whose exact 1-D marginals are
    used); anything else raises naming the site. Autoguides: with
    :class:`~pyro.infer.autoguide.AutoNormal` (full data or minibatches) and
    :class:`~pyro.infer.autoguide.AutoDiagonalNormal` (full data) the code is read from the
    unconstrained Normal behind each user site's ``Delta``, with the transform's log-Jacobian
    added back; the transform must be elementwise (real, positive, interval support). Every other
    guide latent must be reparameterizable too. :math:`N` is the data plate's full size
    (``pyro.plate("data", N, subsample=idx)`` or ``subsample_size=B``); for a plate that is not
    subsampled ``dataset_size`` declares it a minibatch of :math:`N` points (and the loss scale
    :math:`N/B` follows); without it :math:`N = B` (with a warning, since the estimators then
    treat the batch as the dataset). Batch size 1 (for example the short last batch of an epoch,
    see :meth:`check_batching`), or :math:`B > N`, raises. Latents outside the data plate are
    allowed when the plate is not subsampled (their log-density ratio counts as reconstruction);
    with a subsampled plate they raise, as no per-point minibatch bound exists for them.

    Memory: the ``[B, B, D]`` computation is done ``chunk_size`` rows at a time and nothing of
    size :math:`B^2` is kept for the backward: a factorized Normal code goes through a fused kernel
    (chunked forward, analytic chunked backward, blocks of :math:`2^{17}` elements; at
    :math:`B = 2048, D = 10` a training step grows memory by tens of MB where the dense tensor alone
    is 168 MB); other families evaluate their ``log_prob`` on checkpointed blocks of
    :math:`2^{22}` elements. Should a density ratio within a batch exceed the float range, the
    fused kernel hands over to the log-sum-exp path.

    References
    ----------
    .. [1] R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud, "Isolating Sources of Disentanglement in
       Variational Autoencoders", NeurIPS 2018.
    .. [2] M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the variational
       evidence lower bound", NIPS 2016 Workshop on Advances in Approximate Bayesian Inference.
    .. [3] I. Higgins et al., "beta-VAE: Learning Basic Visual Concepts with a Constrained
       Variational Framework", ICLR 2017.

    Examples
    --------
    ::

        from pyro.infer import SVI
        from pyro_vi_ext import DecomposedELBO

        loss = DecomposedELBO(beta=6.0, aggregate="mss", num_particles=1)
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)
        for step, idx in enumerate(batches):          # idx: rows of the minibatch
            loss.set_step(step)
            svi.step(x[idx], idx=idx, n_data=len(x))  # plate("data", n_data, subsample=idx)
            print(loss.last_terms["total_correlation"])

        # annealing: a weight may be a callable of the step
        loss = DecomposedELBO(beta=lambda step: 1.0 + 5.0 * min(1.0, step / 10_000))
    """

    def __init__(
        self,
        alpha: Weight = 1.0,
        beta: Weight = 1.0,
        gamma: Weight = 1.0,
        aggregate: Aggregate = "mss",
        num_particles: int = 1,
        code_sites: Sequence[str] | None = None,
        data_plate: str | None = None,
        dataset_size: int | None = None,
        chunk_size: int | None = None,
        max_plate_nesting: int | None = None,
        vectorize_particles: bool = True,
        retain_graph: bool | None = None,
        jit: bool | str = False,
        *,
        estimator: Aggregate | object = _UNSET,
    ):
        if estimator is not _UNSET:
            warnings.warn(
                "DecomposedELBO(estimator=...) is deprecated: pass aggregate='mss' or "
                "aggregate='mws' (the aggregate-posterior estimator). 'estimator' names the "
                "gradient estimator of ImportanceWeightedELBO.",
                FutureWarning,
                stacklevel=2,
            )
            if estimator not in AGGREGATE_ESTIMATORS:
                raise ValueError(
                    f"estimator must be one of {AGGREGATE_ESTIMATORS}, got {estimator!r} "
                    "(and is deprecated: use aggregate=)"
                )
            aggregate = estimator
        if aggregate not in AGGREGATE_ESTIMATORS:
            raise ValueError(f"aggregate must be one of {AGGREGATE_ESTIMATORS}, got {aggregate!r}")
        if dataset_size is not None and (
            isinstance(dataset_size, bool) or int(dataset_size) != dataset_size or dataset_size < 1
        ):
            raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
            jit=jit,
        )
        self.alpha = _check_weight("alpha", alpha)
        self.beta = _check_weight("beta", beta)
        self.gamma = _check_weight("gamma", gamma)
        self.aggregate: Aggregate = aggregate
        self.code_sites = (code_sites,) if isinstance(code_sites, str) else code_sites
        self.data_plate = data_plate
        self.dataset_size = None if dataset_size is None else int(dataset_size)
        self.chunk_size = chunk_size
        self.step = 0
        self.last_term_shifts: dict[str, float] = {}
        self._warned_unsubsampled = False

    # -- schedules --------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Set the training step at which callable weights are evaluated."""
        self.step = int(step)

    def compile_state(self) -> tuple:
        """Return the current weights: a compiled trace bakes them in (a change recompiles)."""
        return tuple(sorted(self.current_weights().items()))

    def current_weights(self) -> dict[str, float]:
        """Return ``{"alpha", "beta", "gamma"}`` at the current step."""
        weights = {}
        for name in ("alpha", "beta", "gamma"):
            weight = getattr(self, name)
            value = float(weight(self.step)) if callable(weight) else weight
            if not math.isfinite(value):
                raise ValueError(f"{name} schedule gave {value} at step {self.step}")
            weights[name] = value
        return weights

    # -- batching ---------------------------------------------------------------------------
    def check_batching(self, num_points: int, batch_size: int, drop_last: bool = False) -> None:
        """Check, before a run, that every minibatch of an epoch suits the estimator.

        Both estimators need at least two points per batch: a dataset of ``num_points`` points
        cut into batches of ``batch_size`` leaves a last batch of ``num_points % batch_size``
        points unless it is dropped.

        Parameters
        ----------
        num_points : int
            Points in the dataset (one epoch).
        batch_size : int
            Points per minibatch.
        drop_last : bool
            Whether the runner drops a short last batch.

        Raises
        ------
        ValueError
            Naming the batch sizes, when a batch would hold fewer than two points.

        Examples
        --------
        >>> DecomposedELBO().check_batching(1000, 100)
        >>> DecomposedELBO().check_batching(101, 50)
        Traceback (most recent call last):
        ...
        ValueError: DecomposedELBO(aggregate='mss'): 101 points in batches of 50 leave a last batch of 1 point; ...
        """  # noqa: E501
        if batch_size < 2:
            raise ValueError(
                f"DecomposedELBO(aggregate={self.aggregate!r}): batch_size={batch_size}; the "
                "aggregate-posterior estimators need at least 2 points per batch."
            )
        last = num_points % batch_size
        if last == 1 and not drop_last:
            raise ValueError(
                f"DecomposedELBO(aggregate={self.aggregate!r}): {num_points} points in batches "
                f"of {batch_size} leave a last batch of 1 point; the aggregate-posterior "
                "estimators need at least 2 points per batch. Drop the short last batch "
                "(drop_last=True) or choose a batch size that does not leave 1 point over."
            )

    # -- the Pyro contract ------------------------------------------------------------------
    def differentiable_loss(
        self, model: Callable, guide: Callable, *args, **kwargs
    ) -> torch.Tensor:
        """Return the negative weighted objective as a scalar tensor (reparameterized gradient).

        Parameters
        ----------
        model, guide : callable
            Pyro model and guide, called with ``*args, **kwargs``.

        Returns
        -------
        torch.Tensor
            The loss; :attr:`last_terms` is set as a side effect.
        """
        weights_now = self.current_weights()
        nesting = self._model_plate_nesting(model, guide, args, kwargs)
        num_particles = self.num_particles
        try:
            weights = trace_particles(
                model,
                guide,
                args,
                kwargs,
                num_particles=num_particles,
                plate_nesting=nesting,
                # one particle needs no particle plate (as Trace_ELBO): the same draws, and the
                # model need not broadcast over a particle dim
                vectorize=num_particles > 1,
                structure_cache=self.structure_cache(),
            )
        except ValueError as error:
            reason = packed_autoguide_subsampling(guide)
            if reason is not None:
                raise ValueError(reason) from error
            if isinstance(error, SubsamplingError):
                raise _subsampling_refusal(error, self.num_particles) from error
            raise
        model_trace, guide_trace = weights.model_trace, weights.guide_trace
        layout = find_code_layout(model_trace, guide_trace, self.data_plate, self.code_sites)
        check_code_sites(model_trace, guide_trace, layout)
        n = self._dataset_size(layout)
        scale = self._loss_scale(weights, layout, n)
        c_code = code_scale(model_trace, guide_trace, layout)
        per_point = scale / n
        extra = {
            "index_code_mi": 1.0 - weights_now["alpha"],
            "total_correlation": 1.0 - weights_now["beta"],
            "dimwise_kl": 1.0 - weights_now["gamma"],
        }
        # with unit weights the objective is log w alone: the code's densities and the
        # aggregate-posterior terms only serve the report, so they take no part in the graph
        unit_weights = all(c == 0.0 for c in extra.values())
        terms_grad = torch.is_grad_enabled() and not unit_weights

        sources = code_sources(guide, guide_trace, layout, model_trace)
        particle_plate = weights.vectorized
        # the code's log-densities reduce over the traces' own batch dims
        window, leading = (nesting + 1, num_particles) if particle_plate else (nesting, None)
        blocks = code_blocks(sources, layout, nesting + 1, particle_plate=particle_plate)
        log_w = weights.log_weights.sum(-1)  # [S]
        code_dim = sum(block.dim for block in blocks)
        self._record_shifts(n, code_dim, c_code * per_point * layout.size)

        code = NormalCode.from_blocks(blocks) if unit_weights and self._defers_terms() else None
        if code is not None:
            # the value is log w alone; the terms are computed when last_terms is read, from
            # copies of the code (and of a Normal prior, whose log p(z) is then deferred too)
            prior_blocks = normal_prior_blocks(model_trace, layout, nesting + 1, particle_plate)
            prior = None if prior_blocks is None else NormalCode.from_blocks(prior_blocks)
            with torch.no_grad():
                if prior is None:
                    log_q_code, log_p_code, log_jacobian = code_log_densities(
                        model_trace, sources, layout, window, leading
                    )
                else:
                    log_q_code = log_p_code = None
                    log_jacobian = code_log_jacobian(sources, layout, window, leading)
            self._defer_terms(
                DeferredTerms(
                    code=code.detached_copy(),
                    prior=None if prior is None else prior.detached_copy(),
                    log_q_code=_copy(log_q_code),
                    log_p_code=_copy(log_p_code),
                    log_jacobian=_copy(log_jacobian),
                    log_w=_copy(log_w),
                    code_weight=c_code,
                    per_point=per_point,
                    dataset_size=n,
                    aggregate=self.aggregate,
                    chunk_size=self.chunk_size,
                )
            )
            return -scale * log_w.mean()

        with torch.set_grad_enabled(terms_grad):
            log_q_code, log_p_code, log_jacobian = code_log_densities(
                model_trace, sources, layout, window, leading
            )
            log_agg, log_marg = minibatch_log_aggregate(blocks, self.aggregate, n, self.chunk_size)
        terms = sample_terms(log_q_code, log_p_code, log_agg, log_marg, log_jacobian)

        # objective = log w + sum_t (1 - weight_t) * term_t: exactly the ELBO when weights are 1
        objective = log_w
        for name, coefficient in extra.items():
            if coefficient != 0.0:
                objective = objective + (c_code * coefficient) * getattr(terms, name).sum(-1)
        value = -scale * objective.mean()
        self._set_terms(reported_terms(terms, log_w, c_code, per_point))
        return value

    def loss_terms(self, model: Callable, guide: Callable, *args, **kwargs) -> dict[str, float]:
        """Compute the decomposition on one fresh batch of samples, without a gradient.

        Returns
        -------
        dict of str to float
            ``reconstruction``, ``index_code_mi``, ``total_correlation``, ``dimwise_kl``,
            ``elbo`` (nats per data point); also stored in :attr:`last_terms`.
        """
        with torch.no_grad():
            self.differentiable_loss(model, guide, *args, **kwargs)
        return dict(self.last_terms)

    @property
    def last_terms_unshifted(self) -> dict[str, float]:
        r"""The terms of :attr:`last_terms` without the estimator's constants.

        For ``aggregate="mws"`` the aggregate posterior is then the batch average
        :math:`\\log \\frac1B \\sum_j q(z_i \\mid x_j)`, so the MI lies in :math:`[0, \\log B]`;
        for ``"mss"`` it equals :attr:`last_terms`.
        """
        shifts = self.last_term_shifts
        return {name: value - shifts[name] for name, value in self.last_terms.items()}

    # -- bookkeeping ------------------------------------------------------------------------
    def _dataset_size(self, layout: CodeLayout) -> int:
        batch = layout.size
        if self.dataset_size is not None:
            n = self.dataset_size
            if layout.subsampled and n != layout.full_size:
                raise ValueError(
                    f"dataset_size={n} contradicts plate '{layout.plate}', which declares its "
                    f"full size N = {layout.full_size} (subsampled to {batch} points). Leave "
                    f"dataset_size out (the plate's size is used) or make the two agree."
                )
        else:
            n = layout.full_size
            if not layout.subsampled and not self._warned_unsubsampled:
                self._warned_unsubsampled = True
                warnings.warn(
                    f"Data plate '{layout.plate}' is not subsampled, so DecomposedELBO takes the "
                    f"dataset size N = {n}, its size. If each call sees a minibatch of a larger "
                    "dataset, pass dataset_size=N or subsample the plate "
                    "(pyro.plate(name, N, subsample=idx)): the MI and TC estimators need N.",
                    stacklevel=3,
                )
        if batch > n:
            raise ValueError(
                f"Batch size B = {batch} (plate '{layout.plate}') exceeds the dataset size N = {n}"
                + (" given as dataset_size" if self.dataset_size is not None else "")
                + "; the minibatch estimators need B <= N."
            )
        if batch < 2:
            reason = (
                "minibatch stratified sampling estimates the aggregate posterior from the "
                "other points"
                if self.aggregate == "mss"
                else "minibatch weighted sampling then sees only the point's own density, so its "
                "terms are the paper's constants (a negative dimension-wise KL), not estimates"
            )
            raise ValueError(
                f"Batch size {batch} with estimator='{self.aggregate}' (aggregate="
                f"'{self.aggregate}', plate '{layout.plate}', N = {n}): {reason}; at least 2 "
                "points per batch are needed. If this is the short last batch of an epoch, drop "
                "it (drop_last=True) or pick a batch size that does not leave 1 point over "
                "(DecomposedELBO.check_batching(N, batch_size) tells before a run)."
            )
        return n

    def _loss_scale(self, weights: ParticleWeights, layout: CodeLayout, n: int) -> float:
        point_plates = {p.name: p for p in weights.point_plates}
        plate = point_plates.get(layout.plate)
        if plate is None:
            # latents outside the data plate; trace_particles refuses a subsampled data plate then
            if self.dataset_size is not None and self.dataset_size != layout.size:
                raise ValueError(
                    f"dataset_size={self.dataset_size} with latents outside the data plate "
                    f"'{layout.plate}': rescaling the batch to N would also rescale those "
                    "global latents. Subsample the plate in the model instead."
                )
            return weights.scale
        if n == plate.full_size:
            return weights.scale
        # dataset_size declares a plate that is not subsampled a minibatch of n points
        declared = dataclasses.replace(plate, full_size=n)
        return weights.scale * declared.subsample_factor

    def _defers_terms(self) -> bool:
        """Whether unit weights may defer the aggregate-posterior terms to the first read.

        Always True; a subclass returning False computes them at every step (the tests compare
        the two).
        """
        return True

    def _defer_terms(self, deferred: DeferredTerms) -> None:
        if self._deferred_terms is not None:  # compiled: the graph returns the snapshot
            self._set_terms(deferred.as_outputs())
        else:
            self._set_pending_terms(deferred)

    def set_compiled_terms(self, terms: dict[str, torch.Tensor]) -> None:
        """Set :attr:`last_terms` from a compiled graph's outputs (a deferred snapshot or terms)."""
        if DeferredTerms.is_outputs(terms):
            self._set_pending_terms(
                DeferredTerms.from_outputs(terms, self.aggregate, self.chunk_size)
            )
        else:
            super().set_compiled_terms(terms)

    def _record_shifts(self, n: int, code_dim: int, weight: float) -> None:
        shift = math.log(n) * weight if self.aggregate == "mws" else 0.0
        self.last_term_shifts = {
            "reconstruction": 0.0,
            "index_code_mi": shift,
            "total_correlation": (code_dim - 1) * shift,
            "dimwise_kl": -code_dim * shift,
            "elbo": 0.0,
        }


__all__ = ["TERMS", "DecomposedELBO", "DeferredTerms", "reported_terms", "sample_terms"]

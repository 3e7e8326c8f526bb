r"""The compiled path of every loss (``jit=True``): model, guide and bound traced per structure.

:class:`CompiledLoss` runs a loss's eager ``differentiable_loss`` under :func:`torch.jit.trace`
the first time it sees a *signature*, and replays the traced graph afterwards. The graph takes
every parameter leaf (``pyro.param`` values, ``pyro.module`` modules, the parameters of a model or
guide that is an ``nn.Module``) and every tensor argument as inputs, so the optimizer's updates
and new minibatches flow in; random draws are graph operations, so every call draws afresh and,
on the same seed, the same numbers as the eager path. The reported terms
(:attr:`~pyro_vi_ext.infer._loss_base.ParticleELBO.last_terms`) are outputs of the graph.

What recompiles (a new trace, kept next to the old ones): a new model or guide, new shapes,
dtypes or devices of the tensor arguments, a new value of a non-tensor argument, switching
gradients on or off, and a new loss state that changes the maths (e.g. the annealed weights of
:class:`~pyro_vi_ext.DecomposedELBO`, which then recompiles each time they change). What is
*baked in* and does not recompile: Python control flow on tensor values inside the model or
guide, a :func:`pyro.poutine.scale` whose value changes between calls, and the value-dependent
validation checks (finite observations), which run when tracing only. Models whose structure
depends on the data in those ways should stay eager.

``torch.jit.trace`` is marked deprecated in torch 2.13 (in favour of ``torch.compile``, which
breaks the graph at every Pyro messenger); it is what Pyro's own ``JitTrace_ELBO`` uses and it
works here; its deprecation warning is silenced inside this module only.

If tracing fails (a parameter the trace cannot see, an operation ``torch.jit.trace`` does not
support), the loss runs the same call eagerly; if that succeeds the signature stays eager and a
warning saying why is given once, otherwise the eager error is raised as without ``jit``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch

#: maximum number of traces kept per loss; the oldest is dropped beyond it
MAX_TRACES = 32


def _signature(value: object) -> object:
    """Hashable description of an argument: shape/dtype/device for tensors, else the value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _signature(v)) for k, v in value.items())))
    hash(value)  # TypeError for an unhashable argument: the caller falls back to eager
    return ("value", type(value), value)


def _flatten_tensors(value: object, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _flatten_tensors(item, out)
    elif isinstance(value, dict):
        for key in sorted(value):
            _flatten_tensors(value[key], out)


def _rebuild(value: object, tensors: list[torch.Tensor]) -> object:
    """Replace the tensors of ``value`` (in :func:`_flatten_tensors` order) by ``tensors``."""
    if isinstance(value, torch.Tensor):
        return tensors.pop(0)
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(item, tensors) for item in value)
    if isinstance(value, dict):
        rebuilt = {key: _rebuild(value[key], tensors) for key in sorted(value)}
        return {key: rebuilt[key] for key in value}
    return value


def _program_key(fn: Callable) -> object:
    owner = getattr(fn, "__self__", None)
    key = (owner, fn.__func__) if owner is not None and hasattr(fn, "__func__") else fn
    try:
        hash(key)
    except TypeError:
        return id(fn)
    return key


def _module_parameters(fn: Callable) -> list[torch.Tensor]:
    """Parameters of ``fn`` (or of the object a bound method belongs to) if it is a module."""
    params = []
    for obj in (fn, getattr(fn, "__self__", None)):
        if isinstance(obj, torch.nn.Module):
            params.extend(p for p in obj.parameters() if p.requires_grad)
    return params


class _Trace:
    """One traced graph: its parameter names, the extra module leaves, and the output names."""

    def __init__(
        self,
        param_names: list[str],
        module_leaves: list[torch.Tensor],
        term_names: list[str],
        graph: Callable,
    ):
        self.param_names = param_names
        self.module_leaves = module_leaves
        self.term_names = term_names
        self.graph = graph


class CompiledLoss:
    """The traces of one loss instance, by signature, and the signatures that stay eager.

    A loss built with ``jit=True`` holds one; its ``differentiable_loss`` dispatches here.
    """

    def __init__(self) -> None:
        self.traces: dict[object, _Trace] = {}
        self.eager: dict[object, str] = {}
        self.compile_count = 0
        self._warned: set[str] = set()

    def key(self, loss, model, guide, args, kwargs) -> object:
        """Return the signature a trace is kept under (raises ``TypeError`` if unhashable)."""
        return (
            _program_key(model),
            _program_key(guide),
            torch.is_grad_enabled(),
            _signature(tuple(args)),
            _signature(dict(kwargs)),
            loss.compile_state(),
        )

    def _leaves(
        self, names: list[str], module_leaves: list[torch.Tensor], model, guide
    ) -> list[torch.Tensor]:
        leaves: dict[int, torch.Tensor] = {}
        for name in names:
            # the primitive, so that SVI's param capture sees the parameters of a replayed graph
            leaf = pyro.param(name).unconstrained()
            leaves[id(leaf)] = leaf
        for fn in (model, guide):
            for param in _module_parameters(fn):
                leaves.setdefault(id(param), param)
        for param in module_leaves:
            leaves.setdefault(id(param), param)
        return list(leaves.values())

    def __call__(self, loss, method: Callable, model, guide, args, kwargs) -> torch.Tensor:
        """Return ``method(loss, model, guide, *args, **kwargs)`` through the compiled graph."""
        try:
            key = self.key(loss, model, guide, args, kwargs)
        except TypeError as error:
            return self._eager(
                loss,
                method,
                None,
                f"an argument cannot be hashed ({error})",
                model,
                guide,
                args,
                kwargs,
            )
        if key in self.eager:
            return method(loss, model, guide, *args, **kwargs)
        refusal = loss.compile_refusal()
        if refusal is not None:
            return self._eager(loss, method, key, refusal, model, guide, args, kwargs)
        trace = self.traces.get(key)
        if trace is None:
            return self._compile(loss, method, key, model, guide, args, kwargs)
        leaves = self._leaves(trace.param_names, trace.module_leaves, model, guide)
        arg_tensors: list[torch.Tensor] = []
        _flatten_tensors((tuple(args), dict(kwargs)), arg_tensors)
        outputs = trace.graph(*leaves, *arg_tensors)
        value, terms = outputs[0], outputs[1:]
        loss.set_compiled_terms(dict(zip(trace.term_names, terms, strict=True)))
        return value

    def _eager(self, loss, method, key, why: str, model, guide, args, kwargs) -> torch.Tensor:
        value = method(loss, model, guide, *args, **kwargs)  # an eager error propagates
        if key is not None:
            self.eager[key] = why
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(
                f"{type(loss).__name__}(jit=True) runs this model and guide eagerly: {why}. "
                "The values and gradients are those of the eager path.",
                stacklevel=4,
            )
        return value

    def _compile(self, loss, method, key, model, guide, args, kwargs) -> torch.Tensor:
        # the parameters the call reaches through pyro.param / pyro.module
        rng = _rng_state()
        with poutine.block(), poutine.trace(param_only=True) as capture, torch.no_grad():
            with _quiet_terms(loss):
                method(loss, model, guide, *args, **kwargs)
        _set_rng_state(rng)  # the traced run draws the numbers the eager run would
        params = [site for site in capture.trace.nodes.values() if site["type"] == "param"]
        param_names = [site["name"] for site in params]
        # the module's own parameters, handed to pyro.module's pyro.param as initial values: a
        # module uses them even when the store holds another tensor under its name (two models
        # registering modules under the same name)
        module_leaves = [
            init
            for site in params
            for init in site["args"][1:2]
            if isinstance(init, torch.nn.Parameter) and init.requires_grad
        ]
        leaves = self._leaves(param_names, module_leaves, model, guide)
        arg_tensors: list[torch.Tensor] = []
        _flatten_tensors((tuple(args), dict(kwargs)), arg_tensors)
        num_leaves = len(leaves)
        term_names: list[str] = []
        first_outputs: list[tuple] = []

        def traced(*inputs):
            call_args, call_kwargs = _rebuild(
                (tuple(args), dict(kwargs)), list(inputs[num_leaves:])
            )
            with loss.deferred_terms() as terms:
                value = method(loss, model, guide, *call_args, **call_kwargs)
            term_names[:] = list(terms)
            outputs = (value, *terms.values())
            first_outputs.append(outputs)
            return outputs

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # torch 2.13 marks torch.jit.trace deprecated; it still works (see module note)
                warnings.filterwarnings("ignore", ".*torch.jit.trace.*", DeprecationWarning)
                graph = torch.jit.trace(
                    traced, (*leaves, *arg_tensors), check_trace=False, strict=False
                )
        except Exception as error:  # noqa: BLE001 - any tracing failure: try the eager path
            _set_rng_state(rng)
            why = f"torch.jit.trace failed ({type(error).__name__}: {str(error).splitlines()[0]})"
            return self._eager(loss, method, key, why, model, guide, args, kwargs)
        if len(self.traces) >= MAX_TRACES:
            self.traces.pop(next(iter(self.traces)))
        self.traces[key] = _Trace(param_names, module_leaves, list(term_names), graph)
        self.compile_count += 1
        # the tracing run computed this call's result (with its graph): return it
        value, *terms = first_outputs[-1]
        loss.set_compiled_terms(dict(zip(term_names, terms, strict=True)))
        return value


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _quiet_terms(loss):
    saved = dict(loss.last_terms)
    try:
        yield
    finally:
        loss.last_terms = saved


__all__ = ["MAX_TRACES", "CompiledLoss"]

r"""The compiled paths of every loss: ``jit=True`` (``torch.jit.trace``) and ``jit="inductor"``.

``jit=True``: :class:`CompiledLoss` runs a loss's eager ``differentiable_loss`` under
:func:`torch.jit.trace` the first time it sees a *signature* (after one eager run of that call, see
below), and replays the traced graph afterwards. The graph takes every parameter leaf
(``pyro.param`` values, ``pyro.module`` modules, the parameters of a model or guide that is an
``nn.Module``) and every tensor argument as inputs, so the optimizer's updates and new minibatches
flow in; random draws are graph operations, so every call draws afresh and, on the same seed, the
same numbers as the eager path. The reported terms
(:attr:`~pyro_vi_ext.infer._loss_base.ParticleELBO.last_terms`) are outputs of the graph. The
backward pass is autograd's, op by op.

``jit="inductor"``: :class:`InductorCompiledLoss` captures, per signature, one graph computing
the loss value, its terms *and* the gradients :math:`g_\theta = \partial L / \partial \theta`
of every parameter leaf (:func:`torch.fx.experimental.proxy_tensor.make_fx` over the eager call
followed by :func:`torch.autograd.grad`, on the real tensors: the Pyro program runs once and only
its ATen operations remain), and compiles it with torch inductor (fused C++ kernels, no Python,
messenger or autograd-engine work per step). A call returns the value through a one-node
autograd function whose backward adds :math:`c\, g_\theta` for an incoming gradient :math:`c`, so
``loss.backward()``, ``SVI`` and ``torch.autograd.grad`` work as before; higher-order gradients
(``create_graph=True``) are not available on this path. Random draws stay ATen calls
(``fallback_random``), so values equal the eager path on the same seed. Compiling takes seconds
per signature (10-30 s for the 784-400-20 VAE on 2 cores; inductor's on-disk cache shortens a
recompile of the same graph in a later process), so this path pays off for long training runs on
fixed shapes. Without a C++ compiler (``g++``, or what ``torch._inductor.config.cpp.cxx``
names) or when inductor fails, the captured graph runs uncompiled (same values, no Pyro
overhead, no fused kernels) with a warning; when the capture itself fails, the call runs eagerly
with a warning. A tensor that requires grad but is not reached through ``pyro.param`` /
``pyro.module`` (a closure) would become a constant of the graph: such a model runs eagerly.

The first call of a signature runs eagerly (its value, gradients and terms are the eager
path's; a guide that sets itself up on its first call, e.g. an autoguide, draws its set-up
numbers there exactly as without ``jit``) and the graph is captured right after it, with the
random state restored, so every later call draws the numbers the eager path would.

What recompiles, on both paths (a new trace, kept next to the old ones, at most
:data:`MAX_TRACES`): a new model or guide, new shapes, dtypes or devices of the tensor arguments,
a new value of a non-tensor argument, switching gradients on or off (``loss`` and
``differentiable_loss`` have one graph each), the ``train()`` / ``eval()`` flags of the
``nn.Module`` objects the program called (dropout, batch norm: one graph per combination), a
module of the program replaced by another object or given other parameter objects, a parameter
removed from or replaced in the param store (``pyro.clear_param_store()``,
``get_param_store().set_state(...)``), and a new loss state that changes the maths (e.g. the
annealed weights of :class:`~pyro_vi_ext.DecomposedELBO`, which then recompiles each time they
change: keep such schedules on the eager or ``jit=True`` path). A model or guide that reads a
tensor value into Python (``if (x > 0).all():``, ``.item()``, ``float(t)``, ``int(t)``,
``.tolist()``, indexing with a tensor) runs eagerly with a warning naming the file and line: a
graph would freeze that branch or number at its first value. Such reads by torch, Pyro or this
package (validation checks, which raise rather than branch) do not count; they run on the first
call only.

.. warning::
   Python values that the model or guide reads from a **global or a closure** are *frozen* at the
   capture and nothing detects a change: e.g. a KL-annealing factor ``poutine.scale(scale=beta)``
   with a global ``beta`` keeps its first value. Pass such a value as an **argument** of model and
   guide (as Pyro's annealing tutorial does): a float argument recompiles for each new value
   (correct, seconds per value on the inductor path); a 0-d tensor argument flows into the
   graph (no recompile). Tensors read from a closure or a global are constants of the graph in
   the same way: pass data that changes as an argument. Weights changed in place (``.data``,
   ``copy_``) are seen. A module replaced by a new object is detected once the old object is
   gone (garbage collected); while the old one stays referenced elsewhere (say, in a list of
   checkpoints) it is not: call ``pyro.clear_param_store()`` or build a new loss after the swap.

On the inductor path, freezing or unfreezing a parameter (``requires_grad``) also recaptures, and
after :data:`INDUCTOR_MANY_COMPILES` graphs in one loss a warning says that it keeps recompiling.

``torch.jit.trace`` is marked deprecated in torch 2.13 (in favour of ``torch.compile``, which
breaks the graph at every Pyro messenger); it is what Pyro's own ``JitTrace_ELBO`` uses and it
works here; its deprecation warning is silenced inside this module only. The first, eager run
of a signature raises the eager error as without ``jit``; if tracing after it fails (a parameter
the trace cannot see, an operation ``torch.jit.trace`` does not support), the signature stays
eager and a warning saying why is given once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
import weakref
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.scale_messenger import ScaleMessenger
from pyro.poutine.trace_messenger import TraceMessenger

from pyro_vi_ext.infer import _weights
from pyro_vi_ext.infer._random_state import same_random_state

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
        #: the param store's tensors the graph was captured with (see :func:`_store_tensors`)
        self.store_tensors: list[torch.Tensor] = []


class _Inputs:
    """What the observed eager run reached: parameters, argument tensors, modules, value reads."""

    def __init__(
        self,
        param_names: list[str],
        module_leaves: list[torch.Tensor],
        leaves: list[torch.Tensor],
        arg_tensors: list[torch.Tensor],
        modules: list[tuple[weakref.ref, tuple]],
        value_read: str | None,
    ):
        self.param_names = param_names
        self.module_leaves = module_leaves
        self.leaves = leaves
        self.arg_tensors = arg_tensors
        self.modules = modules
        self.value_read = value_read


#: folders whose reads of tensor values are validation, not the user's control flow
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (torch, pyro, sys.modules[__name__.split(".")[0]])
)

#: the tensor methods that turn a tensor value into a Python value (a branch, an index, a number)
_VALUE_READS = frozenset(
    {
        torch.Tensor.__bool__,
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.numpy,
        torch.equal,
        torch.allclose,
    }
)

#: torch files whose tensor methods read a value on the caller's behalf (``x in t``, ``format``)
_READ_ON_BEHALF = tuple(
    os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), name)
    for name in ("_tensor.py", "overrides.py", "_tensor_str.py")
)


class _ValueReadWatch(torch.overrides.TorchFunctionMode):
    """Note the first read of a tensor value into Python made by user code (file:line).

    Reads from torch, Pyro or this package (validation that raises rather than branches) are
    not counted; a read from the user's model or guide is control flow (or a number) that a
    captured graph would freeze.
    """

    def __init__(self) -> None:
        super().__init__()
        self.where: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.where is None and func in _VALUE_READS:
            frame = sys._getframe(1)
            filename = os.path.abspath(frame.f_code.co_filename)
            while filename in _READ_ON_BEHALF and frame.f_back is not None:
                frame = frame.f_back  # the code that asked the tensor method for the value
                filename = os.path.abspath(frame.f_code.co_filename)
            if not filename.startswith(_LIBRARY_DIRS):
                self.where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        return func(*args, **(kwargs or {}))


#: handlers that only record or hide sites (``SVI.step`` wraps every step in a parameter trace)
_RECORDING_HANDLERS = (TraceMessenger, BlockMessenger)


def _outer_handlers() -> tuple:
    """Describe the Pyro handlers active around the loss call (part of the signature).

    A handler changes the program a graph was captured from: ``fit(data_plate=...)`` scales by
    its own ``N / B`` (training and evaluation differ), a user's ``poutine.scale`` by its factor.
    Those two are described by their state, so a change recompiles; a trace or block (SVI's
    parameter capture) is left out; any other handler counts by its identity, so a graph is
    only reused under the very same handler object.
    """
    described = []
    for handler in _PYRO_STACK:
        if isinstance(handler, _RECORDING_HANDLERS):
            continue  # SVI's parameter capture: records the program, changes nothing in it
        if isinstance(handler, _weights.DataPlateScaling):
            described.append(
                ("data_plate", handler.plate_name, handler.full_size, handler.batch_size)
            )
        elif isinstance(handler, ScaleMessenger) and not isinstance(handler.scale, torch.Tensor):
            described.append(("scale", float(handler.scale)))
        else:
            described.append((type(handler).__qualname__, id(handler)))
    return tuple(described)


def _argument_numbers(value: object, out: set[float]) -> None:
    """Collect the Python numbers among the (nested) arguments ``value``."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        out.add(float(value))
    elif isinstance(value, list | tuple):
        for item in value:
            _argument_numbers(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _argument_numbers(item, out)


class _FrozenScaleWatch(Messenger):
    """Note the first sample site whose user scale is a Python number not among the arguments.

    Such a scale (``poutine.scale(scale=beta)`` with ``beta`` read from a global or a closure,
    e.g. a KL-annealing factor) is a constant of a captured graph: a later change of ``beta``
    is not seen. A number passed as an argument is part of the signature (a new value
    recompiles) and a tensor scale is an input of the graph, so neither is noted. The plates'
    subsampling factors (``fit(data_plate=...)``'s included: it marks the plate's full size) are
    divided out by :func:`~pyro_vi_ext.infer._weights.site_user_scale`.
    """

    def __init__(self, argument_numbers: set[float]) -> None:
        super().__init__()
        self.argument_numbers = argument_numbers
        self.where: str | None = None

    def _pyro_post_sample(self, msg) -> None:
        if self.where is not None or isinstance(msg["scale"], torch.Tensor):
            return
        scale = _weights.site_user_scale(msg)
        if scale is None or scale == 1.0 or scale in self.argument_numbers:
            return
        self.where = f"site {msg['name']!r} has the user scale {scale:g}"


@contextlib.contextmanager
def _record_modules():
    """Yield the list of the ``nn.Module`` objects called inside (each once, in call order)."""
    called: dict[int, torch.nn.Module] = {}

    def note(module, inputs):
        called.setdefault(id(module), module)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(note)
    modules: list[torch.nn.Module] = []
    try:
        yield modules
    finally:
        handle.remove()
        modules.extend(called.values())


def _module_guard(module: torch.nn.Module) -> tuple[weakref.ref, tuple]:
    return weakref.ref(module), tuple(module._parameters.values())


def _modules_changed(modules: list[tuple[weakref.ref, tuple]]) -> bool:
    """Whether a module the graph ran is gone or holds other parameter objects than then."""
    for ref, params in modules:
        module = ref()
        if module is None:
            return True
        current = module._parameters.values()
        if len(current) != len(params):
            return True
        if any(a is not b for a, b in zip(current, params, strict=True)):
            return True
    return False


def _same_modules(old: list | None, new: list) -> bool:
    """Whether two module records (of :func:`_module_guard`) name the same module objects."""
    return old is not None and [ref() for ref, _ in old] == [ref() for ref, _ in new]


def _training_flags(modules: list[tuple[weakref.ref, tuple]]) -> tuple[bool, ...]:
    return tuple(ref().training for ref, _ in modules)


def _store_tensors(names: list[str]) -> list[torch.Tensor]:
    """Return the unconstrained tensors the param store holds under ``names``."""
    params = pyro.get_param_store()._params
    return [params[name] for name in names]


def _store_changed(trace: _Trace) -> bool:
    """Whether a parameter of the graph was removed or replaced in the param store."""
    params = pyro.get_param_store()._params
    for name, tensor in zip(trace.param_names, trace.store_tensors, strict=True):
        if params.get(name) is not tensor:
            return True
    return False


class CompiledLoss:
    """The traces of one loss instance, by signature, and the signatures that stay eager.

    A loss built with ``jit=True`` holds one; its ``differentiable_loss`` dispatches here.
    """

    #: the ``jit=`` option this class implements (named in warnings)
    option: bool | str = True

    def __init__(self) -> None:
        self.traces: dict[object, _Trace] = {}
        self.eager: dict[object, str] = {}
        #: per signature, the modules the program called when captured (weakly) and their
        #: parameter objects; their training flags complete the key of a trace
        self.modules: dict[object, list[tuple[weakref.ref, tuple]]] = {}
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
            _outer_handlers(),
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
        modules = self.modules.get(key)
        if modules is None:
            return self._compile(loss, method, key, model, guide, args, kwargs)
        if _modules_changed(modules):
            # a module was replaced (or its parameters were): its graphs read stale weights
            self._forget(key)
            return self._compile(loss, method, key, model, guide, args, kwargs)
        full_key = (key, _training_flags(modules))
        trace = self.traces.get(full_key)
        if trace is None or _store_changed(trace):
            # new train()/eval() flags, or a parameter cleared / replaced in the param store
            return self._compile(loss, method, key, model, guide, args, kwargs)
        return self._replay(loss, trace, model, guide, args, kwargs)

    def _forget(self, key) -> None:
        """Drop the graphs of signature ``key`` (all training flags)."""
        self.modules.pop(key, None)
        for full_key in [k for k in self.traces if k[0] == key]:
            del self.traces[full_key]

    def _replay(self, loss, trace: _Trace, model, guide, args, kwargs) -> torch.Tensor:
        leaves = self._leaves(trace.param_names, trace.module_leaves, model, guide)
        arg_tensors: list[torch.Tensor] = []
        _flatten_tensors((tuple(args), dict(kwargs)), arg_tensors)
        outputs = trace.graph(*leaves, *arg_tensors)
        value, terms = outputs[0], outputs[1:]
        loss.set_compiled_terms(dict(zip(trace.term_names, terms, strict=True)))
        return value

    def _keep(self, key, found: _Inputs, trace: _Trace) -> None:
        """Keep ``trace`` for ``key`` and the training flags of the modules it ran."""
        if not _same_modules(self.modules.get(key), found.modules):
            self._forget(key)  # another set of modules: the old flags do not describe it
            self.modules[key] = found.modules
        full_key = (key, _training_flags(found.modules))
        self.traces.pop(full_key, None)
        if len(self.traces) >= MAX_TRACES:
            oldest = next(iter(self.traces))
            self.traces.pop(oldest)
            if not any(k[0] == oldest[0] for k in self.traces):
                self.modules.pop(oldest[0], None)
        trace.store_tensors = _store_tensors(trace.param_names)
        self.traces[full_key] = trace
        self.compile_count += 1

    def _warn_once(self, loss, why: str, consequence: str) -> None:
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(
                f"{type(loss).__name__}(jit={self.option!r}) {consequence}: {why}.",
                stacklevel=5,
            )

    def _eager(self, loss, method, key, why: str, model, guide, args, kwargs) -> torch.Tensor:
        value = method(loss, model, guide, *args, **kwargs)  # an eager error propagates
        return self._stay_eager(loss, key, why, value)

    def _stay_eager(self, loss, key, why: str, value: torch.Tensor) -> torch.Tensor:
        """Keep signature ``key`` eager, say why once, and return the eager ``value``."""
        if key is not None:
            self.eager[key] = why
            self._forget(key)
        self._warn_once(
            loss,
            why,
            "runs this model and guide eagerly (the values and gradients are those of the eager "
            "path)",
        )
        return value

    def _observe(self, loss, method, model, guide, args, kwargs) -> tuple[torch.Tensor, _Inputs]:
        """Run the call eagerly, noting the parameters, modules and value reads it makes.

        The eager run is this call's result: a guide that sets itself up on its first call (an
        autoguide) draws its set-up numbers as on the eager path, and the graph is captured
        afterwards, from a set-up program (the random state is restored after the capture).
        """
        watch = _ValueReadWatch()
        numbers: set[float] = set()
        _argument_numbers((args, kwargs), numbers)
        scales = _FrozenScaleWatch(numbers)
        with poutine.trace(param_only=True) as capture, _record_modules() as modules:
            with watch, scales:
                value = method(loss, model, guide, *args, **kwargs)
        if scales.where is not None:
            self._warn_once(
                loss,
                f"{scales.where}, a Python number that is not an argument of the model, so the "
                "graph keeps it; if it changes between steps (KL annealing from a global), pass "
                "it to the model and guide as an argument (a float recompiles per value, a 0-d "
                "tensor flows in) or use jit=False",
                "freezes a scale at its captured value",
            )
        params = [site for site in capture.trace.nodes.values() if site["type"] == "param"]
        param_names = list(dict.fromkeys(site["name"] for site in params))
        # the module's own parameters, handed to pyro.module's pyro.param as initial values: a
        # module uses them even when the store holds another tensor under its name (two models
        # registering modules under the same name)
        module_leaves = list(
            {
                id(init): init
                for site in params
                for init in site["args"][1:2]
                if isinstance(init, torch.nn.Parameter) and init.requires_grad
            }.values()
        )
        leaves = self._leaves(param_names, module_leaves, model, guide)
        arg_tensors: list[torch.Tensor] = []
        _flatten_tensors((tuple(args), dict(kwargs)), arg_tensors)
        guards = [_module_guard(module) for module in modules]
        found = _Inputs(param_names, module_leaves, leaves, arg_tensors, guards, watch.where)
        return value, found

    def _prepare(self, loss, method, key, model, guide, args, kwargs):
        """Run the call eagerly; return ``(value, found)``, ``found`` None when it stays eager."""
        value, found = self._observe(loss, method, model, guide, args, kwargs)
        if found.value_read is not None:
            why = (
                f"the model or guide reads a tensor value into Python at {found.value_read} "
                "(e.g. `if (x > 0).all():`, `.item()`); a compiled graph would freeze that "
                "branch or number at its first value"
            )
            return self._stay_eager(loss, key, why, value), None
        return value, found

    def _compile(self, loss, method, key, model, guide, args, kwargs) -> torch.Tensor:
        value, found = self._prepare(loss, method, key, model, guide, args, kwargs)
        if found is None:
            return value
        param_names, module_leaves = found.param_names, found.module_leaves
        leaves, arg_tensors = found.leaves, found.arg_tensors
        num_leaves = len(leaves)
        term_names: list[str] = []

        def traced(*inputs):
            call_args, call_kwargs = _rebuild(
                (tuple(args), dict(kwargs)), list(inputs[num_leaves:])
            )
            with loss.deferred_terms() as terms:
                traced_value = method(loss, model, guide, *call_args, **call_kwargs)
            term_names[:] = list(terms)
            return (traced_value, *terms.values())

        try:
            with same_random_state(), _kept_terms(loss), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # torch 2.13 marks torch.jit.trace deprecated; it still works (see module note)
                warnings.filterwarnings("ignore", ".*torch.jit.trace.*", DeprecationWarning)
                graph = torch.jit.trace(
                    traced, (*leaves, *arg_tensors), check_trace=False, strict=False
                )
        except Exception as error:  # noqa: BLE001 - any tracing failure: stay eager
            why = f"torch.jit.trace failed ({type(error).__name__}: {str(error).splitlines()[0]})"
            return self._stay_eager(loss, key, why, value)
        self._keep(key, found, _Trace(param_names, module_leaves, list(term_names), graph))
        return value


class _InductorTrace(_Trace):
    """A captured (and, when the compiler ran, compiled) loss-and-gradient graph.

    ``graph(*leaves, *argument_tensors)`` returns ``(value, *terms, *gradients)``; the gradients
    are those of the inputs at ``grad_positions`` (in that order), the inputs that required grad
    (``requires_grad``, per input, when captured) and that the value depends on. ``compiled`` is
    False when the graph runs uncompiled (no C++ compiler, or inductor failed). ``method`` and
    ``key`` recapture the graph when a parameter is frozen or unfrozen.
    """

    def __init__(
        self,
        found: _Inputs,
        term_names: list[str],
        graph: Callable,
        grad_positions: list[int],
        requires_grad: tuple[bool, ...],
        compiled: bool,
        method: Callable,
        key: object,
    ):
        super().__init__(found.param_names, found.module_leaves, term_names, graph)
        self.grad_positions = grad_positions
        self.requires_grad = requires_grad
        self.compiled = compiled
        self.method = method
        self.key = key


class _PrecomputedGradients(torch.autograd.Function):
    """The loss value whose backward hands out gradients the compiled graph already computed.

    The gradients are handed out once (a second backward through the same value raises), so
    that autograd can move them into ``.grad`` without a copy; an incoming gradient other than
    one scales them.
    """

    @staticmethod
    def forward(ctx, value, gradients, *targets):
        ctx.gradients = gradients
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        gradients = ctx.gradients
        if gradients is None:
            raise RuntimeError(
                "a loss built with jit='inductor' was backpropagated twice through the same "
                "value: its gradients were computed with the value and handed out on the first "
                "backward; call the loss again, or use jit=True / jit=False for repeated backward"
            )
        if torch.is_grad_enabled():
            raise RuntimeError(
                "higher-order gradients (backward with create_graph=True) are not available "
                "from a loss built with jit='inductor' (its gradients are precomputed values); "
                "use jit=True or jit=False"
            )
        ctx.gradients = None  # the only reference left is autograd's: no copy into .grad
        # d(c L)/dtheta = c dL/dtheta; reading c costs a device sync, so only on the CPU
        if grad_output.device.type == "cpu" and float(grad_output) == 1.0:
            return (None, None, *gradients)
        return (None, None, *(grad_output * gradient for gradient in gradients))


def cpp_compiler_problem() -> str | None:
    """Return why inductor cannot build C++ kernels here (``None``: a compiler was found).

    Looks for the compilers ``torch._inductor.config.cpp.cxx`` names (``g++`` by default) on the
    ``PATH``, as inductor does before building its first kernel, so that a missing compiler is
    known before the (long) lowering starts.

    Returns
    -------
    str or None
        The message, naming the compilers looked for and what to do.

    Examples
    --------
    >>> cpp_compiler_problem() is None or "compiler" in cpp_compiler_problem()
    True
    """
    import torch._inductor.config as inductor_config

    wanted = inductor_config.cpp.cxx
    candidates = [c for c in (wanted if isinstance(wanted, (list, tuple)) else (wanted,)) if c]
    if any(shutil.which(candidate) for candidate in candidates):
        return None
    return (
        f"no C++ compiler for torch inductor was found (looked for {candidates} on the PATH); "
        "install g++ or set CXX / torch._inductor.config.cpp.cxx"
    )


class InductorCompiledLoss(CompiledLoss):
    r"""The loss and its gradients as one graph per signature, compiled by torch inductor.

    A loss built with ``jit="inductor"`` holds one. The first call of a signature runs eagerly (its
    result is the eager one), then captures the eager ``differentiable_loss`` followed by
    :func:`torch.autograd.grad` of its result with respect to every parameter leaf under
    :func:`torch.fx.experimental.proxy_tensor.make_fx` (real tensors, so the Pyro messengers run
    once and leave only the ATen operations they caused), and hands that forward-and-backward graph
    to :func:`torch._inductor.compile`. Later calls run the compiled kernels without gradient
    recording and return the value through a one-node autograd function whose backward adds the
    precomputed gradients, scaled by the incoming gradient:
    :math:`\partial (c L) / \partial \theta = c\, g_\theta`.

    Random draws stay ATen calls (``fallback_random``), so on the same seed the compiled loss
    draws the same numbers as the eager one. What recompiles and what falls back: see the module
    note.

    References
    ----------
    .. [1] J. Ansel et al., "PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode
       Transformation and Graph Compilation", ASPLOS 2024 (AOTAutograd's joint forward-backward
       graph and the inductor compiler this path uses).

    Examples
    --------
    >>> from pyro_vi_ext import ImportanceWeightedELBO
    >>> loss = ImportanceWeightedELBO(num_particles=5, estimator="dreg", jit="inductor")
    >>> type(loss._compiled).__name__
    'InductorCompiledLoss'
    """

    option = "inductor"

    def _replay(self, loss, trace: _InductorTrace, model, guide, args, kwargs) -> torch.Tensor:
        leaves = self._leaves(trace.param_names, trace.module_leaves, model, guide)
        arg_tensors: list[torch.Tensor] = []
        _flatten_tensors((tuple(args), dict(kwargs)), arg_tensors)
        inputs = [*leaves, *arg_tensors]
        if trace.requires_grad != tuple(tensor.requires_grad for tensor in inputs):
            # a parameter was frozen or unfrozen: the graph computes the wrong set of gradients
            return self._compile(loss, trace.method, trace.key, model, guide, args, kwargs)
        with torch.no_grad():
            outputs = trace.graph(*(tensor.detach() for tensor in inputs))
        return self._finish(loss, trace, inputs, outputs)

    def _finish(self, loss, trace: _InductorTrace, inputs, outputs) -> torch.Tensor:
        num_terms = len(trace.term_names)
        value, terms = outputs[0], outputs[1 : 1 + num_terms]
        gradients = tuple(outputs[1 + num_terms :])
        loss.set_compiled_terms(dict(zip(trace.term_names, terms, strict=True)))
        if not gradients or not torch.is_grad_enabled():
            return value
        targets = [inputs[position] for position in trace.grad_positions]
        return _PrecomputedGradients.apply(value, gradients, *targets)

    def _compile(self, loss, method, key, model, guide, args, kwargs) -> torch.Tensor:
        eager_value, found = self._prepare(loss, method, key, model, guide, args, kwargs)
        if found is None:
            return eager_value
        inputs = [*found.leaves, *found.arg_tensors]
        num_leaves = len(found.leaves)
        with_grad = torch.is_grad_enabled()
        grad_positions = [i for i, tensor in enumerate(inputs) if tensor.requires_grad]
        used_positions: list[int] = []  # inputs the value depends on (the others get no .grad)
        term_names: list[str] = []

        def loss_and_gradients(*traced_inputs):
            call_args, call_kwargs = _rebuild(
                (tuple(args), dict(kwargs)), list(traced_inputs[num_leaves:])
            )
            with loss.deferred_terms() as terms:
                value = method(loss, model, guide, *call_args, **call_kwargs)
            term_names[:] = list(terms)
            gradients: list[torch.Tensor] = []
            if with_grad and grad_positions and value.requires_grad:
                all_gradients = torch.autograd.grad(
                    value, [traced_inputs[i] for i in grad_positions], allow_unused=True
                )
                pairs = zip(grad_positions, all_gradients, strict=True)
                used = [(i, g) for i, g in pairs if g is not None]
                used_positions[:] = [i for i, _ in used]
                gradients = [g for _, g in used]
            return (value.detach(), *terms.values(), *gradients)

        # imported here: both modules are heavy and only this path needs them
        from torch.fx.experimental.proxy_tensor import make_fx

        try:
            # value reads of the library (checks) run on the real tensors and are baked in, as
            # under torch.jit.trace; the user's were refused by _prepare
            capture = make_fx(
                loss_and_gradients, tracing_mode="real", _error_on_data_dependent_ops=False
            )
            with same_random_state(), _kept_terms(loss):
                graph = capture(*inputs)
            _drop_baked_value_reads(graph)
            constant = _constant_requiring_grad(graph)
            if constant is not None:
                raise _Uncapturable(
                    f"a tensor that requires grad ({constant}) is not reached through "
                    "pyro.param / pyro.module, so the graph would treat it as a constant"
                )
        except Exception as error:  # noqa: BLE001 - any capture failure: stay eager
            why = f"make_fx capture failed ({type(error).__name__}: {_first_line(error)})"
            return self._stay_eager(loss, key, why, eager_value)
        with same_random_state():  # compiling must not move the RNG either
            runner, compiled, why = self._inductor(graph, inputs)
        if why is not None:
            self._warn_once(
                loss, why, "runs its captured graph uncompiled (same values, no fused kernels)"
            )
        trace = _InductorTrace(
            found,
            list(term_names),
            runner,
            list(used_positions),
            tuple(tensor.requires_grad for tensor in inputs),
            compiled,
            method,
            key,
        )
        self._keep(key, found, trace)
        if self.compile_count == INDUCTOR_MANY_COMPILES:
            self._warn_once(
                loss,
                f"{self.compile_count} graphs compiled so far (shapes, non-tensor arguments or "
                "loss state change between calls; see pyro_vi_ext.infer._compiled for what "
                "recompiles); each compile takes seconds, so jit=True may be faster overall",
                "keeps recompiling",
            )
        return eager_value  # this call's result is the eager run's (see _observe)

    @staticmethod
    def _inductor(graph, inputs) -> tuple[Callable, bool, str | None]:
        """Return (runner, whether it is compiled, why not)."""
        # CPU kernels are C++; CUDA kernels are Triton and need no C++ compiler of ours
        on_cpu = any(tensor.device.type == "cpu" for tensor in inputs)
        problem = cpp_compiler_problem() if on_cpu else None
        if problem is not None:
            return graph, False, problem
        examples = [tensor.detach() for tensor in inputs]
        try:
            with warnings.catch_warnings(), torch.no_grad():
                # inductor's own use of deprecated torch internals warns; not the user's concern
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                from torch._inductor import compile as inductor_compile

                runner = inductor_compile(graph, examples, options=INDUCTOR_OPTIONS)
        except Exception as error:  # noqa: BLE001 - e.g. a compiler that fails on this machine
            return graph, False, f"inductor failed ({type(error).__name__}: {_first_line(error)})"
        return runner, True, None


class _Uncapturable(RuntimeError):
    """The captured graph would be wrong (raised inside the capture, turned into the fallback)."""


def _constant_requiring_grad(graph: torch.fx.GraphModule) -> str | None:
    """Return the name of a graph constant that requires grad (its gradient would be lost)."""
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            constant = getattr(graph, str(node.target), None)
            if isinstance(constant, torch.Tensor) and constant.requires_grad:
                return f"shape {tuple(constant.shape)}"
    return None


def _drop_baked_value_reads(graph: torch.fx.GraphModule) -> None:
    """Remove the graph's reads of tensor values into Python numbers whose result is unused.

    A value read (``.item()``, ``float(tensor)``) during the capture leaves a
    ``_local_scalar_dense`` node whose number was used as a constant; inductor refuses such a
    data-dependent node, and nothing in the graph needs it.
    """
    value_read = torch.ops.aten._local_scalar_dense.default
    unused = [
        node
        for node in graph.graph.nodes
        if node.op == "call_function" and node.target is value_read and not node.users
    ]
    for node in unused:
        graph.graph.erase_node(node)
    if unused:
        graph.recompile()


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


#: after this many compiled graphs in one loss, jit="inductor" warns that it keeps recompiling
INDUCTOR_MANY_COMPILES = 8

#: inductor options of the compiled path: random draws stay ATen calls (the eager stream)
INDUCTOR_OPTIONS = {"fallback_random": True}

#: the values ``jit=`` accepts
JIT_OPTIONS = (False, True, "inductor")


def check_jit_option(jit: object) -> bool | str:
    """Return the ``jit=`` option of a loss, normalized, or raise naming the valid ones.

    Parameters
    ----------
    jit : bool or {"inductor"}
        ``False``: eager; ``True``: :class:`CompiledLoss` (``torch.jit.trace``); ``"inductor"``:
        :class:`InductorCompiledLoss`.

    Returns
    -------
    bool or str
        ``False``, ``True`` or ``"inductor"``.

    Raises
    ------
    ValueError
        For any other value.

    Examples
    --------
    >>> check_jit_option("inductor")
    'inductor'
    """
    if isinstance(jit, str):
        if jit == "inductor":
            return jit
    elif isinstance(jit, (bool, int)) and jit in (0, 1):
        return bool(jit)
    raise ValueError(
        f"jit must be False, True (torch.jit.trace) or 'inductor' (torch inductor), got {jit!r}"
    )


def compiled_path(jit: object) -> CompiledLoss | None:
    """Return the compiled path of a loss built with ``jit=jit`` (``None``: eager).

    Parameters
    ----------
    jit : bool or {"inductor"}
        The loss's ``jit=`` argument (see :func:`check_jit_option`).

    Returns
    -------
    CompiledLoss or None
        A fresh :class:`CompiledLoss`, :class:`InductorCompiledLoss`, or ``None``.

    Examples
    --------
    >>> type(compiled_path("inductor")).__name__
    'InductorCompiledLoss'
    """
    option = check_jit_option(jit)
    if option == "inductor":
        return InductorCompiledLoss()
    return CompiledLoss() if option else None


@contextlib.contextmanager
def _kept_terms(loss):
    """Keep the eager run's reported terms (pending or computed) across a capture."""
    saved = loss._pending_terms, loss._last_terms
    try:
        yield
    finally:
        loss._pending_terms, loss._last_terms = saved


__all__ = [
    "INDUCTOR_MANY_COMPILES",
    "INDUCTOR_OPTIONS",
    "JIT_OPTIONS",
    "MAX_TRACES",
    "CompiledLoss",
    "InductorCompiledLoss",
    "check_jit_option",
    "compiled_path",
    "cpp_compiler_problem",
]

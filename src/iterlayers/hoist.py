r"""Loop-invariant code motion for equilibrium cells.

A solver evaluates ``cell(z, x)`` once per iteration, yet part of a typical cell depends on the input and the
parameters alone: the input injection ``U x + b`` of ``tanh(W z + U x + b)``, a normalised weight, a
positional encoding. Those values are identical at every iteration of a solve. :func:`split_cell` traces the
cell once with :mod:`torch.fx`, finds the part of the graph that does not depend on ``z``, and splits it into

    cell(z, *args) == step(z, *prepare(*args))

so that ``prepare`` runs once per solve and ``step`` once per iteration (:func:`iterlayers.deq_solve` does this
for its no-grad forward solve; the differentiable evaluations of the backward pass use the cell itself).

The split is an optimisation and does not change results beyond round-off (a hoisted ``U x`` is computed for
the whole batch once, where the loop would compute it for the shrinking set of unconverged samples, and a
matrix product's rounding can depend on its batch size). It is refused (the cell is then used as written)
when tracing fails, when the traced graph mutates tensors in place, when tracing changed the module's
state, when a forward hook would not fire once per real evaluation (below), or when ``step(prepare(.))``
does not reproduce the cell on the first two iterates of the solve it is built for. Random ops (dropout,
``rand*``) and modules with buffers in training mode (batch-norm statistics) are never hoisted: they stay
inside ``step`` and run every iteration, as they would without the split. Values derived from the batched
inputs are hoisted only as tensors whose first dimension is the batch, so the solver can still slice them
when it drops converged samples.

What a trace bakes in, and how the cache stays valid. The generated code looks parameters, buffers, tensor
attributes and leaf submodules up on the live cell at every call (``self.W``), so an optimiser step, a
replaced ``nn.Parameter`` or ``load_state_dict`` is followed without re-tracing. Every other Python value the
forward reads (a temperature ``self.temp``, a flag, ``training``, a submodule's ``eps``, which submodules and
parameters exist and of what type) is frozen into the graph. :func:`cell_fingerprint` records all of them at
trace time, for the cell and every submodule, and each solve compares the record with the cell as it is
(a walk over the modules' attribute dicts: no extra evaluation of the cell); any difference rebuilds and
re-verifies the split. A cell whose record keeps changing (an attribute annealed at every step) is not
worth re-tracing: after ``_MAX_REBUILDS`` rebuilds it is used as written from then on. Values the forward
reaches outside the module tree (globals, closures of stored functions, objects nested deeper than
``_DEPTH`` or containers of more than ``_WIDTH`` items, which are compared by identity) are not tracked:
such a cell should be solved with ``hoist=False``.

Hooks. The cell's own ``forward`` never runs under the split, and fx inlines every submodule that is not a
``torch.nn`` leaf, so forward (pre-)hooks on those would silently stop firing (an NFE counter, an activation
recorder). Hoisting is therefore refused while the cell, a non-leaf submodule, or the global registry
(``torch.nn.modules.module.register_module_forward_hook``) carries a forward or forward-pre hook. Hooks on
leaf submodules (``nn.Linear``, ``nn.Conv2d``, ...) are kept: the split still calls those modules, so their
hooks fire once per real evaluation (once per solve for a hoisted ``U``, once per iteration for ``W``).

What the verification guarantees. ``step(prepare(args))`` is compared with ``cell`` (to ``8 eps``
relative) at ``z0`` and at ``cell(z0)``, for the inputs of the solve the split is built for. A trace that
took a wrong Python branch (an ``isinstance`` test on a proxy, say) and differs from the cell at either
point is refused. This is a check at two points, not a proof: fx cannot branch on tensor values, so once the
baked-in Python values are pinned by the fingerprint and the input signature by the cache key, the graph is
the same function for every later input, and a wrong branch that agrees with the cell at both points (an
error that vanishes at ``z0`` and at ``f(z0)``) is the residual risk. State carried between iterations is
not something two points can reveal (an in-place update of a hoisted value that is a no-op at ``z0`` and
``z1``): it is excluded by refusing every in-place op, not by the verification.
"""
from __future__ import annotations

import enum
import inspect
import operator
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

from .cells import submodules

__all__ = ["SplitCell", "split_cell", "cell_fingerprint", "input_signature"]

_RANDOM_WORDS = ("dropout", "rand", "bernoulli", "normal", "multinomial", "poisson", "uniform", "exponential",
                 "cauchy", "geometric")
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


@dataclass
class SplitCell:
    """``cell(z, *args) == step(cell, z, *prepare(cell, *args))``.

    ``prepare`` returns the values of the ``frontier`` nodes (hoisted values used inside the loop);
    ``from_args[i]`` says whether value ``i`` derives from the inputs (then it is batch-shaped and sliced
    with the samples) or from parameters and constants alone (shared, never sliced). ``n_hoisted`` counts the
    operations moved out of the loop.
    """

    prepare: Callable
    step: Callable
    frontier: tuple
    from_args: tuple
    n_hoisted: int

    def bind(self, cell, args: tuple, batch: int, values: tuple | None = None):
        """Run ``prepare`` once; return ``(step_fn, batched)`` with ``step_fn(z, *batched)`` equal to
        ``cell(z, *args)`` (and to the sliced cell on sliced ``batched``), or ``None`` if a value derived from
        the inputs is not a batch-shaped tensor."""
        if values is None:
            values = self.prepare(cell, *args)
        for v, from_args in zip(values, self.from_args):
            if from_args and not _batch_shaped(v, batch):
                return None
        batched = tuple(v for v, k in zip(values, self.from_args) if k)
        shared = tuple(v for v, k in zip(values, self.from_args) if not k)
        order, step = self.from_args, self.step
        if all(order):
            # Every hoisted value is batched (the usual input injection): no interleaving per evaluation.
            def step_fn(z, *b):
                return step(cell, z, *b)
        else:
            def step_fn(z, *b):
                it_b, it_s = iter(b), iter(shared)
                return step(cell, z, *[next(it_b) if k else next(it_s) for k in order])

        return step_fn, batched


def _batch_shaped(v, batch: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch


def _is_random(target) -> bool:
    name = getattr(target, "__name__", str(target)).lower()
    return any(w in name for w in _RANDOM_WORDS)


def _is_inplace(node: fx.Node, cell: nn.Module) -> bool:
    if "out" in node.kwargs or node.kwargs.get("inplace", False):
        return True
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_module":
        return bool(getattr(cell.get_submodule(node.target), "inplace", False))
    return False


def _is_impure(node: fx.Node, cell: nn.Module) -> bool:
    """Ops whose repeated evaluation differs from a single one: they must stay in the loop."""
    if node.op in ("call_function", "call_method"):
        return _is_random(node.target)
    if node.op == "call_module":
        m = cell.get_submodule(node.target)
        if _is_random(type(m)):
            return True
        # Batch norm and friends update running statistics at every call in training mode.
        return m.training and any(True for _ in m.buffers(recurse=True))
    return False


_CONTAINERS = (list, dict, set)


def _module_state(cell: nn.Module):
    """A snapshot of every submodule's attributes (and of the contents of list/dict/set attributes): a
    forward pass that records things on the module leaves proxies there when traced."""
    snap = []
    for m in cell.modules():
        d = dict(m.__dict__)
        containers = {k: (v, v.copy()) for k, v in d.items()
                      if isinstance(v, _CONTAINERS) and k not in ("_parameters", "_buffers", "_modules")}
        snap.append((m, d, dict(m._parameters), dict(m._buffers), dict(m._modules), containers))
    return snap


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b)) if isinstance(a, list) else (
        a.keys() == b.keys() and all(a[k] is b[k] for k in a) if isinstance(a, dict) else a == b)


def _state_changed(snap) -> bool:
    for m, d, p, b, mods, containers in snap:
        if m.__dict__.keys() != d.keys() or any(m.__dict__[k] is not v for k, v in d.items()):
            return True
        if not (_same(m._parameters, p) and _same(m._buffers, b) and _same(m._modules, mods)):
            return True
        if any(not _same(obj, saved) for obj, saved in containers.values()):
            return True
    return False


def _restore(snap) -> None:
    for m, d, p, b, mods, containers in snap:
        m.__dict__.clear()
        m.__dict__.update(d)
        for live, saved in ((m._parameters, p), (m._buffers, b), (m._modules, mods)):
            live.clear()
            live.update(saved)
        for obj, saved in containers.values():
            if isinstance(obj, list):
                obj[:] = saved
            else:
                obj.clear()
                obj.update(saved)


def _compile(graph: fx.Graph) -> Callable:
    graph.lint()
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    # The generated source refers to parameters and submodules as ``self.<name>``: binding ``self`` to the
    # live cell at call time (instead of copying references as fx.GraphModule does) keeps the split valid
    # when parameters or buffers are replaced, e.g. by ``module.to(...)`` or ``load_state_dict``.
    exec(compile(code.src, "<iterlayers.hoist>", "exec"), namespace)  # noqa: S102 - fx-generated source
    return namespace["forward"]


def _trace(cell: nn.Module, nargs: int) -> fx.Graph | None:
    try:
        params = list(inspect.signature(cell.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) < 1 + nargs:
        return None
    extra = positional[1 + nargs:]
    if any(p.default is p.empty for p in extra):
        return None
    # Parameters the solver never passes are specialised to their defaults (a proxy would take the wrong
    # branch of an ``if mask is None``).
    concrete = {p.name: p.default for p in extra}
    snap = _module_state(cell)
    try:
        graph = fx.Tracer().trace(cell, concrete_args=concrete or None)
    except Exception:  # noqa: BLE001 - any tracing failure means: use the cell as written
        graph = None
    if _state_changed(snap):
        _restore(snap)
        return None
    return graph


def _build(cell: nn.Module, graph: fx.Graph, nargs: int, refuse: set) -> SplitCell | None:
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    # Placeholders past z and the inputs are parameters specialised to their defaults (concrete_args).
    if len(placeholders) < 1 + nargs or any(not n.args for n in placeholders[1 + nargs:]):
        return None
    inputs_ = set(placeholders[1:1 + nargs])
    if any(_is_inplace(n, cell) for n in nodes):
        return None
    z = placeholders[0]
    hoisted, from_args = set(), {}
    for n in nodes:
        if n.op == "output":
            continue
        inputs = n.all_input_nodes
        if n is z or n.name in refuse or _is_impure(n, cell) or any(i not in hoisted for i in inputs):
            continue
        hoisted.add(n)
        from_args[n] = (n in inputs_) or any(from_args[i] for i in inputs)
    frontier = [n for n in nodes if n in hoisted and any(u not in hoisted for u in n.users)]
    n_ops = sum(1 for n in hoisted if n.op in ("call_function", "call_method", "call_module"))
    if n_ops == 0:
        return None

    pre = fx.Graph()
    env = {}
    for n in nodes:
        if n in hoisted:
            env[n] = pre.node_copy(n, lambda a: env[a])
    pre.output(tuple(env[n] for n in frontier))

    stp = fx.Graph()
    env2 = {z: stp.placeholder(z.name)}
    for i, n in enumerate(frontier):
        env2[n] = stp.placeholder(f"hoisted_{i}")
    for n in nodes:
        if n is z or n in frontier or n in hoisted:
            continue
        env2[n] = stp.node_copy(n, lambda a: env2[a])
    return SplitCell(prepare=_compile(pre), step=_compile(stp), frontier=tuple(n.name for n in frontier),
                     from_args=tuple(from_args[n] for n in frontier), n_hoisted=n_ops)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_REBUILDS = "rebuilds"  # per-cell counter of splits rebuilt because the fingerprint changed
_MAX_REBUILDS = 3

# Entries of every nn.Module's __dict__ that the fingerprint treats itself (or that cannot change a trace).
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)
_DEPTH, _WIDTH = 4, 64
_TENSOR = ("tensor",)  # tensors are looked up live by the generated code: only their presence matters


#: exact types answered by one lookup (the common attributes: numbers, strings, flags; a fingerprint is taken on
#: every solve); subclasses (an IntEnum, a Parameter) go through the isinstance tests below
_EXACT_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device})


def _value(v, depth: int = 0):
    """A comparable record of a Python value a trace may have read (without references to it)."""
    t = type(v)
    if t in _EXACT_SCALARS:
        return (t, v)
    if t is tuple and depth < _DEPTH and len(v) <= _WIDTH:
        return (t, tuple([_value(x, depth + 1) for x in v]))
    if isinstance(v, torch.Tensor):
        return _TENSOR
    if isinstance(v, _SCALARS):
        return (type(v), v)
    if depth < _DEPTH:
        if isinstance(v, (tuple, list)) and len(v) <= _WIDTH:
            return (type(v), tuple(_value(x, depth + 1) for x in v))
        if isinstance(v, dict) and len(v) <= _WIDTH:
            return (type(v), tuple((_value(k, depth + 1), _value(x, depth + 1)) for k, x in v.items()))
        if isinstance(v, (set, frozenset)) and len(v) <= _WIDTH and all(isinstance(x, _SCALARS) for x in v):
            return (type(v), frozenset(v))
        # a plain object holding options (a config dataclass): its fields, one level further down
        if not callable(v) and not isinstance(v, (type, nn.Module)) and hasattr(v, "__dict__"):
            return (type(v), _value(vars(v), depth + 1))
    # functions, classes, large or deep containers: identity (and length, where there is one)
    return ("id", type(v), id(v), len(v) if isinstance(v, (tuple, list, dict, set, frozenset)) else -1)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _global_hooks() -> bool:
    g = torch.nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks)


def cell_fingerprint(cell: nn.Module, modules: tuple | None = None) -> tuple:
    """Everything a trace of ``cell`` may have frozen besides the input signature: per module (by path) its
    type, its non-tensor attributes (values), which parameters, buffers and children it has (and which are
    None), and whether it carries forward hooks; plus whether global forward hooks exist. Two equal
    fingerprints mean the traced graph is still the cell's graph. ``modules``: the cell's
    :func:`~iterlayers.cells.submodules` if the caller has walked it already."""
    parts = [_global_hooks()]
    # list comprehensions, not generators: this runs once per solve over every attribute of every module
    for path, m in (submodules(cell) if modules is None else modules):
        parts.append((
            path,
            type(m),
            tuple([(k, _value(v)) for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS]),
            tuple([(k, v is None) for k, v in m._parameters.items()]),
            tuple([(k, v is None) for k, v in m._buffers.items()]),
            tuple([(k, v is None) for k, v in m._modules.items()]),
            _has_hooks(m),
        ))
    return tuple(parts)


def _hooks_refuse(cell: nn.Module) -> bool:
    """Whether some forward hook would not fire once per real evaluation under the split: one on the cell
    itself or on a submodule fx inlines (only leaf modules stay calls), or a global one."""
    if _global_hooks():
        return True
    tracer = fx.Tracer()
    return any(_has_hooks(m) and (path == "" or not tracer.is_leaf_module(m, path))
               for path, m in cell.named_modules())


def _sig(a):
    if isinstance(a, torch.Tensor):
        return ("t", a.dtype, a.device.type, a.dim())
    if isinstance(a, (tuple, list)):
        return (type(a).__name__,) + tuple(_sig(x) for x in a)
    return (type(a).__name__,)


def input_signature(cell: nn.Module, z, args, kwargs=None, modules: tuple | None = None) -> tuple:
    """What a trace (and a verified stopping rule) depends on besides the fingerprint: every module's training
    flag and the structure, dtype, device type and rank of the state, of each input and of each keyword.
    ``modules``: the cell's :func:`~iterlayers.cells.submodules` if the caller has walked it already."""
    kw = () if not kwargs else tuple([(k, _sig(v)) for k, v in kwargs.items()])
    training = tuple([m.training for _, m in (submodules(cell) if modules is None else modules)])
    return (training, _sig(z), tuple([_sig(a) for a in args]), kw)


def _close(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        tol = 8 * torch.finfo(a.dtype).eps if a.is_floating_point() else 0.0
        return bool(((a - b).abs() <= tol * (1 + b.abs())).all())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return False


def split_cell(cell, z0, args: tuple, batch: int, fingerprint: tuple | None = None, signature: tuple | None = None):
    """The loop-invariant split of ``cell`` for a solve from ``z0`` with inputs ``args``, or ``None``.

    Returns ``(step_fn, batched_args, n_hoisted)`` where ``step_fn(z, *batched_args)`` evaluates the cell
    with its ``z``-independent part already computed; ``None`` when the cell cannot (or need not) be split.
    The split is built and verified once per cell, training mode and input signature, then cached with the
    cell's :func:`cell_fingerprint`; a solve that finds a different fingerprint rebuilds it (see the module
    docstring), and after ``_MAX_REBUILDS`` rebuilds the cell is no longer split. ``fingerprint``: the
    cell's :func:`cell_fingerprint` if the caller has just computed it (it is computed once per solve), and
    ``signature`` its :func:`input_signature` for ``(z0, args)`` likewise.
    """
    if not isinstance(cell, nn.Module) or len(args) == 0:
        return None
    if getattr(cell, "_orig_mod", None) is not None or torch.compiler.is_compiling():
        return None  # a torch.compile'd cell already optimises its own graph
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None
    per_cell = _CACHE.setdefault(cell, {})
    if per_cell.get(_REBUILDS, 0) > _MAX_REBUILDS:
        return None
    key = input_signature(cell, z0, args) if signature is None else signature
    if fingerprint is None:
        fingerprint = cell_fingerprint(cell)
    entry = per_cell.get(key)
    if entry is not None and entry[1] == fingerprint:
        split = entry[0]
        if split is None:
            return None
        bound = split.bind(cell, args, batch)
        return None if bound is None else (*bound, split.n_hoisted)
    if entry is not None:
        # Something the cached trace baked in has changed since: rebuild (or give up on a volatile cell).
        per_cell[_REBUILDS] = per_cell.get(_REBUILDS, 0) + 1
        if per_cell[_REBUILDS] > _MAX_REBUILDS:
            per_cell.clear()
            per_cell[_REBUILDS] = _MAX_REBUILDS + 1
            return None

    result = None
    try:
        result = None if _hooks_refuse(cell) else _make_verified(cell, z0, args, batch)
    finally:
        per_cell[key] = (None if result is None else result[0], fingerprint)
    return None if result is None else (result[1], result[2], result[0].n_hoisted)


def _make_verified(cell, z0, args, batch):
    graph = _trace(cell, len(args))
    if graph is None:
        return None
    refuse: set = set()
    # Values derived from the inputs must be batch-shaped tensors to be sliceable: an input's shape or
    # device, say, is refused (kept in the loop) and the split is rebuilt around it.
    for _ in range(len(graph.nodes)):
        try:
            split = _build(cell, graph, len(args), refuse)
        except Exception:  # noqa: BLE001
            return None
        if split is None:
            return None
        try:
            values = split.prepare(cell, *args)
        except Exception:  # noqa: BLE001
            return None
        bad = [name for name, v, fa in zip(split.frontier, values, split.from_args)
               if fa and not _batch_shaped(v, batch)]
        if not bad:
            break
        refuse.update(bad)
    else:
        return None
    bound = split.bind(cell, args, batch, values)  # the values just checked: prepare is not run again
    if bound is None:
        return None
    step_fn, batched = bound
    # Guard against a trace that is valid Python but not the cell (e.g. an isinstance test on a proxy):
    # the split must reproduce the cell on the first two iterates.
    return (split, step_fn, batched) if _reproduces(cell, step_fn, batched, z0, args) else None


def _reproduces(cell, step_fn, batched, z0, args) -> bool:
    """Whether ``step_fn`` equals ``cell`` at ``z0`` and ``cell(z0)``, without side effects: both run from the
    same random seed (random ops stay in ``step`` in their original order, so dropout masks agree) inside a
    forked RNG, and buffers that the extra evaluations update (batch-norm statistics) are restored."""
    saved = [(b, b.detach().clone()) for b in cell.buffers()]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            z = z0
            for i in range(2):
                torch.manual_seed(12345 + i)
                ref = cell(z, *args)
                torch.manual_seed(12345 + i)
                if not _close(step_fn(z, *batched), ref):
                    return False
                z = ref
        return True
    except Exception:  # noqa: BLE001 - a split that cannot even run is not the cell
        return False
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)

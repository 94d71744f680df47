"""Every option of every solver, and every option solve() shares: a wrong type and a wrong value each give the
typed error of the family, naming the solver (where there is one) and the option, before any iteration."""
import dataclasses
import math

import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers.errors import IterlayersError, OptionTypeError, ValidationError
from iterlayers.solvers import SOLVERS, LoopOptions, make_solver

NAN, INF = float("nan"), float("inf")

# (solver, option, bad value, error type). Each solver option appears with at least one wrong type and one
# wrong value; bools never pass as numbers, strings never as numbers or flags, NaN never passes a range.
CASES = [
    ("picard", "damping", "0.5", OptionTypeError),
    ("picard", "damping", True, OptionTypeError),
    ("picard", "damping", 0.0, ValidationError),
    ("picard", "damping", 1.5, ValidationError),
    ("picard", "damping", NAN, ValidationError),
    ("anderson", "m", 2.5, OptionTypeError),
    ("anderson", "m", True, OptionTypeError),
    ("anderson", "m", "5", OptionTypeError),
    ("anderson", "m", 0, ValidationError),
    ("anderson", "lam", "1e-4", OptionTypeError),
    ("anderson", "lam", NAN, ValidationError),
    ("anderson", "lam", INF, ValidationError),
    ("anderson", "lam", -1e-3, ValidationError),
    ("anderson", "damping", "0.5", OptionTypeError),
    ("anderson", "damping", 0.0, ValidationError),
    ("anderson", "damping", NAN, ValidationError),
    ("broyden", "memory", 3.0, OptionTypeError),
    ("broyden", "memory", False, OptionTypeError),
    ("broyden", "memory", 0, ValidationError),
    ("broyden", "line_search", "no", OptionTypeError),
    ("broyden", "line_search", 1, OptionTypeError),
    ("broyden", "ls_steps", 1.5, OptionTypeError),
    ("broyden", "ls_steps", -1, ValidationError),
    ("forward_backward", "alpha", "0.5", OptionTypeError),
    ("forward_backward", "alpha", 0.0, ValidationError),
    ("forward_backward", "structure", 3, OptionTypeError),
    ("forward_backward", "structure", None, ValidationError),
    ("peaceman_rachford", "alpha", True, OptionTypeError),
    ("peaceman_rachford", "alpha", -1.0, ValidationError),
    ("peaceman_rachford", "structure", "W", OptionTypeError),
    ("peaceman_rachford", "structure", None, ValidationError),
    ("gmres", "restart", 10.0, OptionTypeError),
    ("gmres", "restart", True, OptionTypeError),
    ("gmres", "restart", 0, ValidationError),
]


def test_the_cases_cover_every_option_of_every_solver_with_a_wrong_type_and_a_wrong_value():
    for name, cls in SOLVERS.items():
        for option in cls.option_names():
            kinds = {err for s, o, _, err in CASES if (s, o) == (name, option)}
            assert kinds == {OptionTypeError, ValidationError} or (kinds == {OptionTypeError}
                                                                   and cls.__dataclass_fields__[option].type == "bool"
                                                                   ), (name, option, kinds)


@pytest.mark.parametrize("solver, option, value, error", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]!r}" for c in CASES])
def test_bad_solver_option_is_a_typed_error_naming_solver_and_option(solver, option, value, error):
    calls = []

    def f(z):
        calls.append(1)
        return 0.5 * z

    with pytest.raises(error, match=rf"^{solver}: {option} must ") as info:
        il.solve(f, torch.zeros(2, 3), solver=solver, **{option: value})
    assert calls == []  # refused before the first evaluation
    assert isinstance(info.value, IterlayersError)
    # the builtin a user would catch still catches it
    assert isinstance(info.value, ValueError if error is ValidationError else TypeError)
    # the same check through make_solver and through a solver instance
    with pytest.raises(error, match=rf"^{solver}: {option} must "):
        make_solver(solver, {option: value})
    with pytest.raises(error, match=rf"^{solver}: {option} must "):
        make_solver(SOLVERS[solver](**{option: value}))
    # and through a DEQ's solver options, forward and backward
    with pytest.raises(error, match=rf"{solver}: {option} must "):
        il.DEQ(lambda z, x: z, solver=solver, solver_options={option: value})
    with pytest.raises(error, match=rf"{solver}: {option} must "):
        il.DEQ(lambda z, x: z, backward_solver=solver, backward_solver_options={option: value})


# The splitting solvers need the structure of a monotone map, not a generic f: their valid options and
# solves are tested in tests/models/test_zoo_mondeq.py (a linear monotone system solved exactly, monDEQs).
@pytest.mark.parametrize("solver", sorted(set(SOLVERS) - {"forward_backward", "peaceman_rachford"}))
def test_valid_options_are_normalised_and_solve(solver):
    # Integral-valued floats are not ints, but an int is a valid float: damping=1 is damping=1.0.
    numeric = {"picard": {"damping": 1}, "anderson": {"m": 3, "lam": 0, "damping": 1},
               "broyden": {"memory": 4, "line_search": True, "ls_steps": 0}, "gmres": {"restart": 5}}[solver]
    s = make_solver(solver, numeric)
    for k, value in numeric.items():
        assert getattr(s, k) == value and type(getattr(s, k)) is type(SOLVERS[solver].__dataclass_fields__[k].default)
    x = torch.randn(4, 3, dtype=torch.float64)

    def f(z, xx):  # affine (GMRES's domain), a 0.5-contraction
        return 0.5 * z.flip(1) + xx

    sol = il.solve(f, torch.zeros_like(x), args=(x,), solver=s, atol=1e-10, rtol=0, max_iter=200,
                   on_failure="raise")
    true_res = (f(sol.z, x) - sol.z).norm(dim=1)
    assert bool((true_res <= 1e-10 * (1 + 1e-6)).all()), true_res


def test_unknown_solver_and_options_are_typed():
    with pytest.raises(ValidationError, match=r"unknown solver 'newton'; valid: \['anderson', 'broyden'"):
        make_solver("newton")
    with pytest.raises(OptionTypeError, match="solver must be a name"):
        make_solver(3)
    with pytest.raises(OptionTypeError, match=r"unknown option\(s\) \['mm'\] for solver 'anderson'"):
        make_solver("anderson", {"mm": 3})
    with pytest.raises(OptionTypeError, match="given with a solver instance"):
        make_solver(il.AndersonSolver(), {"m": 3})
    with pytest.raises(OptionTypeError, match="solver options must be a dict"):
        make_solver("anderson", [("m", 3)])
    with pytest.raises(OptionTypeError, match="FixedPointSolver subclass"):
        il.register_solver(object)


# (option, bad value, error) for the options every solve shares
COMMON = [
    ("atol", "1e-5", OptionTypeError),
    ("atol", True, OptionTypeError),
    ("atol", -1.0, ValidationError),
    ("atol", NAN, ValidationError),
    ("rtol", None, OptionTypeError),
    ("rtol", -1e-3, ValidationError),
    ("rtol", INF, ValidationError),
    ("max_iter", True, OptionTypeError),
    ("max_iter", 10.0, OptionTypeError),
    ("max_iter", -1, ValidationError),
    ("on_failure", True, OptionTypeError),
    ("on_failure", "explode", ValidationError),
    ("divergence_ratio", "big", OptionTypeError),
    ("divergence_ratio", 1.0, ValidationError),
    ("divergence_ratio", NAN, ValidationError),
]


@pytest.mark.parametrize("option, value, error", COMMON, ids=[f"{c[0]}-{c[1]!r}" for c in COMMON])
def test_bad_common_option_is_a_typed_error_naming_it(option, value, error):
    calls = []
    with pytest.raises(error, match=rf"^{option} must "):
        il.solve(lambda z: calls.append(1) or z, torch.zeros(2, 3), **{option: value})
    assert calls == []
    kw = dict(atol=1e-5, rtol=1e-5, max_iter=10, on_failure="warn", divergence_ratio=1e6)
    kw[option] = value
    with pytest.raises(error, match=rf"^DEQ: {option} must "):
        LoopOptions(**kw, where="DEQ")


def test_common_boundaries():
    # the closed ends are valid, an infinite divergence ratio disables the divergence test
    assert LoopOptions(0.0, 1e-3, 0, "ignore", math.inf).divergence_ratio == math.inf
    assert LoopOptions(1e-3, 0, 1, "raise", 1.0 + 1e-9).max_iter == 1
    with pytest.raises(ValidationError, match="atol and rtol are both 0"):
        LoopOptions(0, 0.0, 5, "warn", 2.0)


def test_loop_options_are_one_value_built_once_and_used_by_every_solve():
    # Validated and normalised once; a frozen value; replace re-validates.
    o = LoopOptions(atol=1e-6, rtol=0, max_iter=7, on_failure="ignore")
    assert (o.atol, o.rtol, o.max_iter) == (1e-6, 0.0, 7) and isinstance(o.rtol, float)
    with pytest.raises(ValidationError, match="^max_iter must"):
        o.replace(max_iter=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.atol = 1.0  # type: ignore[misc]
    # run_loop takes only the value
    from iterlayers.solvers._loop import run_loop

    with pytest.raises(OptionTypeError, match="options must be a LoopOptions"):
        run_loop(lambda z: 0.5 * z, torch.ones(2, 3), solver=make_solver("picard"), options={"atol": 1e-6})
    z, st = run_loop(lambda z: 0.5 * z, torch.ones(2, 3), solver=make_solver("picard"), options=o)
    # |z_k| = 0.5^k sqrt(3): the step count follows from the value's atol, and max_iter caps it
    assert st.atol == 1e-6 and st.max_iter == 7 and int(st.nstep.max()) == 7 and st.status == "max_iter"
    # A layer builds its forward value once: every forward pass reads the same object
    deq = il.DEQ(nn.Linear(3, 3), atol=1e-4, max_iter=9)
    assert deq.options.loop is deq.options.loop and deq.options.loop.max_iter == 9
    # solve_chain: keywords or a value, not both
    from iterlayers.solvers import solve_chain

    with pytest.raises(ValidationError, match=r"\['max_iter'\] given together with options="):
        solve_chain(lambda z: 0.5 * z, torch.ones(2, 3), solvers=["picard"], options=o, max_iter=3)
    _, cst = solve_chain(lambda z: 0.5 * z, torch.ones(2, 3), solvers=["picard", "anderson"], options=o)
    assert cst.max_iter == 7

"""Bounded mode: parallel iterations only while they can pay, then a sequential finish.

The prefix before a solver's frontier is exact, so the rest of the trajectory can
always be finished by the sequential scan from the frontier's state, at a cost of
`T - frontier` cell steps. With `c` the cost of one parallel iteration in the same
units (the first linearisation counts as one), the solve takes another iteration
only while the work it has spent plus that iteration does not exceed what
finishing now would cost:

    (n + 1)·c + c <= T - frontier_n        (n iterations done)

and otherwise finishes sequentially. This is the ski-rental rule. If the parallel
solve would have needed `N` iterations in all, the bounded solve costs at most
`2·min(N·c, T) + c` under this model, about twice the cheaper of the two pure
strategies, without knowing `N` in advance: when it stops at `n < N`, its spent
work `(n+1)c` exceeds the remaining sequential cost minus `c`, so the total is at
most twice the parallel work done (`<= N·c`), and that work never exceeded `T`.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from ._problem import Problem


def may_start(cost: float, T: int) -> bool:
    """Whether the first linearisation and one iteration (`2c`) can pay against `T`
    steps: the rule below at `n = 0` with nothing solved yet."""
    return 2 * cost <= T


def keep_iterating(cost: float, n: Int[Array, ""], remaining: Int[Array, ""]) -> Array:
    """The ski-rental rule: another iteration only if spent + its cost <= remaining."""
    spent = (n.astype(jnp.float32) + 2) * jnp.float32(cost)
    return spent <= remaining.astype(jnp.float32)


def finish_sequentially(
    problem: Problem, states: Float[Array, "T D"], frontier: Int[Array, ""]
) -> Float[Array, "T D"]:
    """`states` before `frontier`, then the sequential recurrence from there on.

    One `lax.scan` over all `T` steps whose steps before the frontier only copy
    (a `lax.cond`): `T - frontier` cell evaluations. Under `vmap` the `cond` becomes
    a select and every step evaluates the cell (`T` evaluations per sequence).
    """
    T = states.shape[0]

    def step(prev, inp):
        t, x, s_t = inp
        new = lax.cond(t < frontier, lambda: s_t, lambda: problem.fn(x, prev))
        return new, new

    t = jnp.arange(T, dtype=frontier.dtype)
    _, out = lax.scan(step, problem.init, (t, problem.inputs, states))
    return jax.lax.stop_gradient(out)

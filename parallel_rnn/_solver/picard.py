"""Zeroth-order solvers: Picard (`Ã_t = I`) and Jacobi (`Ã_t = 0`)."""

from .._problem import Problem
from .._scan import Method, prefix_sum
from .base import AbstractLinearisedSolver


class Picard(AbstractLinearisedSolver):
    """Picard iteration: `Ã_t = I`, so each step is a prefix sum of the residuals.

    No Jacobian at all; converges when the cell is close to the identity map
    (e.g. small-step discretisations of ODEs), otherwise needs up to `T` steps.

    **Arguments:**

    - `scan`: unused (a prefix sum is always a cumulative sum); kept so every
      solver takes the same options.
    """

    scan: Method = "auto"
    jacobian = "diagonal"

    def linearise(self, problem: Problem, states):
        return problem.evaluate(states), None

    def correction(self, jac, rhs):
        del jac
        return prefix_sum(rhs)


class Jacobi(AbstractLinearisedSolver):
    """Jacobi iteration: `Ã_t = 0`, i.e. `s_t ← f(x_t, s_{t-1})` for all `t` at once.

    No scan and no Jacobian; each iteration makes (at least) one more step exact,
    so it needs about as many iterations as the memory of the cell.

    **Arguments:**

    - `scan`: unused; kept so every solver takes the same options.
    """

    scan: Method = "auto"
    jacobian = "diagonal"

    def linearise(self, problem: Problem, states):
        return problem.evaluate(states), None

    def correction(self, jac, rhs):
        del jac
        return rhs

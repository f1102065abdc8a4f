"""Zeroth-order solvers: Picard (`Ã_t = I`) and Jacobi (`Ã_t = 0`)."""

from .._problem import Problem
from .._scan import Method, prefix_sum
from .base import AbstractLinearisedSolver


class _AbstractZerothOrder(AbstractLinearisedSolver):
    """Solvers that use no Jacobian in the forward pass; they differ in `correction`.

    Their gradient is still exact: it solves the adjoint recurrence with the
    Jacobian diagonal by quasi-Newton iterations (`jacobian = "diagonal"`), and
    `scan` says how those linear recurrences are evaluated.
    """

    scan: Method = "auto"
    jacobian = "diagonal"

    def linearise(self, problem: Problem, states):
        return problem.evaluate(states), None


class Picard(_AbstractZerothOrder):
    """Picard iteration: `Ã_t = I`, so each step is a prefix sum of the residuals.

    No Jacobian at all; converges when the cell is close to the identity map
    (e.g. small-step discretisations of ODEs), otherwise needs up to `T` steps.

    **Arguments:**

    - `scan`: `"auto"`, `"associative"` or `"sequential"`: how the linear
      recurrences of the *gradient* are evaluated (as for `DEER`). The forward
      step is a cumulative sum, which XLA evaluates in parallel on its own.
    """

    def correction(self, jac, rhs):
        del jac
        return prefix_sum(rhs)


class Jacobi(_AbstractZerothOrder):
    """Jacobi iteration: `Ã_t = 0`, i.e. `s_t ← f(x_t, s_{t-1})` for all `t` at once.

    No scan and no Jacobian; each iteration makes (at least) one more step exact,
    so it needs about as many iterations as the memory of the cell.

    **Arguments:**

    - `scan`: as for `Picard`: only the gradient's linear recurrences use it.
    """

    def correction(self, jac, rhs):
        del jac
        return rhs

"""DEER (Newton) and quasi-DEER (diagonal quasi-Newton)."""

from .._problem import Problem
from .._scan import Method, diagonal_recurrence, linear_recurrence
from .base import AbstractLinearisedSolver


class DEER(AbstractLinearisedSolver):
    """Newton's method on the residual: `Ã_t` is the full Jacobian `∂f/∂s`.

    Locally quadratic, so it needs few iterations on well-behaved cells, but each
    costs a dense `D×D` scan: `O(T D³)` work and `O(T D²)` memory. Undamped, so
    on unstable or chaotic cells it can wander (the safeguards keep it finite and
    within `T` iterations); use `ELK` there. On a cell whose Jacobian is declared
    diagonal or block-diagonal (`cells.ParaGRU`, `cells.ParaLSTM`, see
    `register_jacobian`) it uses that exact structure: Newton at `O(T D)` memory.

    **Arguments:**

    - `scan`: `"auto"` (sequential on CPU, associative elsewhere), `"associative"`
      or `"sequential"`: how the linear recurrence of each step is evaluated.

    ??? cite "Reference"
        Lim, Zhu, Selfridge, Kasim. *Parallelizing non-linear sequential models
        over the sequence length.* ICLR 2024.
    """

    scan: Method = "auto"
    jacobian = "dense"

    def linearise(self, problem: Problem, states):
        return problem.linearise_exact(states)  # dense, or the cell's exact structure

    def correction(self, jac, rhs):
        return linear_recurrence(jac, rhs, method=self.scan)


class QuasiDEER(AbstractLinearisedSolver):
    """Quasi-Newton with the diagonal of the Jacobian: `Ã_t = diag(∂f/∂s)`.

    `O(T D)` work and memory per iteration. Uses the cell's analytic
    `diagonal_jacobian(input_t, state)` when it has one, else `D` JVP passes.
    Converges linearly; needs more iterations than `DEER` unless the Jacobian is
    close to diagonal, but each is far cheaper for large `D`.

    **Arguments:**

    - `scan`: as for `DEER`.

    ??? cite "Reference"
        Gonzalez, Warrington, Smith, Linderman. *Towards scalable and stable
        parallelization of nonlinear RNNs.* NeurIPS 2024.
    """

    scan: Method = "auto"
    jacobian = "diagonal"

    def linearise(self, problem: Problem, states):
        return problem.linearise_diagonal(states)

    def correction(self, jac, rhs):
        return diagonal_recurrence(jac, rhs, method=self.scan)

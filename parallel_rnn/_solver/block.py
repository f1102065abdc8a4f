"""Block quasi-DEER: quasi-Newton with the `k×k` diagonal blocks of the Jacobian."""

from .._problem import Problem
from .._scan import Method, block_recurrence
from .base import AbstractLinearisedSolver


class BlockQuasiDEER(AbstractLinearisedSolver):
    """Quasi-Newton keeping the `k×k` diagonal blocks of `∂f/∂s`.

    Between `QuasiDEER` (`k = 1`) and `DEER` (`k = D`): block `j` couples the flat
    state entries `j, n+j, …, (k-1)n+j` (`n = D/k`), i.e. for a state of `k`
    leaves of size `n`, unit `j` of every leaf. For an LSTM's `(h, c)` with
    `block_size=2` these are the `(h_j, c_j)` pairs, which keeps the strong
    `∂h'/∂c = o (1 - tanh² c') f` coupling that `QuasiDEER` drops. `O(T·D·k)`
    memory and `O(T·D·k)` work per iteration (sequential scan).

    The blocks come from the cell's `value_and_block_jacobian` (or a registration,
    see `register_jacobian`) when its block size is `block_size`, else from its
    closed-form dense Jacobian, else from `D` JVP passes. The gradient is computed
    as after `QuasiDEER` (diagonal adjoint iterations, `O(T·D)` memory).

    **Arguments:**

    - `block_size`: `k`, which must divide the state size `D` (default 2).
    - `scan`: as for `DEER`.
    """

    block_size: int = 2
    scan: Method = "auto"
    jacobian = "diagonal"

    def __check_init__(self):
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"`block_size` must be an integer >= 1, got {self.block_size!r}")

    def linearise(self, problem: Problem, states):
        D = states.shape[-1]
        if D % self.block_size:
            raise ValueError(f"`block_size` ({self.block_size}) must divide the state size D = {D}")
        return problem.linearise_blocks(states, self.block_size)

    def correction(self, jac, rhs):
        return block_recurrence(jac, rhs, method=self.scan)

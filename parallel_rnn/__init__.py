"""parallel_rnn: evaluate nonlinear RNNs in parallel over the sequence length."""

import importlib.metadata

from . import cells as cells, nn as nn
from ._cost import calibrate as calibrate
from ._diagnose import Diagnosis as Diagnosis, Prediction as Prediction, diagnose as diagnose
from ._gated import GatedJacobian as GatedJacobian
from ._lyapunov import lyapunov_exponent as lyapunov_exponent
from ._scan import (
    block_recurrence as block_recurrence,
    dense_recurrence as dense_recurrence,
    diagonal_recurrence as diagonal_recurrence,
    gated_recurrence as gated_recurrence,
    linear_recurrence as linear_recurrence,
)
from ._sequential import solve_sequential as solve_sequential
from ._solution import RESULTS as RESULTS, Solution as Solution
from ._solve import solve_parallel as solve_parallel
from ._solve_sharded import solve_sharded as solve_sharded
from ._solver import (
    DEER as DEER,
    ELK as ELK,
    AbstractLinearisedSolver as AbstractLinearisedSolver,
    AbstractSolver as AbstractSolver,
    BlockQuasiDEER as BlockQuasiDEER,
    Jacobi as Jacobi,
    MultipleShooting as MultipleShooting,
    Picard as Picard,
    QuasiDEER as QuasiDEER,
    QuasiELK as QuasiELK,
)
from ._structure import register_jacobian as register_jacobian


__version__ = importlib.metadata.version("parallel_rnn")

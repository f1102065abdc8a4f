"""Recurrent cells with the `cell(input_t, state) -> new_state` signature.

Each defines `diagonal_jacobian(input_t, state)`, the diagonal of
`∂new_state/∂state` in closed form, which the quasi solvers use instead of `D`
autodiff passes (and `value_and_diagonal_jacobian`, the step and the diagonal
from one evaluation).
"""

from ._implicit_ssm import ImplicitSSM as ImplicitSSM
from ._lorenz96 import Lorenz96 as Lorenz96
from ._pararnn import ParaGRU as ParaGRU, ParaLSTM as ParaLSTM
from ._rnn import GRU as GRU, LSTM as LSTM, Elman as Elman

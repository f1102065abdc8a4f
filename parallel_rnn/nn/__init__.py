"""Recurrent layers evaluated by parallel solves, in the Equinox idiom.

`RNN` is one layer (a cell and a solver); `Bidirectional` runs two of them in
opposite directions; `Block` wraps a layer in normalisation, projection, dropout
and a residual connection; `Stack` chains blocks. Every layer returns its outputs
and a `LayerResult` (states for warm starts, iterations, convergence, fallbacks).
"""

from ._bidirectional import Bidirectional as Bidirectional
from ._block import Block as Block
from ._layer import RNN as RNN, LayerResult as LayerResult
from ._stack import Stack as Stack

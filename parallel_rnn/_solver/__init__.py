from .base import (
    AbstractLinearisedSolver as AbstractLinearisedSolver,
    AbstractSolver as AbstractSolver,
    Iterate as Iterate,
    safeguard as safeguard,
)
from .block import BlockQuasiDEER as BlockQuasiDEER
from .deer import DEER as DEER, QuasiDEER as QuasiDEER
from .elk import ELK as ELK, QuasiELK as QuasiELK
from .picard import Jacobi as Jacobi, Picard as Picard
from .shooting import MultipleShooting as MultipleShooting

"""Solver options are validated when the solver is built, not when it is traced."""

import pytest

import parallel_rnn as prnn


SOLVER_CLASSES = (prnn.DEER, prnn.QuasiDEER, prnn.ELK, prnn.QuasiELK, prnn.Picard, prnn.Jacobi)


@pytest.mark.parametrize("cls", SOLVER_CLASSES, ids=lambda c: c.__name__)
def test_unknown_scan_fails_at_construction(cls):
    with pytest.raises(ValueError, match="'auto', 'associative' or 'sequential'"):
        cls(scan="parallel")


@pytest.mark.parametrize("cls", SOLVER_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("scan", ["auto", "associative", "sequential"])
def test_known_scans_are_accepted(cls, scan):
    assert cls(scan=scan).scan == scan

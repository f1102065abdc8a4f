"""Runnable studies: `python -m experiments.NAME [--quick]`."""

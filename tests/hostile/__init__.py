"""Misbehaving BatchNorms for testing the runner's isolation (issue 6).

Each class in :mod:`tests.hostile.candidates` is a ``BatchNorm2d`` drop-in that does one
hostile thing (raise, hang, crash, lie, print, patch global state, ...).
``tests/test_hostile.py`` checks that ``bnspec check`` turns each into a "does not
conform" verdict that names what happened, with exit status 1, in bounded time.
"""

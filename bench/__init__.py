"""easel's benchmarks: ``python -m bench`` runs them all, ``python -m bench NAME`` one.

Each prints its headline figures on stdout as ``name = value`` lines; progress and
details go to stderr. They are measurements, not tests: nothing here asserts a time.
docs/performance.md has today's figures; bench/RESULTS.md the dated log of recorded runs.
"""

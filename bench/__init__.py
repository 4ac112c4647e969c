"""easel's benchmarks (issue 5): ``python -m bench`` runs them all, ``python -m bench NAME`` one.

Each prints its headline figures on stdout as ``name = value`` lines; progress and
details go to stderr. They are measurements, not tests: nothing here asserts a time.
See docs/benchmarks.md for what each measures and the figures from a recorded run.
"""

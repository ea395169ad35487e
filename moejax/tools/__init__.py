"""Tools that run the library for a report (benchmarks, memory table, run plots, studies).

The core (moejax/*) never imports this package; the tools import the core.
"""

"""Hypothesis profiles of the fuzz suite: ``fast`` by default, ``slow`` for the twins marked slow.

fast: a bounded, derandomized run (the same examples on every machine, so CI
is reproducible). slow: many more examples and a fresh random draw each time;
the ``*_slow`` twin of every property uses it (``pytest -m slow tests/fuzz``).
A failure prints the example and a ``@reproduce_failure`` blob to replay it.
"""

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "fast", max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=_QUIET
)
settings.register_profile(
    "slow",
    max_examples=500,
    deadline=None,
    derandomize=False,
    database=None,
    suppress_health_check=_QUIET,
    print_blob=True,
)
settings.load_profile("fast")

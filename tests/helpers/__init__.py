"""Helpers of the test suite, imported as ``tests.helpers.<module>`` (pytest puts the repository
on sys.path: ``pythonpath`` in pyproject.toml; processes started by ``multiprocess`` get it on
PYTHONPATH). Here live the helpers more than one test folder uses, the data builders of the
loader tests, and the worker/driver programs tests run as processes
(``python -m tests.helpers.<module>``, started through ``multiprocess``)."""

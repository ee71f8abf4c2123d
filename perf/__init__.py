"""Performance tooling for tritonnorm: the GPU report, the interpreter byte count, and helpers.

``python -m perf`` is the entry point (see ``perf/__main__.py``). Nothing in this package is
imported by the library itself.
"""

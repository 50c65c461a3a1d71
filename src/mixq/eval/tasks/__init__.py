"""Benchmark tasks: one module per task, registered by name (see mixq.eval.registry).

Modules whose names start with `_` are helpers, not tasks.
"""

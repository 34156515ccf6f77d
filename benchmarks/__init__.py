"""Benchmarks for login_token_module: speed, scaling, and a side-by-side run against Synapse.

Run everything with ``python -m benchmarks`` (``--smoke`` for a seconds-long check).
See benchmarks/README.md.
"""

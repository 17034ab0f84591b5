"""The benchmarks behind ``chargewatch bench`` (``bench.cli``): dev tooling, not product.

It may import every package of ours (and the simulators, for the district's messages);
none imports it but ``api/cli.py``, lazily (tests/test_architecture.py).
"""

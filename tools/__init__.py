"""Tools around the running system, never imported by it: the benchmark suite (`specserve bench`, `soak`), the
KV store, router and expert benchmarks, fault injection (`specserve chaos`) and a command-line client
(`specserve generate`). A test (tests/unit/test_layers.py) keeps the runtime from importing this package."""

"""oncely's benchmark harness: `make bench` (see docs/benchmarks.md). Not a test."""

"""The apps under test: the same small POST handler, bare or behind a middleware."""

"""The ACIP engine: the per-layer bases, the scoring module, the global pruning order and the
materialization of any size from it (docs/ARCHITECTURE.md, steps 2-5)."""

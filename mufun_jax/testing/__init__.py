"""Helpers shared by the tests and the benchmarks (tests/, bench/), importable from both without
``sys.path`` edits. Nothing in the rest of the package imports this subpackage: its modules may
import test-only dependencies (torch) at module level."""

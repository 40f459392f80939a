"""Norm-position comparison sweeps (tools/compare_norms.py): plan the variants, launch them, collect their metrics, report."""

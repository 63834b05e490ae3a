"""Packing sequences into token-budgeted micro-batches (planner, C++ extension loader, Python twin)."""

"""Precision, the second axis: what a format stores, its bytes, packing and kernel calls."""

"""Precision, the second axis: one module per format family (floats, int8, int4, ...) owning what it
stores, its bytes, packing and kernel calls; `registry` lists them and owns the key grammar."""

"""The runs that learn: scoring (the paper's Algorithm 1 loop), fine-tuning a size, the memory plan
before either, multi-GPU sharding."""

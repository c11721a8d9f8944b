"""Measuring sizes: perplexity and generation, lm-eval, the curve, baselines, speed."""

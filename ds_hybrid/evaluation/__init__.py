"""Evaluation: RULER / SWDE / FDA recall via lm-eval, held-out quality, inference speed."""

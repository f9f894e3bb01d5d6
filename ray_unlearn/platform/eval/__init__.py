"""Evaluation: accuracy, membership inference (threshold attacks, LiRA / U-LiRA)."""

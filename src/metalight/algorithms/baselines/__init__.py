"""Baselines without meta-training: pretrain a classifier on the training classes, then fit a head per task (Baseline, Baseline++, RFS; heads.py the per-task heads)."""

"""Trainer state outside the algorithm: checkpoints (``checkpoint``) and data-parallel gradient
reduction among actor replicas (``data_parallel``).
"""

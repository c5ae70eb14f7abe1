"""Hydra recipes: ``default.yaml`` (what ``rlflow`` runs) and the others, chosen with ``rlflow -cn NAME``.

A recipe only sets fields of the structured config in ``flow/config.py``; it never adds new ones.
"""

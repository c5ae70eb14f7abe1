"""Observability: metrics to jsonl/W&B and the console (``tracking``), what each role did when
(``timeline``), the end-of-run report (``report``, ``plots``) and the capacity advice (``capacity``).
"""

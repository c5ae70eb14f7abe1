"""Engines: what generates (rollout) and what trains (actor), behind the protocols in ``engines/base.py``:
Hugging Face transformers (``hf``), an sglang server (``sglang``, ``sglang_api``) and the tiny model built
locally for CPU runs (``tiny``).
"""

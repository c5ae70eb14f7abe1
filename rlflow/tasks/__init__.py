"""Built-in tasks (generated prompts with answers, ``builtin``) and reward functions (``rewards``).
Plain Python: a reward is a function ``(response, **row) -> float``.
"""

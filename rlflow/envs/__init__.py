"""Environments for multi-turn episodes: what a user writes, and where it runs.

- ``base.py``: the interface (``reset(record)``, ``step(action) -> (observation, reward, done)``) and the
  checks on what an environment returns
- ``tools.py``: tools as plain functions (``@tool``), the built-in ``ToolEnv`` and the ``calc`` tool
- ``config.py``: ``EnvConfig`` (the recipe's ``env`` section)
- ``worker.py``: an environment worker process (one episode at a time)
- ``pool.py``: a rollout replica's workers: routing, bounds on every call, replacement of failed workers
- ``agent.py``: ``env.agent``: a user's agent function in a worker, behind an OpenAI-compatible chat
  endpoint whose every completion the rollout generates

The rollout's multi-turn loop that drives them is ``roles/episodes.py``. Torch-free.
"""

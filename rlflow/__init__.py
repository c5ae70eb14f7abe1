"""rlflow: asynchronous streaming dataflow for RL post-training of LLMs.

The packages, lowest first (an import only ever points to a package above it in this list):
``transfer`` (the bus, nothing of RL), ``envs`` (the environment interface for multi-turn episodes, tools,
environment workers), ``tasks`` (built-in prompts and rewards), ``algo`` (advantages,
losses, off-policy corrections, the step accumulator), ``sync`` (the weight-sync codec and channel),
``engines`` (what generates and trains: Hugging Face, sglang, the tiny model), ``train`` (trainer state:
checkpoints, data parallelism), ``roles`` (the four role loops and their contract) and ``flow`` (the
launcher that wires them: config, feeder, placement, observability). Importing ``rlflow`` imports none
of them, so a process pays only for what it uses.
"""

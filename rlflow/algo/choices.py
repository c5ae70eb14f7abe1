"""The names each algorithm setting may take, torch-free so that configs check them without torch.

``loss.py`` and ``offpolicy.py`` implement every name here (``tests/test_loss.py`` pins that each
one dispatches); a new advantage estimator or correction adds its name here and its branch there.
"""

ADVANTAGES = ("grpo", "rloo", "drgrpo", "opob")  # actor.advantage
AGGREGATIONS = ("token_mean", "seq_mean", "constant")  # actor.aggregation
OLD_LOGPROBS = ("rollout", "recompute")  # actor.old_logprobs
RATIO_LEVELS = ("token", "sequence")  # actor.ratio_level
CORRECTIONS = ("none", "tis", "mis")  # actor.correction
LEVELS = ("token", "sequence")  # actor.correction_level
LR_RULES = ("sqrt", "linear")  # actor.vcpo_rule

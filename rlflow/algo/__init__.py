"""The algorithm: group advantages, the policy loss, off-policy corrections and VCPO's learning-rate rule,
and the step accumulator that streams groups into one optimizer step. Torch only (but ``choices``, the
names a config may choose, which the launcher checks without torch); nothing of the bus.
"""

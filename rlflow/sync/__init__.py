"""Weight sync (SparseRL-Sync): the lossless sparse codec (``codec``) and the channel that publishes
patches from the actor and applies them on rollout replicas, relayed peer to peer (``weights``).
"""

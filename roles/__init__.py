"""roles — the rollout, reward, reference and actor services and their plug-in interfaces."""

"""Placement: where role replicas run (``local`` processes or a ``ray_cluster``), how they find each
other (``endpoints``), what runs inside each (``worker``) and how the launcher watches them (``supervisor``).
"""

"""Cicada gateway: the REST face of the mesh (Open Inference Protocol v2)."""

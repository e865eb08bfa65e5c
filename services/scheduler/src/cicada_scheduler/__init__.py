"""Cicada scheduler: owns jobs and their priorities, places them on loaders."""

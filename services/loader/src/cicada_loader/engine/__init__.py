"""The cold-start engine: MiniLoader, the WeightDecoupler's applying half, and the pipeline."""

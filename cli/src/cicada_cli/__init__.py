"""The cicada command: start the mesh, write checkpoints, run the benchmarks."""

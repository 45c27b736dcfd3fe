"""Where work runs: submitit backends (debug, local, Slurm), containers, images, GPU pre-flight."""

"""hpc_infer: batch LLM inference on Slurm/HPC clusters with vLLM workers."""

__version__ = "0.1.0"

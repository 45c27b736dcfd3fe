"""Serving: OpenAI-compatible vLLM endpoints as Slurm job arrays (`hpc-infer serve`)."""

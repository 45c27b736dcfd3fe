"""What a job does on its host, apart from the run directory: processes identified by PID
and start time (procs.py), the VLLM_PORT range of a TP/PP worker (ports.py), vLLM's compile
cache shared safely (compile_cache.py). Standard library only: imported inside images."""

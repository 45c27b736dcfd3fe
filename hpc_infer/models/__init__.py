"""Models on the login node: resolution to shared paths, the admin cache, the CPU default, vLLM checks."""

"""Inside each job: claim chunks, run the engine (vLLM, or HTTP to served replicas), write checked
outputs. Standard library + vLLM only: it is imported inside the cluster's vLLM image."""

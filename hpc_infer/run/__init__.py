"""One run's steps on the login node: plan, wait and status, merge, timeline, sbatch scripts."""

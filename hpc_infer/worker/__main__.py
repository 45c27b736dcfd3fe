"""`python -m hpc_infer.worker RUN_DIR [--worker-id ID]`: the worker a rendered sbatch script runs."""

import sys

from .worker import main

sys.exit(main())

"""The callables submitit runs for a serve run: a replica per array task, the router."""

from __future__ import annotations

from ..cluster.task import die_with_controller


class ServeTask:
    """Called with the serve run directory and the replica index (one per array task)."""

    def __call__(self, run_dir: str, index: int) -> dict:
        from .replica import run_replica

        die_with_controller()
        return run_replica(run_dir, index)


class RouterTask:
    """Called with the serve run directory (index unused): the router in front of its replicas."""

    def __call__(self, run_dir: str, index: int = 0) -> dict:
        from .router import run_router

        die_with_controller()
        return run_router(run_dir)

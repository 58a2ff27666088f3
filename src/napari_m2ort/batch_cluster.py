"""The dask side of a cohort run: a local cluster set up for inference, or a connection.

See ``distributed`` for how slides are cut into tasks.
"""

from __future__ import annotations

from .errors import M2ORTError

__all__ = ["connect", "dashboard_link", "has_bokeh", "local_cluster"]


def local_cluster(workers: int = 2, threads_per_worker: int = 1, dashboard_address: str = ":8787"):
    """A ``LocalCluster`` of worker processes set up for model inference.

    dask's defaults cost throughput here: ``MALLOC_TRIM_THRESHOLD_`` (set by the nanny)
    turns off glibc's adaptive mmap threshold, so every activation tensor becomes a fresh
    mmap plus page faults (~15 % slower forward passes), and the 10 ms stack-sampling
    profiler competes for the GIL. Tasks here are few and long, so neither is needed.
    """
    import dask
    from distributed import LocalCluster

    with dask.config.set(
        {
            "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
            "distributed.worker.profile.enabled": False,
        }
    ):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=dashboard_address,
        )


def connect(scheduler: str, workers: int, threads_per_worker: int, dashboard_address: str):
    from distributed import Client

    if scheduler == "local":
        cluster = local_cluster(workers, threads_per_worker, dashboard_address)
        try:
            client = Client(cluster)
        except BaseException:
            cluster.close()
            raise
        return client, cluster
    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise M2ORTError(
            f"Cannot reach the dask scheduler at {scheduler!r} ({exc}). Start it (dask scheduler) "
            "and its workers first, check the address, or use --scheduler local."
        ) from None
    return client, None


def dashboard_link(client) -> str:
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:
        services = {}
    if "dashboard" not in services:
        return ""
    return client.dashboard_link


def has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None

"""The Ray session of a job: join a cluster or start a local instance on 127.0.0.1."""
from __future__ import annotations

import logging
import os

from .config import Config

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_init(cfg: Config):
    """Join ``ray.address`` / ``RAY_ADDRESS`` (``ray job submit`` sets it), or start a local
    instance bound to 127.0.0.1 (its dashboard too: Ray Train's placement-group cleaner asks the
    dashboard's state API whether a Train controller is still alive)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Read by Ray when it is imported, and inherited by the processes it starts: with it, Ray
        # resolves "127.0.0.1" to itself instead of the machine's network address.
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            from ray._private import ray_constants

            # ray may have been imported (by Tune, Data) before the variable was set above
            ray_constants.ENABLE_RAY_CLUSTER = os.environ[LOOPBACK_ENV].lower() not in ("0", "false")
            # more logical CPUs than cores: Train workers hold fractions, Ray Data tasks whole ones
            # address="local": a new instance, even when another one on this machine wrote
            # /tmp/ray/ray_current_cluster (ray.init() without an address would join that one)
            ray.init(address="local", num_cpus=cfg.ray.num_cpus or max(6, os.cpu_count() or 1),
                     include_dashboard=True, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines flood a job's output
    return ray

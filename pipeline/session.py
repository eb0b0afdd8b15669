"""The Ray session of a job: join a cluster or start a local instance on 127.0.0.1."""
from __future__ import annotations

import logging
import os

from .config import Config


def ray_init(cfg: Config):
    """Join ``ray.address`` / ``RAY_ADDRESS`` (``ray job submit`` sets it), or start a local
    instance bound to 127.0.0.1."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            # more logical CPUs than cores: Train workers hold fractions, Ray Data tasks whole ones
            ray.init(num_cpus=cfg.ray.num_cpus or max(6, os.cpu_count() or 1), include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines flood a job's output
    return ray

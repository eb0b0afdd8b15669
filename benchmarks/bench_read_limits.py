"""Do the readers' limits hold with bounded memory? Peak resident memory of one process reading:

- a clean shard (the baseline),
- a shard with a decompression-bomb PNG (~20 KB on disk, 127.7 Mpx decoded),
- a gzip shard with one 512 MiB member (2.3 MB on disk),

each through the plain reader (``rvpt.shards.iter_samples``) and through the Ray Data path
(``pipeline.data.read_split``: one read task per shard, in a Ray worker), each in a fresh process
(``ru_maxrss`` of the reading process; for Ray, of the worker that read the shard). Run by hand:

    .venv/bin/python benchmarks/bench_read_limits.py [--member-mib 512]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PLAIN = """
import json, resource, sys
from rvpt.shards import ReadRules, ReadStats, iter_samples
stats = ReadStats()
n = sum(1 for _ in iter_samples([sys.argv[1]], 32, stats, rules=ReadRules(num_classes=3)))
print(json.dumps({"valid": n, "reasons": dict(stats.reasons),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

RAY = """
import json, os, sys
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
         log_to_driver=False,
         configure_logging=False)
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
from pipeline.data import STATS, merge_stats, read_split
from rvpt.shards import ReadRules

ds = read_split(sys.argv[1], "test", 32, ReadRules(num_classes=3)).materialize()
rows = ds.select_columns([STATS]).take_all()
stats = merge_stats(r[STATS] for r in rows)
# the read ran in this node's worker processes: the highest peak resident memory among them
import psutil
workers = [p for p in psutil.process_iter(["cmdline"])
           if "default_worker.py" in " ".join(p.info["cmdline"] or [])]
hwm = 0
for p in workers:
    try:
        for line in open(f"/proc/{p.pid}/status"):
            if line.startswith("VmHWM:"):
                hwm = max(hwm, int(line.split()[1]) / 1024)
    except OSError:
        pass
print(json.dumps({"valid": stats.samples, "reasons": dict(stats.reasons), "peak_rss_mib": hwm}))
ray.shutdown()
"""


def _tar(members: list, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _png(size: int, seed: int = 0) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _sample(key: str, label: int, image: bytes) -> list:
    return [(f"{key}.png", image), (f"{key}.cls", str(label).encode())]


def _corpus(root: Path, name: str, shard: bytes) -> Path:
    from rvpt.shards import write_classes, write_manifest

    d = root / name
    d.mkdir()
    (d / "test-00000.tar").write_bytes(shard)
    write_classes(d, ["a", "b", "c"], ["a photo of a {}."])
    write_manifest(d, {"test": {"count": None, "shards": ["test-00000.tar"]}})
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--member-mib", type=int, default=512)
    args = p.parse_args()
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="rvpt-limits-"))
    buf = io.BytesIO()
    Image.new("L", (11300, 11300)).save(buf, format="PNG", optimize=True)
    bomb = buf.getvalue()
    clean = _tar(sum((_sample(f"c{i}", i % 3, _png(64, i)) for i in range(200)), []))
    bombs = _tar(_sample("bomb", 0, bomb) + _sample("ok", 1, _png(64)))
    big = _tar(_sample("big", 0, b"\0" * (args.member_mib << 20)) + _sample("ok", 1, _png(64)),
               gz=True)
    cases = {"clean shard (200 x 64 px)": clean, f"bomb PNG ({len(bomb) / 1024:.0f} KB, 127.7 Mpx)": bombs,
             f"gzip shard ({len(big) / 2**20:.1f} MB) with a {args.member_mib} MiB member": big}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(f"{'input':58s}  {'reader':9s}  {'valid':>5s}  {'peak RSS MiB':>12s}  skip reasons")
    for i, (label, shard) in enumerate(cases.items()):
        corpus = _corpus(tmp, f"c{i}", shard)
        for reader, code, target in (("plain", PLAIN, str(corpus / "test-00000.tar")),
                                     ("Ray Data", RAY, str(corpus))):
            out = subprocess.run([sys.executable, "-c", code, target], capture_output=True,
                                 text=True, env=env, timeout=900)
            if out.returncode != 0:
                print(f"{label:58s}  {reader:9s}  failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{label:58s}  {reader:9s}  {res['valid']:5d}  {res['peak_rss_mib']:12.0f}  "
                  f"{res['reasons']}")


if __name__ == "__main__":
    main()

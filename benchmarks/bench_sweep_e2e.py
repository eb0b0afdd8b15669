"""The main job end to end with nothing cached: wall time and peak memory of the whole process tree.

    .venv/bin/python benchmarks/bench_sweep_e2e.py [--root DIR] [--out FILE] [key.sub=value ...]

Runs ``python jobs/sweep.py`` (the README's main command; overrides are passed on) in a fresh
artifacts root, samples the resident memory of the job and all its descendants (the local Ray
instance, its workers, the Train and Tune processes) every 0.5 s, and prints the wall time, the peak,
the time of each stage as the job announced it, and the job's own summary (best trials per attack).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memwatch import PeakRSS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGES = ("corpus:", "clean model:", "backdoored model for", "writing", "sweep ", "resuming sweep",
          "best per attack", "report:")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="artifacts root (default: a fresh temporary directory)")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="rvpt-e2e-"))
    root.mkdir(parents=True, exist_ok=True)
    summary = root / "sweep-summary.json"
    cmd = [sys.executable, "-u", str(REPO / "jobs" / "sweep.py"), f"paths.root={root}",
           *args.overrides, "--out", str(summary)]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    marks, log = [], root / "sweep.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        with PeakRSS(proc.pid, interval=0.5) as mem:
            for line in proc.stdout:
                f.write(line)
                last = line.rsplit("\r", 1)[-1].strip()
                if last.startswith(STAGES):  # the job's own lines, not its progress bars
                    t = round(time.perf_counter() - start, 1)
                    marks.append((t, last[:120]))
                    print(f"[{t:7.1f} s] {last[:120]}", flush=True)
            rc = proc.wait()
    wall = time.perf_counter() - start
    out = {"command": cmd, "returncode": rc, "wall_s": round(wall, 1),
           "wall_min": round(wall / 60, 2), "peak_rss_mib": round(mem.peak_mib),
           "peak_pss_mib": round(mem.peak_pss_mib),
           "stages": marks, "log": str(log)}
    if summary.exists():
        out["job"] = json.loads(summary.read_text())
    print(json.dumps({k: v for k, v in out.items() if k != "job"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())

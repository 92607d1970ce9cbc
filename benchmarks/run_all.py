"""`make bench`: every benchmark in turn; each writes its own section of BENCHMARKS.md."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench_deploy after bench_demo: its tiled comparison uses the demo model that bench_demo trains (runs/demo)
SCRIPTS = [
    "bench_losses.py",
    "bench_model.py",
    "bench_demo.py",
    "bench_precision.py",
    "bench_deploy.py",
    "bench_report.py",
    "bench_augment.py",
    "bench_small_data.py",
    "bench_localisation.py",
    "bench_huge_image.py",
    "bench_detect_memory.py",
    "bench_shared_cores.py",
]

for name in SCRIPTS:
    path = HERE / name
    if path.exists():
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(path)], check=True)

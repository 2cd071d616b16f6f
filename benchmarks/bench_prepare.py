"""Wall time and peak memory of stages _0_, _1_ and _2_ on the offline GEO fixture.

The fixture (../shared/data/geo_fixture) has the real GSE130148 file format filled with the
Zheng PBMC counts (8,846 genes x 3,500 cells); its seven sorted types are given as labels, and
a second run of _1_ uses Leiden instead. Each stage runs in its own process (so its peak RSS
is its own), under /usr/bin/time.

Run:  python benchmarks/bench_prepare.py [--work=/tmp/bulk2sc_bench_prepare]
Prints a table; asserts nothing.
"""
from __future__ import annotations

import gzip
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def run_stage(script: str, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one stage in a fresh process."""
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, str(REPO / script), *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{script} failed:\n{done.stderr[-3000:]}")
    peak_kib = float(done.stderr.strip().splitlines()[-1])
    return wall, peak_kib / 1024


def main() -> None:
    work = Path(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--work=")),
                     "/tmp/bulk2sc_bench_prepare"))
    if not SHARED.is_dir():
        sys.exit(f"needs {SHARED}")
    shutil.rmtree(work, ignore_errors=True)
    raw = work / "raw"
    raw.mkdir(parents=True)
    shutil.copy(SHARED / "geo_fixture" / "GSE130148_raw_counts.RData.gz", raw)
    with gzip.open(SHARED / "gene_length_hg19.csv.gz", "rb") as src, open(raw / "GeneLength.txt", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(SHARED / "pbmc_zheng7" / "celltypes.csv", raw / "cell_types.csv")
    common = [f"--DATA_DIR={work}"]
    rows = [("_0_download_data.py", *run_stage("_0_download_data.py", common)),
            ("_1_split_train_test.py (given labels)",
             *run_stage("_1_split_train_test.py", common + [f"--FIG_DIR={work / 'fig'}"])),
            ("_2_prepare_sctape.py", *run_stage("_2_prepare_sctape.py", common))]
    (raw / "cell_types.csv").rename(raw / "cell_types.given.csv")
    leiden = work / "leiden"
    shutil.copytree(raw, leiden / "raw")
    rows.append(("_1_split_train_test.py (Leiden)",
                 *run_stage("_1_split_train_test.py", [f"--DATA_DIR={leiden}", f"--FIG_DIR={leiden / 'fig'}"])))
    print(f"# {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"# machine: {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, Python {platform.python_version()}")
    print(f"{'stage':40s} {'wall s':>8s} {'peak RSS MiB':>13s}")
    for name, wall, rss in rows:
        print(f"{name:40s} {wall:8.1f} {rss:13.0f}")


if __name__ == "__main__":
    main()

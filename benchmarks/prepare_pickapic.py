"""Memory and speed of `prepare_pickapic`: peak RSS must not grow with the number of input shards.

    .venv/bin/python benchmarks/prepare_pickapic.py                        # 1 and 10 shards of 2000 rows
    .venv/bin/python benchmarks/prepare_pickapic.py --shards 1 4 16 --rows 800 --keep pairs

Writes N synthetic Pick-a-Pic v2 shards (the real schema; ~20-50 KB random-noise JPEGs; --row-group-rows rows per
row group, plus one shard written as a single row group to show that a row group is never read whole), then for
each case runs `prepare_pickapic` in a fresh child process (its /proc VmHWM is its own peak) and prints the child's
RSS after imports, its peak RSS, the peak minus the baseline, and rows/s. The last line is the ratio of the peaks
of the largest and the smallest case: with streaming it stays near 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
from spin_diffusion.prepare import prepare_pickapic

def rss_mb(field="VmRSS"):
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")

inputs, out, keep = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
base = rss_mb()
t0 = time.perf_counter()
s = prepare_pickapic(inputs, out, keep=keep)
seconds = time.perf_counter() - t0
peak = rss_mb("VmHWM")
print(json.dumps({"base_mb": base, "peak_mb": peak, "seconds": seconds, "pairs": s.pairs_read, "kept": s.kept_rows,
                  "output_shards": s.output_shards}))
"""


def _jpeg_pool(n: int, seed: int) -> list[bytes]:
    """`n` random-noise JPEGs of 160-240 px (about 20-50 KB each)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        side = int(rng.integers(160, 241))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        pool.append(buf.getvalue())
    return pool


def _write_shard(path: Path, rows: int, row_group_rows: int, pool: list[bytes], shard: int, page_rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(shard)
    pick = rng.integers(0, len(pool), (rows, 2))
    labels = rng.choice([0.0, 0.5, 1.0], size=rows, p=[0.45, 0.1, 0.45])
    table = pa.table(
        {
            "are_different": rng.random(rows) > 0.02,
            "best_image_uid": [f"best-{shard}-{i}" for i in range(rows)],
            "caption": [f"prompt {int(rng.integers(0, rows // 3 + 1))} of shard {shard}" for _ in range(rows)],
            "created_at": pa.array([dt.datetime(2023, 5, 1)] * rows, pa.timestamp("ns")),
            "has_label": [True] * rows,
            "image_0_uid": [f"a-{shard}-{i}" for i in range(rows)],
            "image_0_url": [f"https://example.invalid/a-{shard}-{i}.jpg" for i in range(rows)],
            "image_1_uid": [f"b-{shard}-{i}" for i in range(rows)],
            "image_1_url": [f"https://example.invalid/b-{shard}-{i}.jpg" for i in range(rows)],
            "jpg_0": pa.array([pool[j] for j in pick[:, 0]], pa.binary()),
            "jpg_1": pa.array([pool[j] for j in pick[:, 1]], pa.binary()),
            "label_0": labels,
            "label_1": 1.0 - labels,
            "model_0": ["sdxl"] * rows,
            "model_1": ["sd-2.1"] * rows,
            "ranking_id": np.arange(rows, dtype=np.int64),
            "user_id": rng.integers(0, 1000, rows),
            "num_example_per_prompt": [1] * rows,
        }
    )
    strings = [f.name for f in table.schema if f.type == pa.string()]
    # JPEGs plain (all distinct on the Hub), pages of ~1 MB: a reader holds at least one page of each column
    pq.write_table(table, path, row_group_size=row_group_rows, use_dictionary=strings, write_batch_size=page_rows)


def _run_child(inputs: list[Path], out: Path, keep: str) -> dict:
    src = Path(__file__).resolve().parents[1] / "src"
    env_path = f"{src}"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([str(p) for p in inputs]), str(out), keep],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 10], help="input shard counts to compare")
    parser.add_argument("--rows", type=int, default=2000, help="rows per input shard")
    parser.add_argument("--row-group-rows", type=int, default=250, help="rows per input row group")
    parser.add_argument("--page-rows", type=int, default=16, help="rows per write step of the inputs (page size)")
    parser.add_argument("--pool", type=int, default=300, help="distinct JPEGs the rows draw from")
    parser.add_argument("--keep", choices=["winners", "pairs"], default="winners")
    parser.add_argument("--tmp", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="prepare_bench_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        pool = _jpeg_pool(args.pool, seed=0)
        most = max(args.shards)
        shards = [root / f"train-{i:05d}.parquet" for i in range(most)]
        for i, path in enumerate(shards):
            _write_shard(path, args.rows, args.row_group_rows, pool, i, args.page_rows)
        one_group = root / "one-row-group.parquet"
        _write_shard(one_group, args.rows, args.rows, pool, 0, args.page_rows)
        size_mb = sum(p.stat().st_size for p in shards) / 2**20
        mean_kb = sum(len(b) for b in pool) / len(pool) / 1024
        print(
            f"wrote {most} shards x {args.rows} rows ({args.row_group_rows} rows/row group), {size_mb:.0f} MB, "
            f"JPEGs {mean_kb:.0f} KB on average, in {time.perf_counter() - t0:.0f} s; keep={args.keep}"
        )

        cases = [(f"{n} shard(s)", shards[:n]) for n in sorted(args.shards)]
        cases.append(("1 shard, 1 row group", [one_group]))
        print(f"{'case':<22} {'rows':>7} {'MB in':>7} {'base MB':>8} {'peak MB':>8} {'peak-base':>9} {'rows/s':>8}")
        peaks = {}
        for i, (name, inputs) in enumerate(cases):
            r = _run_child(inputs, root / f"out-{i}", args.keep)
            mb_in = sum(p.stat().st_size for p in inputs) / 2**20
            peaks[name] = r["peak_mb"]
            print(
                f"{name:<22} {r['pairs']:>7} {mb_in:>7.0f} {r['base_mb']:>8.0f} {r['peak_mb']:>8.0f} "
                f"{r['peak_mb'] - r['base_mb']:>9.0f} {r['pairs'] / r['seconds']:>8.0f}"
            )
        small, large = cases[0][0], cases[len(args.shards) - 1][0]
        print(f"peak RSS {large} / {small}: {peaks[large] / peaks[small]:.2f}")


if __name__ == "__main__":
    main()

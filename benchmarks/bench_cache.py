"""Memory of the streaming cache: peak RSS must not grow with the number of prompts.

    .venv/bin/python benchmarks/bench_cache.py                     # N = 2000 and 20000, tiny preset, CPU
    .venv/bin/python benchmarks/bench_cache.py --sizes 1000 10000 --dtype bf16
    .venv/bin/python benchmarks/bench_cache.py --end-to-end          # a whole `spin` iteration instead

For each N, a fresh child process (so that ru_maxrss is its own):
  1. writes an image folder of N tiny PNGs + metadata.jsonl (about N/4 distinct captions),
  2. builds the latent cache with the tiny preset (spin_diffusion.cache.build_latent_cache),
  3. generates the opponent's samples for all N prompts with trajectories (sampling.generate_shards),
  4. reads --batches training batches of random rows through the stores, as the trainer does,
and prints its peak RSS and the cache size on disk. The table ends with the 2k -> 20k ratio of the peaks:
process memory is O(batch + model), so it should stay within 10 %.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spin_diffusion import encoding, presets

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process, MB."""
    status = Path("/proc/self/status").read_text().split("\n") if Path("/proc/self/status").exists() else []
    fields = {line.split(":")[0]: line.split()[1] for line in status if line.startswith(("VmRSS", "VmHWM"))}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return float(fields.get("VmRSS", 0)) / 1024, peak


def child(n: int, args: argparse.Namespace) -> dict:
    import torch
    from PIL import Image

    from spin_diffusion import cache, sampling
    from spin_diffusion.config import DataConfig
    from spin_diffusion.data import load_captioned_images

    torch.set_num_threads(args.threads)
    phases: dict[str, float] = {}
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        root = Path(tmp) / "images"
        (root / "imgs").mkdir(parents=True)
        t0 = time.perf_counter()
        variants = []  # 64 distinct 16x16 PNGs, written round-robin: fast to create, still real files to decode
        for v in range(64):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), ((v * 37) % 256, (v * 91) % 256, (v * 53) % 256)).save(buf, format="PNG")
            variants.append(buf.getvalue())
        distinct = max(1, n // 4)
        with open(root / "metadata.jsonl", "w") as meta:
            for i in range(n):
                (root / "imgs" / f"{i}.png").write_bytes(variants[i % 64])
                caption = f"a shape of color {i % distinct % 97} at position {i % distinct // 97}"
                meta.write(json.dumps({"file_name": f"imgs/{i}.png", "text": caption}) + "\n")
        timings["write images"] = time.perf_counter() - t0
        phases["start"] = _rss_mb()[0]

        if args.end_to_end:
            return _end_to_end(n, root, Path(tmp) / "run", args, phases, timings)

        c = presets.build_preset("tiny")
        t0 = time.perf_counter()
        images = load_captioned_images(DataConfig(path=str(root)))
        cache_dir = Path(tmp) / "cache" / "real"
        real = cache.build_latent_cache(
            c,
            images,
            cache_dir,
            resolution=c.resolution,
            batch_size=args.encode_batch,
            model_id="preset:tiny",
            dtype=args.dtype,
            shard_size=args.shard_size,
        )
        timings["build cache"] = time.perf_counter() - t0
        phases["after cache"] = _rss_mb()[0]

        t0 = time.perf_counter()
        gen_dir = Path(tmp) / "generated"
        negative = encoding.encode_prompts(c, [""])
        spec = sampling.GenerationSpec(
            run_seed=0,
            iteration=0,
            num_prompts=n,
            num_steps=args.steps,
            guidance_scale=2.0,
            eta=0.0,
            latent_shape=tuple(real.latents.shape[1:]),
            store_trajectory=True,
            shard_size=args.shard_size,
            store_dtype=args.dtype,
        )
        sampling.generate_shards(
            c.denoiser,
            c.family,
            real.prompt_embeds,
            negative,
            gen_dir,
            spec,
            batch_size=args.sample_batch,
            progress=False,
        )
        generated = sampling.load_generated(gen_dir)
        timings["generate"] = time.perf_counter() - t0
        phases["after generate"] = _rss_mb()[0]

        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        total = 0.0
        for _ in range(args.batches):
            rows = torch.randint(0, n, (args.batch,), generator=g)
            for store in (real.latents, real.prompt_embeds.embeds, generated.latents, generated.trajectory):
                total += float(store[rows].sum())
        timings["read batches"] = time.perf_counter() - t0
        phases["after reads"] = _rss_mb()[0]
        return {
            "n": n,
            "unique_captions": real.prompt_embeds.embeds.num_stored,
            "peak_rss_mb": _rss_mb()[1],
            "phases_rss_mb": phases,
            "cache_mb": _dir_mb(cache_dir),
            "generated_mb": _dir_mb(gen_dir),
            "seconds": timings,
            "checksum": total,
        }


def _end_to_end(n: int, root: Path, run_dir: Path, args: argparse.Namespace, phases: dict, timings: dict) -> dict:
    """The real thing: one `spin` iteration through self_play.run (cache, generation, trainer with its DataLoader,
    export) on the image folder, as `spin-diffusion spin` runs it."""
    from spin_diffusion.config import load_config
    from spin_diffusion.self_play import run

    cfg = load_config(
        None,
        [
            f"run_dir={run_dir}",
            "model.preset=tiny",
            f"data.path={root}",
            f"data.cache_dtype={args.dtype}",
            f"data.cache_shard_size={args.shard_size}",
            f"data.encode_batch_size={args.encode_batch}",
            "num_iterations=1",
            f"sample.num_steps={args.steps}",
            "sample.guidance_scale=2.0",
            f"sample.batch_size={args.sample_batch}",
            f"sample.shard_size={args.shard_size}",
            f"sample.store_dtype={args.dtype}",
            f"train.batch_size={args.batch}",
            f"train.max_steps={args.batches}",
            "train.checkpoint_every=0",
            "eval.enabled=false",
        ],
    )
    t0 = time.perf_counter()
    run(cfg, progress=False)
    timings["build cache"] = timings["generate"] = 0.0
    timings["read batches"] = time.perf_counter() - t0  # the whole run
    phases["after run"] = _rss_mb()[0]
    return {
        "n": n,
        "unique_captions": len(set(json.loads(line)["text"] for line in (root / "metadata.jsonl").open())),
        "peak_rss_mb": _rss_mb()[1],
        "phases_rss_mb": phases,
        "cache_mb": _dir_mb(run_dir / "cache"),
        "generated_mb": _dir_mb(run_dir / "iter_00" / "generated"),
        "seconds": timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="cache storage dtype")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the opponent samples")
    parser.add_argument("--encode-batch", type=int, default=128)
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20, help="training batches read at random")
    parser.add_argument("--batch", type=int, default=64, help="rows per training batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="run one real `spin` iteration (self_play.run: cache, generation, training, export) "
        "instead of the cache steps alone; --batches = optimizer steps, --batch = pairs per step",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args)))
        return

    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    what = (
        "one spin_approx iteration (self_play.run), no trajectory"
        if args.end_to_end
        else "cache steps, trajectory stored"
    )
    print(
        f"{what}: tiny preset, cache dtype {args.dtype}, shard size {args.shard_size}, {args.steps} DDIM steps, "
        f"{args.batches} batches of {args.batch}"
    )
    print(
        f"{'N':>7} {'unique':>7} {'peak RSS MB':>12} {'cache MB':>9} {'generated MB':>13}"
        "  seconds (images/cache/gen/read)"
    )
    for r in rows:
        s = r["seconds"]
        print(
            f"{r['n']:>7} {r['unique_captions']:>7} {r['peak_rss_mb']:>12.1f} {r['cache_mb']:>9.1f} "
            f"{r['generated_mb']:>13.1f}  {s['write images']:.1f}/{s['build cache']:.1f}/{s['generate']:.1f}/"
            f"{s['read batches']:.1f}"
        )
    for r in rows:
        print(f"  N={r['n']}: RSS by phase (MB) " + ", ".join(f"{k} {v:.0f}" for k, v in r["phases_rss_mb"].items()))
    if len(rows) >= 2:
        ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        verdict = "OK" if ratio <= 1.10 else "FAIL: memory grows with N"
        print(f"peak RSS ratio N={rows[-1]['n']} / N={rows[0]['n']}: {ratio:.3f} (limit 1.10) {verdict}")


if __name__ == "__main__":
    main()

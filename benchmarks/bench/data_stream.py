"""Shard streaming at two set sizes: start-up time and peak memory per rank must not grow with the number of samples;
and images/s per data worker at the paper's stage-1 resolution, to size `data.workers`.

    ov2 bench data                                   # 100k and 1M tiny samples, 1 and 2 workers (a few minutes)
    ov2 bench data --sizes 10000,100000 --batches 20 --jpeg 256 --out /tmp/data_small

For each size, a set of tiny webdataset samples (an 8x8 PNG + a JSON caption, 10,000 per shard) is written once
into --work (kept for the next call). Each measurement is a fresh process (one rank) that opens the set by its brace
pattern, as the pretraining loader does (`encoder.data.loader.make_loader` on `encoder.data.stream`), and reports:
start-up seconds (source + loader until the first batch), peak RSS of the rank's main process and of its largest
data worker, and samples/s over the next --batches batches (per worker: divided by the workers; a rank uses at most
one worker per shard, and the table gives the workers used). The median of --repeats runs is kept.

Last row (--jpeg N images timed, 0: none): one worker turns 640x480 JPEGs (photo-like: a smooth random field plus
grain, quality 90; 64 of them in 4 shards in a temporary folder, streamed round and round) into 84 px crops, the
paper's stage-1 resolution, with the paper presets' augmentation (`encoder.config.RELEASED_DATA`) and uint8 batches
of 32, as the pretraining loader does. A rank that must feed R images/s wants about R / (its images/s) workers, and
a core for each. Writes NAME.md and NAME.json (default benchmarks/results/data_stream_cpu), never over existing ones
without --force.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from benchmarks.bench.results import ROOT, check_writable, markdown_table, out_options, write_results
from ov2.cli import doc_parser, fail, positive


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), ((37 * seed) % 256, (91 * seed) % 256, (53 * seed) % 256)).save(buf, format="PNG")
    return buf.getvalue()


def write_set(folder: str, n: int, per_shard: int) -> str:
    """`n` tiny samples, `per_shard` to a shard (written once; a `done` file marks a complete set) -> brace pattern."""
    shards = (n + per_shard - 1) // per_shard
    pattern = os.path.join(folder, f"shard-{{000000..{shards - 1:06d}}}.tar")
    if os.path.isfile(os.path.join(folder, "done")):
        return pattern
    os.makedirs(folder, exist_ok=True)
    images = [_png(i) for i in range(16)]

    def add(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"shard-{s:06d}.tar"), "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                add(tar, f"{i:09d}.png", images[i % 16])
                add(tar, f"{i:09d}.json", json.dumps({"caption": f"a small square number {i}."}).encode())
    open(os.path.join(folder, "done"), "w").close()
    return pattern


PHOTO = (640, 480)  # the JPEG row's source size
PAPER_SIZE = 84  # OpenVision 2's stage-1 resolution
JPEG_SET, JPEG_BATCH = 64, 32  # JPEGs written (streamed round and round), images per batch


def _photo_jpeg(seed: int) -> bytes:
    """A 640x480 JPEG that costs about what a photo costs to decode: smooth colour regions and fine grain."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(PHOTO, Image.BICUBIC)
    grain = rng.normal(0, 12, (PHOTO[1], PHOTO[0], 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(field) + grain, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_jpeg_set(folder: str, n: int = JPEG_SET, shards: int = 4) -> str:
    """`n` photo-like JPEGs with captions in `shards` shards -> brace pattern."""
    per_shard = n // shards
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"photo-{s:06d}.tar"), "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                for name, data in ((f"{i:09d}.jpg", _photo_jpeg(i)),
                                   (f"{i:09d}.json", json.dumps({"caption": f"a photo number {i}."}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, f"photo-{{000000..{shards - 1:06d}}}.tar")


def measure(pattern: str, workers: int, batches: int, batch_size: int, image_size: int = 8) -> dict:
    """One rank's start-up, memory and throughput (run in a fresh process: `--measure`); at `image_size` other than
    8 with the paper presets' augmentation."""
    import resource

    from encoder.config import RELEASED_DATA, DataConfig
    from encoder.data.loader import make_loader
    from encoder.data.stream import StreamSource, shard_urls, worker_count

    t0 = time.perf_counter()
    source = StreamSource(shard_urls(pattern)).split(0, 1)
    augment = RELEASED_DATA if image_size != 8 else {}
    it = iter(make_loader(source, DataConfig(source=pattern, workers=workers, **augment), image_size, batch_size, 0,
                          None, 16))
    next(it)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    samples = sum(next(it)["pixels"].shape[0] for _ in range(batches))
    rate = samples / (time.perf_counter() - t1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker that has ended
    del it  # ends the workers, so that their peak is counted
    child = max(child, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return {"startup_s": startup, "peak_rss_mb": peak, "worker_peak_rss_mb": child if workers else None,
            "samples_per_s": rate, "shards": len(source), "workers": worker_count(source, workers) if workers else 0}


def _run_one(pattern: str, workers: int, batches: int, batch_size: int, image_size: int = 8) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench.data_stream", "--measure", pattern, "--workers", str(workers),
           "--batches", str(batches), "--batch", str(batch_size), "--image-size", str(image_size)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise RuntimeError(f"measurement failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    prog = "ov2 bench data"
    parser = doc_parser(prog, __doc__)
    parser.add_argument("--sizes", default="100000,1000000", help="samples per set, comma-separated")
    parser.add_argument("--workers", default="1,2", help="data workers per rank to measure, comma-separated")
    parser.add_argument("--batches", type=positive(), default=100, help="timed batches per run (default 100)")
    parser.add_argument("--batch", type=positive(), default=256, help="samples per batch (default 256)")
    parser.add_argument("--repeats", type=positive(), default=3, help="runs per row, median kept (default 3)")
    parser.add_argument("--per-shard", type=positive(), default=10_000, help="samples per shard (default 10000)")
    parser.add_argument("--work", default="runs/bench-data", help="where the shard sets are written (kept)")
    parser.add_argument("--jpeg", type=positive(zero=True), default=1024,
                        help=f"images timed in the last row: 640x480 JPEG -> {PAPER_SIZE} px on one worker (default "
                             f"1024; 0: no such row)")
    out_options(parser, "data_stream_cpu")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=positive(), default=8, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.measure:
        print(json.dumps(measure(a.measure, int(a.workers), a.batches, a.batch, a.image_size)))
        return 0
    try:
        sizes = [int(s) for s in a.sizes.split(",") if s]
        workers = [int(w) for w in a.workers.split(",") if w]
    except ValueError:
        return fail(prog, f"--sizes and --workers take comma-separated integers, got {a.sizes!r} / {a.workers!r}")
    if not sizes or min(sizes) <= 0 or not workers or min(workers) < 0:
        return fail(prog, "--sizes must be positive and --workers non-negative")
    out_dir, name = os.path.split(os.path.abspath(a.out))
    try:
        check_writable(out_dir, name, a.force, ("md", "json"))
    except ValueError as err:
        return fail(prog, err)
    rows = []

    def add_row(n: int, w: int, runs: list[dict], images: str) -> None:
        med = {k: statistics.median(r[k] for r in runs) if runs[0][k] is not None else None for k in runs[0]}
        rows.append({"samples": n, "images": images, "shards": int(med["shards"]), "workers": int(med["workers"]),
                     "startup_s": round(med["startup_s"], 3), "peak_rss_mb": round(med["peak_rss_mb"], 1),
                     "worker_peak_rss_mb": None if med["worker_peak_rss_mb"] is None
                     else round(med["worker_peak_rss_mb"], 1),
                     "samples_per_s": round(med["samples_per_s"]),
                     "samples_per_s_per_worker": round(med["samples_per_s"] / max(1, w))})
        print(f"{prog}: {rows[-1]}", file=sys.stderr)

    for n in sizes:
        print(f"{prog}: writing {n:,} samples into {a.work}/n{n} (once)", file=sys.stderr)
        pattern = write_set(os.path.join(a.work, f"n{n}-s{a.per_shard}"), n, a.per_shard)
        for w in workers:
            add_row(n, w, [_run_one(pattern, w, a.batches, a.batch) for _ in range(a.repeats)], "8x8 PNG -> 8 px")
    if a.jpeg:
        with tempfile.TemporaryDirectory(prefix="ov2-bench-jpeg-") as tmp:
            pattern = write_jpeg_set(tmp)
            add_row(JPEG_SET, 1, [_run_one(pattern, 1, -(-a.jpeg // JPEG_BATCH), JPEG_BATCH, PAPER_SIZE)
                                  for _ in range(a.repeats)], f"{PHOTO[0]}x{PHOTO[1]} JPEG -> {PAPER_SIZE} px")
    header = ["samples", "images", "shards", "workers", "start-up s", "peak RSS MB (main)", "peak RSS MB (a worker)",
              "samples/s", "samples/s per worker"]
    table = markdown_table(header, [[f"{r['samples']:,}", r["images"], r["shards"], r["workers"], r["startup_s"],
                                     r["peak_rss_mb"], r["worker_peak_rss_mb"], r["samples_per_s"],
                                     r["samples_per_s_per_worker"]] for r in rows])
    jpeg_note = (f" Last row: {PHOTO[0]}x{PHOTO[1]} JPEGs cropped to {PAPER_SIZE} px (the paper's stage 1) with the "
                 f"paper presets' augmentation, uint8 batches of {JPEG_BATCH}, {a.jpeg} images timed on one worker: a "
                 f"rank that must feed R images/s wants about R / its samples/s workers, and a core for each."
                 if a.jpeg else "")
    command = "ov2 bench data " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"# Shard streaming: start-up and memory against set size\n\n`{command}` on {platform.machine()} "
          f"({os.cpu_count()} cores); one rank, 8x8 PNG + JSON caption per sample, {a.per_shard:,} per shard, batch "
          f"{a.batch}, decode and 8 px augmentation in the workers (workers=0: in the main process); median of "
          f"{a.repeats} fresh processes.{jpeg_note}\n\n{table}")
    write_results(out_dir, name, rows, md, a.force, formats=("md", "json"), meta={"command": command})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

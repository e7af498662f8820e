"""Webdataset shards, streamed through the `webdataset` library: nothing is indexed, so start-up time and memory do
not grow with the number of samples (benchmarks/bench/data_stream.py measures it).

    urls = shard_urls("/data/recap/{000000..009999}.tar")   brace expansion, '::' lists, globs, a folder, a file;
                                                            pipe:, http(s):// and other URLs are passed to webdataset
    source = StreamSource(urls).split(rank, world)          this rank's shards: urls[rank::world]
    loader = stream_loader(source, data_cfg, image_size, batch_size, seed, cursors, texts)

Order. Epoch e visits the rank's shards in `permutation(seed, e)`; worker w of W reads every W-th of them and yields
whole batches, in each shard's own order (write shards shuffled, as img2dataset does). The DataLoader takes batches
from its workers in turn, so the b-th batch of a rank comes from worker b % W.

Resume. Every batch carries its worker's cursor after it, `{"worker": w, "epoch", "shard", "offset"}` (offset:
samples read from that shard). The trainer keeps the cursor of each worker from the batches it consumed, and the
number of batches (`state["stream"]`, saved per rank): a resumed worker reopens its shard and skips `offset` samples,
so the same batches follow as if the run had not stopped. The split depends on the number of processes and workers;
a resume with others is refused with the reason (`check_layout`).

Bad data. A sample without an image or a caption, or with a corrupt image, is dropped from its batch and counted
(`batch["bad"]`), as for the other sources; an unreadable shard (missing, cut, not a tar) ends that shard, is counted
as `bad_shard` and the stream goes on (webdataset's warn-and-continue), counted once per reading as `bad["bad_shard"]`,
apart from the samples.
"""

from __future__ import annotations

import glob
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from encoder.data.sources import IMAGE_EXTS, BadSample, _checked, decode_image, parse_text

REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://")


class StreamError(ValueError):
    """A shard set or a resume that cannot work as given; the message says why."""


def shard_urls(spec: str) -> list[str]:
    """The shard URLs a `data.source` names, in order. Local names are taken literally first (a file or folder whose
    name holds `[`, `*` or braces is never a pattern); a folder means its *.tar files."""
    from webdataset.shardlists import expand_urls

    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
    elif os.path.isfile(spec) or spec.startswith(REMOTE):
        urls = [spec]
    else:
        urls = []
        for part in spec.split(","):
            for url in expand_urls(part) if part else []:
                if url.startswith(REMOTE) or os.path.isfile(url):
                    urls.append(url)
                elif any(c in url for c in "*?["):
                    urls += sorted(glob.glob(url))
                else:
                    urls.append(url)  # missing: read as a bad shard, unless none exists (below)
    if not urls or not any(u.startswith(REMOTE) or os.path.isfile(u) for u in urls):
        raise FileNotFoundError(f"no webdataset shards found at {spec!r}")
    return urls


class StreamSource:
    """A list of shard URLs, split by rank; no sample is read until the loader streams it."""

    streaming = True

    def __init__(self, urls: list[str], rank: int = 0, world: int = 1):
        self.urls, self.rank, self.world = list(urls), rank, world

    def __len__(self) -> int:  # shards, not samples: a stream does not know how many samples it holds
        return len(self.urls)

    def split(self, rank: int, world: int) -> StreamSource:
        if len(self.urls) < world:
            raise StreamError(f"{len(self.urls)} shards cannot feed {world} processes: write more shards")
        return StreamSource(self.urls[rank::world], rank, world)


def worker_count(source: StreamSource, workers: int) -> int:
    """Data workers a rank uses: `data.workers`, at most one per shard, 1 for in-process loading (workers=0)."""
    return max(1, min(workers, len(source.urls)))


def layout(source: StreamSource, workers: int) -> dict:
    return {"world": source.world, "workers": worker_count(source, workers), "shards": len(source.urls)}


def check_layout(saved: dict | None, now: dict) -> None:
    """A stream position is only meaningful for the split it was taken under."""
    if saved and saved != now:
        diff = ", ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in now if saved.get(k) != now.get(k))
        raise StreamError(f"--resume: the shard stream was split for {saved['world']} process(es) x "
                          f"{saved['workers']} worker(s) and cannot continue exactly with another split ({diff}); "
                          f"resume with the same number of processes and data.workers, or start a new run")


def _sample(raw: dict, at_least: int = 0) -> dict:
    image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
    if image is None:
        raise BadSample("missing_image")
    ext = "json" if "json" in raw else "txt" if "txt" in raw else None
    if ext is None:
        raise BadSample("empty_caption")
    caption, alt = parse_text(raw[ext], ext)
    return _checked(decode_image(image, at_least), caption, alt)


def shard_samples(url: str, skip: int = 0, at_least: int = 0):
    """(sample dict | BadSample) for each sample of one shard in its order after the first `skip`; an unreadable
    shard (or the rest of a cut one) yields one `BadSample("bad_shard")`. JPEGs are decoded no larger than needed
    for `at_least` px (`decode_image`)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    errors: list[Exception] = []

    def keep(err: Exception) -> bool:  # warn and continue, counted
        errors.append(err)
        return True

    stream = group_by_keys(tar_file_expander(url_opener([{"url": url}], handler=keep), handler=keep), handler=keep)
    for index, raw in enumerate(stream):
        if index < skip:
            continue
        try:
            yield _sample(raw, at_least)
        except BadSample as err:
            yield err
    if errors:
        err = errors[0]
        reason = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
        print(f"warning: unreadable shard {url} ({type(err).__name__}: {reason}): the rest of it is skipped and "
              f"counted as bad_shards in metrics.jsonl", file=sys.stderr)
        yield BadSample("bad_shard")


class ShardStream(IterableDataset):
    """Endless batches of one rank's shards; see the module docstring for the order and the cursors.
    `transform(image, rng) -> tensor` and `collate(items) -> batch` are the map-style loader's."""

    def __init__(self, source: StreamSource, batch_size: int, seed: int, transform, collate, workers: int,
                 cursors: dict | None = None, decode_size: int = 0):
        self.source, self.batch_size, self.seed, self.decode_size = source, batch_size, seed, decode_size
        self.transform, self.collate = transform, collate
        self.workers = worker_count(source, workers)
        cursors = cursors or {}
        self.batches = int(cursors.get("batches", 0))
        self.cursors = {int(k): v for k, v in cursors.get("workers", {}).items()}

    def shards(self, worker: int, epoch: int) -> list[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source.urls))
        return [int(i) for i in order[worker::self.workers]]

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.batches) % self.workers  # the worker whose batch comes next takes the first turn
        cursor = dict(self.cursors.get(worker, {"epoch": 0, "shard": 0, "offset": 0}))
        items, shard_errors = [], 0
        while True:
            read = cursor["shard"] or cursor["offset"]  # a resumed pass has read some already
            mine = self.shards(worker, cursor["epoch"])
            for s in range(cursor["shard"], len(mine)):
                for sample in shard_samples(self.source.urls[mine[s]], cursor["offset"], self.decode_size):
                    if isinstance(sample, BadSample) and str(sample) == "bad_shard":
                        shard_errors += 1  # counted with the next batch; it takes no place in it
                        continue
                    rng = np.random.default_rng([self.seed, cursor["epoch"], mine[s], cursor["offset"],
                                                 self.source.rank, self.source.world])
                    cursor["offset"] += 1
                    read += 1
                    items.append(self.transform(sample, rng) if isinstance(sample, dict) else {"bad": str(sample)})
                    if len(items) == self.batch_size:
                        batch = self.collate(items)
                        if shard_errors:
                            batch["bad"]["bad_shard"] = batch["bad"].get("bad_shard", 0) + shard_errors
                        batch["stream"] = {"worker": worker, **cursor}
                        yield batch
                        items, shard_errors = [], 0
                cursor.update(shard=s + 1, offset=0)
            if not read:
                raise StreamError(f"no readable sample in a whole pass over the {len(mine)} shard(s) of worker "
                                  f"{worker} of rank {self.source.rank} (first: {self.source.urls[mine[0]]})")
            cursor = {"epoch": cursor["epoch"] + 1, "shard": 0, "offset": 0}


def advance(stream: dict, batch: dict) -> None:
    """Record a consumed batch's cursor in a rank's stream position {"batches", "workers": {w: cursor}}."""
    cursor = dict(batch["stream"])
    stream["workers"][str(cursor.pop("worker"))] = cursor
    stream["batches"] += 1


def stream_loader(source: StreamSource, dataset_kwargs: dict, workers: int, cursors: dict | None) -> DataLoader:
    """A DataLoader over `ShardStream(source, **dataset_kwargs)`: whole batches from each worker, in turn."""
    dataset = ShardStream(source, workers=workers, cursors=cursors, **dataset_kwargs)
    n = dataset.workers if workers > 0 else 0
    return DataLoader(dataset, batch_size=None, num_workers=n, generator=torch.Generator(),
                      persistent_workers=False, prefetch_factor=2 if n else None, pin_memory=torch.cuda.is_available())

"""Write webdataset shards: KEY.png (or .jpg) + KEY.json ({"caption", "alt", "kind"}) + KEY.txt (caption)."""

from __future__ import annotations

import io
import json
import os

import webdataset as wds
from tqdm import tqdm

from encoder.data.synth import make_scene


def write_synth_shards(out: str, n: int, seed: int = 0, size: int = 64, kinds=("shapes", "text", "chart"),
                       per_shard: int = 1000, force: bool = False) -> list[str]:
    """Shards of `n` built-in scenes into `out`, which must be new or empty; with `force`, the `shard-*.tar` files
    already in it are removed first (nothing else there is touched), so no stale shard is ever mixed in."""
    if n <= 0 or per_shard <= 0:
        raise ValueError("--n and --per-shard must be positive")
    from encoder.data.synth import KINDS

    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"unknown scene kinds {sorted(set(kinds) - set(KINDS))}; choose from {', '.join(KINDS)}")
    existing = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if existing and not force:
        raise ValueError(f"{out} is not empty ({len(existing)} entries): choose a new folder, or pass --force to "
                         f"replace the shard-*.tar files in it")
    for name in existing:
        if name.startswith("shard-") and name.endswith(".tar"):
            os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    pattern = os.path.join(out, "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in tqdm(range(n), desc="synth", unit="img"):
            scene = make_scene(seed, i, size, kinds)
            buf = io.BytesIO()
            scene.image.save(buf, format="PNG")
            sink.write({
                "__key__": f"{seed:04d}_{i:09d}",
                "png": buf.getvalue(),
                "json": json.dumps({"caption": scene.caption, "alt": scene.alt, "kind": scene.kind}).encode(),
                "txt": scene.caption.encode(),
            })
    return sorted(os.path.join(out, f) for f in os.listdir(out) if f.startswith("shard-") and f.endswith(".tar"))

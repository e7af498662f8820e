"""Random-access sample sources: `len(source)` and `source.read(i) -> {"image": PIL.Image, "caption", "alt"}`.

- SynthSource: built-in scenes generated on the fly from (seed, index).
- webdataset tar shards (`jpg|jpeg|png|webp` + `txt|json`) are streamed, never indexed: encoder.data.stream
  (`open_source` returns its StreamSource for them).
- FolderSource: an image folder with a JSONL / CSV / parquet captions file (columns `image` or `file`,
  `caption` or `text`, optional `alt`).
`read` raises `BadSample` for a corrupt image or an empty caption; the loader counts and skips those.
"""

from __future__ import annotations

import io
import json
import os

from PIL import Image

from encoder.data.synth import KINDS, make_scene

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "json")


class BadSample(Exception):
    """A sample that cannot be used; str(err) is the reason counted in the metrics."""


def decode_image(data: bytes, at_least: int = 0) -> Image.Image:
    """RGB image; with `at_least`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides at least that large: a web photo of a few megapixels decodes several times faster for a 224 px crop."""
    try:
        image = Image.open(io.BytesIO(data))
        if at_least and image.format == "JPEG":
            image.draft("RGB", (at_least, at_least))
        image.load()
        return image.convert("RGB")
    except Exception as err:  # PIL raises many types for broken files
        raise BadSample("corrupt_image") from err


def parse_text(data: bytes | str, ext: str) -> tuple[str, str]:
    """(caption, alt) from a `.txt` or `.json` payload."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    if ext == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadSample("bad_json") from err
        caption = obj.get("caption") or obj.get("text") or obj.get("txt") or ""
        return str(caption).strip(), str(obj.get("alt") or "").strip()
    return text.strip(), ""


def _checked(image: Image.Image, caption: str, alt: str) -> dict:
    if not caption:
        raise BadSample("empty_caption")
    return {"image": image, "caption": caption, "alt": alt or caption.split(".")[0]}


class SynthSource:
    def __init__(self, seed: int = 0, n: int = 50_000, size: int = 64, kinds: tuple[str, ...] = KINDS,
                 max_groups: int = 3, indices: range | None = None):
        self.seed, self.size, self.kinds, self.max_groups = seed, size, tuple(kinds), max_groups
        self.indices = indices if indices is not None else range(n)

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int) -> dict:
        scene = make_scene(self.seed, self.indices[i], self.size, self.kinds, self.max_groups)
        return _checked(scene.image, scene.caption, scene.alt)

    def split(self, rank: int, world: int) -> SynthSource:
        return SynthSource(self.seed, size=self.size, kinds=self.kinds, max_groups=self.max_groups,
                           indices=self.indices[rank::world])


class SourceError(ValueError):
    """A captions file that cannot be used as given (bad line, missing columns, paths leaving the folder)."""


class FolderSource:
    def __init__(self, root: str, captions: str, rows: list[dict] | None = None, outside: bool = False):
        self.root, self.captions = root, captions
        self.rows = rows if rows is not None else self._load_rows(captions)
        if rows is None and not outside:
            self._check_inside()

    @staticmethod
    def _load_rows(path: str) -> list[dict]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"captions file {path!r} not found")
        if path.endswith((".jsonl", ".json")):
            rows = []
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        raise SourceError(f"{path}:{number}: not a JSON line") from None
                    if not isinstance(row, dict):
                        raise SourceError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                    rows.append(row)
            return rows
        import pandas as pd

        try:
            frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path, keep_default_na=False)
        except Exception as err:  # pandas / pyarrow raise many types for a broken file
            raise SourceError(f"{path}: cannot be read as a table ({str(err).splitlines()[0][:200]})") from None
        columns = set(frame.columns)
        missing = [need for need in (("image", "file"), ("caption", "text")) if not columns & set(need)]
        if missing:
            names = " and ".join(" or ".join(repr(c) for c in need) for need in missing)
            raise SourceError(f"{path}: no column {names} (found: {', '.join(map(str, frame.columns))})")
        return frame.to_dict("records")

    def _check_inside(self) -> None:
        """Image paths must stay in the image folder (no `..`, absolute paths or symlinks out of it)."""
        root = os.path.realpath(self.root)
        for number, row in enumerate(self.rows, 1):
            name = str(row.get("image") or row.get("file") or "")
            if not name:
                continue
            path = os.path.join(self.root, name)
            target = os.path.realpath(path)
            if os.path.isabs(name) or os.path.commonpath([root, target]) != root:
                if os.path.islink(path) and not os.path.exists(path):  # not "leaving": pointing nowhere
                    raise SourceError(f"{self.captions}: row {number}: image {name!r} is a broken symbolic link "
                                      f"(to {os.readlink(path)!r}, which does not exist)")
                raise SourceError(f"{self.captions}: row {number}: image path {name!r} leaves the image folder "
                                  f"{self.root}; pass --data.captions_outside=true to allow it")

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, i: int) -> dict:
        row = self.rows[i]
        name = row.get("image") or row.get("file") or ""
        try:
            with open(os.path.join(self.root, str(name)), "rb") as f:
                data = f.read()
        except OSError as err:
            raise BadSample("missing_image") from err
        caption = str(row.get("caption") or row.get("text") or "").strip()
        return _checked(decode_image(data), caption, str(row.get("alt") or "").strip())

    def split(self, rank: int, world: int) -> FolderSource:
        return FolderSource(self.root, self.captions, self.rows[rank::world])


def open_source(data_cfg, render_size: int = 64):
    """The source named by a `DataConfig` (not yet split across ranks)."""
    spec = data_cfg.source
    if spec == "synth":
        kinds = tuple(k.strip() for k in data_cfg.kinds.split(",") if k.strip())
        source = SynthSource(data_cfg.synth_seed, data_cfg.synth_size, render_size, kinds, data_cfg.synth_max_groups)
    elif data_cfg.captions:
        if not os.path.isdir(spec):
            raise FileNotFoundError(f"image folder {spec!r} not found")
        source = FolderSource(spec, data_cfg.captions, outside=getattr(data_cfg, "captions_outside", False))
    else:
        from encoder.data.stream import StreamSource, shard_urls

        source = StreamSource(shard_urls(spec))
    if data_cfg.fashion_mnist > 0 and getattr(source, "streaming", False):
        raise ValueError("data.fashion_mnist mixes Fashion-MNIST into a synth or image-folder source; a shard stream "
                         "takes it as shards (write them into the set)")
    if data_cfg.fashion_mnist > 0:  # real images: the Fashion-MNIST train split (never the test split)
        from encoder.data.fashion_mnist import FashionMNISTSource, MixedSource

        source = MixedSource(source, FashionMNISTSource("train", render_size), data_cfg.fashion_mnist)
    return source

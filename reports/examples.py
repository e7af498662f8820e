"""A few questions per task with the image, the right answer and each encoder's answer (wrong ones marked).

Questions where the encoders disagree come first (they say most about the difference), then ones all got wrong,
then the rest, in doc_id order. Images come from RUN/data/<task>/ (datasets.save_to_disk, doc_id = row index).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmarks.evals.suite.tasks import TASKS
from reports.figures import png_uri
from reports.summary import task_label


def _images(data_dir: Path, task: str, doc_ids: list[int]) -> dict[int, str]:
    folder = Path(data_dir) / task
    if not (folder / "dataset_info.json").is_file() and not (folder / "dataset_dict.json").is_file():
        return {}
    try:
        from datasets import load_from_disk

        data = load_from_disk(str(folder))
        if hasattr(data, "keys"):  # a DatasetDict: the first split
            data = data[next(iter(data.keys()))]
        column = next((c for c in ("image", "images", "img") if c in data.column_names), None)
        if column is None:
            return {}
        out = {}
        for i in doc_ids:
            if 0 <= i < len(data):
                image = data[int(i)][column]
                image = image[0] if isinstance(image, list) and image else image
                if hasattr(image, "convert"):
                    out[i] = png_uri(image)
        return out
    except Exception:  # an unreadable data folder costs the pictures, not the report
        return {}


def _short(text: str, limit: int = 160) -> str:
    """An answer as shown: an untrained model can ramble for hundreds of characters."""
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def build_examples(samples: pd.DataFrame, encoders: list[str], data_dir: Path, per_task: int = 3) -> list[dict]:
    """[{task, label, items: [{doc_id, image, question, target, answers: [{encoder, text, right}]}]}]"""
    out = []
    if samples.empty:
        return out
    order = {task: i for i, task in enumerate(TASKS)}
    tasks = sorted(dict.fromkeys(samples["task"]), key=lambda t: (order.get(t, len(order)), t))
    for task in tasks:
        group = samples[samples["task"] == task]
        present = [e for e in encoders if e in set(group["encoder"])]
        wide = group.pivot_table(index="doc_id", columns="encoder", values="score", aggfunc="first")
        wide = wide[[e for e in present if e in wide.columns]].dropna()
        if wide.empty:
            continue
        agree_all = wide.nunique(axis=1) == 1
        all_wrong = (wide <= 0).all(axis=1)
        rank = (~agree_all).astype(int) * 2 + all_wrong.astype(int)
        picked = sorted(wide.index, key=lambda d: (-rank[d], d))[:per_task]
        images = _images(data_dir, task, [int(d) for d in picked])
        items = []
        for doc in picked:
            rows = group[group["doc_id"] == doc].set_index("encoder")
            first = rows.iloc[0]
            answers = [{"encoder": e, "text": _short(str(rows.loc[e, "prediction"])),
                        "right": bool(float(rows.loc[e, "score"]) > 0)} for e in present if e in rows.index]
            items.append({"doc_id": int(doc), "image": images.get(int(doc)), "question": str(first["question"]),
                          "target": str(first["target"]), "type": first.get("type"), "answers": answers})
        out.append({"task": task, "label": task_label(task), "items": items})
    return out

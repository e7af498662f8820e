"""`ov2 bench data`: tiny shard sets of two sizes streamed in fresh processes; the table and JSON are written."""

import json

import pytest

from tests.helpers import run_inprocess


@pytest.mark.slow  # eight fresh processes
def test_bench_data_writes_a_row_per_size_and_worker_count(tmp_path):
    out = tmp_path / "data"
    result = run_inprocess("bench", "data", "--sizes", "60,600", "--per-shard", "50", "--workers", "0,2",
                                 "--batches", "3", "--batch", "16", "--repeats", "1", "--work", str(tmp_path / "w"),
                                 "--jpeg", "64", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "data.json").read_text())["rows"]
    assert [(r["samples"], r["shards"], r["workers"]) for r in rows] == [(60, 2, 0), (60, 2, 2), (600, 12, 0),
                                                                        (600, 12, 2), (64, 4, 1)]
    assert all(r["startup_s"] > 0 and r["samples_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    assert rows[1]["worker_peak_rss_mb"] > 0 and rows[0]["worker_peak_rss_mb"] is None
    md = (tmp_path / "data.md").read_text()
    assert "| 600 | 8x8 PNG -> 8 px | 12 | 2 |" in md
    # the last row sizes workers for the paper: one worker's 84 px crops of 640x480 JPEGs
    assert rows[-1]["images"] == "640x480 JPEG -> 84 px" and rows[-1]["worker_peak_rss_mb"] > 0
    assert rows[-1]["samples_per_s_per_worker"] == rows[-1]["samples_per_s"] > 0 and "R / its samples/s" in md
    again = run_inprocess("bench", "data", "--sizes", "60", "--work", str(tmp_path / "w"), "--out", str(out))
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr

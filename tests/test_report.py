"""ov2 report: numbers in the HTML equal the results on disk, escaping, failures named, a real browser renders it.

The run folders are hand-made (tests/report_fixture.py): 3 encoders, 9 tasks, per-question samples, curves, one
failed bridge stage with its evaluation skipped. The browser test drives the Debian `chromium` with Playwright from
a file URL with the network blocked; under CI (CI=true) it fails, not skips, when either is missing.
"""

from __future__ import annotations

import io
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_fixture import TASKS, write_run

from benchmarks.evals.suite.tasks import TASKS as SUITE
from reports.render import build_report
from reports.stats import paired_bootstrap
from tests.helpers import run_inprocess

XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("report") / "run")
    return run, build_report(run)


@pytest.fixture(scope="module")
def xss_report(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("xss") / "run", encoders=("ov2", XSS), failed=None, n=12)
    return run, build_report(run)


class Tables(HTMLParser):
    """Every <table id=...> as rows of (tag, text, classes) cells."""

    def __init__(self):
        super().__init__()
        self.tables, self.current, self.row, self.cell = {}, None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.current = self.tables.setdefault(attrs.get("id") or f"t{len(self.tables)}", [])
        elif tag == "tr" and self.current is not None:
            self.row = []
            self.current.append(self.row)
        elif tag in ("td", "th") and self.row is not None:
            self.cell = [tag, "", attrs.get("class") or ""]
            self.row.append(self.cell)

    def handle_endtag(self, tag):
        if tag == "table":
            self.current = None
        elif tag in ("td", "th"):
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data


def parse_tables(path) -> dict:
    parser = Tables()
    parser.feed(path.read_text())
    return parser.tables


def column(rows: list, head: str) -> int:
    """The index of the summary column whose header starts with `head` (label and unit; the split follows)."""
    return next(i for i, c in enumerate(rows[0]) if c[1].strip().startswith(head))


def numbers(text: str) -> list[float]:
    return [float(t) for t in text.replace("±", " ").split() if t not in ("—", "")]


def test_summary_numbers_equal_the_results_on_disk(report):
    run, path = report
    rows = parse_tables(path)["summary-table"]
    header = [c[1].strip() for c in rows[0]][1:]
    labels = {SUITE[t].label: t for t in SUITE}
    tasks = [max(((lab, t) for lab, t in labels.items() if h.startswith(lab)), key=lambda x: len(x[0]))[1]
             for h in header]  # the longest label the header starts with ("GQA unseen pairs" before "GQA")
    assert all(h.endswith(("held-in", "held-out")) for h in header)  # every task says which kind it is
    assert tasks == list(TASKS), header
    res = pd.read_csv(run / "results.csv")
    checked = 0
    for row in rows[1:]:
        name = row[0][1].split()[0] if row[0][1].strip() != "chance" else "chance"
        for task, cell in zip(tasks, row[1:]):
            metric, chance = TASKS[task][0], TASKS[task][1]
            scale = 1.0 if chance > 1 else 100.0  # MME and OCRBench are scores, the rest in %
            got = numbers(cell[1])
            if name == "chance":
                assert got == [pytest.approx(chance * scale, abs=0.05)]
                checked += 1
                continue
            disk = res[(res["encoder"] == name) & (res["task"] == task) & (res["metric"] == metric)]
            if disk.empty:  # clip's bridge failed: no results, a dash in the table
                assert got == [] and cell[1].strip() == "—"
                continue
            expected = [disk["value"].iloc[0] * scale]
            if pd.notna(disk["stderr"].iloc[0]):
                expected.append(disk["stderr"].iloc[0] * scale)
            assert got == pytest.approx(expected, abs=0.05 + 1e-9), (name, task, cell)
            checked += len(expected)
    assert checked >= 2 * 2 * 8 + 9  # two encoders with values and stderrs on (nearly) every task, and chance


def test_best_per_column_is_marked(report):
    run, path = report
    rows = parse_tables(path)["summary-table"][1:-1]
    for j in range(1, len(rows[0])):
        values = [numbers(r[j][1])[0] if numbers(r[j][1]) else None for r in rows]
        marked = [("best" in r[j][2]) for r in rows]
        present = [v for v in values if v is not None]
        if len(set(present)) > 1:
            assert marked == [v == max(present) for v in values]
        else:  # a tie between every encoder marks nobody
            assert not any(marked)


def test_differences_have_paired_intervals(report):
    run, path = report
    rows = parse_tables(path)["differences"]
    assert [r[0][1].strip() for r in rows[1:]] == ["ov1"]  # clip has no answers to pair, ov2 is the reference
    samples = {e: pd.read_json(run / "encoders" / e / "eval" / "samples" / "ov2_pope.jsonl", lines=True)
               for e in ("ov2", "ov1")}
    expected = paired_bootstrap(samples["ov2"]["score"], samples["ov1"]["score"])
    pope = column(rows, "POPE")
    diff, lo, hi = numbers(rows[1][pope][1].replace("[", " ").replace("]", " ").replace(",", " "))
    assert diff == pytest.approx(expected["diff"] * 100, abs=0.05)
    assert (lo, hi) == pytest.approx((expected["lo"] * 100, expected["hi"] * 100), abs=0.05)
    assert lo <= diff <= hi


def test_paired_bootstrap_sees_a_small_consistent_gain():
    rng = np.random.default_rng(0)
    a = (rng.random(200) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:12]] = 1.0  # b answers 12 more questions right, and nothing else changes
    r = paired_bootstrap(a, b)
    assert r["diff"] == pytest.approx(0.06) and r["significant"] and 0 < r["lo"] < r["diff"] < r["hi"]
    same = paired_bootstrap(a, a)
    assert same["diff"] == 0 and not same["significant"]


def test_failed_stage_is_named(report):
    run, path = report
    html = path.read_text()
    failures = parse_tables(path)
    rows = [[c[1].strip() for c in r] for t in failures.values() for r in t]
    failed = [r for r in rows if r[:3] == ["clip", "bridge", "failed"]]
    assert failed and failed[0][3].startswith("RuntimeError: bridge of clip ran out of memory at step 7")
    assert ["clip", "eval", "skipped", "needs bridge, which failed"] in rows
    assert "bridge failed" in html  # the clip row of the summary says why it is empty
    assert "step 6 loss 3.2" in html  # the tail of the failed stage's log


def test_names_and_answers_are_escaped(xss_report):
    run, path = xss_report
    html = path.read_text()
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert html.count("<script") == 1  # the report's own few lines that sort tables


def test_cli_bad_input_and_overwrite(report, tmp_path):
    cli = run_inprocess
    run, _ = report
    bad = cli("report", str(tmp_path / "missing"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.csv").write_text('encoder,task,value\n"ov2')
    cut = cli("report", str(broken))
    assert cut.returncode == 2 and "results.csv" in cut.stderr and len(cut.stderr.strip().splitlines()) == 1
    mine = tmp_path / "notes.html"
    mine.write_text("my notes")
    kept = cli("report", str(run), "--out", str(mine))
    assert kept.returncode == 2 and "--force" in kept.stderr and mine.read_text() == "my notes"
    forced = cli("report", str(run), "--out", str(mine), "--force")
    assert forced.returncode == 0, forced.stderr
    assert 'content="ov2 report"' in mine.read_text()
    again = cli("report", str(run), "--out", str(mine))  # our own report is replaced without --force
    assert again.returncode == 0, again.stderr


def test_compare_puts_two_runs_side_by_side(report, tmp_path):
    run, _ = report
    other = write_run(tmp_path / "run_b", failed=None, seed=1, n=24, with_data=False)
    path = build_report(run, compare=other)
    assert path.name == "compare_run_b.html"
    rows = [[c[1].strip() for c in r] for r in parse_tables(path)["compare-table"][1:]]
    clip = rows[6:9]  # encoder rows come in threes: A, B, B - A
    assert clip[0][0] == "clip" and clip[0][1].startswith("A") and set(clip[0][2:]) == {"—"}  # A's clip failed
    assert all(v != "—" for v in clip[1][1:])  # B's clip has numbers
    ov1_delta = rows[5]
    assert rows[3][0] == "ov1" and ov1_delta[0] == "B − A"
    values = []
    for folder in (run, other):
        t = pd.read_csv(folder / "results.csv")
        values.append(float(t[(t.encoder == "ov1") & (t.task == "ov2_pope") & (t.metric == "f1")]["value"].iloc[0]))
    got = numbers(ov1_delta[1 + list(TASKS).index("ov2_pope")].replace("[", " ").replace("]", " ").replace(",", " "))
    assert got[0] == pytest.approx((values[1] - values[0]) * 100, abs=0.05) and got[1] <= got[2]


def _browser():
    """(sync_playwright, chromium path), or fail under CI / skip elsewhere when either is missing."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = [what for what, ok in (("playwright", sync_playwright), ("chromium", chromium)) if not ok]
    if missing:
        message = f"{' and '.join(missing)} missing: make install (root) adds the Debian chromium and playwright"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright, chromium


def test_real_browser_renders_the_report(report, xss_report, tmp_path):
    from PIL import Image

    sync_playwright, chromium = _browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            for name, (_, path) in (("report", report), ("xss", xss_report)):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                errors, failed, dialogs, remote = [], [], [], []
                page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.on("requestfailed", lambda r, failed=failed: failed.append(r.url))
                page.on("dialog", lambda d, dialogs=dialogs: (dialogs.append(d.message), d.dismiss()))
                page.route("http*://**", lambda r, remote=remote: (remote.append(r.request.url), r.abort()))
                page.goto(path.resolve().as_uri(), wait_until="load")
                sortable = page.locator("table.sortable th")
                if sortable.count():  # the report's own script runs without errors
                    sortable.first.click()
                shot = page.screenshot(full_page=True)
                (tmp_path / f"{name}.png").write_bytes(shot)
                assert errors == [] and failed == [] and remote == [] and dialogs == [], (name, errors, failed)
                boxes = page.evaluate("""() => Array.from(document.querySelectorAll('img, svg')).map(e => {
                    const r = e.getBoundingClientRect();
                    return [e.tagName, r.width, r.height, e.tagName === 'IMG' ? e.naturalWidth : 1]; })""")
                assert len(boxes) >= 10, boxes  # 9 task charts, curves, thumbnails, the encoder-eval chart
                assert all(w > 0 and h > 0 and natural > 0 for _, w, h, natural in boxes), boxes
                image = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=float)
                assert image.shape[0] > 900 and image.std() > 10 and len(np.unique(image)) > 50
                page.close()
        finally:
            browser.close()


def test_efficiency_ratios_to_ov2(report, tmp_path):
    run, _ = report
    results = tmp_path / "results"
    results.mkdir()
    pd.DataFrame([
        {"variant": "ov2", "family": "ov2", "image_size": 64, "batch": 16, "step_s": 0.5, "images_per_s": 32.0,
         "peak_mib": 900.0},
        {"variant": "ov1", "family": "ov1", "image_size": 64, "batch": 16, "step_s": 0.8, "images_per_s": 20.0,
         "peak_mib": 1350.0},
    ]).to_csv(results / "cost_train_cpu.csv", index=False)
    path = build_report(run, out=tmp_path / "r.html", results_dir=results)
    tables = [t for t in parse_tables(path).values() if t and "step_s / ov2" in [c[1] for c in t[0]]]
    assert len(tables) == 1
    header = [c[1] for c in tables[0][0]]
    ov1 = [c[1] for c in tables[0][2]]
    assert float(ov1[header.index("step_s / ov2")]) == pytest.approx(1.6)
    assert float(ov1[header.index("peak_mib / ov2")]) == pytest.approx(1.5)
    assert float(ov1[header.index("images_per_s / ov2")]) == pytest.approx(0.625, abs=0.006)  # two decimals


def test_parquet_only_run_without_paper_table(tmp_path):
    run = write_run(tmp_path / "run", failed=None, n=8, with_data=False)
    table = pd.read_csv(run / "results.csv")
    table.to_parquet(run / "results.parquet")
    (run / "results.csv").unlink()
    (run / "experiment.yaml").write_text((run / "experiment.yaml").read_text().replace(
        "llava15_openvision2", "no_such_table"))
    html = build_report(run).read_text()
    assert "reports/reference/no_such_table.csv is not there" in html
    rows = parse_tables(run / "report" / "index.html")["summary-table"]
    ov2 = table[(table.encoder == "ov2") & (table.task == "ov2_seed") & (table.metric == "accuracy")]["value"].iloc[0]
    seed = column(rows, "SEED%")
    assert numbers(rows[1][seed][1])[0] == pytest.approx(ov2 * 100, abs=0.05)
    assert "<img class=\"thumb\"" not in html  # no data folder: examples without pictures, and no error


def test_paper_differences_beside_ours(report):
    run, path = report
    reference = Path(__file__).resolve().parents[1] / "reports" / "reference" / "llava15_openvision2.csv"
    paper = pd.read_csv(reference)
    paper = paper[paper.framework == "llava-1.5"]
    pairs = paper[paper.method == "OpenVision"].merge(paper[paper.method == "OpenVision 2"],
                                                     on=["encoder", "resolution"], suffixes=("", "_ov2"))
    expected = (pairs["pope"] - pairs["pope_ov2"]).mean()
    html = path.read_text()
    assert "different scale and data" in html
    table = next(t for t in parse_tables(path).values() if t and [c[1] for c in t[0]][:3] == ["task", "ours", "paper"])
    pope = next(r for r in table if r[0][1] == "POPE")
    assert float(pope[2][1]) == pytest.approx(expected, abs=0.05)
    summary = parse_tables(path)["summary-table"]
    col = column(summary, "POPE%")
    ours = numbers(summary[2][col][1])[0] - numbers(summary[1][col][1])[0]
    assert float(pope[1][1]) == pytest.approx(ours, abs=0.11)


def test_examples_show_image_question_and_every_answer(report):
    run, path = report
    html = path.read_text()
    assert html.count('class="thumb" src="data:image/png;base64,') == 3 * len(TASKS)  # 3 questions per task
    # the textvqa question with markup is one where ov2 and ov1 disagree: shown first, both answers marked
    assert "Which tag is written: &lt;b&gt;bold&lt;/b&gt;" in html
    card = html.split("Which tag is written:")[1].split('<div class="card">')[0]
    assert '<li class="wrong">' in card and '<li class="right">' in card


def test_encoders_shown_by_their_label(tmp_path):
    import yaml

    run = write_run(tmp_path / "run", encoders=("a", "b"), failed=None, n=8, with_data=False)
    experiment = yaml.safe_load((run / "experiment.yaml").read_text())
    experiment["encoders"] = {"a": {"preset": "clip-tiny", "label": "CLIP tiny"},
                              "b": {"preset": "ov2-tiny", "label": "OpenVision 2 tiny"}}
    (run / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    rows = parse_tables(build_report(run))["summary-table"]
    names = [r[0][1].strip() for r in rows[1:-1]]
    assert names == ["CLIP tiny", "OpenVision 2 tiny reference"]  # the ov2 preset is the reference, by label

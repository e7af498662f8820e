"""A hostile user's inputs (issue "nothing lost, nothing cryptic"): one test per numbered data-loss / recovery item,
one table-driven test over the bad-input list (exit 2, one line on stderr, no traceback, run folder unchanged),
Ctrl-C, shard folders with [ or ] in their names, captions-file paths that leave the image folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from ov2 import checkpoint as core
from ov2.cli import main as ov2
from ov2.runfolder import RunLock, RunLocked, read_metrics, read_run
from tests.helpers import ROOT, run_cli

MICRO = ["--preset", "ov2-micro", "--data.workers=0"]
SHORT = [*MICRO, "--stages.0.steps=2", "--stages.1.steps=1", "--stages.0.warmup_steps=0",
         "--stages.1.warmup_steps=0"]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished ov2-micro run folder (checkpoints at steps 10, 12, 20)."""
    out = tmp_path_factory.mktemp("micro") / "run"
    assert ov2(["train", "--out", str(out), *MICRO]) == 0
    return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    from bridge_helpers import write_our_checkpoint

    folder = tmp_path_factory.mktemp("ours")
    write_our_checkpoint(folder)
    return folder


def _png(width: int, height: int, data: bytes = b"") -> bytes:
    """A PNG that claims width x height pixels (enough for Image.open to read its size), with `data` as pixels."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def _image_folder(root: Path, rows: list, name: str = "captions.jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "a.png")
    path = root / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- 1-7: nothing lost ---------------------------------------------------------------------------------


def test_1_export_encoder_refuses_non_empty_and_checkpoint_destinations(run, ours, tmp_path, capsys):
    from bridge.cli import export_encoder_main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own file")
    assert export_encoder_main([str(run), str(mine)]) == 2
    assert (mine / "config.json").read_text() == "my own file" and len(list(mine.iterdir())) == 1
    assert "--force" in capsys.readouterr().err
    before_run, before_ckpt = snapshot(run), snapshot(ours)
    for dest in (run, core.list_checkpoints(run)[-1], ours, core.list_checkpoints(run)[-1] / "sub"):
        assert export_encoder_main([str(run), str(dest), "--force"]) == 2, dest
    assert snapshot(run) == before_run and snapshot(ours) == before_ckpt
    assert export_encoder_main([str(run), str(mine), "--force"]) == 0
    assert json.loads((mine / "config.json").read_text())["model_type"] == "vit"


def test_2_all_bad_data_stops_instead_of_looping(tmp_path, capsys):
    captions = _image_folder(tmp_path / "imgs", [{"image": f"missing_{i}.png", "caption": "x"} for i in range(5)])
    start = time.time()
    code = ov2(["train", "--out", str(tmp_path / "r"), *SHORT, f"--data.source={tmp_path / 'imgs'}",
                f"--data.captions={captions}", "--data.max_bad_fraction=1"])
    err = capsys.readouterr().err
    assert code == 1 and "no usable sample in" in err and "missing_image" in err, err[-1000:]
    assert time.time() - start < 60
    assert read_run(tmp_path / "r")["status"]["state"] == "failed"


def test_3_failed_resume_writes_nothing_and_names_the_keys(run, capsys):
    before = snapshot(run)
    assert ov2(["train", "--out", str(run), "--resume", "--preset", "ov1-micro"]) == 2
    err = capsys.readouterr().err
    assert "cannot change the architecture" in err and "model.family (saved 'ov2', now 'ov1')" in err, err
    assert ov2(["train", "--out", str(run), "--resume", "--model.vit.depth=3", "--stages.0.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "model.vit.depth (saved 2, now 3)" in err and "stages.0.lr" not in err
    assert ov2(["train", "--out", str(run), "--resume", "--stages.1.steps=2"]) == 2  # total 14 < step 20
    assert "checkpoint is at step 20" in capsys.readouterr().err
    assert snapshot(run) == before


def test_4_bridge_train_into_another_runs_folder_is_refused_untouched(ours, tmp_path, capsys):
    from dataclasses import asdict

    from bridge.cli import main as bridge
    from bridge.config import BridgeConfig

    out = tmp_path / "llava"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(asdict(BridgeConfig(encoder=str(ours), out=str(out)))))
    before = snapshot(out)
    for encoder in ("preset:ov2-micro", str(tmp_path / "nope")):
        assert bridge(["train", "--encoder", encoder, "--out", str(out), "--llm", "x"]) == 2
        err = capsys.readouterr().err
        assert "encoder" in err and "another --out" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(out) == before
    fresh = tmp_path / "fresh"
    assert bridge(["train", "--encoder", str(tmp_path / "nope"), "--out", str(fresh)]) == 2
    assert "vision tower" in capsys.readouterr().err and not fresh.exists()


def test_5_preset_tower_is_seeded_by_the_run_seed():
    from bridge.towers import load_tower

    state = torch.get_rng_state()
    a, b = load_tower("preset:ov2-micro", seed=3), load_tower("preset:ov2-micro", seed=3)
    c = load_tower("preset:ov2-micro", seed=4)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()) if pa.std() > 0)


@pytest.mark.slow
def test_6_a_second_writer_exits_2_naming_the_holder(tmp_path):
    out = tmp_path / "busy"
    with RunLock(out):  # held by this process: another process is refused, naming it
        result = run_cli("train", "--out", str(out), *SHORT)
        with pytest.raises(RunLocked, match=f"in use by pid {os.getpid()}"):  # and so is this process itself
            RunLock(out).__enter__()
    assert result.returncode == 2 and f"in use by pid {os.getpid()}" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_7_one_atomic_scheme_a_crash_mid_write_leaves_the_older_checkpoints(tmp_path):
    run = tmp_path / "run"
    first = core.begin(run, 1)
    (first / "model.safetensors").write_bytes(b"w" * 10)
    core.commit(first, {"step": 1})
    crashed = core.begin(run, 2)  # the process died while writing step 2
    (crashed / "model.safetensors").write_bytes(b"w" * 3)
    assert [p.name for p in core.list_checkpoints(run)] == ["step_0000001"]
    assert core.newest(run)[0].name == "step_0000001"
    assert core.read_state(core.step_path(run, 1)) == {"step": 1}


# --- 8-11: recovery ------------------------------------------------------------------------------------


def test_8_truncated_newest_checkpoint_falls_back_for_every_reader(run, tmp_path, capsys):
    from bridge.cli import export_encoder_main
    from encoder.checkpoint import load_model

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = core.list_checkpoints(copy)[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model, _ = load_model(str(copy))
    err = capsys.readouterr().err
    assert "step_0000020 is damaged (model.safetensors has" in err and "using checkpoint step_0000012" in err
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (0, 0, 200)).save(img)
    assert ov2(["caption", "--ckpt", str(copy), str(img), "--max-len", "4"]) == 0
    assert export_encoder_main([str(copy), str(tmp_path / "hf")]) == 0
    assert "step_0000020 is damaged" in capsys.readouterr().err


def test_9_a_cut_last_metrics_line_is_dropped(tmp_path):
    from ov2.runfolder import rewrite_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    rewrite_metrics(path, 1)
    assert path.read_text() == '{"step": 1}\n'


def test_10_unreadable_shards_are_counted_once_in_metrics(tmp_path, capsys):
    from encoder.data.shards import write_synth_shards

    shards = tmp_path / "shards"
    write_synth_shards(str(shards), 16, size=32, per_shard=8)  # 3 steps of 8 read past the end of the set
    (shards / "shard-broken.tar").write_bytes(b"not a tar file at all" * 50)
    out = tmp_path / "r"
    assert ov2(["train", "--out", str(out), *SHORT, f"--data.source={shards}"]) == 0
    assert "shard-broken.tar" in capsys.readouterr().err  # named as it is skipped
    counts = [r["bad_shards"] for r in read_metrics(out / "metrics.jsonl")]
    assert counts[-1] >= 1 and counts == sorted(counts)  # counted each time the stream reaches it, apart from samples
    assert all(r["skipped"] == 0 for r in read_metrics(out / "metrics.jsonl"))


def test_11_data_synth_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "synth"
    assert ov2(["data", "synth", "--n", "6", "--per-shard", "2", "--size", "16", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert ov2(["data", "synth", "--n", "2", "--per-shard", "2", "--size", "16", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and snapshot(out) == before
    assert ov2(["data", "synth", "--n", "2", "--per-shard", "2", "--size", "16", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shard-000000.tar"]


# --- one line, exit 2, for every bad input -------------------------------------------------------------

BAD = {  # name -> argv, with RUN (the finished run folder) and T (a scratch folder) filled in
    "patch_size=0": ["train", "--out", "{RUN}", *MICRO, "--model.vit.patch_size=0"],
    "heads=0": ["train", "--out", "{RUN}", *MICRO, "--model.vit.heads=0"],
    "stage image_size=0": ["train", "--out", "{RUN}", *MICRO, "--stages.0.image_size=0"],
    "lr=nan": ["train", "--out", "{RUN}", *MICRO, "--stages.0.lr=nan"],
    "workers=-1": ["train", "--out", "{RUN}", *MICRO, "--data.workers=-1"],
    "yaml stages: [3, 4]": ["train", "--out", "{RUN}", "--config", "{T}/stages_scalars.yaml"],
    "yaml stages: []": ["train", "--out", "{RUN}", "--config", "{T}/stages_empty.yaml"],
    "yaml preset: [1]": ["train", "--out", "{RUN}", "--config", "{T}/preset_list.yaml"],
    "yaml a list": ["train", "--out", "{RUN}", "--config", "{T}/list.yaml"],
    "--out a file": ["train", "--out", "{RUN}/config.yaml", *MICRO],
    "--out read-only": ["train", "--out", "/sys/ov2_hostile_run", *MICRO],
    "resume other preset": ["train", "--out", "{RUN}", "--resume", "--preset", "clip-micro"],
    "captions broken line": ["train", "--out", "{RUN}/../new", *MICRO, "--data.source={T}/imgs",
                             "--data.captions={T}/imgs/broken.jsonl"],
    "captions non-object": ["train", "--out", "{RUN}/../new", *MICRO, "--data.source={T}/imgs",
                            "--data.captions={T}/imgs/list.jsonl"],
    "csv without columns": ["train", "--out", "{RUN}/../new", *MICRO, "--data.source={T}/imgs",
                            "--data.captions={T}/imgs/cols.csv"],
    "caption bomb": ["caption", "--ckpt", "{RUN}", "{T}/bomb.png"],
    "caption size": ["caption", "--ckpt", "{RUN}", "{T}/imgs/a.png", "--size", "12"],
    "chat corrupt image": ["bridge", "chat", "{RUN}", "{T}/corrupt.png", "hi"],
    "chat non-image": ["bridge", "chat", "{RUN}", "{RUN}/config.yaml", "hi"],
    "chat folder": ["bridge", "chat", "{RUN}", "{T}", "hi"],
    "eval-encoder n-train 0": ["eval-encoder", "--ckpt", "{RUN}", "--n-train", "0"],
    "eval-encoder out folder": ["eval-encoder", "--ckpt", "{RUN}", "--out", "{T}"],
    "bridge eval n 0": ["bridge", "eval", "{RUN}", "--n", "0"],
    "bridge config list": ["bridge", "train", "--encoder", "{RUN}", "--out", "{RUN}/../b", "--config",
                           "{T}/list.yaml"],
    "bridge bad value": ["bridge", "train", "--encoder", "{RUN}", "--out", "{RUN}/../b", "--stage1.lr=fast"],
    "bridge bad steps": ["bridge", "train", "--encoder", "{RUN}", "--out", "{RUN}/../b", "--stage2.steps=0"],
    "bridge unknown key": ["bridge", "train", "--encoder", "{RUN}", "--out", "{RUN}/../b", "--stage1.nope=3"],
}
NAMED = {"lr=nan": "stages.0.lr", "captions broken line": "broken.jsonl:2", "captions non-object": "list.jsonl:1",
         "csv without columns": "'caption' or 'text'", "caption bomb": "too large", "bridge bad value": "stage1.lr",
         "bridge bad steps": "stage2.steps", "heads=0": "model.vit.heads", "patch_size=0": "model.vit.patch_size",
         "workers=-1": "data.workers", "stage image_size=0": "stages.0.image_size", "yaml preset: [1]": "preset",
         "--out read-only": "not writable", "resume other preset": "cannot change"}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    t = tmp_path_factory.mktemp("bad")
    (t / "stages_scalars.yaml").write_text("stages: [3, 4]\n")
    (t / "stages_empty.yaml").write_text("stages: []\n")
    (t / "preset_list.yaml").write_text("preset: [1]\n")
    (t / "list.yaml").write_text("- 1\n- 2\n")
    _image_folder(t / "imgs", [{"image": "a.png", "caption": "red"}, '{"image": "a.png", "cap'], "broken.jsonl")
    _image_folder(t / "imgs", ["[1, 2]"], "list.jsonl")
    (t / "imgs" / "cols.csv").write_text("path,label\na.png,red\n")
    (t / "bomb.png").write_bytes(_png(40_000, 40_000))
    (t / "corrupt.png").write_bytes(_png(8, 8, b"too short"))
    return t


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_and_exit_2(name, run, scratch, capsys):
    argv = [a.replace("{RUN}", str(run)).replace("{T}", str(scratch)) for a in BAD[name]]
    before = snapshot(run)
    capsys.readouterr()
    code = ov2(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    assert name not in NAMED or NAMED[name] in err, err
    assert snapshot(run) == before
    assert not (run.parent / "new").exists() and not (run.parent / "b").exists()


def test_full_disk_says_no_space_left(run, tmp_path, monkeypatch, capsys):
    import ov2.resume as resume

    monkeypatch.setattr(resume.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    assert ov2(["train", "--out", str(tmp_path / "r"), *SHORT]) == 2
    assert "no space left" in capsys.readouterr().err and not (tmp_path / "r").exists()


def _default_sigint() -> None:
    """A suite started in the background (`make test &`) hands its children SIGINT ignored, and Python then installs
    no KeyboardInterrupt handler: give the child the terminal's default, as a user's Ctrl-C finds it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_prints_how_to_resume_and_exits_130(tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "ov2", "train", "--out", str(out), *MICRO,
                             "--stages.0.steps=2000", "--ckpt_every=2"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not core.list_checkpoints(out):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("ov2 train: interrupted at step ") and f"ov2 train --out {out} --resume" in last
    assert "Traceback" not in err
    assert read_run(out)["status"]["state"] == "interrupted"


def test_shard_folder_names_with_brackets_work(tmp_path, capsys):
    from encoder.data.shards import write_synth_shards
    from encoder.data.stream import shard_urls

    shards = tmp_path / "set[1]"
    write_synth_shards(str(shards), 16, size=32, per_shard=8)
    assert len(shard_urls(str(shards))) == 2
    assert len(shard_urls(f"{shards}/shard-000000.tar,{shards}/shard-000001.tar")) == 2
    assert ov2(["train", "--out", str(tmp_path / "r[2]"), *SHORT, f"--data.source={shards}"]) == 0


def test_captions_paths_leaving_the_folder_are_refused_unless_allowed(tmp_path, capsys):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16), (0, 200, 0)).save(outside)
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "link.png").symlink_to(outside)
    for name in ("../outside.png", str(outside), "link.png"):
        captions = _image_folder(root, [{"image": "a.png", "caption": "red"}, {"image": name, "caption": "green"}])
        argv = ["train", "--out", str(tmp_path / "r"), *SHORT, f"--data.source={root}", f"--data.captions={captions}"]
        assert ov2(argv) == 2
        err = capsys.readouterr().err
        assert "row 2" in err and "leaves the image folder" in err and "captions_outside" in err, err
        assert not (tmp_path / "r").exists()
    assert ov2([*argv, "--data.captions_outside=true", "--data.max_bad_fraction=1"]) == 0

"""bf16: auto follows the hardware: native bf16 CPUs (avx512_bf16 / AMX) and CUDA >= 8.0 get autocast, others
float32; an AVX2-only CPU is reproduced with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ov2.config import ConfigError
from ov2.precision import check_bf16, native_bf16, resolve_bf16

PROBE = ("import json, torch; from ov2.precision import resolve_bf16; "
         "print(json.dumps([torch.backends.cpu.get_cpu_capability(), *resolve_bf16('auto', 'cpu')]))")


def _probe(env: dict) -> list:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_auto_is_float32_on_an_avx2_only_cpu():
    isa, use, why = _probe({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert isa == "AVX2" and use is False
    assert "float32" in why and "AVX2" in why


def test_auto_follows_onednn_on_this_cpu():
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert native_bf16("cpu")[0] == native
    use, why = resolve_bf16("auto", "cpu")
    assert use == native and ("bf16 autocast" if native else "float32") in why


@pytest.mark.parametrize("value,word", [(True, "true"), (False, "false"), ("auto", "auto"), ("ON", "true"),
                                        ("0", "false"), (" Auto ", "auto")])
def test_settings_are_auto_true_or_false(value, word):
    assert check_bf16(value) == word


def test_forced_settings_win_and_bad_ones_name_the_key():
    assert resolve_bf16(True, "cpu")[0] is True and resolve_bf16("false", "cpu")[0] is False
    with pytest.raises(ConfigError, match=r"stage2\.bf16: expected auto, true or false, got 'maybe'"):
        check_bf16("maybe", "stage2.bf16")


@pytest.mark.parametrize("flavour", [pytest.param("native", marks=pytest.mark.slow), "avx2"])
def test_a_training_run_says_its_precision_once_and_keeps_it(tmp_path, flavour):
    from helpers import ROOT

    env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"} if flavour == "avx2" else {}
    expected = _probe(env)[2]
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "ov2", "train", "--preset", "ov2-micro", "--out", str(out),
                          "--data.workers=0", "--stages.0.steps=2", "--stages.1.steps=1", "--bf16=auto"],
                         env={**os.environ, **env, "PYTHONPATH": ROOT}, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert [line for line in res.stderr.splitlines() if line.startswith("bf16:")] == [expected]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "ok" and status["precision"] == expected
    assert ("float32" in expected) == (flavour == "avx2" or not native_bf16("cpu")[0])

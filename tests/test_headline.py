"""The report's headline answers the experiment's question with intervals, and says per measure whether pretraining
beat random-init."""

from __future__ import annotations

import numpy as np
import pandas as pd
import yaml

from reports.headline import answer, build_headline, pretraining


def _samples(scores: dict[tuple[str, str], np.ndarray]) -> pd.DataFrame:
    rows = [{"encoder": e, "task": t, "doc_id": i, "score": float(s)} for (e, t), v in scores.items()
            for i, s in enumerate(v)]
    return pd.DataFrame(rows)


def test_a_real_winner_is_named_with_its_interval_and_noise_is_called_noise():
    rng = np.random.default_rng(0)
    coin = rng.integers(0, 2, 80)
    clear = _samples({("a", "t1"): np.ones(80), ("b", "t1"): coin, ("a", "t2"): coin, ("b", "t2"): coin})
    text = answer(clear, ["a", "b"], {"t1": "Task one"})
    assert text.startswith("a: better than every other encoder") and "a better on Task one +" in text, text
    diff = (1 - coin.mean()) * 100
    assert f"+{diff:.1f} [" in text  # the difference in points, with its interval
    tied = _samples({("a", "t1"): coin, ("b", "t1"): coin[::-1]})
    assert answer(tied, ["a", "b"], {}).startswith("No objective gives a better encoder beyond noise"), \
        answer(tied, ["a", "b"], {})


def test_pretraining_against_random_init_on_each_measure():
    ones, zeros = np.ones(60), np.zeros(60)
    run = {"encoders": ["a", "random-init"], "roles": {"a": "encoder", "random-init": "control"},
           "samples": _samples({("a", "t1"): ones, ("random-init", "t1"): zeros,
                                ("a", "t2"): zeros, ("random-init", "t2"): zeros}),
           "encoder_eval": {"a": {"linear_probe_acc": 0.8, "random_init_linear_probe_acc": 0.5, "n_test": 300}}}
    (line,) = pretraining(run, ["a"], {"t1": "T1"})
    assert "beat random-init on 1 of 2 bridged tasks (T1)" in line and "beat it on the Fashion-MNIST linear probe " \
        "(+30.0 [" in line, line
    run["encoder_eval"]["a"]["linear_probe_acc"] = 0.52
    assert "did not beat it on the Fashion-MNIST linear probe" in pretraining(run, ["a"], {})[0]


def test_the_report_opens_with_the_question_and_its_answer(tmp_path):
    from reports.collect import load_run
    from reports.render import build_report
    from tests.test_controls import _run_with_controls

    run = _run_with_controls(tmp_path)
    experiment = yaml.safe_load((run / "experiment.yaml").read_text())
    experiment["question"] = "Which objective is better here?"
    (run / "experiment.yaml").write_text(yaml.safe_dump(experiment, sort_keys=False))
    head = build_headline(load_run(run), {})
    assert head["question"] == "Which objective is better here?" and head["pretraining"]
    html = build_report(run).read_text()
    top = html[html.index('id="headline"'):html.index('id="summary-table"')]
    assert "Which objective is better here?" in top and head["answer"].split(":")[0] in top
    assert "Not at this budget" not in top  # ov2 clears blind in this run: the comparison stands

"""The controls of every experiment: a blind bridge (no image reaches the LLM) and a random-init tower, planned
beside the encoders, tabled with role = control."""

from __future__ import annotations

import torch
from bridge_helpers import smollm2_tokenizer, write_our_checkpoint


def test_a_blind_bridge_trains_but_never_sees_the_image(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from bridge.assemble import assemble, make_blind
    from bridge.config import LlavaStageConfig
    from bridge.data import Collator, SynthInstructions
    from bridge.export import export_llava
    from bridge.llm import tiny_llama
    from bridge.towers import load_tower
    from bridge.train import train_stage

    write_our_checkpoint(tmp_path / "ckpt")
    tokenizer = smollm2_tokenizer()
    tower = load_tower(tmp_path / "ckpt")
    model, processor = assemble(tower, tiny_llama(tokenizer, seed=0, init_std=0.1), tokenizer, seed=0)
    make_blind(model)
    collate = Collator(processor.tokenizer, processor.image_processor, tower.num_patches)
    data = SynthInstructions(16, image_size=32)
    bias = model.model.multi_modal_projector.linear_2.bias.detach().clone()
    for stage in (1, 2):
        cfg = LlavaStageConfig(stage=stage, steps=3, batch_size=4, lr=1e-2, progress=False, bf16="false")
        summary = train_stage(model, data, collate, cfg, tmp_path / f"stage{stage}")
        assert summary["steps"] == 3
    projector = model.model.multi_modal_projector
    assert not projector.linear_2.weight.any()  # still zero: no image feature reaches the LLM
    assert not torch.equal(projector.linear_2.bias, bias)  # ... while the recipe trained what it could
    export_llava(model, processor, tmp_path / "model")
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.blind is True
    a, b = collate([data[0]]), collate([data[1]])
    assert not torch.equal(a["pixel_values"], b["pixel_values"])
    with torch.no_grad():
        logits = [loaded(input_ids=a["input_ids"], attention_mask=a["attention_mask"],
                         pixel_values=x["pixel_values"]).logits for x in (a, b)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)  # two images, one answer: blind


def _run_with_controls(tmp_path):
    """A report-fixture run of two encoders and both controls; blind answers every MME question right."""
    import json

    import pandas as pd
    import report_fixture
    import yaml

    report_fixture.SKILL.update(blind=0.0, **{"random-init": 0.3})
    try:
        run = report_fixture.write_run(tmp_path / "run", encoders=("ov2", "ov1", "blind", "random-init"),
                                       failed=None, n=40)
    finally:
        for name in ("blind", "random-init"):
            report_fixture.SKILL.pop(name)
    experiment = yaml.safe_load((run / "experiment.yaml").read_text())
    experiment["controls"] = ["blind", "random-init"]
    (run / "experiment.yaml").write_text(yaml.safe_dump(experiment, sort_keys=False))
    mme = run / "encoders" / "blind" / "eval" / "samples" / "ov2_mme.jsonl"
    lines = [json.loads(x) for x in mme.read_text().splitlines()]
    mme.write_text("".join(json.dumps({**x, "score": 1.0, "prediction": x["target"]}) + "\n" for x in lines))
    table = pd.read_csv(run / "results.csv")
    table.insert(2, "role", ["control" if e in ("blind", "random-init") else "encoder" for e in table["encoder"]])
    losses = {"ov2": 1.6, "ov1": 1.8, "blind": 3.2, "random-init": 2.9}  # the bridges' caption losses
    table = pd.concat([table, pd.DataFrame([{**table.iloc[0].to_dict(), "encoder": e, "task": "caption_loss",
                                             "metric": "heldout_nll", "value": v, "stderr": 0.05, "n": 64,
                                             "chance": float("nan"), "primary": False, "role": table.loc[
                                                 table["encoder"] == e, "role"].iloc[0]}
                                            for e, v in losses.items()])])
    table.to_csv(run / "results.csv", index=False)
    return run


def test_the_report_reads_each_encoder_against_the_controls(tmp_path):
    from reports.collect import load_run
    from reports.controls import caption_losses, controls_section
    from reports.render import build_report
    from reports.summary import build_summary

    run = _run_with_controls(tmp_path)
    loaded = load_run(run)
    assert loaded["roles"] == {"ov2": "encoder", "ov1": "encoder", "blind": "control", "random-init": "control"}
    summary = build_summary(loaded)
    assert summary["reference"] == "ov2" and "blind" not in summary["sentence"].split(" has the best")[0]
    tasks = [c["task"] for c in summary["columns"]]
    section = controls_section(loaded, tasks, {c["task"]: c["label"] for c in summary["columns"]})
    assert section["encoders"] == ["ov2", "ov1"] and section["controls"] == ["blind", "random-init"]
    rows = {r["task"]: r for r in section["rows"]}
    assert rows["ov2_mme"]["no_vision"] and "ov2_mme" not in section["needs_vision"]
    # blind answers nothing else right: every other task needs vision, and ov2 clears blind on each
    assert sorted(section["needs_vision"]) == sorted(t for t in tasks if t != "ov2_mme")
    assert sorted(section["cleared"]["ov2"]) == sorted(section["needs_vision"])
    vs_blind = rows["ov2_gqa"]["cells"][0]  # (ov2, blind)
    assert vs_blind["significant"] and vs_blind["up"] and vs_blind["n"] == 40
    assert f"ov2 beats blind on {len(tasks) - 1} of {len(tasks)} tasks" in section["sentence"]
    assert "at this scale these do not need vision" in section["sentence"] and "pretraining ov2 beat random-init" \
        in section["sentence"]
    losses = {r["encoder"]: r for r in caption_losses(loaded)}
    assert list(losses) == ["ov2", "ov1", "blind", "random-init"]
    assert (losses["ov2"]["loss"], losses["ov2"]["vs_blind"], losses["blind"]["vs_blind"]) == ("1.600", "-1.600", "")
    assert losses["random-init"]["role"] == "control" and losses["ov1"]["stderr"] == "0.050"
    html = build_report(run).read_text()
    assert 'id="controls-table"' in html and "does not need vision at this scale" in html
    assert 'id="caption-loss-table"' in html and "-1.600" in html
    assert html.count('<span class="badge">control</span>') == 2


def test_every_experiment_plans_its_controls_unless_told_not_to(tmp_path):
    import pytest

    from benchmarks.runner.experiment import ExperimentError, from_dict
    from benchmarks.runner.plan import build_plan

    tree = {"name": "x", "encoders": {"ov2": {"preset": "ov2-micro"}, "clip": {"preset": "clip-micro"}},
            "bridge": {"overrides": {"stage1.steps": 2}}}
    stages = build_plan(from_dict(tree), tmp_path)
    controls = [s for s in stages if s.role == "control"]
    assert [(s.encoder, s.name) for s in controls] == [("blind", "bridge"), ("blind", "eval"),
                                                       ("random-init", "bridge"), ("random-init", "eval")]
    bridges = {s.encoder: s.command for s in stages if s.name == "bridge"}
    assert "--encoder" in bridges["random-init"] and "preset:ov2-micro" in bridges["random-init"]  # untrained tower
    assert "--blind=true" in bridges["blind"] and "--blind=true" not in bridges["ov2"]
    for name in ("blind", "random-init"):  # the same recipe: the encoders' bridge overrides, the same tasks
        assert "--stage1.steps=2" in bridges[name]
    evals = {s.encoder: s.command for s in stages if s.name == "eval"}
    assert evals["blind"][evals["blind"].index("--tasks") + 1] == evals["ov2"][evals["ov2"].index("--tasks") + 1]
    assert all(s.role == "encoder" for s in stages if s.encoder in ("ov2", "clip"))
    assert not [s for s in build_plan(from_dict({**tree, "controls": []}), tmp_path) if s.role == "control"]
    with pytest.raises(ExperimentError, match="'blind' is the name of a control"):
        from_dict({**tree, "encoders": {"blind": {"preset": "ov2-micro"}}})
    with pytest.raises(ExperimentError, match="controls: choose each of blind, random-init"):
        from_dict({**tree, "controls": ["blind", "nothing"]})
    with pytest.raises(Exception, match="blind: set by the runner"):
        build_plan(from_dict({**tree, "bridge": {"overrides": {"blind": True}}}), tmp_path)


def test_when_no_encoder_clears_blind_anywhere_the_report_says_the_numbers_cannot_rank(tmp_path):
    from reports.controls import _sentence

    rows = [{"label": "GQA", "no_vision": True}, {"label": "POPE", "no_vision": True}]
    text = _sentence(["ov2"], ["blind"], "blind", rows, {"ov2": []}, {}, {})
    assert "no encoder clears blind on any of the 2 tasks" in text and "cannot rank the encoders" in text
    assert "do not need vision" not in text

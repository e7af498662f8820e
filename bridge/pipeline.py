"""The LLaVA-1.5 recipe end to end: assemble -> stage 1 -> stage 2 -> export -> held-out accuracy.

    cfg = BridgeConfig(encoder="runs/ov2-tiny", llm="smollm2", out="runs/llava")
    summary = run(cfg)     # OUT/stage1, OUT/stage2 (resumable run folders), OUT/model (standard LLaVA folder),
                           # OUT/config.yaml, OUT/status.json, OUT/summary.json

Everything is checked before anything is written: the config, an existing OUT's saved config (another encoder,
LLM, feature layer or seed in the same OUT is refused; a non-empty OUT without one is the user's and refused), and
the encoder itself (it is loaded first).
Data: "synth" (built-in scenes: SynthCaptions for stage 1, SynthInstructions for stage 2) or a LLaVA JSON file
(`stage1_data` / `stage2_data`, images under `image_root`); `stage2_tasks` mixes built-in tasks' train splits into
stage 2 (bridge.data.TaskMix: those tasks become held-in).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import yaml

from bridge.config import ARCHITECTURE, RUN_RESUME_SAFE, BridgeConfig, upgrade, validate
from bridge.lora import add_lora, merge_lora
from bridge.train import latest_weights, load_trainable, train_stage
from ov2 import runfolder
from ov2.config import ConfigError
from ov2.resume import check_out, check_resume

CONFIG = "config.yaml"


def saved_config(out: str | Path) -> dict | None:
    """The config an OUT was trained with (config.yaml; bridge_config.json from older runs; older key names renamed
    by bridge.config.upgrade), or None."""
    out = Path(out)
    for name, parse in ((CONFIG, yaml.safe_load), ("bridge_config.json", json.loads)):
        path = out / name
        if path.is_file():
            try:
                tree = parse(path.read_text())
            except (ValueError, yaml.YAMLError):
                raise ConfigError(f"{path} is damaged: it cannot be parsed") from None
            if not isinstance(tree, dict):
                raise ConfigError(f"{path} does not hold a bridge config")
            return upgrade(tree)
    return None


def check_same_run(cfg: BridgeConfig) -> None:
    """An existing OUT may only be continued with the same model and recipe (steps may grow; RUN_RESUME_SAFE keys
    may change): the one check of every resume (ov2.resume.check_resume)."""
    saved = saved_config(cfg.out)
    if saved is not None:
        check_resume(cfg.out, cfg, 0, saved, safe=RUN_RESUME_SAFE, architecture=ARCHITECTURE,
                     where=f"{cfg.out} holds a bridge run: a rerun")


RUNNER_FILES = {"stage.json", "stage.log", "status.json", ".lock"}  # what `ov2 run` keeps in a stage folder


def check_ours(out: Path) -> None:
    """An existing OUT without a bridge config.yaml may hold only what `ov2 run` writes there first: anything else
    is the user's, and is never written over."""
    if out.is_dir() and saved_config(out) is None:
        theirs = sorted(p.name for p in out.iterdir() if p.name not in RUNNER_FILES)
        if theirs:
            raise ConfigError(f"--out {out} is a non-empty folder without a bridge config.yaml (it holds "
                              f"{theirs[0]!r}{' ...' if len(theirs) > 1 else ''}): choose another --out")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device here")
    return torch.device(name)


SCENE_SIZE = 64  # built-in scenes are drawn at least this large (the suite's size); the processor resizes them


def build(cfg: BridgeConfig):
    """-> (model, processor, tower) freshly assembled (random projector; a preset: tower seeded by cfg.seed)."""
    from bridge.assemble import assemble, make_blind
    from bridge.llm import keep_layers, load_llm
    from bridge.towers import at_image_size, load_tower

    tower = at_image_size(load_tower(cfg.encoder, feature_layer=cfg.feature_layer, seed=cfg.seed), cfg.image_size)
    llm, tokenizer = load_llm(cfg.llm)
    keep_layers(llm, cfg.llm_layers)
    model, processor = assemble(tower, llm, tokenizer, seed=cfg.seed, template=cfg.chat_template,
                                pad_to_square=cfg.pad_to_square)
    if cfg.blind:
        make_blind(model)
    return model, processor, tower


def datasets(cfg: BridgeConfig, image_size: int):
    """(stage 1, stage 2) records for a tower taking `image_size` px; built-in scenes are drawn at SCENE_SIZE at
    least, as the suite draws them, and the processor resizes them."""
    from bridge.data import LlavaJsonDataset, SynthCaptions, SynthInstructions, TaskMix

    image_size = max(image_size, SCENE_SIZE)

    def pick(spec: str, synth, root: str | None):
        return synth if spec == "synth" else LlavaJsonDataset(spec, root)

    kinds = tuple(k for k in cfg.synth_kinds.split(",") if k)
    types = tuple(t for t in cfg.stage2_types.split(",") if t) or None
    stage2 = pick(cfg.stage2_data, SynthInstructions(cfg.stage2_samples, image_size=image_size, kinds=kinds,
                                                     types=types, turns=cfg.stage2_turns), cfg.image_root)
    tasks = tuple(t for t in cfg.stage2_tasks.split(",") if t)
    if tasks:
        stage2 = TaskMix(stage2, tasks, cfg.stage2_task_share, image_size=image_size)
    stage1 = pick(cfg.stage1_data, SynthCaptions(cfg.stage1_samples, image_size=image_size, kinds=kinds),
                  cfg.stage1_image_root or cfg.image_root)
    return stage1, stage2


def heldout_captions(cfg: BridgeConfig, image_size: int):
    """Stage-1 caption pairs of the run's scene kinds from a seed no stage trains on (bridge.data.HELDOUT_SEED)."""
    from bridge.data import HELDOUT_SEED, SynthCaptions

    kinds = tuple(k for k in cfg.synth_kinds.split(",") if k)
    return SynthCaptions(cfg.caption_samples, seed=HELDOUT_SEED + 1, image_size=max(image_size, SCENE_SIZE),
                         kinds=kinds)


def run(cfg: BridgeConfig, *, evaluate: bool = True) -> dict:
    """Both stages, export and held-out check. Under torchrun every rank trains (each on its share of every batch,
    gradients averaged) and rank 0 owns the folder: lock, status, config, export, evaluation, summary; after the
    last step the other ranks leave, so that no collective waits on rank 0's check and export."""
    import contextlib

    from bridge.data import Collator
    from bridge.engine import is_sharded
    from bridge.evaluate import caption_loss, heldout_accuracy
    from bridge.export import export_llava
    from ov2 import distributed as dist

    validate(cfg)
    out = Path(cfg.out)
    check_out(out)
    runfolder.check_unlocked(out)
    check_same_run(cfg)
    check_ours(out)
    local = dist.setup()  # joins the process group under torchrun; cuda:LOCAL_RANK when there is a GPU
    device = local if cfg.device == "auto" else _device(cfg.device)
    model, processor, tower = build(cfg)  # a bad --encoder or --llm fails here, before anything is written
    data1, data2 = datasets(cfg, tower.image_size)
    collate = Collator(processor.tokenizer, processor.image_processor, tower.num_patches)
    key = runfolder.config_key(asdict(cfg))
    summary = {"encoder": cfg.encoder, "llm": cfg.llm}
    dist.barrier()  # every rank has checked OUT before rank 0 writes into it
    with contextlib.ExitStack() as owner:
        if dist.is_main():
            owner.enter_context(runfolder.RunLock(out))
            owner.enter_context(runfolder.track(out, key=key, kind="bridge"))
            runfolder.write_config(out, asdict(cfg))
        dist.barrier()
        model.to(device)
        summary["stage1"] = train_stage(model, data1, collate, cfg.stage1, out / "stage1", inputs=(key,))
        if cfg.caption_samples:  # every rank computes the same numbers: no rank waits in a collective meanwhile
            summary["caption_loss"] = caption_loss(model, collate, heldout_captions(cfg, tower.image_size),
                                                   n=cfg.caption_samples)
        with_lora(model, cfg)
        summary["stage2"] = train_stage(model, data2, collate, cfg.stage2, out / "stage2", inputs=(key,))
        merge_lora(model)  # LoRA adapters folded into the LLM: the export is a plain LLaVA either way
        if is_sharded(model) and dist.is_main():  # the whole model, from the stages' final weights
            model = load_trained(out)[0].to(device)
        if dist.is_main():  # rank 0 alone: the others are released (no barrier waits on a generation)
            if evaluate and cfg.eval_samples > 0:  # on the training device
                summary["heldout"] = heldout_accuracy(model, processor, n=cfg.eval_samples)
            model.to("cpu")  # the export is written from where any reader can load it
            export_llava(model, processor, out / "model", extra={"encoder": cfg.encoder, "llm": cfg.llm})
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.teardown()
    return summary


def with_lora(model, cfg: BridgeConfig) -> None:
    """Stage 2's LoRA adapters (stage2.lora_r > 0), seeded by the run's seed; nothing otherwise."""
    if cfg.stage2.lora_r:
        add_lora(model, r=cfg.stage2.lora_r, alpha=cfg.stage2.lora_alpha, seed=cfg.seed)


def load_trained(run_dir: str | Path):
    """Rebuild a run's model from its config and its stage weights (finished, or newest intact checkpoint)."""
    run_dir = Path(run_dir)
    tree = saved_config(run_dir)
    if tree is None:
        raise FileNotFoundError(f"{run_dir}: not a bridge run folder (no {CONFIG})")
    cfg = BridgeConfig.from_dict(tree)
    model, processor, _ = build(cfg)
    for stage in ("stage1", "stage2"):
        if stage == "stage2":
            with_lora(model, cfg)
        weights = latest_weights(run_dir / stage)
        if weights is not None:
            load_trainable(model, weights)
    merge_lora(model)
    return model.eval(), processor, cfg

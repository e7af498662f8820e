"""An experiment -> an ordered list of stages, each with its folder, its key and the command that runs it.

Per encoder (and seed): pretrain (preset encoders) -> export (our encoders: a transformers ViTModel/CLIPVisionModel
folder) -> bridge (LLaVA stage 1 + stage 2 + export) -> eval (lmms-eval on the suite) and, for our encoders,
encoder_eval (Fashion-MNIST probe and zero-shot). A stage's key hashes its own settings and its inputs' keys, so
changing one encoder's config changes the keys of that encoder's stages only.

    RUN/encoders/<encoder>/<stage>/     status.json, stage.json (key, command), stage.log, the stage's own files

After the encoders, each control of `controls:` (role "control"): `blind` and `random-init` get a bridge and an eval
stage with the same recipe and tasks, their tower the first preset encoder's at its initial weights (control_tower).

Building the plan checks every override against the real config it is meant for: `pretrain:` then the encoder's
`overrides:` on its preset's TrainConfig (encoder.config), `bridge.overrides:` on the BridgeConfig (bridge.config),
each followed by that config's `validate`. An unknown key, a bad type or value, an unknown preset or a key the runner
sets itself is a ConfigError naming its place (`bridge.overrides: unknown config key 'stage2.lrr'`), before anything
runs. The checked values go to each stage's command as `--key=value`, the way the stage reads them. The inputs are
checked too (check_inputs): source folders hold what their kind needs, the LLM is a known name or a folder with
config.json, every task is the suite's or lmms-eval's. A local input's key covers its content cheaply (_source_key).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.evals.evaluate import lmms_eval_task_names
from benchmarks.runner.experiment import EncoderSpec, Experiment
from ov2.config import ConfigError, flatten, resolve_key, set_value
from ov2.runfolder import config_key

OV2 = [sys.executable, "-m", "ov2"]
# config fields the runner sets for a stage itself: never in an experiment's overrides
RUNNER_SETS = {"pretrain": {"preset": "encoders.NAME.preset", "seed": "seeds"},
               "bridge": {"encoder": "the encoder being bridged", "out": "the run folder", "llm": "bridge.llm",
                          "seed": "seeds", "blind": "controls: [blind]"}}


@dataclass
class Stage:
    encoder: str  # folder name under RUN/encoders (the encoder's name, plus the seed when there are several)
    label: str  # the encoder's display name
    seed: int
    name: str  # pretrain | export | bridge | eval | encoder_eval
    key: str
    folder: Path
    command: list[str]
    deps: list[str] = field(default_factory=list)  # ids of the stages this one reads
    resumable: bool = False  # a training stage: an unfinished folder with the same key is resumed, not cleared
    role: str = "encoder"  # encoder | control (blind, random-init)

    @property
    def id(self) -> str:
        return f"{self.encoder}/{self.name}"


def _text(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else "null" if v is None else str(v)


def _args(overrides: dict) -> list[str]:
    return [f"--{k}={_text(v)}" for k, v in overrides.items()]


def _checked(cfg, where: str, tree: dict, runner_sets: dict[str, str]) -> dict:
    """`tree` (nested or dotted keys) as {dotted key: value}, each applied to `cfg` in place as its stage will apply
    it (the `--key=value` text); ConfigError naming `where` for an unknown key, a bad type, a key the runner sets."""
    try:
        flat = flatten(tree)
        for key, value in flat.items():
            path = resolve_key(cfg, key.replace("-", "_"))
            if path in runner_sets:
                raise ConfigError(f"{key}: set by the runner from {runner_sets[path]}, not an override")
            set_value(cfg, path, _text(value))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return flat


def pretrain_overrides(exp: Experiment, enc: EncoderSpec) -> dict:
    """`pretrain:` then the encoder's `overrides:`, checked on its preset's config (ConfigError naming the place)."""
    from encoder.config import get_preset, validate

    try:
        cfg = get_preset(enc.preset)
    except ConfigError as err:
        raise ConfigError(f"encoders.{enc.name}.preset: {err}") from None
    merged = {**_checked(cfg, "pretrain", exp.pretrain, RUNNER_SETS["pretrain"]),
              **_checked(cfg, f"encoders.{enc.name}.overrides", enc.overrides, RUNNER_SETS["pretrain"])}
    try:
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"encoders.{enc.name} ({enc.preset} with pretrain and overrides): {err}") from None
    return merged


def bridge_overrides(exp: Experiment, encoder: str, out: Path) -> dict:
    """`bridge.overrides:`, checked on the BridgeConfig its stage will build (ConfigError naming the place)."""
    from bridge.config import BridgeConfig, validate

    cfg = BridgeConfig(encoder=encoder, out=str(out), llm=exp.bridge.llm)
    overrides = _checked(cfg, "bridge.overrides", exp.bridge.overrides, RUNNER_SETS["bridge"])
    try:
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"bridge.overrides: {err}") from None
    return overrides


SOURCE_FILES = {"checkpoint": ("config.yaml", "checkpoints"), "transformers": ("config.json",),
                "openvision": ("open_clip_config.json",)}  # what a source folder holds (one of them)
KEY_STATS = 512  # a source key stats at most this many entries (a huge folder is not walked)
KEY_HASH_BYTES = 1 << 20  # ... and hashes the text of its small top-level files (configs, weight indexes)


def _source_key(path: str) -> str:
    """The key of an input read from disk, covering its content cheaply: its absolute path, the text of its small
    top-level files (config.json, config.yaml, *.index.json) and the size and modification time of the entries on
    its first two levels (checkpoints/step_N, weights), at most KEY_STATS of them."""
    import hashlib

    p = Path(path).expanduser().resolve()
    parts: list = [str(p)]
    entries = [p]
    try:
        for top in sorted(p.iterdir()) if p.is_dir() else []:
            entries.append(top)
            if top.is_dir() and not top.is_symlink() and len(entries) < KEY_STATS:
                entries += sorted(top.iterdir())[:KEY_STATS - len(entries)]
            if len(entries) >= KEY_STATS:
                break
    except OSError:
        pass
    for entry in entries[:KEY_STATS]:
        try:
            st = entry.stat()
        except OSError:
            continue
        parts.append((str(entry.relative_to(p)) if entry != p else ".", st.st_size, st.st_mtime_ns))
        if entry.parent == p and entry.is_file() and st.st_size <= KEY_HASH_BYTES and entry.suffix in (
                ".json", ".yaml", ".txt"):
            try:
                parts.append(hashlib.sha256(entry.read_bytes()).hexdigest())
            except OSError:
                pass
    return config_key("source", parts)


def check_inputs(exp: Experiment) -> None:
    """Every input the stages will read is there: encoder source folders, the LLM folder, the task names."""
    for enc in exp.encoders.values():
        if enc.source == "preset":
            continue
        where, path = f"encoders.{enc.name}.{enc.source}", Path(getattr(enc, enc.source)).expanduser()
        if not path.exists():
            raise ConfigError(f"{where}: no such folder {path}")
        if not path.is_dir():
            raise ConfigError(f"{where}: {path} is a file, not a folder")
        wanted = SOURCE_FILES[enc.source]
        if not any((path / name).exists() for name in wanted):
            raise ConfigError(f"{where}: {path} holds no {' or '.join(wanted)} (not a {enc.source} folder)")
    from bridge.llm import ALIASES, is_hub_id

    llm = exp.bridge.llm
    if llm.lower() not in ALIASES and not (Path(llm).expanduser() / "config.json").is_file() and not is_hub_id(llm):
        raise ConfigError(f"bridge.llm: {llm!r} is neither a known name ({', '.join(sorted(ALIASES))}), a local "
                          "transformers folder with config.json, nor a Hub id (org/name)")
    from benchmarks.evals.suite.tasks import TASKS

    unknown = [t for t in exp.eval.tasks if t not in TASKS and t not in lmms_eval_task_names()]
    if unknown:
        raise ConfigError(f"eval.tasks: unknown task {unknown[0]!r}: built-in are {', '.join(TASKS)}; others must "
                          "be lmms-eval task names (python -m lmms_eval tasks list)")


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def distributed(stage: Stage) -> bool:
    """A stage every machine of a multi-node run takes part in (the others run on node 0 alone)."""
    return stage.command[:3] == TORCHRUN


def launch(exp: Experiment, command: str, module: str) -> list[str]:
    """How a stage starts: `ov2 COMMAND`, or with `nproc` > 1 torchrun over `python -m MODULE` (training: DDP/FSDP2
    or the bridge's averaged gradients; evaluation: lmms-eval's torchrun backend shares out the questions)."""
    if exp.nnodes > 1:  # every machine runs the same command with its own --node_rank (torchrun's static rendezvous)
        host, port = exp.master.rsplit(":", 1)
        return [*TORCHRUN, f"--nnodes={exp.nnodes}", f"--node_rank={exp.node_rank}", f"--master_addr={host}",
                f"--master_port={port}", f"--nproc_per_node={exp.nproc}", "-m", *module.split()]
    if exp.nproc > 1:
        return [*TORCHRUN, "--standalone", f"--nproc_per_node={exp.nproc}", "-m", *module.split()]
    return [*OV2, *command.split()]


def pretrain_command(exp: Experiment, overrides: dict, preset: str, out: Path, resume: bool) -> list[str]:
    return [*launch(exp, "train", "encoder train"), "--preset", preset, "--out", str(out), *_args(overrides),
            *(["--resume"] if resume else [])]


class _Stages(list):
    """The stages of one encoder (or control) and seed, in order, all under RUN/encoders/<name>/."""

    def __init__(self, exp: Experiment, name: str, label: str, seed: int, run_dir: Path, role: str = "encoder"):
        super().__init__()
        self.exp, self.seed, self.run_dir, self.role = exp, seed, run_dir, role
        self.name = name if len(exp.seeds) == 1 else f"{name}-seed{seed}"
        self.label, self.root = label, run_dir / "encoders" / self.name

    def add(self, stage: str, key: str, command: list[str], deps: list[Stage], resumable: bool = False) -> Stage:
        st = Stage(self.name, self.label, self.seed, stage, key, self.root / stage, command, [d.id for d in deps],
                   resumable, self.role)
        self.append(st)
        return st

    def bridge_and_eval(self, tower: str, tower_key: str, tower_deps: list[Stage], extra: dict | None = None) -> None:
        """The LLaVA bridge of `tower` (the experiment's one recipe, plus `extra` bridge keys) and its evaluation."""
        exp, root = self.exp, self.root
        bridge_args = {**bridge_overrides(exp, tower, root / "bridge"), **(extra or {}), "seed": self.seed}
        world = exp.nproc * exp.nnodes
        bridge = self.add("bridge", config_key("bridge", exp.bridge.llm, bridge_args, tower_key, world),
                          [*launch(exp, "bridge train", "bridge train"), "--encoder", tower, "--llm", exp.bridge.llm,
                           "--out", str(root / "bridge"), *_args(bridge_args)], tower_deps, resumable=True)
        ev = exp.eval
        self.add("eval", config_key("eval", ev.tasks, ev.limit, bridge.key),
                 [*launch(exp, "eval", "benchmarks.evals.evaluate"), str(bridge.folder / "model"),
                  "--tasks", ",".join(ev.tasks), "--out", str(root / "eval"), "--data", str(self.run_dir / "data"),
                  *(["--limit", str(ev.limit)] if ev.limit else [])], [bridge])


def _encoder_stages(exp: Experiment, enc: EncoderSpec, seed: int, run_dir: Path) -> list[Stage]:
    stages = _Stages(exp, enc.name, enc.label, seed, run_dir)
    root = stages.root
    ours_path, src_key, upstream, tower_deps = None, "", [], []
    if enc.source == "preset":
        overrides = {**pretrain_overrides(exp, enc), "seed": seed}
        key = config_key("pretrain", enc.preset, overrides, exp.nproc * exp.nnodes)
        pre = stages.add("pretrain", key, pretrain_command(exp, overrides, enc.preset, root / "pretrain", False), [],
                         resumable=True)
        ours_path, src_key, upstream = str(pre.folder), pre.key, [pre]
    elif enc.source == "checkpoint":
        ours_path, src_key = os.path.abspath(enc.checkpoint), _source_key(enc.checkpoint)
    if ours_path is not None:
        export = stages.add("export", config_key("export", src_key),
                            [*OV2, "export-encoder", ours_path, str(root / "export" / "encoder")], upstream)
        tower, tower_key, tower_deps = str(export.folder / "encoder"), export.key, [export]
    else:
        path = enc.transformers or enc.openvision
        tower, tower_key = os.path.abspath(path), _source_key(path)
    stages.bridge_and_eval(tower, tower_key, tower_deps)
    ee = exp.encoder_eval
    if ee.enabled and ours_path is not None:
        stages.add("encoder_eval", config_key("encoder_eval", ee.n_train, ee.n_test, ee.baseline, src_key),
                   [*OV2, "eval-encoder", "--ckpt", ours_path, "--out", str(root / "encoder_eval" / "result.json"),
                    "--n-train", str(ee.n_train), "--n-test", str(ee.n_test), *(["--baseline"] if ee.baseline else [])],
                   upstream)
    return stages


def control_tower(exp: Experiment) -> str | None:
    """The controls' tower: the first preset encoder's preset at its initial weights (`preset:NAME`, seeded by the
    bridge's seed), None when no encoder is trained from a preset."""
    presets = [enc.preset for enc in exp.encoders.values() if enc.source == "preset"]
    return f"preset:{presets[0]}" if presets else None


def _control_stages(exp: Experiment, control: str, seed: int, run_dir: Path) -> list[Stage]:
    """blind: the recipe with no image reaching the LLM; random-init: the untrained tower, bridged the same way."""
    tower = control_tower(exp)
    if tower is None and control == "random-init":
        return []  # no tower of ours to leave untrained
    tower = tower or "preset:ov2-tiny"  # blind: any tower will do, none of it reaches the LLM
    stages = _Stages(exp, control, control, seed, run_dir, role="control")
    stages.bridge_and_eval(tower, config_key("control", control, tower), [],
                           {"blind": True} if control == "blind" else None)
    return stages


def build_plan(exp: Experiment, run_dir: Path) -> list[Stage]:
    """Every stage of the experiment in the order it runs: encoder by encoder, seed by seed; ConfigError for a bad
    override or a missing input (nothing is created)."""
    check_inputs(exp)
    stages = []
    for seed in exp.seeds:
        for enc in exp.encoders.values():
            stages += _encoder_stages(exp, enc, seed, Path(run_dir))
        for control in exp.controls:
            stages += _control_stages(exp, control, seed, Path(run_dir))
    return stages

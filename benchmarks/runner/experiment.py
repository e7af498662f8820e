"""An experiment file: which encoders, how each is bridged to an LLM, which tasks, which seeds.

    name: default
    paper: llava15_openvision2          # reports/reference/<name>.csv, shown beside ours in the report
    seeds: [0]
    nproc: 1                            # > 1: training and evaluation run under torchrun --nproc_per_node N
    nnodes: 1                           # > 1: on that many machines (static rendezvous at `master`), each started
    master: ""                          #   with `ov2 run EXP --node-rank R` (0 runs the plan; the others join it)
    pretrain: {data.workers: 1}         # overrides applied to every encoder trained from a preset
    encoders:
      ov2:  {preset: ov2-tiny, overrides: {stages.0.steps: 200}}
      mine: {checkpoint: runs/demo}                 # one of our run or checkpoint folders
      clip-hf: {transformers: models/clip-vit}      # a local transformers CLIP / SigLIP / ViT vision folder
      ov2-l14: {openvision: models/openvision2-l14} # a local OpenVision release folder (open_clip layout)
    bridge: {llm: smollm2, overrides: {stage1.steps: 30, stage2.steps: 80}}
    eval: {tasks: [ov2_gqa, ov2_pope], limit: 50}
    encoder_eval: {enabled: true, n_train: 2000, n_test: 1000}
    controls: [blind, random-init]      # the default; [] turns them off
    quick: {eval: {limit: 8}, bridge: {overrides: {stage2.steps: 10}}}   # deep-merged over the rest by --quick

Controls run beside the encoders, with the same bridge recipe and evaluation: `blind`, a bridge that no image
reaches (the floor an encoder must clear), and `random-init`, the first preset encoder's tower at its initial
weights (what pretraining adds; one control serves every family, as they share the tower).

Read with the one config engine (`ov2.config.build`); every mistake (unknown key, wrong type, an encoder with no
source or two) is an ExperimentError (a ConfigError): one line, exit 2. `pretrain:`, an encoder's `overrides:` and
`bridge.overrides:` are checked against the real pretraining and bridge configs when the plan is built
(benchmarks/runner/plan.py), so `ov2 run EXP --dry-run` catches a bad key or value before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.evals.suite.tasks import TASKS
from ov2.config import ConfigError, build, read_yaml_file

SUITE_TASKS = tuple(TASKS)  # the built-in suite: eval.tasks when the file names none
CONTROLS = ("blind", "random-init")  # the no-vision floor and the untrained tower (runner/plan.py)
SOURCES = ("preset", "checkpoint", "transformers", "openvision")


def control_of(name: str, controls=CONTROLS) -> str | None:
    """The control an encoder folder name stands for (`blind`, `blind-seed1`, ...), or None."""
    base = name.rsplit("-seed", 1)[0]
    return base if base in controls else None


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ExperimentError(ConfigError):
    """A bad experiment file; printed as one line, exit code 2."""


@dataclass
class EncoderSpec:
    name: str = ""
    preset: str | None = None  # train from this preset (ov2-*, ov1-*, clip-*)
    checkpoint: str | None = None  # one of our run or checkpoint folders
    transformers: str | None = None  # a local transformers vision-model folder
    openvision: str | None = None  # a local OpenVision release folder (open_clip layout)
    overrides: dict = field(default_factory=dict)  # pretraining config keys (preset encoders), over `pretrain:`
    label: str = ""  # display name in the report (default: the name)

    @property
    def source(self) -> str:
        return next(s for s in SOURCES if getattr(self, s))

    @property
    def ours(self) -> bool:
        """Our own model (trained here or one of our checkpoints): it can be exported and evaluated as an encoder."""
        return self.source in ("preset", "checkpoint")


@dataclass
class BridgeRecipe:
    llm: str = "smollm2"
    overrides: dict = field(default_factory=dict)  # bridge config keys: stage1.steps, stage2.lr, stage2_samples ...


@dataclass
class EvalSpec:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    limit: int | None = None  # questions per task (None: the task's default size)


@dataclass
class EncoderEvalSpec:
    enabled: bool = True
    n_train: int = 2000
    n_test: int = 1000
    baseline: bool = True  # also probe the same ViT at its initial weights (the random-init floor)


@dataclass
class Experiment:
    name: str = "experiment"
    question: str = ""  # what the experiment asks; the report's headline answers it
    encoders: dict[str, EncoderSpec] = field(default_factory=dict)  # name -> spec, in the file's order
    pretrain: dict = field(default_factory=dict)  # pretraining config keys for every preset encoder
    bridge: BridgeRecipe = field(default_factory=BridgeRecipe)
    eval: EvalSpec = field(default_factory=EvalSpec)
    encoder_eval: EncoderEvalSpec = field(default_factory=EncoderEvalSpec)
    seeds: list[int] = field(default_factory=lambda: [0])
    nproc: int = 1  # processes per machine
    nnodes: int = 1  # machines; > 1 needs `master`
    master: str = ""  # HOST:PORT of node 0, where every distributed stage meets (torchrun --master_addr/--master_port)
    node_rank: int = 0  # this machine's place among nnodes: set by `ov2 run --node-rank`, never in a file
    paper: str | None = None
    report: bool = True
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    quick: dict = field(default_factory=dict)


def merge(base: dict, extra: dict) -> dict:
    """Deep merge of two YAML trees (mappings merge key by key; anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def from_dict(tree: dict, quick: bool = False) -> Experiment:
    if not isinstance(tree, dict):
        raise ExperimentError("an experiment file must hold a mapping (name, encoders, bridge, eval, ...)")
    if quick:
        if not isinstance(tree.get("quick") or {}, dict):
            raise ExperimentError(f"quick: expected a mapping, got {tree['quick']!r}")
        tree = merge({k: v for k, v in tree.items() if k != "quick"}, tree.get("quick") or {})
    if tree.get("node_rank"):
        raise ExperimentError("node_rank is each machine's own: give it as `ov2 run EXP --node-rank R`, not in the "
                              "file")
    encoders = tree.get("encoders")
    if not isinstance(encoders, dict) or not encoders:
        raise ExperimentError("encoders: give at least one, as a mapping name -> {preset|checkpoint|transformers|"
                              "openvision: ...}")
    try:
        exp = build(Experiment, {**tree, "encoders": {name: spec or {} for name, spec in encoders.items()}})
    except ConfigError as err:
        raise ExperimentError(str(err)) from None
    for name, enc in exp.encoders.items():
        if not NAME.match(name):
            raise ExperimentError(f"encoders: name {name!r} must be letters, digits, '_', '-' or '.' (64 at most)")
        enc.name, enc.label = name, enc.label or name
        given = [s for s in SOURCES if getattr(enc, s)]
        if len(given) != 1:
            raise ExperimentError(f"encoders.{name}: give exactly one of {', '.join(SOURCES)} (got {given or 'none'})")
        if enc.overrides and enc.source != "preset":
            raise ExperimentError(f"encoders.{name}: overrides apply to preset encoders only")
    if not NAME.match(exp.name):
        raise ExperimentError(f"name {exp.name!r} must be letters, digits, '_', '-' or '.'")
    if not exp.seeds or min(exp.seeds) < 0 or len(set(exp.seeds)) != len(exp.seeds):
        raise ExperimentError(f"seeds: expected a non-empty list of distinct non-negative integers, got {exp.seeds!r}")
    if exp.nproc < 1:
        raise ExperimentError(f"nproc must be at least 1, got {exp.nproc}")
    if exp.nnodes < 1:
        raise ExperimentError(f"nnodes must be at least 1, got {exp.nnodes}")
    if exp.nnodes > 1 and not re.fullmatch(r"[^:\s]+:\d{1,5}", exp.master):
        raise ExperimentError(f"nnodes: {exp.nnodes} machines need master: HOST:PORT (node 0's address), got "
                              f"{exp.master!r}")
    if not exp.eval.tasks or not all(exp.eval.tasks):
        raise ExperimentError(f"eval.tasks: expected a non-empty list of task names, got {exp.eval.tasks!r}")
    twice = sorted({t for t in exp.eval.tasks if exp.eval.tasks.count(t) > 1})
    if twice:
        raise ExperimentError(f"eval.tasks: {twice[0]!r} is named twice")
    if exp.eval.limit is not None and exp.eval.limit < 1:
        raise ExperimentError(f"eval.limit must be at least 1, got {exp.eval.limit}")
    if exp.encoder_eval.n_train < 10 or exp.encoder_eval.n_test < 10:
        raise ExperimentError("encoder_eval.n_train and n_test must be at least 10")
    unknown = [c for c in exp.controls if c not in CONTROLS]
    if unknown or len(set(exp.controls)) != len(exp.controls):
        raise ExperimentError(f"controls: choose each of {', '.join(CONTROLS)} at most once, got {exp.controls!r}")
    taken = sorted(set(exp.controls) & set(exp.encoders))
    if taken:
        raise ExperimentError(f"encoders: {taken[0]!r} is the name of a control; rename the encoder or drop the "
                              f"control (controls: [...])")
    return exp


def load(path: str | Path, quick: bool = False) -> Experiment:
    """An experiment file (UTF-8 YAML; a key given twice in one mapping and alias bombs are refused)."""
    path = Path(path)
    if not path.exists():
        raise ExperimentError(f"no experiment file {path}")
    if path.is_dir():
        raise ExperimentError(f"{path} is a folder, not an experiment file")
    try:
        tree = read_yaml_file(str(path), "experiment file")
    except ConfigError as err:
        raise ExperimentError(str(err)) from None
    return from_dict(tree, quick=quick)


def to_dict(exp: Experiment) -> dict:
    tree = dataclasses.asdict(exp)
    tree["encoders"] = {name: {k: v for k, v in e.items() if k != "name" and v not in (None, {}, "")}
                        for name, e in tree["encoders"].items()}
    return tree

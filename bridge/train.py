"""One LLaVA training stage: freeze per stage, AdamW with warm-up + cosine, gradient accumulation, bf16 autocast option,
checkpoints every `save_every` steps and exact resume, tqdm progress, JSONL metrics.

    stage 1: projector only, LR 1e-3          stage 2: projector + LLM, LR 2e-5
    unfreeze_vision: the tower trains too, at its own LR (Open-LLaVA-NeXT style, 2e-6)

Output folder of a stage:
    metrics.jsonl            one line per optimizer step: step, loss, lr, tokens, seconds, peak_rss_mb
    ckpt/                    trainable.safetensors + optim.pt + state.json (latest step; resume starts here)
    final.safetensors        the trained weights (trainable parameters only) once the stage is done
    done.json                summary (steps, final loss, wall time, peak memory); a finished stage is skipped
The sample order is a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from bridge.assemble import trainable_groups
from bridge.loss import AnswerLoss

DEFAULT_LR = {1: 1e-3, 2: 2e-5}


@dataclass
class StageConfig:
    stage: int = 1
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: 1e-3 for stage 1, 2e-5 for stage 2
    unfreeze_vision: bool = False
    vision_lr: float = 2e-6
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    bf16: bool = False
    seed: int = 0
    save_every: int = 50
    progress: bool = True

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.stage]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    warmup = max(1, math.ceil(total * warmup_ratio)) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class SampleOrder:
    """Index of the g-th sample drawn: epoch-wise permutations seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perm = n, seed, {}

    def __call__(self, g: int) -> int:
        epoch = g // self.n
        if epoch not in self._perm:
            generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._perm = {epoch: torch.randperm(self.n, generator=generator)}
        return int(self._perm[epoch][g % self.n])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, path: Path) -> None:
    state = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise KeyError(f"{path}: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _save_ckpt(model, opt, step: int, ckpt: Path) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(opt.state_dict(), tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    if ckpt.exists():
        old = ckpt.with_name(ckpt.name + ".old")
        ckpt.rename(old)
        tmp.rename(ckpt)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(ckpt)


def train_stage(model, dataset, collate, cfg: StageConfig, out_dir: str | Path, *,
                stop_after: int | None = None) -> dict:
    """Train one stage in place on `model`; -> summary dict. `stop_after` ends early (as an interruption would)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "done.json"
    groups = trainable_groups(model, stage=cfg.stage, unfreeze_vision=cfg.unfreeze_vision)
    if done.is_file():
        load_trainable(model, out_dir / "final.safetensors")
        return json.loads(done.read_text())
    param_groups = [{"params": ps, "lr": cfg.vision_lr if name == "vision" else cfg.lr, "name": name}
                    for name, ps in groups.items()]
    for g in param_groups:
        g["initial_lr"] = g["lr"]
    opt = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    loss_fn = AnswerLoss()
    order = SampleOrder(len(dataset), cfg.seed)
    ckpt = out_dir / "ckpt"
    step = 0
    if (ckpt / "state.json").is_file():
        load_trainable(model, ckpt / "trainable.safetensors")
        opt.load_state_dict(torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=True))
        step = json.loads((ckpt / "state.json").read_text())["step"]
    metrics = out_dir / "metrics.jsonl"
    kept = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= step] if metrics.exists() else []
    metrics.write_text("".join(ln + "\n" for ln in kept))
    (out_dir / "stage_config.json").write_text(json.dumps(asdict(cfg), indent=1))

    model.train()
    t0, last = time.time(), None
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(step, end), initial=step, total=cfg.steps, desc=f"stage {cfg.stage}", disable=not cfg.progress)
    with metrics.open("a") as log:
        for step in bar:
            factor = lr_factor(step, cfg.steps, cfg.warmup_ratio)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * factor
            opt.zero_grad(set_to_none=True)
            total, tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                first = (step * cfg.grad_accum + micro) * cfg.batch_size
                batch = collate([dataset[order(first + j)] for j in range(cfg.batch_size)])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    out = loss_fn(model, batch)
                (out["lm_loss"] / cfg.grad_accum).backward()
                total += float(out["lm_loss"].detach()) / cfg.grad_accum
                tokens += int(out["tokens"])
            opt.step()
            last = {"stage": cfg.stage, "step": step + 1, "loss": total, "lr": cfg.lr * factor, "tokens": tokens,
                    "seconds": round(time.time() - t0, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
            log.write(json.dumps(last) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{total:.4f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == end:
                _save_ckpt(model, opt, step + 1, ckpt)
    bar.close()
    model.eval()
    finished = json.loads((ckpt / "state.json").read_text())["step"] if (ckpt / "state.json").is_file() else step
    summary = {"stage": cfg.stage, "steps": finished, "final_loss": last["loss"] if last else None,
               "seconds": round(time.time() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if finished >= cfg.steps:
        save_file(trainable_state(model), str(out_dir / "final.safetensors"))
        done.write_text(json.dumps(summary, indent=1))
    return summary

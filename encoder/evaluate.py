"""Encoder-level evaluation on real data: Fashion-MNIST linear probe and zero-shot accuracy, as JSON.

    ov2 eval-encoder --ckpt runs/demo                                  # 2000 train / 1000 test images
    ov2 eval-encoder --ckpt runs/clip --n-train 60000 --n-test 10000 --out results/clip_fmnist.json
    ov2 eval-encoder --ckpt runs/demo --size 32 --baseline             # CPU smoke, plus a random-init ViT probe

Images (28 x 28 grayscale) are resized to the model's input size (default: its last training stage) and
repeated to RGB. Features: mean of the last-block patch tokens -> the ViT's final LayerNorm (the pooled
feature of v1/CLIP; for OpenVision 2 that LayerNorm is never trained, so it is a plain normalisation).
- linear probe: standardised features, multinomial logistic regression (scikit-learn), C picked on a 20 %
  hold-out of the train subset, refit on the whole subset, accuracy on the test subset;
- zero-shot: contrastive models rank class prompts by cosine (prompt features averaged over templates);
  OpenVision 2 ranks them by the decoder's caption log-likelihood (summed over tokens, averaged over
  templates). Only meaningful if pretraining mixed Fashion-MNIST in (`--data.fashion_mnist`).
- `--baseline` adds the probe of the same ViT at the run's initial weights: a randomly initialised ViT of the
  same shape, seeded as the trainer seeded it, so the comparison is paired and shows what training added
  (across init seeds alone the random-ViT probe varies by about 0.03 at the test's sizes).
Subsets are fixed random draws (seeded); the test split is never used for training or model selection.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from encoder.data import fashion_mnist as fm
from encoder.data.transforms import eval_transform

C_GRID = (0.01, 0.1, 1.0, 10.0)


def load_subset(split: str, n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(pixels [n, 3, size, size] normalised like training, labels [n]) of a seeded random subset of a split."""
    images, labels = fm.load_split(split)
    n = min(n, len(labels))
    idx = np.sort(np.random.default_rng([seed, 0 if split == "train" else 1]).permutation(len(labels))[:n])
    transform = eval_transform(size)
    pixels = torch.stack([transform(fm.to_image(images[i])) for i in idx])
    return pixels, labels[idx]


def _batches(pixels: torch.Tensor, batch: int, desc: str):
    for start in tqdm(range(0, len(pixels), batch), desc=desc, leave=False, disable=len(pixels) <= batch):
        yield pixels[start: start + batch]


@torch.no_grad()
def features(vit: nn.Module, pixels: torch.Tensor, batch: int = 128, device="cpu") -> np.ndarray:
    """[n, Dv] pooled features: mean of the last-block patch tokens -> final LayerNorm."""
    vit.eval()
    out = [vit.pooled(vit(x.to(device))["tokens"]).float().cpu() for x in _batches(pixels, batch, "features")]
    return torch.cat(out).numpy()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 seed: int = 0) -> tuple[float, float]:
    """(test accuracy, chosen C) of a logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    order = np.random.default_rng(seed).permutation(len(train_y))
    cut = len(order) // 5
    held, fit = order[:cut], order[cut:]

    def fitted(C: float, rows) -> LogisticRegression:
        return LogisticRegression(C=C, max_iter=500, random_state=seed).fit(train_x[rows], train_y[rows])

    with threadpool_limits(1):  # small problems: BLAS threads only contend (30x slower on a busy machine)
        scores = {C: fitted(C, fit).score(train_x[held], train_y[held]) for C in C_GRID}
        best = max(C_GRID, key=lambda C: (scores[C], -C))
        return float(fitted(best, slice(None)).score(test_x, test_y)), best


@torch.no_grad()
def zero_shot_contrastive(model: nn.Module, pixels: torch.Tensor, batch: int = 128, device="cpu") -> np.ndarray:
    """[n, classes] cosine of image features to the class prompt features (mean over templates)."""
    classes = []
    for label in range(len(fm.CLASSES)):
        prompts = model.encode_text(fm.class_prompts(label))
        classes.append(F.normalize(prompts.mean(0), dim=-1))
    classes = torch.stack(classes)
    return torch.cat([(model.encode_image(x.to(device)) @ classes.T).cpu()
                      for x in _batches(pixels, batch, "zero-shot")]).numpy()


@torch.no_grad()
def zero_shot_caption(model: nn.Module, pixels: torch.Tensor, max_len: int, batch: int = 64,
                      device="cpu") -> np.ndarray:
    """[n, classes] OpenVision 2: mean over templates of log p(prompt | image), the image prefix computed once."""
    from encoder.kernels import linear_cross_entropy
    from encoder.models.ov2 import shift_targets
    from encoder.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    prompts = [tokenizer(fm.class_prompts(label), max_len).to(device) for label in range(len(fm.CLASSES))]
    scores = []
    for x in _batches(pixels, batch, "zero-shot"):
        prefix = model.image_prefix(x.to(device))  # [B, K, Dd]
        B = prefix.shape[0]
        per_class = []
        for tokens in prompts:  # [P, T]
            P = tokens.shape[0]
            inputs, targets = shift_targets(tokens.repeat_interleave(B, dim=0))  # rows: prompt-major
            hidden = model.decoder(prefix.repeat(P, 1, 1), model.decoder.embed(inputs))
            nll = linear_cross_entropy(hidden.flatten(0, 1), model.decoder.head.weight, targets.flatten(),
                                       reduction="none").view(targets.shape).sum(1)
            per_class.append(-nll.view(P, B).mean(0))
        scores.append(torch.stack(per_class, dim=1).cpu())
    return torch.cat(scores).numpy()


def initial_vit(cfg) -> nn.Module:
    """The ViT exactly as training started it: the trainer seeds with cfg.seed, then builds the whole model.
    The caller's random state is left as it was."""
    from encoder.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model).vit


def evaluate(model: nn.Module, cfg, size: int, n_train: int = 2000, n_test: int = 1000, seed: int = 0,
             baseline: bool = False, zero_shot: bool = True, device="cpu", batch: int = 128) -> dict:
    """The metrics dict of one model (see the module docstring)."""
    start = time.perf_counter()
    train_px, train_y = load_subset("train", n_train, size, seed)
    test_px, test_y = load_subset("test", n_test, size, seed)
    model = model.to(device).eval()
    acc, C = linear_probe(features(model.vit, train_px, batch, device), train_y,
                          features(model.vit, test_px, batch, device), test_y, seed)
    result = {"family": cfg.model.family, "image_size": size, "n_train": len(train_y), "n_test": len(test_y),
              "linear_probe_acc": acc, "linear_probe_C": C}
    if zero_shot:
        if hasattr(model, "encode_text"):
            scores, method = zero_shot_contrastive(model, test_px, batch, device), "cosine"
        else:
            scores = zero_shot_caption(model, test_px, cfg.model.decoder.max_len, max(1, batch // 2), device)
            method = "caption_likelihood"
        result.update(zero_shot_acc=float((scores.argmax(1) == test_y).mean()), zero_shot_method=method)
    if baseline:
        vit = initial_vit(cfg).to(device)
        acc, C = linear_probe(features(vit, train_px, batch, device), train_y,
                              features(vit, test_px, batch, device), test_y, seed)
        result.update(random_init_linear_probe_acc=acc, random_init_linear_probe_C=C)
    result["chance"] = 1.0 / len(fm.CLASSES)
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ov2 eval-encoder", description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[1:6]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run folder (latest checkpoint) or checkpoint folder")
    parser.add_argument("--n-train", type=int, default=2000, help="train-split images for the probe (max 60000)")
    parser.add_argument("--n-test", type=int, default=1000, help="test-split images scored (max 10000)")
    parser.add_argument("--size", type=int, default=None, help="input resolution (default: the last stage's)")
    parser.add_argument("--seed", type=int, default=0, help="subset draw and probe split")
    parser.add_argument("--baseline", action="store_true",
                        help="also probe the same ViT at its initial (random) weights")
    parser.add_argument("--no-zero-shot", action="store_true", help="linear probe only")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    from encoder.checkpoint import load_model, resolve
    from encoder.config import ConfigError
    from ov2.cli import fail

    prog = "ov2 eval-encoder"
    if args.n_train < 10 or args.n_test < 10 or args.batch < 1:
        return fail(prog, f"--n-train and --n-test must be at least 10 (the probe holds out 20 % of the train "
                          f"images), --batch at least 1; got {args.n_train}, {args.n_test}, {args.batch}")
    if args.out and os.path.isdir(args.out):
        return fail(prog, f"--out {args.out} is a folder; give a file name for the JSON")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        return fail(prog, f"--out {args.out}: the folder {os.path.dirname(args.out)} does not exist")
    try:
        path = resolve(args.ckpt)
        model, cfg = load_model(path)
        if not fm.available():
            fm.load_split("test")  # raises with the install hint
    except (FileNotFoundError, ConfigError) as err:
        return fail(prog, err)
    size = args.size or cfg.stages[-1].image_size
    if size <= 0 or size % cfg.model.vit.patch_size:
        return fail(prog, f"--size {size} must be a positive multiple of the patch size {cfg.model.vit.patch_size}")
    result = {"ckpt": path, **evaluate(model, cfg, size, args.n_train, args.n_test, args.seed, args.baseline,
                                       not args.no_zero_shot, args.device, args.batch)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        tmp = f"{args.out}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    return 0

"""A bridge stage's batches built by DataLoader workers: the same weights as built in the training process, and a
resume from a checkpoint continues with the same batches."""

from pathlib import Path

import pytest
import torch
from bridge_helpers import smollm2_tokenizer, write_our_checkpoint


def _stage(ckpt: Path, out: Path, workers: int, stop_after: int | None = None) -> dict:
    from bridge.assemble import assemble
    from bridge.config import LlavaStageConfig
    from bridge.data import Collator, SynthInstructions
    from bridge.llm import tiny_llama
    from bridge.towers import load_tower
    from bridge.train import train_stage, trainable_state

    tok = smollm2_tokenizer()
    tower = load_tower(ckpt)
    model, processor = assemble(tower, tiny_llama(tok, seed=0, init_std=0.1), tok, seed=0)
    collate = Collator(processor.tokenizer, processor.image_processor, tower.num_patches)
    cfg = LlavaStageConfig(stage=2, steps=4, batch_size=2, grad_accum=2, lr=1e-3, ckpt_every=2, progress=False,
                          bf16="false", workers=workers)
    train_stage(model, SynthInstructions(16, image_size=32), collate, cfg, out, stop_after=stop_after)
    return trainable_state(model)


@pytest.mark.slow  # three short stages, two with worker processes
def test_worker_built_batches_train_the_same_weights_and_resume(tmp_path):
    ckpt = tmp_path / "enc"
    write_our_checkpoint(ckpt)
    inline = _stage(ckpt, tmp_path / "inline", workers=0)
    workers = _stage(ckpt, tmp_path / "workers", workers=2)
    assert inline.keys() == workers.keys() and all(torch.equal(inline[k], workers[k]) for k in inline)
    _stage(ckpt, tmp_path / "resumed", workers=2, stop_after=2)  # stopped at its step-2 checkpoint
    resumed = _stage(ckpt, tmp_path / "resumed", workers=2)
    assert all(torch.equal(inline[k], resumed[k]) for k in inline)

"""LLaVA-1.5 assembly: vision tower -> 2-layer GELU MLP projector (`mlp2x_gelu`) -> causal LM, as a standard
`transformers.LlavaForConditionalGeneration`, plus the matching `LlavaProcessor`.

Shapes: pixels [B,3,H,W] -> tower hidden_states[feature_layer] [B,1+N,Dv] -> drop cls (strategy "default"; SigLIP
towers have none, "full") -> projector [B,N,Dt] -> replaces the N `<image>` tokens of the prompt -> LM.

The tokenizer gains one special token, `<image>`; the LM's embedding table grows to hold it (new rows are the mean
of the old ones, the transformers default). Nothing here knows which tower it holds.
"""

from __future__ import annotations

import torch
from torch import nn

from bridge.processor import IMAGE_TOKEN, add_image_token, chat_template, make_processor, square


def assemble(tower, llm: nn.Module, tokenizer, *, pad_to_multiple_of: int = 64, seed: int = 0,
             template: str = "auto", pad_to_square: bool = True):
    """-> (LlavaForConditionalGeneration, LlavaProcessor); the model shares the tower's and LLM's modules.
    `template`: the chat template (bridge.processor.chat_template: the LLM's own, or "chatml"); `pad_to_square`:
    images padded to a square before resizing (LLaVA-1.5), else centre-cropped."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    torch.manual_seed(seed)  # the new embedding rows and the projector are random: make them reproducible
    template = chat_template(tokenizer, template)
    image_token_id = add_image_token(tokenizer, template)
    if llm.get_input_embeddings().weight.shape[0] <= image_token_id:
        llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
    vision = tower.hf_model()
    text_config = llm.config
    text_config.pad_token_id = tokenizer.pad_token_id
    text_config.eos_token_id = tokenizer.eos_token_id
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=tower.num_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=tower.strategy,
        vision_feature_layer=tower.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"assembly left tensors on the meta device: {meta[:5]}")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.eval()
    processor = make_processor(tokenizer, square(tower.image_processor, pad_to_square), tower.patch_size,
                               tower.strategy, tower.has_cls, template)
    if processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
        raise RuntimeError("processor and model disagree on the <image> token id")
    return model, processor


def make_blind(model) -> None:
    """The no-vision control (`blind`): the projector's output weight is zero and stays frozen, so every image token
    is one learned vector (the output bias) whatever the image. The model, its recipe and its evaluation are
    otherwise the ordinary ones; the exported folder is a standard LLaVA whose config says `blind: true`."""
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        projector.linear_2.weight.zero_()
    model.config.blind = True


def trainable_groups(model, *, stage: int, unfreeze_vision: bool = False) -> dict[str, list[nn.Parameter]]:
    """Freeze per LLaVA-1.5: stage 1 trains the projector; stage 2 the projector and LLM (+ tower if asked), or, when
    the LLM holds LoRA adapters (bridge.lora), the projector and the adapters. A blind model's projector trains its
    output bias only (make_blind)."""
    from bridge.lora import has_lora, lora_parameters

    inner = model.model
    projector = inner.multi_modal_projector
    blind = getattr(model.config, "blind", False)
    groups = {"projector": [projector.linear_2.bias] if blind else list(projector.parameters())}
    if stage == 2 and has_lora(inner.language_model):
        groups["llm"] = lora_parameters(inner.language_model)
    elif stage == 2:
        groups["llm"] = list(inner.language_model.parameters())
        if model.lm_head.weight is not inner.language_model.get_input_embeddings().weight:
            groups["llm"] += list(model.lm_head.parameters())
    elif stage != 1:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    if unfreeze_vision:
        groups["vision"] = list(inner.vision_tower.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    return groups

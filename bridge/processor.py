"""The LLaVA processor: our image preprocessing + the LLM's tokenizer + a chat template + the `<image>` token.

The chat template is ChatML (SmolLM2's format) and accepts message content either as a string (with `<image>`
inline) or as a list of `{"type": "image"}` / `{"type": "text", "text": ...}` parts, as lmms-eval's `llava_hf` and
`pipeline("image-text-to-text")` send it. No system turn is added unless the messages hold one.

`encode_conversation` tokenizes a training conversation the same way the template renders it, with labels (-100
everywhere except the assistant's answer tokens and their closing `<|im_end|>`).
"""

from __future__ import annotations

import torch

IMAGE_TOKEN = "<image>"
IGNORE = -100

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def add_image_token(tokenizer) -> int:
    """Adds `<image>` as one special token (idempotent); -> its id. Also makes sure a pad token exists."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{IMAGE_TOKEN} must encode to one token, got {ids}")
    tokenizer.chat_template = CHAT_TEMPLATE
    return ids[0]


def make_image_processor(image_size: int, mean, std, resample: int = 3):
    """Resize the short side to image_size (bicubic), centre-crop, scale to [0,1], normalise: our eval transform."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
        resample=resample,
        do_convert_rgb=True,
    )


def make_processor(tokenizer, image_processor, patch_size: int, strategy: str, has_cls: bool):
    """A LlavaProcessor whose image-token count matches LlavaForConditionalGeneration's features."""
    from transformers import LlavaProcessor

    add_image_token(tokenizer)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if has_cls else 0,
    )


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ({"from": "human"|"gpt", "value"}) -> chat messages ({"role", "content"})."""
    out = []
    for turn in conversations:
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"unknown conversation role in {turn}")
        out.append({"role": role, "content": turn.get("value", turn.get("content"))})
    return out


def render_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """The chat template's text as (segment, is_answer) pieces; joined they equal apply_chat_template's output."""
    segments: list[tuple[str, bool]] = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = "".join(IMAGE_TOKEN + "\n" if p["type"] == "image" else p.get("text", "") for p in content)
        segments.append((f"<|im_start|>{m['role']}\n", False))
        if m["role"] == "assistant":
            segments.append((content + "<|im_end|>", True))
            segments.append(("\n", False))
        else:
            segments.append((content + "<|im_end|>\n", False))
    return segments


def encode_conversation(tokenizer, conversations: list[dict], num_image_tokens: int, max_len: int | None = None):
    """-> dict(input_ids [T], labels [T]) with every `<image>` expanded to num_image_tokens copies."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in render_segments(to_messages(conversations)):
        text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens)
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if is_answer else [IGNORE] * len(piece)
    if max_len is not None and len(ids) > max_len:
        ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def prompt_ids(tokenizer, question: str, num_image_tokens: int) -> list[int]:
    """Token ids of one user turn with an image, followed by the assistant prompt (what generate continues)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return tokenizer.encode(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens), add_special_tokens=False)

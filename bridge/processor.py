"""The LLaVA processor: our image preprocessing + the LLM's tokenizer + a chat template + the `<image>` token.

The chat template is the LLM tokenizer's own (`apply_chat_template`: Vicuna, Llama, Qwen ... each ends its answers
as its LLM was trained to), with ChatML only where the tokenizer has none or where asked (`chat_template: chatml`,
the shortest prompt: no system turn is added unless the messages hold one). Either way the processor's template
accepts message content as a string (with `<image>` inline) or as a list of `{"type": "image"}` /
`{"type": "text", "text": ...}` parts, as lmms-eval's `llava_hf` and `pipeline("image-text-to-text")` send it
(TYPED_CONTENT turns a list into the string a plain LLM template expects).

`encode_conversation` tokenizes a training conversation exactly as the template renders it, with labels -100
everywhere except each assistant answer and the end-of-turn text the template closes it with (`render_segments`
finds them by rendering the conversation turn by turn: whatever one assistant turn adds after its generation prompt).
Images are padded to a square with the mean colour before resizing, as LLaVA-1.5 does (`pad_to_square`).
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
# Prepended to an LLM's own template: list content becomes the string it expects ("<image>\n" + text).
TYPED_CONTENT = (
    "{%- set ns = namespace(out=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.out = ns.out + [m] -%}"
    "{%- else -%}{%- set part = namespace(text='') -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{%- set part.text = part.text + '<image>\n' -%}"
    "{%- elif p['type'] == 'text' -%}{%- set part.text = part.text + p['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set ns.out = ns.out + [{'role': m['role'], 'content': part.text}] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.out -%}"
)
TEMPLATES = ("auto", "chatml")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def chat_template(tokenizer, which: str = "auto") -> str:
    """The template a bridge uses: the tokenizer's own ("auto", when it has one), else ChatML."""
    if which not in TEMPLATES:
        raise ValueError(f"chat_template must be one of {', '.join(TEMPLATES)}, got {which!r}")
    own = tokenizer.chat_template
    if which == "chatml" or not isinstance(own, str) or not own.strip() or own == CHAT_TEMPLATE:
        return CHAT_TEMPLATE
    return own if own.startswith(TYPED_CONTENT) else TYPED_CONTENT + own


def add_image_token(tokenizer, template: str | None = None) -> int:
    """Adds `<image>` as one special token (idempotent); -> its id. Also makes sure a pad token exists and sets the
    tokenizer's chat template (`template`; None: chat_template(tokenizer))."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{IMAGE_TOKEN} must encode to one token, got {ids}")
    tokenizer.chat_template = template or chat_template(tokenizer)
    return ids[0]


def make_image_processor(image_size: int, mean, std, resample: int = 3, pad_to_square: bool = False):
    """Pad to a square with the mean colour (LLaVA-1.5's `image_aspect_ratio: pad`) when asked, resize the short
    side to image_size (bicubic), centre-crop, scale to [0,1], normalise: transformers' LlavaImageProcessor."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
        resample=resample,
        do_convert_rgb=True,
        do_pad=pad_to_square,
    )


def square(image_processor, pad_to_square: bool = True):
    """The same preprocessing as `image_processor` (size, crop, mean, std) with padding to a square on or off."""
    crop = image_processor.crop_size
    size = crop["height"] if isinstance(crop, dict) else crop.height
    return make_image_processor(size, image_processor.image_mean, image_processor.image_std,
                                int(getattr(image_processor, "resample", 3)), pad_to_square)


def make_processor(tokenizer, image_processor, patch_size: int, strategy: str, has_cls: bool,
                   template: str | None = None):
    """A LlavaProcessor whose image-token count matches LlavaForConditionalGeneration's features."""
    from transformers import LlavaProcessor

    add_image_token(tokenizer, template)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=tokenizer.chat_template,
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


def render_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The tokenizer's chat template's text as (segment, is_answer) pieces; joined they equal apply_chat_template's
    output. An answer is what its assistant turn adds after the generation prompt, trailing whitespace aside (the
    answer and the end-of-turn marker the template closes it with, e.g. `<|im_end|>` or ` </s>`)."""

    def render(msgs: list[dict], prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt) if msgs else ""

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError("this chat template does not render a conversation turn by turn (a later turn changes "
                             "the text of an earlier one), so its answers cannot be masked")
        answer = full[len(prefix):].rstrip()
        segments += [(prefix[len(done):], False), (answer, True)]
        done = prefix + answer
    whole = render(messages, False)
    if not whole.startswith(done):
        raise ValueError("this chat template renders the whole conversation differently from its turns")
    if whole[len(done):]:
        segments.append((whole[len(done):], False))
    return [(text, answer) for text, answer in segments if text]


def encode_conversation(tokenizer, conversations: list[dict], num_image_tokens: int, max_len: int | None = None):
    """-> dict(input_ids [T], labels [T]) with every `<image>` expanded to num_image_tokens copies."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in render_segments(tokenizer, to_messages(conversations)):
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

"""lmms-eval's `llava_hf`, adapted: batched likelihood scoring and batched greedy generation, at the hardware's
precision. `ov2 eval` (benchmarks.evals.evaluate) hands an instance of this class to lmms-eval's `simple_evaluate`.

    lm = load_model("runs/llava/model", batch_size=8, bf16="auto")   # bf16 where the device multiplies it natively

What differs from lmms-eval 0.7.3's own class (the one its registry resolves `llava_hf` to, subclassed at run time):
- `loglikelihood` (what `multiple_choice` tasks call once per option): the inherited one tokenises the context
  without the image, which transformers 5 refuses, and counts the prompt's tail into the loss. Here each question's
  options are scored together after `chat_prompt`, the prompt `generate_until` gives the same question: the options
  that are one token after the prompt (a letter, Yes / No) from the next-token distribution at the prompt's last
  position, `batch_size` questions per forward pass, the LM head applied at that one position only (`next_logprobs`);
  longer options from a pass over prompt + option each (`option_nll`).
- `generate_until`: `batch_size` questions per `generate` call (left padding, prompts sorted by length so that a
  batch pads little), the same prompt, greedy decoding, stop tokens and decoded text as lmms-eval's batch-1 loop.
Both equal the batch-1 computation to float tolerance (tests/test_eval.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def load_model(model_dir: str | Path, batch_size: int = 8, bf16: str = "auto"):
    """The adapted `llava_hf` on the folder: on CUDA if present (under torchrun: this process's GPU), else the CPU;
    in bf16 where `bf16` resolves so on that device (`ov2.precision`: auto = where it multiplies bf16 natively)."""
    import torch

    from ov2.precision import resolve_bf16

    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    use_bf16, _ = resolve_bf16(bf16, device)
    dtype = "bfloat16" if use_bf16 else "float32"
    args = f"pretrained={Path(model_dir).resolve()},device={device},device_map={device},dtype={dtype}"
    return llava_hf_class().create_from_arg_string(args, {"batch_size": batch_size})


def llava_hf_class():
    """lmms-eval's `llava_hf` class (its chat variant) with `loglikelihood` and `generate_until` batched."""
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.models import get_model
    from lmms_eval.protocol import ChatMessages
    from tqdm import tqdm

    base = get_model("llava_hf")

    class LlavaHF(base):
        def loglikelihood(self, requests):
            groups: dict[tuple, list[tuple[int, str]]] = {}  # one question's options, scored together
            visuals = {}
            for i, (context, continuation, doc_to_visual, doc_id, task, split) in enumerate(r.args for r in requests):
                doc = self.task_dict[task][split][doc_id]
                if not isinstance(continuation, str):  # output_type loglikelihood: the task's doc_to_target
                    continuation = continuation(doc)
                key = (task, split, doc_id, context)
                groups.setdefault(key, []).append((i, continuation))
                visuals[key] = doc_to_visual
            questions = []
            for (task, split, doc_id, context), options in groups.items():
                images = self.flatten([visuals[(task, split, doc_id, context)](self.task_dict[task][split][doc_id])])
                questions.append((chat_prompt(self._image_processor, context, len(images)), images, options))
            out: list = [None] * len(requests)
            bar = tqdm(total=len(questions), desc="Scoring options", disable=self.rank != 0)
            for batch in batches(questions, self.batch_size_per_gpu, key=lambda q: len(q[0])):
                scores = score_options(self.model, self._image_processor, [(p, [o for _, o in opts], ims)
                                                                           for p, ims, opts in batch])
                for (_, _, options), per_option in zip(batch, scores):
                    for (i, _), score in zip(options, per_option):
                        out[i] = score
                bar.update(len(batch))
            bar.close()
            return out

        def generate_until(self, requests):
            prompts, images, settings = [], [], []
            for _, doc_to_messages, gen_kwargs, doc_id, task, split in (r.args for r in requests):
                messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
                visual, _, _ = messages.extract_media()
                prompts.append(self._image_processor.apply_chat_template(messages.model_dump()["messages"],
                                                                         tokenize=False, add_generation_prompt=True))
                images.append(self.flatten([visual]))
                settings.append(dict(gen_kwargs))
            texts: list = [None] * len(requests)
            bar = tqdm(total=len(requests), desc="Model Responding", disable=self.rank != 0)
            same = {}
            for i, kwargs in enumerate(settings):  # one generate call holds questions of one setting
                same.setdefault(repr(sorted(kwargs.items(), key=str)), []).append(i)
            for indices in same.values():
                kwargs = settings[indices[0]]
                for batch in batches(indices, self.batch_size_per_gpu, key=lambda i: len(prompts[i])):
                    outs = generate(self.model, self._image_processor, [prompts[i] for i in batch],
                                    [images[i] for i in batch], max_new_tokens=kwargs.get("max_new_tokens", 1024),
                                    eos_token_id=self.eot_token_id, use_cache=self.use_cache)
                    for i, ids in zip(batch, outs):
                        texts[i] = GenerationResult(text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                                    token_counts=TokenCounts(output_tokens=len(ids)))
                        self.cache_hook.add_partial("generate_until", (prompts[i], kwargs), texts[i].text)
                    bar.update(len(batch))
            bar.close()
            return texts

    LlavaHF.__name__ = LlavaHF.__qualname__ = base.__name__
    return LlavaHF


def batches(items: list, size: int, key) -> list[list]:
    """`items` in batches of `size`, sorted by `key` (a prompt's length) so that each batch pads little."""
    ordered = sorted(items, key=key)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def chat_prompt(processor, text: str, n_images: int) -> str:
    """The prompt lmms-eval's chat `llava_hf` generates after (a ConfigurableMessagesTask's user turn: the images,
    then the text, through the processor's chat template, the assistant's turn opened)."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


@contextlib.contextmanager
def padding_side(tokenizer, side: str):
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


def _inputs(model, processor, prompts: list[str], images: list[list], side: str):
    flat = [im for ims in images for im in ims]
    kwargs = {"images": flat} if flat else {}
    with padding_side(processor.tokenizer, side):
        return processor(text=prompts, return_tensors="pt", padding=True, **kwargs).to(model.device, model.dtype)


def next_logprobs(model, processor, prompts: list[str], images: list[list]):
    """[B, V] float32 log-probabilities of the token after each prompt (with its images), from one forward pass
    over the batch padded on the right; the LM head runs at each prompt's last position only."""
    import torch

    inputs = _inputs(model, processor, prompts, images, "right")
    with torch.inference_mode():
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
        last = inputs["attention_mask"].sum(1) - 1
        logits = model.lm_head(hidden[torch.arange(len(prompts), device=hidden.device), last])
    return logits.float().log_softmax(-1).cpu()


def generate(model, processor, prompts: list[str], images: list[list], max_new_tokens: int, eos_token_id: int,
             use_cache: bool = True) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (left padding), each cut after its end token -> new token ids."""
    import torch

    inputs = _inputs(model, processor, prompts, images, "left")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                             use_cache=use_cache, pad_token_id=eos_token_id, eos_token_id=eos_token_id)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    return [ids[:ids.index(eos_token_id) + 1] if eos_token_id in ids else ids for ids in new]


def one_token_options(tokenizer, prompt: str, options: list[str]) -> dict[str, int]:
    """{option: its token id} for the options that tokenise as exactly one token after the prompt."""
    base = tokenizer.encode(prompt, add_special_tokens=False)
    single = {}
    for option in options:
        ids = tokenizer.encode(prompt + option, add_special_tokens=False)
        if len(ids) == len(base) + 1 and ids[:-1] == base:
            single[option] = ids[-1]
    return single


def score_options(model, processor, questions: list[tuple[str, list[str], list]]) -> list[list[tuple[float, bool]]]:
    """For each (prompt, options, images): one (-log P(option | prompt, images), whether greedy decoding gives
    exactly the option) per option. The one-token options of every question come from one batched forward pass
    (`next_logprobs`), the others from a pass each (`option_nll`)."""
    singles = [one_token_options(processor.tokenizer, p, opts) for p, opts, _ in questions]
    needs = [i for i, s in enumerate(singles) if s]
    logprobs = dict(zip(needs, next_logprobs(model, processor, [questions[i][0] for i in needs],
                                             [questions[i][2] for i in needs]))) if needs else {}
    out = []
    for i, (prompt, options, images) in enumerate(questions):
        row = []
        for o in options:
            if o in singles[i]:
                lp = logprobs[i]
                row.append((float(-lp[singles[i][o]]), int(lp.argmax()) == singles[i][o]))
            else:
                row.append(option_nll(model, processor, prompt, o, images))
        out.append(row)
    return out


def options_nll(model, processor, prompt: str, options: list[str], images: list) -> list[tuple[float, bool]]:
    """score_options for one question."""
    return score_options(model, processor, [(prompt, options, images)])[0]


def option_nll(model, processor, prompt: str, option: str, images: list) -> tuple[float, bool]:
    """(-log P(option's tokens | prompt, images), whether greedy decoding would produce exactly them): one forward
    pass over prompt + option with the images. A loss, lower is likelier: lmms-eval 0.7.3's multiple_choice
    convention (its scoring, and ours in tasks/utils.chosen, take the argmin). The option's tokens are those the
    prompt + option text has beyond the prompt's own; a tokenisation that merges across the boundary raises."""
    import torch

    kwargs = {"images": images} if images else {}
    context = processor(text=prompt, return_tensors="pt", **kwargs)["input_ids"][0]
    inputs = processor(text=prompt + option, return_tensors="pt", **kwargs).to(model.device, model.dtype)
    ids = inputs["input_ids"][0].cpu()
    n = len(context)
    if len(ids) <= n or not torch.equal(ids[:n], context):
        raise ValueError(f"option {option!r} does not tokenise as a continuation of the prompt")
    with torch.inference_mode():
        hidden = model.model(**inputs, use_cache=False).last_hidden_state[0, n - 1:-1]
        logits = model.lm_head(hidden).float().cpu()
    target = ids[n:]
    nll = -logits.log_softmax(-1).gather(1, target[:, None]).sum()
    return float(nll), bool((logits.argmax(-1) == target).all())

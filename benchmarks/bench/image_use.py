"""Does a bridged model look at the image? Colour and shape questions of a built-in task, each answered by the
likelihood of every option word (8 colours, 5 shapes) once with its own image and once with another question's.

    ov2 bench image-use runs/default/encoders/openvision2/bridge/model runs/default/encoders/blind/bridge/model

A model that reads the image is right more often, and less surprised by the right answer, with its own image than
with a shuffled one; for a model that does not (the blind control, or a bridge that learnt answer priors only) the
two are equal. Cheaper and sharper than a whole evaluation: no generation, one forward pass per question and image.
Writes NAME.md and NAME.json (default benchmarks/results/image_use_cpu), never over existing ones without --force.
"""

from __future__ import annotations

import os
import platform
import sys

from benchmarks.bench.results import check_writable, markdown_table, out_options, write_results
from ov2.cli import doc_parser, fail, positive

SHUFFLE = 7  # the shuffled image of question i is question (i + 7)'s


def score(model, processor, records: list[dict], shuffled: bool) -> dict:
    """{"accuracy", "nll"} of the right option word over the options, with each record's own or a shuffled image."""
    import torch

    from benchmarks.evals.suite.prompts import SHORT
    from encoder.data.synth import COLOURS, SHAPES

    tokenizer, right, nll = processor.tokenizer, 0, 0.0
    for i, r in enumerate(records):
        image = records[(i + SHUFFLE) % len(records)]["image"] if shuffled else r["image"]
        options = list(COLOURS) if r["type"] == "colour" else list(SHAPES)
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"] + SHORT}]}],
            add_generation_prompt=True)
        inputs = processor(images=[image], text=text, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            last = model(**inputs).logits[0, -1].float().log_softmax(-1)
        ids = [tokenizer.encode(o, add_special_tokens=False)[0] for o in options]
        scores = last[ids].log_softmax(-1)
        right += options[int(scores.argmax())] == r["answer"]
        nll -= float(scores[options.index(r["answer"])])
    return {"accuracy": right / len(records), "nll": nll / len(records)}


def main(argv: list[str] | None = None) -> int:
    prog = "ov2 bench image-use"
    parser = doc_parser(prog, __doc__)
    parser.add_argument("models", nargs="+", help="exported LLaVA folders (a bridge run's model/)")
    parser.add_argument("--task", default="ov2_gqa", help="built-in task whose colour and shape questions are asked "
                        "(default ov2_gqa, held-in in the default experiment; ov2_gqa_unseen: held-out scenes)")
    parser.add_argument("--n", type=positive(), default=80, help="questions (default 80)")
    out_options(parser, "image_use_cpu")
    a = parser.parse_args(argv)
    from benchmarks.evals.suite.tasks import TASKS

    if a.task not in TASKS:
        return fail(prog, f"--task {a.task!r} is not a built-in task ({', '.join(TASKS)})")
    missing = [m for m in a.models if not os.path.isfile(os.path.join(m, "config.json"))]
    if missing:
        return fail(prog, f"{missing[0]} is not an exported model folder (no config.json)")
    out_dir, name = os.path.split(os.path.abspath(a.out))
    try:
        check_writable(out_dir, name, a.force, ("md", "json"))
    except ValueError as err:
        return fail(prog, err)
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from benchmarks.evals.suite.build import generate

    records = [r for r in generate(a.task, n=3 * a.n) if r["type"] in ("colour", "shape")][: a.n]
    rows = []
    for folder in a.models:
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(folder)
        own, other = score(model, processor, records, False), score(model, processor, records, True)
        rows.append({"model": folder, "n": len(records), "accuracy": round(own["accuracy"], 3),
                     "accuracy_shuffled": round(other["accuracy"], 3), "nll": round(own["nll"], 3),
                     "nll_shuffled": round(other["nll"], 3)})
        print(f"{prog}: {rows[-1]}", file=sys.stderr)
    command = "ov2 bench image-use " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"# Does the bridge look at the image? ({a.task}, colour and shape questions)\n\n`{command}` on "
          f"{platform.machine()}: likelihood of each option word, own image vs another question's.\n\n"
          + markdown_table(["model", "n", "accuracy (own image)", "accuracy (shuffled)", "NLL (own)", "NLL (shuffled)"],
                           [[r["model"], r["n"], r["accuracy"], r["accuracy_shuffled"], r["nll"], r["nll_shuffled"]]
                            for r in rows]))
    write_results(out_dir, name, rows, md, a.force, formats=("md", "json"), meta={"command": command})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

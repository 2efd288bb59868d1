"""Saving a tokenizer (or a processor holding one) so that it reloads with the same behaviour.

transformers 5.x ``save_pretrained`` leaves ``legacy`` out of ``tokenizer_config.json``, and a
Llama (SentencePiece) tokenizer loaded without the key is non-legacy. A legacy tokenizer saved
and reloaded therefore tokenises the same text differently: ``</s>USER:`` becomes ``</s> U SER :``
instead of ``</s> ▁USER :``, ``<image>\\n`` loses its ``▁``. A stage-1 export reloaded for stage 2
would train on ids the model never saw. :func:`save_pretrained_faithfully` writes the key back.

(Loaded from a whole llava folder, ``AutoTokenizer`` gives a generic tokenizer that uses the
saved ``tokenizer.json`` as it is, so the drop shows only when the tokenizer is loaded by its
class, ``LlamaTokenizer.from_pretrained``, or from its files alone; it must hold either way.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Tokenizer attributes that change tokenisation and that save_pretrained may drop.
_BEHAVIOUR_KEYS = ("legacy",)


def save_pretrained_faithfully(obj, folder: str | os.PathLike) -> None:
    """``obj.save_pretrained(folder)`` for a tokenizer or processor, then record in the folder's
    ``tokenizer_config.json`` the behaviour settings the tokenizer was used with."""
    obj.save_pretrained(folder)
    tokenizer = getattr(obj, "tokenizer", obj)
    record_tokenizer_behaviour(tokenizer, folder)


def record_tokenizer_behaviour(tokenizer, folder: str | os.PathLike) -> None:
    """Write ``legacy`` (when the tokenizer has it as a bool) into ``folder/tokenizer_config.json``."""
    path = Path(folder) / "tokenizer_config.json"
    # A tokenizer loaded from a llava folder is a generic TokenizersBackend: no attribute, but
    # the value it was loaded with is still in its init_kwargs.
    init = getattr(tokenizer, "init_kwargs", {}) or {}
    values = {k: getattr(tokenizer, k, init.get(k)) for k in _BEHAVIOUR_KEYS}
    values = {k: v for k, v in values.items() if isinstance(v, bool)}
    if not values or not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if all(config.get(k) == v for k, v in values.items()):
        return
    config.update(values)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)

"""Conversation -> ``input_ids`` and ``labels``, with every ``<image>`` expanded to K image-token ids.

The rendered text is tokenised once, whole, with each placeholder appearing once (so the text
around images tokenises exactly as it does at inference, where the processor sees the same
string); each single image-token id is then replaced by K ids. Nothing relies on the tokenizer
splitting K repeated ``<image>`` strings. Labels come from character offsets: a token is trained
on when it covers a non-space character of an assistant reply (or its end-of-turn token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visionzip_core.data.templates import render
from visionzip_core.data.validation import SampleError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoder:
    """Everything needed to turn a conversation into token ids; picklable for worker processes."""

    tokenizer: object
    template: str
    image_token: str
    image_tokens_per_image: int
    model_max_length: int
    system_prompt: str | None = None

    def __post_init__(self):
        tok = self.tokenizer
        if not getattr(tok, "is_fast", False):
            raise ValueError("data: a fast tokenizer (tokenizers-backed) is needed for character offsets")
        ids = tok.convert_tokens_to_ids(self.image_token)
        if ids is None or ids == tok.unk_token_id:
            raise ValueError(
                f"data: the tokenizer has no {self.image_token!r} token; add it as a special token "
                "(and resize the model's embeddings) before building the dataset"
            )
        if self.image_tokens_per_image < 1:
            raise ValueError("data: image_tokens_per_image must be >= 1")
        if self.template in ("plain", "vicuna_v1") and tok.eos_token is None:
            raise ValueError(f"data.template {self.template!r} needs a tokenizer with an eos token")

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(self, turns, n_images: int) -> tuple[list[int], list[int]]:
        """Encode one conversation; raises :class:`SampleError` when it is bad or cannot fit.

        Returns ``(input_ids, labels)``, equal lengths ``T <= model_max_length``; labels are
        ``IGNORE_INDEX`` everywhere but assistant replies.
        """
        pieces, add_bos = render(self.template, turns, self.tokenizer, self.image_token, self.system_prompt)
        text = "".join(t for t, _ in pieces)
        n_placeholders = text.count(self.image_token)
        if n_placeholders != n_images:
            raise SampleError(
                "placeholder_mismatch",
                f"{n_placeholders} {self.image_token} placeholder(s) for {n_images} image(s)",
            )
        reply = np.zeros(len(text) + 1, dtype=np.int32)
        pos = 0
        for piece, is_reply in pieces:
            if is_reply:
                reply[pos : pos + len(piece)] = [not c.isspace() for c in piece]
            pos += len(piece)
        covered = np.concatenate([[0], np.cumsum(reply)])

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        image_id = self.image_token_id
        is_image = ids == image_id
        if int(is_image.sum()) != n_placeholders:
            raise ValueError(
                f"data: the tokenizer split {n_placeholders} {self.image_token!r} placeholder(s) into "
                f"{int(is_image.sum())} image-token id(s); it must be a single special token"
            )
        trained = (covered[offsets[:, 1]] - covered[offsets[:, 0]]) > 0
        labels = np.where(trained & ~is_image, ids, IGNORE_INDEX)
        if add_bos and self.tokenizer.bos_token_id is not None:
            ids = np.concatenate([[self.tokenizer.bos_token_id], ids])
            labels = np.concatenate([[IGNORE_INDEX], labels])
            is_image = np.concatenate([[False], is_image])

        repeat = np.where(is_image, self.image_tokens_per_image, 1)
        ids, labels = np.repeat(ids, repeat), np.repeat(labels, repeat)
        return self._truncate(ids, labels, image_id, n_images)

    def _truncate(self, ids, labels, image_id: int, n_images: int) -> tuple[list[int], list[int]]:
        limit = self.model_max_length
        if len(ids) > limit:
            image_positions = np.flatnonzero(ids == image_id)
            if n_images and image_positions[-1] >= limit:
                raise SampleError(
                    "too_long",
                    f"needs {len(ids)} tokens; its image tokens alone run to position "
                    f"{image_positions[-1] + 1} > model_max_length {limit}",
                )
            ids, labels = ids[:limit], labels[:limit]
        if not (labels != IGNORE_INDEX).any():
            raise SampleError("too_long", f"no assistant reply within the first {limit} tokens")
        return ids.tolist(), labels.tolist()

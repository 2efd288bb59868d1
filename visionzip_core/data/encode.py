"""Conversation -> ``input_ids`` and ``labels``, with every ``<image>`` expanded to its image-token ids.

K ids per image: a fixed number (LLaVA-1.5: every image is one square crop), or, for a tiling model
(LLaVA-NeXT) or a native-resolution one (Qwen2.5-VL), a count that the model's family computes from
each image's size. A model that takes video (Qwen2.5-VL) also expands each video placeholder
(``<|video_pad|>``) to the count of that video's ``(frames, H, W)``.

``plain`` and ``vicuna_v1`` are tokenised as LLaVA's training code does (``tokenizer_image_token``
in ``llava/mm_utils.py``): the rendered text is split at the placeholders and each chunk is
tokenised on its own, as if it began a text (so it gets the tokenizer's leading-space marker:
``<image>`` is followed by ``▁`` ``<0x0A>`` for ``"\\n..."``), the chunks' own BOS dropped and one
BOS put first. The ids are then the same whatever the tokenizer does with text that follows a
special token. ``chat_template`` text is tokenised whole, as the processor does at inference.
Each single image-token id is then replaced by K ids.

Labels come from character offsets: a token is trained when it covers a character of an
assistant reply (whitespace included) or its end-of-turn token, which is LLaVA's set: every
token after ``ASSISTANT:`` up to and including ``</s>``. For ``chat_template`` whitespace that
the template puts after the end-of-turn marker is not trained. Where LLaVA's length bookkeeping
goes wrong (a reply that itself contains ``"USER: ... ASSISTANT: "`` makes LLaVA print
"tokenization mismatch (ignored)" and mask the whole sample) the reply is still trained here.

Truncation is LLaVA's: the sequence is cut at ``model_max_length`` after the images are
expanded (LLaVA cuts in the model, after expanding to 576). Unlike LLaVA, a sample whose image
run would be cut, or that keeps no trained token, is a bad sample (``too_long``), not trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from visionzip_core.data.templates import place_images_first, render
from visionzip_core.data.validation import SampleError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoder:
    """Everything needed to turn a conversation into token ids; picklable for worker processes.

    ``image_tokens_per_image``: an int, or a callable ``(H, W) -> int`` with a ``per_size``
    attribute (:class:`visionzip_core.families.ImageTokenCount`); when ``per_size`` is true every
    call must pass the images' sizes. Its ``in_several()``, when it has one and it is not None, is
    the count of each image of a sample with several (a model that does not tile those).
    ``image_placement``: ``"start"`` moves each turn's placeholders to its start as LLaVA does,
    ``"keep"`` leaves them where the sample has them. ``plain_end``: ``"newline"`` ends a
    ``plain`` caption with LLaVA's ``"\\n"`` separator, ``"eos"`` with the eos token.
    """

    tokenizer: object
    template: str
    image_token: str
    image_tokens_per_image: int | Callable[[tuple[int, int] | None], int]
    model_max_length: int
    system_prompt: str | None = None
    image_placement: str = "start"
    plain_end: str = "newline"
    #: the video placeholder, and ``(T, H, W) -> int`` (None: the model takes no video)
    video_token: str | None = None
    video_tokens_per_video: Callable[[tuple[int, int, int]], int] | None = None

    @classmethod
    def from_settings(
        cls,
        settings,
        tokenizer,
        image_token: str,
        image_tokens_per_image,
        video_token=None,
        video_tokens=None,
    ) -> Encoder:
        """The encoder a :class:`DataSettings` describes."""
        return cls(
            video_token=video_token,
            video_tokens_per_video=video_tokens,
            tokenizer=tokenizer,
            template=settings.template,
            image_token=image_token,
            image_tokens_per_image=image_tokens_per_image,
            model_max_length=settings.model_max_length,
            system_prompt=settings.system_prompt,
            image_placement=settings.image_placement,
            plain_end=settings.plain_end,
        )

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
        if not callable(self.image_tokens_per_image) and self.image_tokens_per_image < 1:
            raise ValueError("data: image_tokens_per_image must be >= 1")
        if self.video_token is not None:
            vid = tok.convert_tokens_to_ids(self.video_token)
            if vid is None or vid == tok.unk_token_id:
                raise ValueError(f"data: the tokenizer has no {self.video_token!r} token")
            if self.video_tokens_per_video is None:
                raise ValueError("data: a video_token needs video_tokens_per_video")
        if self.image_placement not in ("start", "keep"):
            raise ValueError(f"data.image_placement: 'start' or 'keep', got {self.image_placement!r}")
        if self.plain_end not in ("newline", "eos"):
            raise ValueError(f"data.plain_end: 'newline' or 'eos', got {self.plain_end!r}")
        # computed once: whether chunks that start with a space need SentencePiece's extra "▁"
        object.__setattr__(self, "_space_needs_prefix", _drops_dummy_prefix_before_space(tok))
        needs_eos = self.template == "vicuna_v1" or (self.template == "plain" and self.plain_end == "eos")
        if needs_eos and tok.eos_token is None:
            raise ValueError(f"data.template {self.template!r} needs a tokenizer with an eos token")

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def needs_image_sizes(self) -> bool:
        """Whether an image's token count depends on its size (pass ``image_sizes``)."""
        return callable(self.image_tokens_per_image) and bool(
            getattr(self.image_tokens_per_image, "per_size", True)
        )

    def image_counts(self, n_images: int, image_sizes: Sequence[tuple[int, int]] | None) -> list[int]:
        """Image-token ids of each of ``n_images`` images, in placeholder order."""
        count = self.image_tokens_per_image
        if not callable(count) or n_images == 0:
            return [count] * n_images
        several = getattr(count, "in_several", None)
        if n_images > 1 and several is not None and several() is not None:
            return [several()] * n_images  # one crop each, whatever its size
        if not self.needs_image_sizes:
            return [count(None)] * n_images
        if image_sizes is None or len(image_sizes) != n_images:
            raise ValueError(f"data: {n_images} image(s) need their sizes to count their tokens")
        return [
            _counted(count, tuple(size), f"image {i + 1} ({size[0]}x{size[1]} px as resized, height x width)")
            for i, size in enumerate(image_sizes)
        ]

    def video_counts(self, video_sizes: Sequence[tuple[int, int, int]]) -> list[int]:
        """Video-token ids of each video, from its ``(frames, H, W)`` as the processor gives them."""
        if video_sizes and self.video_token is None:
            raise SampleError("bad_structure", "a video, but this model takes no video")
        return [
            _counted(
                self.video_tokens_per_video,
                tuple(size),
                f"video {i + 1} ({size[0]} frames of {size[1]}x{size[2]} px, height x width)",
            )
            for i, size in enumerate(video_sizes)
        ]

    def __call__(
        self,
        turns,
        n_images: int,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        video_sizes: Sequence[tuple[int, int, int]] = (),
    ) -> tuple[list[int], list[int]]:
        """Encode one conversation; raises :class:`SampleError` when it is bad or cannot fit.

        ``image_sizes``: each image's ``(H, W)`` as the processor sees it, needed when the count
        depends on it (:attr:`needs_image_sizes`). ``video_sizes``: each video's ``(T, H, W)``
        (frames padded to the temporal patch, size as resized), one per video placeholder.

        Returns ``(input_ids, labels)``, equal lengths ``T <= model_max_length``; labels are
        ``IGNORE_INDEX`` everywhere but assistant replies.
        """
        if self.image_placement == "start":
            turns = place_images_first(turns, self.image_token)
        pieces = render(
            self.template,
            turns,
            self.tokenizer,
            self.image_token,
            self.system_prompt,
            self.plain_end,
            self.video_token,
        )
        expanded = self._video_texts(video_sizes)
        if expanded is not None:  # checked against the placeholders first, as for the repeat path
            n_video = "".join(t for t, _ in pieces).count(self.video_token)
            if n_video != len(video_sizes):
                raise SampleError(
                    "placeholder_mismatch",
                    f"{n_video} {self.video_token} placeholder(s) for {len(video_sizes)} video(s)",
                )
            pieces = _expand_videos(pieces, self.video_token, expanded)
        text = "".join(t for t, _ in pieces)
        n_placeholders = text.count(self.image_token)
        if n_placeholders != n_images:
            raise SampleError(
                "placeholder_mismatch",
                f"{n_placeholders} {self.image_token} placeholder(s) for {n_images} image(s)",
            )
        n_video_placeholders = text.count(self.video_token) if self.video_token else 0
        if expanded is not None:
            n_video_placeholders = len(video_sizes)  # each already expanded to its runs
        elif n_video_placeholders != len(video_sizes):
            raise SampleError(
                "placeholder_mismatch",
                f"{n_video_placeholders} {self.video_token} placeholder(s) for {len(video_sizes)} video(s)",
            )
        reply = np.zeros(len(text) + 1, dtype=np.int32)
        pos = 0
        for piece, is_reply in pieces:
            if is_reply:
                # chat templates may add whitespace after the end-of-turn marker: not the reply's
                end = len(piece.rstrip()) if self.template == "chat_template" else len(piece)
                reply[pos : pos + end] = 1
            pos += len(piece)
        covered = np.concatenate([[0], np.cumsum(reply)])

        if self.template == "chat_template":
            ids, offsets = self._tokenize_whole(text)
        else:
            ids, offsets = self._tokenize_chunks(text)
        image_id = self.image_token_id
        is_image = ids == image_id
        if int(is_image.sum()) != n_placeholders:
            raise ValueError(
                f"data: the tokenizer split {n_placeholders} {self.image_token!r} placeholder(s) into "
                f"{int(is_image.sum())} image-token id(s); it must be a single special token"
            )
        is_video = np.zeros(len(ids), dtype=bool)
        if self.video_token is not None:
            is_video = ids == self.tokenizer.convert_tokens_to_ids(self.video_token)
            if expanded is None and int(is_video.sum()) != n_video_placeholders:
                raise ValueError(f"data: the tokenizer split {self.video_token!r} into several ids")
        trained = (covered[offsets[:, 1]] - covered[offsets[:, 0]]) > 0
        labels = np.where(trained & ~is_image & ~is_video, ids, IGNORE_INDEX)
        repeat = np.ones(len(ids), dtype=np.int64)
        repeat[is_image] = self.image_counts(n_images, image_sizes)
        if expanded is None:
            repeat[is_video] = self.video_counts(video_sizes)
        elif int(is_video.sum()) != sum(self.video_counts(video_sizes)):
            raise ValueError(f"data: the expanded videos do not hold their {self.video_token!r} counts")
        ids, labels = np.repeat(ids, repeat), np.repeat(labels, repeat)
        return self._truncate(ids, labels, image_id, n_images + len(video_sizes))

    def _video_texts(self, video_sizes) -> list[str] | None:
        """Each video placeholder's expanded text when the model lays a video out as several runs
        (``video_tokens_per_video.placeholder_text``), else None."""
        expand = getattr(self.video_tokens_per_video, "placeholder_text", None)
        if not video_sizes or self.video_token is None or expand is None:
            return None
        self.video_counts(video_sizes)  # a video too small for the budget is a bad sample, named
        texts = [expand(tuple(size), self.video_token) for size in video_sizes]
        return None if any(t is None for t in texts) else texts

    def _tokenize_whole(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [T], offsets [T, 2])`` of the whole text, no special tokens added."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        return ids, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)

    def _tokenize_chunks(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [T], offsets [T, 2])`` the way LLaVA's ``tokenizer_image_token`` builds ids.

        Each chunk between placeholders is tokenised with the tokenizer's special tokens, as a
        text of its own; when the tokenizer puts BOS first, every chunk's first token (its BOS) is
        dropped and one BOS leads. A tokenizer that adds no BOS but has one gets it prepended, so
        every ``plain``/``vicuna_v1`` sequence starts with BOS. Offsets are into ``text``.
        """
        tok = self.tokenizer
        image_id, bos = self.image_token_id, tok.bos_token_id
        chunks = text.split(self.image_token)
        encoded = [self._tokenize_as_text_start(c) for c in chunks]
        first = encoded[0]["input_ids"]
        drop = 1 if (bos is not None and first and first[0] == bos) else 0
        ids: list[int] = [bos] if bos is not None else []
        offsets: list[tuple[int, int]] = [(0, 0)] if bos is not None else []
        start = 0
        for c, (chunk, enc) in enumerate(zip(chunks, encoded)):
            if c > 0:
                ids.append(image_id)
                offsets.append((start - len(self.image_token), start))
            ids.extend(enc["input_ids"][drop:])
            offsets.extend((start + a, start + b) for a, b in enc["offset_mapping"][drop:])
            start += len(chunk) + len(self.image_token)
        return np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)

    def _tokenize_as_text_start(self, chunk: str) -> dict:
        """``{"input_ids", "offset_mapping"}`` of ``chunk`` tokenised as a text of its own.

        SentencePiece (what LLaVA's slow Llama tokenizer runs) puts its ``▁`` dummy prefix before
        every text, also one that starts with a space (`` ASSISTANT`` -> ``▁`` ``▁ASSISTANT``);
        the tokenizers-backed Llama tokenizer leaves it out there (``▁ASSISTANT``). For such a
        tokenizer a chunk that starts with a space is tokenised with one more space in front,
        which gives SentencePiece's pieces; that extra ``▁`` is given the chunk's first character.
        """
        tok = self.tokenizer
        if not (chunk.startswith(" ") and self._space_needs_prefix):
            return tok(chunk, add_special_tokens=True, return_offsets_mapping=True)
        enc = tok(" " + chunk, add_special_tokens=True, return_offsets_mapping=True)
        offsets = []
        for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if a == b == 0 and tid in tok.all_special_ids:
                offsets.append((0, 0))
            else:
                a, b = max(a - 1, 0), max(b - 1, 0)
                offsets.append((a, max(b, a + 1)))
        return {"input_ids": enc["input_ids"], "offset_mapping": offsets}

    def _truncate(self, ids, labels, image_id: int, n_images: int) -> tuple[list[int], list[int]]:
        limit = self.model_max_length
        if len(ids) > limit:
            media = ids == image_id
            if self.video_token is not None:
                media |= ids == self.tokenizer.convert_tokens_to_ids(self.video_token)
            image_positions = np.flatnonzero(media)
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


def _expand_videos(pieces: list, video_token: str, texts: list[str]) -> list:
    """``pieces`` with the ``k``-th ``video_token`` (in order, across pieces) replaced by ``texts[k]``."""
    out, k = [], 0
    for text, is_reply in pieces:
        parts = text.split(video_token)
        joined = parts[0]
        for part in parts[1:]:
            joined += texts[k] + part
            k += 1
        out.append((joined, is_reply))
    return out


def _counted(count, size: tuple, what: str) -> int:
    """``count(size)``, a budget that does not fit the image (``ValueError``) as a bad sample."""
    try:
        return int(count(size))
    except ValueError as err:
        raise SampleError("too_small", f"{what}: {' '.join(str(err).split())}") from None


def _drops_dummy_prefix_before_space(tokenizer) -> bool:
    """True for a Metaspace (SentencePiece-style) tokenizer that marks a text's start with ``▁`` but
    not when the text already starts with a space: ``"a"`` -> ``▁a`` and ``" a"`` -> ``▁a``."""
    plain = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
    spaced = tokenizer.convert_ids_to_tokens(tokenizer(" a", add_special_tokens=False)["input_ids"])
    return bool(plain) and plain[0].startswith("\u2581") and spaced == plain

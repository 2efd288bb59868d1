"""Conversation templates: a conversation becomes text pieces, each marked as trained on or not.

A template returns ``pieces``, a list of ``(text, is_reply)``; the concatenated text still holds
the ``<image>`` placeholders, which :mod:`encode` expands. Loss goes only on ``is_reply`` pieces: every token of an assistant reply,
whitespace included, and the end-of-turn token after it. The texts are LLaVA-1.5's
(``llava/conversation.py``), character for character:

- ``plain`` (stage 1, ``conv_llava_plain``): ``<image>`` + caption + ``"\\n"``; the user's words
  are dropped and nothing ends the caption but the separator ``"\\n"``, as LLaVA's pretraining
  does; loss on caption + ``"\\n"``. ``plain_end="eos"`` ends it with the eos token instead.
- ``vicuna_v1`` (LLaVA-1.5 stage 2, ``conv_vicuna_v1``):
  ``{system} USER: {q} ASSISTANT: {a}</s>USER: ...``; loss on `` {a}</s>``.
- ``chat_template``: the tokenizer's own template; reply spans are found by rendering the
  conversation prefix by prefix (works for any template that renders prefixes stably). Images and
  videos are rendered the way the template renders them (Qwen2.5-VL's wraps each placeholder in
  ``<|vision_start|>...<|vision_end|>``), as the processor's ``apply_chat_template`` does at inference.
"""

from __future__ import annotations

import re

from visionzip_core.data.settings import VICUNA_V1_SYSTEM
from visionzip_core.data.validation import SampleError

Pieces = list[tuple[str, bool]]


def place_images_first(turns, image_token: str):
    """LLaVA's ``preprocess_multimodal``: a turn holding placeholders becomes ``<image>\\n`` + the
    rest of its text, stripped (one placeholder per image the turn holds, all at its start).

    ``turns``: ``((role, text), ...)``; returns the same shape. Turns without a placeholder are
    kept as they are (LLaVA does not strip them).
    """
    out = []
    for role, text in turns:
        n = text.count(image_token)
        if n:
            text = (image_token * n + "\n" + text.replace(image_token, "").strip()).strip()
        out.append((role, text))
    return tuple(out)


def render(
    template: str,
    turns,
    tokenizer,
    image_token: str,
    system_prompt: str | None,
    plain_end: str = "newline",
    video_token: str | None = None,
) -> Pieces:
    if template == "plain":
        return render_plain(turns, tokenizer, image_token, plain_end)
    if template == "vicuna_v1":
        return render_vicuna_v1(turns, tokenizer, system_prompt)
    if template == "chat_template":
        return ChatTemplateRenderer.for_tokenizer(tokenizer).render(
            turns, image_token, system_prompt, video_token
        )
    raise ValueError(f"data.template: unknown template {template!r}")


def render_plain(turns, tokenizer, image_token: str, plain_end: str = "newline") -> Pieces:
    user = next(text for role, text in turns if role == "user")
    reply = next(text for role, text in turns if role == "assistant")
    end = "\n" if plain_end == "newline" else tokenizer.eos_token
    return [(image_token * user.count(image_token), False), (reply + end, True)]


def render_vicuna_v1(turns, tokenizer, system_prompt: str | None) -> Pieces:
    system = system_prompt if system_prompt is not None else VICUNA_V1_SYSTEM
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    pieces: Pieces = []
    prompt = system + " "
    for role, text in turns:
        if role == "user":
            prompt += f"USER: {text} ASSISTANT:"
        else:
            pieces.append((prompt, False))
            pieces.append((f" {text}{tokenizer.eos_token}", True))
            prompt = ""
    return pieces


class ChatTemplateRenderer:
    """Renders with ``tokenizer.apply_chat_template`` and locates assistant replies by prefix rendering.

    Message content is passed as a plain string with placeholders when the template renders that
    faithfully; templates that expect HF content parts (``[{"type": "image"}, {"type": "text"}]``,
    e.g. llava-hf's) get parts instead, and so do templates that render a media part as more than
    the bare placeholder (Qwen2.5-VL's ``<|vision_start|><|image_pad|><|vision_end|>``): a string
    placeholder would render without the markers the model was trained with. The choice is made
    once per tokenizer.
    """

    _cache: dict[int, ChatTemplateRenderer] = {}

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "data.template is 'chat_template' but the tokenizer has no chat template; "
                "use template: vicuna_v1 or plain, or give the tokenizer a chat_template"
            )
        self.tokenizer = tokenizer
        self.use_parts: bool | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer) -> ChatTemplateRenderer:
        key = id(tokenizer)
        if key not in cls._cache or cls._cache[key].tokenizer is not tokenizer:
            cls._cache[key] = cls(tokenizer)
        return cls._cache[key]

    def _messages(self, turns, image_token: str, parts: bool, video_token: str | None = None) -> list[dict]:
        msgs = []
        split = re.compile("(" + "|".join(re.escape(t) for t in (image_token, video_token) if t) + ")")
        for role, text in turns:
            if not parts:
                msgs.append({"role": role, "content": text})
                continue
            content = []
            for chunk in split.split(text):
                if chunk == image_token:
                    content.append({"type": "image"})
                elif video_token and chunk == video_token:
                    content.append({"type": "video"})
                elif chunk:
                    content.append({"type": "text", "text": chunk})
            msgs.append({"role": role, "content": content})
        return msgs

    def _apply(self, msgs, generation_prompt: bool) -> str:
        if not msgs:
            return ""
        return self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _faithful(self, turns, image_token: str, parts: bool) -> bool:
        text = self._apply(self._messages(turns, image_token, parts), False)
        n_images = sum(t.count(image_token) for _, t in turns)
        words = [w for _, t in turns for w in t.replace(image_token, " ").split()]
        return text.count(image_token) >= n_images and all(w in text for w in words) and "'type'" not in text

    def _wraps_media(self, image_token: str) -> bool:
        """Whether an image part renders as more than the bare placeholder (a string would not)."""
        probe = [("user", image_token + "x")]
        return self._faithful(probe, image_token, parts=True) and self._apply(
            self._messages(probe, image_token, True), False
        ) != self._apply(self._messages(probe, image_token, False), False)

    def render(
        self, turns, image_token: str, system_prompt: str | None, video_token: str | None = None
    ) -> Pieces:
        turns = list(turns)
        if system_prompt is not None and turns[0][0] != "system":
            turns.insert(0, ("system", system_prompt))
        if self.use_parts is None:
            if self._wraps_media(image_token):
                self.use_parts = True
            elif self._faithful(turns, image_token, parts=False):
                self.use_parts = False
            elif self._faithful(turns, image_token, parts=True):
                self.use_parts = True
            else:
                raise ValueError(
                    "data.template: the tokenizer's chat template drops message text or images "
                    "(tried string content and content parts)"
                )
        msgs = self._messages(turns, image_token, self.use_parts, video_token)
        pieces: Pieces = []
        done = ""
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before = self._apply(msgs[:i], True)
            upto = self._apply(msgs[: i + 1], False)
            if not before.startswith(done) or not upto.startswith(before):
                raise SampleError(
                    "bad_structure",
                    "the chat template does not render this conversation prefix by prefix, so the "
                    "assistant replies cannot be located",
                )
            pieces.append((before[len(done) :], False))
            pieces.append((upto[len(before) :], True))
            done = upto
        full = self._apply(msgs, False)
        if len(full) > len(done):
            pieces.append((full[len(done) :], False))
        return pieces


def tokenizer_of(processor):
    """The processor's tokenizer, carrying the processor's chat template when it has none itself.

    Qwen2.5-VL downloads keep the template in ``chat_template.json``, which transformers loads onto
    the processor, not the tokenizer; the ``chat_template`` data template renders with the
    tokenizer's. Sets the attribute on this tokenizer instance only."""
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None)
    if tokenizer is not processor and not getattr(tokenizer, "chat_template", None) and template:
        tokenizer.chat_template = template
    return tokenizer

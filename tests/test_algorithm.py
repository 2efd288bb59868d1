"""VisionZip selection and merging: parity with an eager-attention reference of the paper's rule.

The reference below follows the structure of the paper's code: eager attention with
``output_attentions``, the feature layer's keys from a hook on ``k_proj``, ``masked_select`` for
the dominant and remaining tokens, ``torch.isin`` for the non-target tokens. The library path
(SDPA tower, hooks at the feature layer, gather/one-hot) must give the same features.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from visionzip_core import VisionZipConfig, visionzip
from visionzip_core.algorithm import (
    merge_contextual_tokens,
    remaining_token_indices,
    select_dominant_tokens,
    visionzip_compress,
)

NUM_TOKENS = 65  # tiny tower: 8x8 patches + CLS


def reference_compress(hidden, attentions, metric, dominant, contextual, keep_cls, merge):
    """The paper's rule written as its reference code does, from eager attention maps.

    hidden (B,N,C) feature layer; attentions (B,H,N,N) that layer's maps; metric (B,N,Ck) head-mean keys.
    """
    batch, num_tokens, channels = hidden.shape
    cls_attention = attentions[:, :, 0, 1:].sum(dim=1)
    if keep_cls:
        topk = cls_attention.topk(dominant - 1, dim=1).indices + 1
        all_indices = torch.cat([torch.zeros(batch, 1, dtype=torch.long), topk], dim=1)
    else:
        all_indices = cls_attention.topk(dominant, dim=1).indices + 1
    keep = torch.zeros(batch, num_tokens, dtype=torch.bool).scatter_(1, all_indices, True)
    dominant_tokens = hidden.masked_select(keep.unsqueeze(-1)).view(batch, dominant, channels)
    rest = ~keep
    if not keep_cls:
        rest[:, 0] = False
    remaining = int(rest[0].sum())
    metric_filtered = metric[rest].view(batch, remaining, metric.shape[2])
    hidden_filtered = hidden.masked_select(rest.unsqueeze(-1)).view(batch, remaining, channels)
    if contextual == 0:
        return dominant_tokens
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, remaining // contextual)
    target_indices = torch.arange(0, remaining, step)[:contextual]
    target_tokens = metric_normalized[:, target_indices, :]
    non_target = ~torch.isin(torch.arange(remaining), target_indices)
    tokens_to_merge = metric_normalized[:, non_target, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(batch, tokens_to_merge.shape[1], contextual, dtype=hidden.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).unsqueeze(-1)
    hidden_to_merge = hidden_filtered[:, non_target, :]
    aggregated = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge)
    target_hidden = hidden_filtered[:, target_indices, :]
    if merge == "paper":
        contextual_tokens = target_hidden + aggregated / counts.clamp(min=1)
    else:
        contextual_tokens = (target_hidden + aggregated) / (counts + 1)
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)


def reference_image_features(eager_model, pixel_values, config: VisionZipConfig):
    """Projected features per the paper's rule, from an eager-attention LLaVA (HF stock code only)."""
    tower = eager_model.model.vision_tower
    num_layers = len(tower.encoder.layers)
    fl = config.feature_layer
    hs_index = fl if fl >= 0 else num_layers + 1 + fl  # hidden_states[i] is layer i-1's output
    attn_layer = tower.encoder.layers[hs_index - 1]
    metric = {}

    def grab_keys(_module, _inputs, output):
        b, n, _ = output.shape
        metric["k"] = output.view(b, n, attn_layer.self_attn.num_heads, -1).transpose(1, 2).mean(1)

    handle = attn_layer.self_attn.k_proj.register_forward_hook(grab_keys)
    try:
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        handle.remove()
    assert out.attentions is not None and len(out.attentions) == num_layers
    compressed = reference_compress(
        out.hidden_states[hs_index],
        out.attentions[hs_index - 1],
        metric["k"],
        config.dominant,
        config.contextual,
        config.keep_cls,
        config.merge,
    )
    return eager_model.model.multi_modal_projector(compressed)


@pytest.fixture(scope="module")
def models(tiny_llava_dir):
    fast = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    eager = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, attn_implementation="eager").eval()
    assert fast.model.vision_tower.config._attn_implementation == "sdpa"
    assert eager.model.vision_tower.config._attn_implementation == "eager"
    return fast, eager


SPLITS = [
    dict(dominant=54, contextual=10),  # the paper's 64-token split scaled to a 65-token tower: R=11
    dict(dominant=20, contextual=7),  # R=45, not divisible by 7 (step 6, targets 0..36)
    dict(dominant=9, contextual=3),
    dict(dominant=12, contextual=0),
    dict(dominant=16, contextual=16, keep_cls=False),  # R=48, CLS dropped entirely
    dict(dominant=20, contextual=7, merge="mean"),
    dict(dominant=5, contextual=30, keep_cls=False, merge="mean"),
    dict(dominant=1, contextual=5),  # CLS alone is dominant
]


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("batch", [1, 3])
def test_full_path_matches_eager_reference(models, split, batch):
    fast, eager = models
    config = VisionZipConfig(**split)
    torch.manual_seed(batch)
    pixel_values = torch.randn(batch, 3, 112, 112)
    with torch.no_grad():
        expected = reference_image_features(eager, pixel_values, config)
        visionzip(fast, config=config)
        got = fast.get_image_features(pixel_values=pixel_values).pooler_output
    assert len(got) == batch
    assert expected.shape == (batch, config.tokens_per_image, fast.config.text_config.hidden_size)
    torch.testing.assert_close(torch.stack(got), expected, atol=1e-5, rtol=1e-5)


def test_per_sample_results_do_not_depend_on_batch(models):
    fast, _ = models
    visionzip(fast, dominant=20, contextual=7)
    torch.manual_seed(0)
    pixel_values = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        batched = fast.get_image_features(pixel_values=pixel_values).pooler_output
        for i in range(4):
            single = fast.get_image_features(pixel_values=pixel_values[i : i + 1]).pooler_output[0]
            torch.testing.assert_close(batched[i], single, atol=1e-5, rtol=1e-5)


def _random_inputs(batch=3, num_tokens=NUM_TOKENS, channels=24, key_dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, num_tokens, channels, generator=gen).to(dtype)
    cls_attention = torch.rand(batch, num_tokens, generator=gen)
    keys = torch.randn(batch, num_tokens, key_dim, generator=gen).to(dtype)
    return hidden, cls_attention, keys


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_compress_matches_reference_on_random_tensors(split):
    config = VisionZipConfig(**split)
    hidden, cls_attention, keys = _random_inputs()
    # The reference reads a (B, H, N, N) map; put the scores in the CLS row of one head.
    attentions = torch.zeros(hidden.shape[0], 2, NUM_TOKENS, NUM_TOKENS)
    attentions[:, 0, 0] = cls_attention
    expected = reference_compress(
        hidden, attentions, keys, config.dominant, config.contextual, config.keep_cls, config.merge
    )
    got = visionzip_compress(hidden, cls_attention, keys, config)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_selection_order_and_remainder():
    hidden, cls_attention, _ = _random_inputs(batch=2)
    cls_attention[:, 0] = 100.0  # CLS's own score must not matter
    idx = select_dominant_tokens(cls_attention, 6, keep_cls=True)
    assert idx.shape == (2, 6) and (idx[:, 0] == 0).all()
    assert (idx.diff(dim=1) > 0).all()
    expected = cls_attention[:, 1:].topk(5).indices.sort().values + 1
    assert torch.equal(idx[:, 1:], expected)

    no_cls = select_dominant_tokens(cls_attention, 6, keep_cls=False)
    assert (no_cls > 0).all() and (no_cls.diff(dim=1) > 0).all()
    rest = remaining_token_indices(no_cls, NUM_TOKENS, keep_cls=False)
    assert rest.shape == (2, NUM_TOKENS - 7) and (rest > 0).all() and (rest.diff(dim=1) > 0).all()
    union = torch.cat([no_cls, rest], dim=1).sort(dim=1).values
    assert torch.equal(union, torch.arange(1, NUM_TOKENS).expand(2, -1))


def test_contextual_zero_is_empty():
    hidden, _, keys = _random_inputs()
    out = merge_contextual_tokens(hidden, keys, 0)
    assert out.shape == (3, 0, hidden.shape[-1]) and out.dtype == hidden.dtype


def test_merge_rules_on_a_hand_checked_case():
    # R=4, K=2: step 2, targets at 0 and 2. Token 1 goes to target 0, token 3 to target 2.
    keys = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    hidden = torch.tensor([[[1.0], [3.0], [10.0], [20.0]]])
    paper = merge_contextual_tokens(hidden, keys, 2, "paper")
    mean = merge_contextual_tokens(hidden, keys, 2, "mean")
    assert paper.flatten().tolist() == [4.0, 30.0]
    assert mean.flatten().tolist() == [2.0, 15.0]
    # A target with nothing assigned is just its hidden state.
    lonely = merge_contextual_tokens(hidden[:, :2], keys[:, :2], 2)
    assert lonely.flatten().tolist() == [1.0, 3.0]


def test_bf16_in_bf16_out():
    hidden, cls_attention, keys = _random_inputs(dtype=torch.bfloat16)
    config = VisionZipConfig(dominant=20, contextual=7)
    out = visionzip_compress(hidden, cls_attention.bfloat16(), keys, config)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 27, hidden.shape[-1])
    ref = visionzip_compress(hidden.float(), cls_attention.bfloat16().float(), keys.float(), config)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.02)


def test_gradients_flow_to_hidden():
    hidden, cls_attention, keys = _random_inputs()
    hidden.requires_grad_(True)
    config = VisionZipConfig(dominant=20, contextual=7)
    out = visionzip_compress(hidden, cls_attention, keys, config)
    out.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    # Each dominant token is copied once; with the paper rule each target also counts once.
    dominant_idx = select_dominant_tokens(cls_attention, 20)
    picked = hidden.grad.gather(1, dominant_idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    assert torch.equal(picked, torch.ones_like(picked))
    # Every token contributes: D dominant + K targets (1 each) + merged tokens (1/count each, so
    # 1 per target that received any).
    per_token = hidden.grad[..., 0]
    assert (per_token > 0).all()
    totals = per_token.sum(dim=1)
    assert ((totals > 27) & (totals <= 34)).all()
    torch.testing.assert_close(totals, totals.round())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dominant=0, contextual=10), "dominant"),
        (dict(dominant=54, contextual=-1), "contextual"),
        (dict(dominant=54, contextual=10, merge="avg"), "merge"),
        (dict(dominant=54, contextual=10, dominnt=3), "dominnt"),
    ],
)
def test_bad_settings_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VisionZipConfig(**kwargs)


def test_split_larger_than_tower_rejected(models):
    fast, _ = models
    with pytest.raises(ValueError, match="dominant \\+ contextual"):
        visionzip(fast, dominant=60, contextual=10)
    with pytest.raises(ValueError, match="dominant \\+ contextual"):
        visionzip(fast, dominant=60, contextual=5, keep_cls=False)
    with pytest.raises(ValueError, match="feature_layer"):
        visionzip(fast, dominant=9, contextual=3, feature_layer=7)
    with pytest.raises(ValueError, match="feature_layer"):
        visionzip(fast, dominant=9, contextual=3, feature_layer=-1)  # projector was trained on -2
    hidden, cls_attention, keys = _random_inputs()
    with pytest.raises(ValueError, match="dominant \\+ contextual"):
        visionzip_compress(hidden, cls_attention, keys, VisionZipConfig(dominant=60, contextual=10))

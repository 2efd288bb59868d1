"""Hook capture at the feature layer == eager attention, with SDPA kept and later layers skipped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import CLIPVisionModel

from visionzip_core.algorithm import select_visionzip_tokens, token_groups
from visionzip_core.capture import capture_feature_layer, resolve_feature_layer
from visionzip_core.config import VisionZipConfig
from visionzip_core.families.llava import tiny_vision_config

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    CLIPVisionModel(tiny_vision_config(num_layers=NUM_LAYERS)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def towers(tower_dir):
    sdpa = CLIPVisionModel.from_pretrained(tower_dir).eval()
    eager = CLIPVisionModel.from_pretrained(tower_dir, attn_implementation="eager").eval()
    return sdpa, eager


def eager_reference(tower, pixel_values, feature_layer):
    """Hidden states, CLS attention (summed over heads) and head-mean keys from stock eager outputs."""
    index = resolve_feature_layer(feature_layer, NUM_LAYERS)
    attn = tower.encoder.layers[index - 1].self_attn
    keys = {}

    def hook(_module, _inputs, output):
        b, n, _ = output.shape
        keys["k"] = output.view(b, n, attn.num_heads, attn.head_dim).mean(2)

    handle = attn.k_proj.register_forward_hook(hook)
    try:
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        handle.remove()
    return out.hidden_states[feature_layer], out.attentions[index - 1][:, :, 0, :].sum(1), keys["k"]


class CountSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("feature_layer", [-2, -1, 1, 3, -4])
@pytest.mark.parametrize("batch", [1, 2])
def test_capture_matches_eager_attention(towers, feature_layer, batch):
    sdpa, eager = towers
    torch.manual_seed(feature_layer + 10 * batch)
    pixel_values = torch.randn(batch, 3, 112, 112)
    with torch.no_grad():
        hidden, cls_attention, keys = eager_reference(eager, pixel_values, feature_layer)
        got = capture_feature_layer(sdpa, pixel_values, feature_layer)
    assert got.cls_attention.shape == (batch, 65) and got.keys.shape == (batch, 65, 8)
    torch.testing.assert_close(got.hidden, hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.cls_attention, cls_attention, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.keys, keys, atol=1e-6, rtol=1e-6)
    # Softmax rows sum to one per head.
    torch.testing.assert_close(got.cls_attention.sum(1), torch.full((batch,), 4.0))


def test_sdpa_kept_and_later_layers_not_run(towers):
    sdpa, _ = towers
    calls = [0] * NUM_LAYERS
    handles = [
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(sdpa.encoder.layers)
    ]
    post = []
    handles.append(sdpa.post_layernorm.register_forward_pre_hook(lambda *_: post.append(1)))
    try:
        with CountSDPA() as mode, torch.no_grad():
            capture_feature_layer(sdpa, torch.randn(1, 3, 112, 112), -2)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [1, 1, 1, 0] and not post
    assert mode.calls == 3  # every layer that ran used the SDPA kernel
    assert sdpa.config._attn_implementation == "sdpa"
    # The hooks are scoped to the call.
    for layer in sdpa.encoder.layers:
        assert not layer.self_attn.q_proj._forward_hooks and not layer.self_attn.k_proj._forward_hooks


def test_gradient_checkpointing_gives_same_grads(tower_dir):
    grads = []
    for checkpointing in (False, True):
        tower = CLIPVisionModel.from_pretrained(tower_dir).train()
        if checkpointing:
            tower.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in tower.encoder.layers)
        torch.manual_seed(0)
        out = capture_feature_layer(tower, torch.randn(2, 3, 112, 112), -2)
        (out.hidden**2).sum().backward()
        grads.append({n: p.grad for n, p in tower.named_parameters()})
    plain, ckpt = grads
    assert plain["encoder.layers.2.self_attn.q_proj.weight"] is not None
    assert plain["encoder.layers.3.self_attn.q_proj.weight"] is None  # after the feature layer
    for name, grad in plain.items():
        if grad is None:
            assert ckpt[name] is None, name
        else:
            torch.testing.assert_close(ckpt[name], grad, atol=1e-5, rtol=1e-5)


def test_bad_feature_layers_rejected(towers):
    sdpa, _ = towers
    pixel_values = torch.randn(1, 3, 112, 112)
    for bad in (0, NUM_LAYERS + 1, -(NUM_LAYERS + 1), [-2, -1]):
        with pytest.raises(ValueError, match="feature_layer"):
            capture_feature_layer(sdpa, pixel_values, bad)


def test_bf16_tower_selects_as_fp32_selection_of_the_same_values(tower_dir):
    """Selection runs in float32 whatever the tower's dtype: a bf16 tower's scores and keys, ranked
    and cosine-matched in bf16, tie and drift (the contextual assignment then differs from the
    float32 computation on the very same bf16 values)."""
    tower = CLIPVisionModel.from_pretrained(tower_dir, dtype=torch.bfloat16).eval()
    torch.manual_seed(1)
    pixel_values = torch.randn(8, 3, 112, 112)
    with torch.no_grad():
        captured = capture_feature_layer(tower, pixel_values, -2)
    config = VisionZipConfig(dominant=6, contextual=8)
    tokens = captured.cls_attention.shape[1]
    assert captured.keys.dtype == torch.float32 and captured.cls_attention.dtype == torch.float32
    # The tower's own bf16 values, as a bf16 pipeline holds them.
    keys_bf16 = captured.keys.bfloat16()
    chosen = select_visionzip_tokens(captured.cls_attention, keys_bf16, config)
    exact = select_visionzip_tokens(captured.cls_attention, keys_bf16.float(), config)
    assert torch.equal(chosen.dominant, exact.dominant)
    assert torch.equal(token_groups(chosen, tokens), token_groups(exact, tokens))

"""CUDA checks: the compressed path is device-agnostic and keeps its dtype on a GPU.

pytest -m gpu            # skipped automatically without a CUDA device (see conftest.py)
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from visionzip_core import visionzip
from visionzip_core.capture import capture_feature_layer

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    # TF32 would make CUDA fp32 differ from the CPU by ~1e-3; the comparison is about our code.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pixels(batch=3):
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0))


def test_compressed_features_on_cuda_match_cpu(tiny_llava_dir):
    model = visionzip(
        LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval(), dominant=9, contextual=3
    )
    pixel_values = _pixels()
    with torch.no_grad():
        cpu = torch.stack(model.get_image_features(pixel_values=pixel_values).pooler_output)
        model.cuda()
        gpu = torch.stack(model.get_image_features(pixel_values=pixel_values.cuda()).pooler_output)
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape == (3, 12, 64)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_bf16_capture_on_cuda_matches_eager_attention(tiny_llava_dir):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.bfloat16).cuda().eval()
    tower = model.model.vision_tower
    pixel_values = _pixels().cuda().to(torch.bfloat16)
    with torch.no_grad():
        captured = capture_feature_layer(tower, pixel_values, feature_layer=-2)
        tower.set_attn_implementation("eager")
        eager = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    assert captured.hidden.dtype == torch.bfloat16
    torch.testing.assert_close(captured.hidden, eager.hidden_states[-2], rtol=2e-2, atol=2e-2)
    cls_row = eager.attentions[-2][:, :, 0].float().sum(dim=1)
    torch.testing.assert_close(captured.cls_attention, cls_row, rtol=2e-2, atol=2e-2)

"""Folders laid out like real downloads (not like transformers 5.x saves them)."""

import pytest


@pytest.fixture(scope="module")
def full_clip_folder(tmp_path_factory):
    """A whole ``CLIPModel`` (text + vision, ``model_type: clip``, ``pytorch_model.bin``), as
    openai/clip-vit-large-patch14-336 ships, with its CLIP image processor."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from visionzip_core.tiny import build_image_processor, tiny_vision_config

    out = tmp_path_factory.mktemp("clip-full")
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 99,
            "max_position_embeddings": 16,
        },
        vision_config=tiny_vision_config().to_dict(),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    config.save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    build_image_processor(config.vision_config.image_size).save_pretrained(out)
    return out


def test_processor_from_full_clip_folder(full_clip_folder, tmp_path):
    """The patch size comes from the vision sub-config of a full CLIP folder."""
    from transformers import AutoConfig

    from visionzip_core.tiny import write_sentencepiece_tokenizer
    from visionzip_core.training.modeling import assemble_processor

    assert AutoConfig.from_pretrained(full_clip_folder).model_type == "clip"
    llm = write_sentencepiece_tokenizer(tmp_path / "llm")
    processor = assemble_processor(str(full_clip_folder), str(llm), trust_remote_code=False)
    assert processor.patch_size == 14

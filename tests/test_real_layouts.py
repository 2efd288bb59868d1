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


@pytest.fixture(scope="module")
def sharded_bin_llama_folder(tmp_path_factory):
    """A Llama as lmsys/vicuna-7b-v1.5 ships: two ``pytorch_model-0000N-of-00002.bin`` shards with
    ``pytorch_model.bin.index.json``, and a SentencePiece ``tokenizer.model`` (no tokenizer.json)."""
    import json

    import torch
    from transformers import LlamaForCausalLM

    from visionzip_core.tiny import tiny_text_config, write_sentencepiece_tokenizer

    out = tmp_path_factory.mktemp("vicuna-layout")
    write_sentencepiece_tokenizer(out, legacy=False)
    config = tiny_text_config(1000)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    torch.manual_seed(0)
    state = LlamaForCausalLM(config).state_dict()
    config.save_pretrained(out)
    names = list(state)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: state[k].contiguous() for k in shard}, out / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return out


@pytest.mark.slow
def test_pretrain_from_full_clip_bin_and_sharded_bin_llama(
    full_clip_folder, sharded_bin_llama_folder, tmp_path
):
    """Stage 1 through the real entry point on folders laid out like the LLaVA-1.5 downloads."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file
    from test_train_e2e import _base, train

    out = tmp_path / "run"
    overrides = _base(Path("unused"), out)[1:] + [
        "train.mode=pretrain",
        "model.name_or_path=null",
        f"model.vision_tower={full_clip_folder}",
        f"model.language_model={sharded_bin_llama_folder}",
        "data.template=plain",
        "data.train=[{path: data/demo/pretrain_train.json, image_folder: data/demo/images}]",
        "data.val=[]",
    ]
    train(overrides)
    new = load_file(str(out / "final/model.safetensors"))
    clip = torch.load(full_clip_folder / "pytorch_model.bin", weights_only=True)
    vision = {n: v for n, v in new.items() if "vision_tower" in n and "layers.0.self_attn.q_proj.weight" in n}
    assert len(vision) == 1, sorted(vision)
    k = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(
        clip[k], next(iter(vision.values())).to(clip[k].dtype)
    )  # CLIP's vision weights, untouched
    assert not any("text_model" in n or "text_projection" in n for n in new)  # the text tower is left out

    # Stage 2 starts from the stage-1 export.
    stage2 = tmp_path / "stage2"
    train(_base(out / "final", stage2) + ["train.mode=finetune"])
    assert (stage2 / "final/model.safetensors").is_file()


class _OpensAFile:
    """Unpickling this creates a file: a stand-in for code hidden in a ``.bin``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bin_weights_load_without_running_pickled_code(full_clip_folder, tmp_path):
    """``.bin`` weights are read with ``weights_only``: a pickle that calls a function is refused."""
    import pickle
    import shutil

    import torch
    from transformers import CLIPVisionModel

    folder = tmp_path / "clip"
    shutil.copytree(full_clip_folder, folder)
    marker = tmp_path / "ran"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["extra"] = _OpensAFile(marker)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(
        pickle.UnpicklingError, match="[Ww]eights only load failed|weights_only|Unsupported global"
    ):
        CLIPVisionModel.from_pretrained(folder)
    assert not marker.exists()

"""build_dataset: formats, preflight and the bad-sample policy, mixing, lazy decode failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from visionzip_core.data import BadDataError, DataCollator, DataSettings, build_dataset
from visionzip_core.families.llava import clip_image_processor
from visionzip_core.testing.tokenizers import build_tiny_tokenizer

K = 6


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def proc():
    return clip_image_processor(112)


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (120 + 10 * i, 100), colour).save(images / f"ok{i}.png")
    (images / "empty.png").write_bytes(b"")
    (images / "corrupt.png").write_bytes(b"this is not an image at all")
    # a valid PNG header whose pixel data is cut off: passes the header check, fails to decode
    Image.new("RGB", (150, 150), "red").save(images / "truncated.png")
    data = (images / "truncated.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    return tmp_path


def llava(i, image="ok0.png", q="<image>\nWhat colour?", a="red."):
    row = {"id": f"s{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        row["image"] = image
    return row


def write(folder, name, rows, jsonl=False):
    path = folder / name
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def settings(folder, path, **kw):
    kw.setdefault("cache_dir", str(folder / "cache"))
    train = [{"path": str(path), "image_folder": str(folder / "images")}]
    return DataSettings(train=kw.pop("train", train), **kw)


def good_rows(n):
    return [llava(i, image=f"ok{i % 4}.png") for i in range(n)]


# (kind, bad row) for every bad-sample kind that a single row can have
BAD_ROWS = {
    "missing_image": llava(100, image="nope.png"),
    "unreadable_image": llava(100, image="corrupt.png"),
    "empty_image": llava(100, image="empty.png"),
    "placeholder_mismatch": llava(100, q="What colour?"),
    "empty_conversation": {"id": "s100", "image": "ok0.png", "conversations": []},
    # (an opening gpt turn is not bad: it is dropped, as LLaVA does; two user turns in a row are)
    "bad_roles": {
        "id": "s100",
        "image": "ok0.png",
        "conversations": [
            {"from": "human", "value": "<image>\nhi"},
            {"from": "human", "value": "again"},
            {"from": "gpt", "value": "yo"},
        ],
    },
    "unknown_role": {
        "id": "s100",
        "image": "ok0.png",
        "conversations": [{"from": "robot", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}],
    },
    "non_string_content": {
        "id": "s100",
        "image": "ok0.png",
        "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": 42}],
    },
    # the image sits past model_max_length: cutting the text would cut the image run (LLaVA moves
    # a placeholder to the start of its own turn, so it is put in a late turn)
    "too_long": {
        "id": "s100",
        "image": "ok0.png",
        "conversations": [
            {"from": "human", "value": "what is the colour " * 40},
            {"from": "gpt", "value": "red."},
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": "red."},
        ],
    },
}
REASONS = {
    "missing_image": "image file not found",
    "unreadable_image": "image cannot be read",
    "empty_image": "image file is empty",
    "placeholder_mismatch": "0 <image> placeholder(s) for 1 image(s)",
    "empty_conversation": "no conversation turns",
    "bad_roles": "turn order",
    "unknown_role": "unknown role 'robot'",
    "non_string_content": "turn 1 content is int",
    "too_long": "model_max_length 128",
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_sample_error_policy_names_file_sample_and_reason(folder, tok, proc, kind):
    rows = good_rows(5)
    rows.insert(3, BAD_ROWS[kind])
    path = write(folder, "train.json", rows)
    with pytest.raises(BadDataError) as err:
        build_dataset(settings(folder, path, model_max_length=128), "train", tok, proc, K)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: sample 3 (id 's100'): ")
    assert REASONS[kind] in msg


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_sample_skip_policy_counts_kind(folder, tok, proc, kind):
    rows = good_rows(9)
    rows.insert(3, BAD_ROWS[kind])
    path = write(folder, "train.json", rows)
    s = settings(folder, path, model_max_length=128, on_bad_sample="skip", max_skip_fraction=0.1)
    ds = build_dataset(s, "train", tok, proc, K)
    assert len(ds) == 9
    assert ds.skip_report["by_kind"] == {kind: 1}
    assert ds.skip_report["skipped"] == 1 and ds.skip_report["total"] == 10
    assert "sample 3" in ds.skip_report["first_example"][kind]
    # above the threshold the run stops, naming the counts
    s = settings(folder, path, model_max_length=128, on_bad_sample="skip", max_skip_fraction=0.05)
    with pytest.raises(BadDataError, match=f"1/10 samples are bad .*{kind}=1"):
        build_dataset(s, "train", tok, proc, K)


def test_many_kinds_counted_together(folder, tok, proc):
    rows = good_rows(20) + list(BAD_ROWS.values())
    path = write(folder, "train.json", rows)
    s = settings(folder, path, model_max_length=128, on_bad_sample="skip", max_skip_fraction=0.5)
    ds = build_dataset(s, "train", tok, proc, K)
    assert len(ds) == 20
    assert ds.skip_report["by_kind"] == {kind: 1 for kind in BAD_ROWS}


def test_opening_assistant_turn_is_dropped_and_counted(folder, tok, proc):
    rows = good_rows(4)
    rows[2]["conversations"].insert(0, {"from": "gpt", "value": "Hello, ask me anything."})
    path = write(folder, "train.json", rows)
    ds = build_dataset(settings(folder, path, model_max_length=128), "train", tok, proc, K)
    assert len(ds) == 4 and ds.skip_report["skipped"] == 0
    assert ds.skip_report["dropped_leading_reply"] == 1
    # the kept sample trains on the rest, exactly as if the opening turn were not there
    plain_rows = good_rows(4)
    ref = build_dataset(
        settings(folder, write(folder, "ref.json", plain_rows), model_max_length=128), "train", tok, proc, K
    )
    assert ref.skip_report["dropped_leading_reply"] == 0
    assert ds[2]["input_ids"].tolist() == ref[2]["input_ids"].tolist()
    assert ds[2]["labels"].tolist() == ref[2]["labels"].tolist()


@pytest.mark.parametrize("jsonl", [False, True])
def test_malformed_json_names_line_and_column(folder, tok, proc, jsonl):
    path = write(folder, "train.jsonl" if jsonl else "train.json", good_rows(3), jsonl=jsonl)
    lines = path.read_text().splitlines()
    if jsonl:
        lines[1] = lines[1][:-3]  # cut the end of the second record
        expected = "line 2, column"
    else:
        lines = json.dumps(good_rows(3), indent=1).splitlines()
        lines[5] = lines[5].replace('"', "", 1)  # `from": "human",`
        expected = "line 6, column"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadDataError, match=f"^{path}: malformed JSON at {expected}") as err:
        build_dataset(settings(folder, path), "train", tok, proc, K)
    assert "\n" not in str(err.value)


def test_items_text_only_and_mixed_batch(folder, tok, proc):
    rows = good_rows(3) + [llava(9, image=None, q="Say yes.", a="yes.")]
    path = write(folder, "train.json", rows)
    ds = build_dataset(settings(folder, path), "train", tok, proc, K)
    image_id = tok.convert_tokens_to_ids("<image>")
    item = ds[0]
    assert item["pixel_values"].shape == (1, 3, 112, 112)
    assert int((item["input_ids"] == image_id).sum()) == K
    assert ds.lengths[0] == len(item["input_ids"]) > 0
    text = ds[3]
    assert "pixel_values" not in text
    assert ds.lengths[3] == -len(text["input_ids"])
    batch = DataCollator(pad_token_id=tok.pad_token_id)([ds[0], ds[3], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 112, 112)
    assert int((batch["input_ids"] == image_id).sum()) == 2 * K


def test_hf_messages_format_with_parts_and_strings(folder, tok, proc):
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red."}]},
            ],
            "images": ["ok0.png"],
        },
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Short answers."}]},
                {"role": "user", "content": [{"type": "text", "text": "Say yes."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "yes."}]},
            ],
            "images": [],
        },
    ]
    path = write(folder, "msgs.jsonl", rows, jsonl=True)
    ds = build_dataset(settings(folder, path), "train", tok, proc, K)
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["pixel_values"].shape[0] == 1
    assert tok.decode([x for x in first["labels"].tolist() if x != -100]) == " red.</s>"
    assert tok.decode(second["input_ids"].tolist()).startswith("<s>Short answers. USER: Say yes.")


def test_mixing_weights(folder, tok, proc):
    a = write(folder, "a.json", good_rows(10))
    b = write(folder, "b.json", [llava(i, image=None, q="Say yes.", a="yes.") for i in range(10)])
    img = str(folder / "images")
    s = settings(
        folder,
        a,
        seed=3,
        train=[{"path": str(a), "image_folder": img, "weight": 2.0}, {"path": str(b), "weight": 0.5}],
    )
    ds = build_dataset(s, "train", tok, proc, K)
    lengths = np.array(ds.lengths)
    assert (lengths > 0).sum() == 20 and (lengths < 0).sum() == 5
    picked = sorted(ds._row_of[ds._source_of == 1].tolist())
    assert len(set(picked)) == 5
    again = build_dataset(s, "train", tok, proc, K)
    assert sorted(again._row_of[again._source_of == 1].tolist()) == picked
    other = build_dataset(s.model_copy(update={"seed": 4}), "train", tok, proc, K)
    assert sorted(other._row_of[other._source_of == 1].tolist()) != picked


def test_decode_failure_after_preflight_error_and_skip(folder, tok, proc):
    rows = good_rows(4) + [llava(7, image="truncated.png")]
    path = write(folder, "train.json", rows)
    ds = build_dataset(settings(folder, path), "train", tok, proc, K)  # header is fine
    with pytest.raises(BadDataError, match=r"sample 4 \(id 's7'\): image failed to decode"):
        ds[4]
    s = settings(folder, path, on_bad_sample="skip", max_skip_fraction=0.3)
    ds = build_dataset(s, "train", tok, proc, K)
    replaced = ds[4]  # replaced by the next sample in order, never a broken tensor
    assert replaced["pixel_values"].shape == (1, 3, 112, 112)
    # check_images: decode catches it up front instead
    s = settings(folder, path, check_images="decode", on_bad_sample="skip", max_skip_fraction=0.3)
    ds = build_dataset(s, "train", tok, proc, K)
    assert len(ds) == 4 and ds.skip_report["by_kind"] == {"unreadable_image": 1}


def test_relative_paths_resolve_against_base_dir_and_missing_files_listed(folder, tok, proc):
    write(folder, "train.json", good_rows(2))
    s = DataSettings(
        train=[
            {"path": "train.json", "image_folder": "images"},
            {"path": "gone.json", "image_folder": "nope"},
        ]
    )
    with pytest.raises(ValueError) as err:
        s.resolve_paths(folder)
    msg = str(err.value)
    assert "data.train[1].path: no such file" in msg and "data.train[1].image_folder" in msg
    assert "train[0]" not in msg
    ok = DataSettings(train=[{"path": "train.json", "image_folder": "images"}], cache_dir=str(folder / "c"))
    ds = build_dataset(ok, "train", tok, proc, K, base_dir=folder)
    assert len(ds) == 2


def test_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="templat"):
        DataSettings(train=[{"path": "x.json"}], templat="plain")
    with pytest.raises(ValueError, match="weight"):
        DataSettings(train=[{"path": "x.json", "weight": 0}])


def test_cached_preflight_is_not_reused_after_an_image_is_deleted(folder, tok, proc, caplog):
    path = write(folder, "train.json", good_rows(8))
    s = settings(folder, path)
    assert len(build_dataset(s, "train", tok, proc, K)) == 8
    with caplog.at_level("WARNING"):
        assert len(build_dataset(s, "train", tok, proc, K)) == 8  # cached, nothing changed
    assert "checking again" not in caplog.text
    (folder / "images" / "ok2.png").unlink()
    with pytest.raises(BadDataError, match=r"sample 2 \(id 's2'\): image file not found: .*ok2\.png"):
        build_dataset(s, "train", tok, proc, K)
    # skip: the rows of that image are dropped; restored, they are back
    skip = settings(folder, path, on_bad_sample="skip", max_skip_fraction=0.5)
    assert len(build_dataset(skip, "train", tok, proc, K)) == 6
    Image.new("RGB", (50, 50), "white").save(folder / "images" / "ok2.png")
    assert len(build_dataset(skip, "train", tok, proc, K)) == 8


def test_an_image_replaced_in_place_is_checked_again(folder, tok, proc):
    path = write(folder, "train.json", good_rows(4))
    s = settings(folder, path)
    assert len(build_dataset(s, "train", tok, proc, K)) == 4
    (folder / "images" / "ok1.png").write_bytes(b"not an image any more")
    with pytest.raises(BadDataError, match=r"sample 1 \(id 's1'\): image cannot be read"):
        build_dataset(s, "train", tok, proc, K)


def _epochs(ds, epochs: int, workers: int) -> int:
    import torch

    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=lambda b: len(b))
    return sum(n for _ in range(epochs) for n in loader)


def test_skip_limit_counts_distinct_samples_across_epochs_and_workers(folder, tok, proc):
    images = folder / "images"
    for i in range(20):
        Image.new("RGB", (40, 40), "red").save(images / f"n{i}.png")
    path = write(folder, "train.json", [llava(i, image=f"n{i}.png") for i in range(20)])
    s = settings(folder, path, on_bad_sample="skip", max_skip_fraction=0.1)  # at most 2 of 20
    ds = build_dataset(s, "train", tok, proc, K)
    for i in (5, 13):  # gone after the preflight: they fail while loading, every epoch
        (images / f"n{i}.png").unlink()
    assert _epochs(ds, epochs=3, workers=2) == 60  # replaced by the next sample, every epoch
    assert int(ds._failed.sum()) == 2
    (images / "n17.png").unlink()
    with pytest.raises(
        BadDataError, match=r"data.train: 3 of 20 samples failed to decode, more than max_skip_fraction 10"
    ):
        _epochs(ds, epochs=1, workers=0)

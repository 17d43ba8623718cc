"""LLaVA-Instruct reading (bad records skipped and counted) and dynamic padding."""

import json

import pytest
import torch
from PIL import Image

from mmft.data import Collator, ConversationDataset, DataError, read_llava
from mmft.prompt import IGNORE_INDEX


def _write(tmp_path, records):
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (40, 40), "red").save(tmp_path / "images" / "ok.jpg")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"garbage")
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def _conv(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def test_bad_records_are_skipped_and_counted(tmp_path):
    good = {"id": "1", "image": "ok.jpg", "conversations": _conv(("<image>\nWhat colour?", "Red."))}
    records = [
        good,
        {"id": "2", "image": "missing.jpg", "conversations": _conv(("<image>\nQ", "A"))},
        {"id": "3", "image": "broken.jpg", "conversations": _conv(("<image>\nQ", "A"))},
        {"id": "4", "image": "ok.jpg", "conversations": [{"from": "gpt", "value": "starts wrong"}]},
        {"id": "5", "image": "ok.jpg", "conversations": _conv(("<image>\nQ", ""))},
        {"id": "6", "image": "ok.jpg"},
        "not a dict",
        {"id": "7", "image": "ok.jpg", "conversations": _conv(("<image>\nColour?", "Red."), ("Shape?", "Circle."))},
    ]
    got, report = read_llava(_write(tmp_path, records), tmp_path / "images")
    assert [r.id for r in got] == ["1", "7"]
    assert report.kept == 2
    assert dict(report.skipped) == {"missing image": 1, "unreadable image": 1, "malformed conversation": 3,
                                    "malformed record": 1}
    assert report.summary() == ("read 2 conversations, skipped 6 (3 malformed conversation, 1 malformed "
                                "record, 1 missing image, 1 unreadable image)")
    assert got[1].turns == [("user", "Colour?"), ("assistant", "Red."), ("user", "Shape?"), ("assistant", "Circle.")]
    # offset/limit select a window of the file
    window, _ = read_llava(tmp_path / "llava.json", tmp_path / "images", offset=7, limit=5)
    assert [r.id for r in window] == ["7"]


def test_image_failing_at_load_time_is_counted_and_replaced(tmp_path, tiny_config):
    from transformers import AutoTokenizer

    from mmft.vision import ImageError

    records, report = read_llava(_write(tmp_path, [
        {"id": "a", "image": "ok.jpg", "conversations": _conv(("<image>\nQ?", "Red."))},
        {"id": "b", "image": "ok.jpg", "conversations": _conv(("<image>\nQ?", "Blue."))},
    ]), tmp_path / "images")

    def load(record):
        if record.id == "a":
            raise ImageError("decoder failed")
        return {"image_features": torch.zeros(1, 4)}

    ds = ConversationDataset(records, AutoTokenizer.from_pretrained(tiny_config.lm_model_id), tiny_config, 1, load, report)
    item = ds[0]
    assert report.skipped["unreadable image"] == 1
    assert item["image_features"].shape == (1, 4) and sum(item["image_mask"]) == 1
    ds[0], ds[1]
    assert report.skipped["unreadable image"] == 1  # found once: not tried or counted again

    tried = []

    def broken(record):  # every picture's header read, no picture decodes (a damaged image folder)
        tried.append(record.id)
        raise ImageError("decoder failed")

    ds = ConversationDataset(records, AutoTokenizer.from_pretrained(tiny_config.lm_model_id), tiny_config, 1, broken)
    for _ in range(3):  # a clear DataError (a RuntimeError before: a traceback from train.finetune)
        with pytest.raises(DataError, match="none of the 2 records has an image that decodes"):
            ds[0]
    assert tried == ["a", "b"]  # each file tried once, not once per item asked for


def test_collator_pads_to_the_longest_in_the_batch_not_a_global_maximum():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "image_mask": [True, False, False],
         "image_features": torch.ones(1, 4)},
        {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX] * 4 + [9], "image_mask": [True] + [False] * 4,
         "image_features": torch.ones(1, 4)},
    ]
    batch = Collator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 4 + [9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["image_mask"].sum().item() == 2
    assert batch["image_features"].shape == (2, 1, 4)
    assert Collator(pad_token_id=0, pad_to=8)(examples)["input_ids"].shape == (2, 8)


def test_missing_empty_or_cut_data_file_is_one_clear_error(tmp_path):
    import pytest

    from mmft.data import DataError

    path = tmp_path / "llava.json"
    with pytest.raises(DataError, match=f"^{path}: data file not found$"):
        read_llava(path, tmp_path)
    path.write_text("  \n")
    with pytest.raises(DataError, match=f"^{path}: the data file is empty"):
        read_llava(path, tmp_path)
    path.write_text('[{"id": "1", "image": "ok.jpg", "conversations": [{"from": "human", "val')
    with pytest.raises(DataError, match=rf"^{path}: not valid JSON at line 1, column \d+ .*is the file truncated\?"):
        read_llava(path, tmp_path)
    path.write_text('{"id": "1"}')
    with pytest.raises(DataError, match="expected a JSON list of conversations, got dict"):
        read_llava(path, tmp_path)


def test_image_check_can_come_from_a_feature_cache_without_any_file(tmp_path):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([
        {"id": "1", "image": "cached.jpg", "conversations": _conv(("<image>\nQ?", "A."))},
        {"id": "2", "image": "other.jpg", "conversations": _conv(("<image>\nQ?", "A."))},
        {"id": "3", "conversations": _conv(("Text only?", "Yes."))},
    ]))
    cached = {"cached.jpg"}  # no image folder exists at all
    got, report = read_llava(path, None, image_problem=lambda n: None if n in cached else "image not in the feature cache")
    assert [r.id for r in got] == ["1", "3"] and got[1].image is None
    assert dict(report.skipped) == {"image not in the feature cache": 1}

"""LLaVA data, presets and commands that need no trained model: bad records fail with FILE:LINE and
nothing is written, `repeat`, image-token expansion, pad-to-square, the llava_* presets."""
from __future__ import annotations

import json

import pytest

from trainer.__main__ import main as cli
from inference.errors import UserError
from inference.llava_model import IMAGE_TOKEN, expand_image_tokens
from trainer.multimodal.data import check_llava_file, encode_records, read_llava_records
from trainer.multimodal.synthetic import draw


def _rec(image, human=f"{IMAGE_TOKEN}\nwhat colour is the shape?", gpt="It is red."):
    rec = {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}
    if image is not None:
        rec["image"] = image
    return rec


@pytest.fixture()
def folder(tmp_path):
    import random

    (tmp_path / "img").mkdir()
    draw("red", "circle", 32, random.Random(0)).save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return tmp_path


BAD = [  # (record, words the error must contain)
    (_rec("img/missing.png"), ["not found", "missing.png"]),
    (_rec("img/broken.png"), ["cannot read image", "broken.png"]),
    (_rec("img/ok.png", human="what colour is the shape?"), ["no <image> tag"]),
    (_rec("img/ok.png", human=f"{IMAGE_TOKEN}\n{IMAGE_TOKEN} two?"), ["2 <image> tags"]),
    (_rec(None), ["no 'image' key"]),
    (_rec("img/ok.png", human="what colour?", gpt=f"{IMAGE_TOKEN} red"), ["assistant turn"]),
    (_rec(["img/ok.png", "img/ok.png"]), ["one relative path"]),
]


@pytest.mark.parametrize("record,words", BAD, ids=["missing", "unreadable", "no-tag", "two-tags", "tag-no-image",
                                                   "tag-in-answer", "image-list"])
def test_bad_record_names_file_and_line(folder, record, words):
    path = folder / "data.jsonl"
    path.write_text(json.dumps(_rec("img/ok.png")) + "\n\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_llava_records(path)
    assert str(err.value).startswith(f"{path}:3: ")          # line 3: blank lines keep their numbers
    for w in words:
        assert w in str(err.value)


def test_check_counts_every_bad_record_and_good_file_passes(folder):
    path = folder / "data.json"                              # a JSON array (the course's format), one item a line
    items = [_rec("img/ok.png"), _rec("img/missing.png"), _rec("img/broken.png"), _rec(None, human="plain chat")]
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in items) + "\n]\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.json:3: .*not found.*\(and 1 more bad record"):
        check_llava_file(path)
    path.write_text(json.dumps([_rec("img/ok.png"), _rec(None, human="plain text chat")]), encoding="utf-8")
    assert check_llava_file(path) == {"records": 2, "with_image": 1}


def test_check_data_reports_every_image_problem_with_file_and_line(folder, capsys):
    path = folder / "mixed.jsonl"
    rows = [_rec("img/ok.png"), _rec("img/missing.png"), _rec(None, human="plain text"), _rec("img/broken.png"),
            _rec("img/ok.png", human="no tag here")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    capsys.readouterr()
    assert cli(["check-data", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: image " in err and f"{path}:4: cannot read image" in err and f"{path}:5: record has an image but no <image>" in err
    assert f"{path}:1:" not in err and f"{path}:3:" not in err
    good = folder / "good.jsonl"
    good.write_text(json.dumps(_rec("ok.png")) + "\n", encoding="utf-8")
    assert cli(["check-data", str(good), "--image-folder", str(folder / "img")]) == 0


def test_image_folder_option_resolves_paths(folder, tmp_path_factory):
    data = tmp_path_factory.mktemp("elsewhere") / "d.jsonl"
    data.write_text(json.dumps(_rec("ok.png")) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="not found"):
        read_llava_records(data)
    [rec] = read_llava_records(data, image_folder=folder / "img")
    assert rec["image"] == str(folder / "img" / "ok.png")


def test_mm_train_bad_data_exits_2_before_loading_or_writing_anything(folder, capsys):
    path = folder / "bad.jsonl"
    path.write_text(json.dumps(_rec("img/ok.png")) + "\n" + json.dumps(_rec("img/missing.png")) + "\n",
                    encoding="utf-8")
    work = folder / "work"
    code = cli(["mm-train", "llava_tiny_finetune", "--model", str(folder / "no-model-needed-yet"), "--data", str(path),
                "--work-dir", str(work)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:2: image ") and "missing.png" in err and "\n" not in err
    assert not work.exists()


def test_expand_and_encode_keep_image_out_of_the_loss(folder):
    from inference.llava_model import add_image_token
    from trainer.multimodal.standins import build_tokenizer, domain_texts

    assert expand_image_tokens([1, 9, 2], [5, 6, 7], 9, 3) == ([1, 9, 9, 9, 2], [5, -100, -100, -100, 7])
    tok = build_tokenizer(domain_texts())
    image_id = add_image_token(tok)
    path = folder / "d.jsonl"
    path.write_text(json.dumps(_rec("img/ok.png")) + "\n", encoding="utf-8")
    samples, stats = encode_records(read_llava_records(path), tok, image_id, 16, 128, None)
    ids, labels = samples[0]["input_ids"], samples[0]["labels"]
    assert ids.count(image_id) == 16 and all(labels[i] == -100 for i, t in enumerate(ids) if t == image_id)
    assert tok.decode([t for t in labels if t != -100], skip_special_tokens=True).strip() == "It is red."
    # a limit that cuts into the image placeholders drops the sample instead of misaligning features
    _, stats = encode_records(read_llava_records(path), tok, image_id, 16, 10, None)
    assert stats["samples"] == 0 and stats["dropped"] == 1


def test_pad_to_square_pads_with_the_mean_colour():
    import numpy as np
    from PIL import Image

    from inference.llava_model import make_image_processor
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    padded = make_image_processor(32, True)(images=[wide], return_tensors="np")["pixel_values"][0]
    squashed = make_image_processor(32, False)(images=[wide], return_tensors="np")["pixel_values"][0]
    assert padded.shape == squashed.shape == (3, 32, 32)
    assert np.abs(padded[:, 0, :]).max() < 0.05          # top rows: mean colour, i.e. ~0 after normalising
    assert np.allclose(padded[:, 16, 16], squashed[:, 16, 16], atol=0.05)   # the red middle survives
    assert np.abs(squashed[:, 0, :] - squashed[:, 16, :]).max() < 1e-5     # without padding: a crop of red


def test_repeat_json_and_jsonl(tmp_path):
    src = tmp_path / "unique.json"
    src.write_text(json.dumps([_rec("a.png"), _rec("b.png")]), encoding="utf-8")
    assert cli(["repeat", str(src), str(tmp_path / "rep.json"), "-n", "3"]) == 0
    out = json.loads((tmp_path / "rep.json").read_text(encoding="utf-8"))
    assert [r["image"] for r in out] == ["a.png", "b.png"] * 3
    assert cli(["repeat", str(src), str(tmp_path / "rep.jsonl"), "-n", "2"]) == 0
    assert len((tmp_path / "rep.jsonl").read_text(encoding="utf-8").splitlines()) == 4
    assert cli(["repeat", str(src), str(tmp_path / "zero.json"), "-n", "0"]) == 2
    assert not (tmp_path / "zero.json").exists()


def test_llava_presets_load_and_bad_values_point_at_their_source(tmp_path):
    from trainer.engine.config import preset_names
    from trainer.multimodal.config import load_mm_config

    names = [n for n in preset_names() if n.startswith("llava_")]
    assert {"llava_tiny_pretrain", "llava_tiny_finetune"} <= set(names)
    for name in names:
        cfg = load_mm_config(name)
        assert cfg.stage in ("pretrain", "finetune") and cfg.method == "lora"
    with pytest.raises(UserError, match="--set bits: .*drop bits"):
        load_mm_config("llava_tiny_pretrain", sets=["bits=4"])
    with pytest.raises(UserError, match="did you mean 'visual_encoder'"):
        load_mm_config("llava_tiny_pretrain", sets=["visual_encodr=tiny"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: pretrain\nstage_x: 1\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.yaml:2: unknown config key 'stage_x'"):
        load_mm_config(str(bad))
    bad.write_text("model: tiny\nstage: pretrian\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.yaml:2: stage must be"):
        load_mm_config(str(bad))


@pytest.fixture(scope="module")
def small_llm(tmp_path_factory):
    """A chat LLM dir small enough to write in a second: the stand-in tokenizer + a 1-layer random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.multimodal.standins import build_tokenizer, domain_texts

    out = tmp_path_factory.mktemp("small-llm")
    tok = build_tokenizer(domain_texts())
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_check_data_counts_each_image_as_its_vision_tokens(folder, small_llm, capsys):
    from transformers import AutoTokenizer

    from inference.llava_model import add_image_token
    path = folder / "one.jsonl"
    path.write_text(json.dumps(_rec("img/ok.png")) + "\n", encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(small_llm)
    samples, _ = encode_records(read_llava_records(path), tok, add_image_token(tok), 16, 10_000, None)
    trained_len = len(samples[0]["input_ids"])         # what mm-train feeds the model: 16 image placeholders
    run = ["check-data", str(path), "--model", str(small_llm)]

    capsys.readouterr()
    assert cli(run) == 2                                # no tower named: never count the image as 1 token
    assert "pass --visual-encoder" in capsys.readouterr().err
    assert cli([*run, "--visual-encoder", "tiny", "--max-length", str(trained_len)]) == 0
    out = capsys.readouterr().out
    assert f"max {trained_len};" in out and "each image counted as 16 vision tokens" in out
    # 3 short of the true length: the answer is cut (counting the image as 1 token, 15 tokens fewer, would pass)
    assert cli([*run, "--visual-encoder", "tiny", "--max-length", str(trained_len - 3)]) == 2
    assert f"{path}:1: {trained_len} tokens > max_length {trained_len - 3}: " in capsys.readouterr().err
    assert cli([*run, "--visual-encoder", "tiny", "--max-length", "8"]) == 2
    assert "the image's 16 vision tokens are cut, training drops it" in capsys.readouterr().err


def test_vision_tokens_come_from_the_tower_config(tmp_path):
    """CLIP ViT-L/14-336 (the course's tower) inserts (336/14)^2 = 576 tokens, whether the dir holds a
    whole CLIP or only its vision half; only config.json is read."""
    from transformers import CLIPConfig, CLIPVisionConfig

    from inference.llava_model import vision_token_count
    shape = dict(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2)
    CLIPVisionConfig(**shape).save_pretrained(tmp_path / "vision")
    CLIPConfig(vision_config=shape, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2)).save_pretrained(tmp_path / "clip")
    assert vision_token_count(None, str(tmp_path / "vision")) == vision_token_count(None, str(tmp_path / "clip")) == 576
    assert vision_token_count(None, "tiny") == 16 and vision_token_count(tmp_path / "vision", None) is None
    with pytest.raises(UserError, match="no config.json"):
        vision_token_count(None, str(tmp_path / "nope"))

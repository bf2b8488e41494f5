"""LLaVA end to end on tiny real models: pretrain the projector on captions, finetune on questions,
answer held-out images, export, and load the export in plain transformers.

The pieces, each a stand-in for what the course downloads (trainer/multimodal/standins.py says why):
synthetic images drawn here (red/green/blue circle/square/triangle on plain backgrounds, held-out
ones from another seed); a CLIP-style tower built from config (32x32 images, 8x8 patches -> 16 image
tokens) trained a few seconds to tell the 9 classes apart, as CLIP's features already do; a tiny chat
Llama with a whole-word tokenizer that has read caption requests and captions as text, nothing else.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import sys

import torch

from trainer.__main__ import main as cli
from trainer.multimodal.data import read_llava_records
from trainer.multimodal.demo import CAPTION, ask, describe, score
from conftest import MM_STEPS

# The tiny parts and both stages are session fixtures in tests/conftest.py (mm_*): the app and web demo
# tests serve the same merged model.
FINETUNE_STEPS, SAVE = MM_STEPS["finetune"], MM_STEPS["save"]


def test_before_finetune_it_only_captions(mm_llm, mm_tower, mm_pretrained, mm_shapes):
    """The course's "before": the pretrained projector makes the LLM caption the image, whatever it is asked."""
    got = ask(mm_llm, mm_tower, mm_pretrained, read_llava_records(mm_shapes["heldout"]))
    s = score(got)
    colour_ok = sum(bool(CAPTION.match(a)) and a.split()[1] in truth for q, a, truth in got if "colour" in q)
    print(f"\npretrain only, held-out: {describe(s)}; e.g. {got[1][:2]}; caption colour right for "
          f"{colour_ok}/{s['colour'][1]} colour questions")
    assert s["captions"] >= 0.95 * s["n"] and s["right"] == 0
    assert colour_ok >= 0.8 * s["colour"][1]      # the projector alone already grounds the colour words


def test_after_finetune_it_answers_held_out_questions(mm_llm, mm_tower, mm_finetuned, mm_shapes):
    got = ask(mm_llm, mm_tower, mm_finetuned, read_llava_records(mm_shapes["heldout"]))
    s = score(got)
    print(f"\nafter finetune, held-out: {describe(s)}; e.g. {got[:2]}")
    assert s["captions"] == 0
    assert s["colour"][0] >= 0.9 * s["colour"][1] and s["shape"][0] >= 0.6 * s["shape"][1]
    assert s["right"] >= 0.8


def test_run_files_sample_chats_and_checkpoints(mm_finetuned, mm_pretrained):
    for name in ("adapter_model.safetensors", "projector.safetensors", "llava.json", "assistant.json",
                 "processor_config.json", "chat_template.jinja"):
        assert (mm_finetuned / name).is_file(), name
    info = json.loads((mm_finetuned / "llava.json").read_text(encoding="utf-8"))
    assert info["stage"] == "finetune" and info["base"]["visual_encoder"].endswith("tiny-clip") and info["image_tokens"] == 16
    work = mm_finetuned.parent
    before = (work / "eval_outputs_step_0.txt").read_text(encoding="utf-8")
    after = (work / f"eval_outputs_step_{FINETUNE_STEPS}.txt").read_text(encoding="utf-8")
    assert "heldout00000.png" in before and CAPTION.search(before.split("A: ")[1].splitlines()[0])
    assert "A: It is" in after
    ckpt = work / f"checkpoint-{SAVE}"
    for name in ("checkpoint.json", "llava.json", "projector.safetensors", "adapter_model.safetensors"):
        assert (ckpt / name).is_file(), name
    assert (mm_pretrained.parent / f"checkpoint-{SAVE}" / "projector.safetensors").is_file()


def test_merged_export_runs_in_plain_transformers_with_the_same_answer(mm_llm, mm_tower, mm_finetuned, mm_shapes,
                                                                        mm_merged):
    """mm_merged is `mm-export --merge` through the CLI (tests/conftest.py)."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from inference.image_chat import ImageChatEngine, load_llava
    out = mm_merged
    image = mm_shapes["image_folder"] / "images" / "heldout00003.png"
    question = "what shape is it?"

    model = LlavaForConditionalGeneration.from_pretrained(out).eval()     # plain transformers, nothing of ours
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{question}"}],
                                                     tokenize=False, add_generation_prompt=True)
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]

    ours_merged = ImageChatEngine(model, processor, image).greedy_ids([{"role": "user", "content": question}], 12)
    unmerged = load_llava(mm_llm, image, llava=mm_finetuned, visual_encoder=mm_tower, device="cpu").engine()
    ours_adapter = unmerged.greedy_ids([{"role": "user", "content": question}], 12)
    text = processor.tokenizer.decode(plain, skip_special_tokens=True)
    print(f"\nplain transformers on the merged export: {text!r}")
    assert plain.tolist() == ours_merged == ours_adapter
    assert text.startswith("It is a ")


def test_adapter_export_and_chat_cli_course_style(mm_llm, mm_tower, mm_finetuned, mm_shapes, mm_dir, monkeypatch, capsys):
    out = mm_dir / "adapter_export"
    ckpt = mm_finetuned.parent / f"checkpoint-{SAVE}"
    assert cli(["mm-export", str(ckpt), str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "projector.safetensors", "llava.json", "processor_config.json"} <= names
    assert not names & {"optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"}
    image = mm_shapes["image_folder"] / "images" / "heldout00001.png"
    monkeypatch.setattr(sys, "stdin", io.StringIO("what colour is the shape?\n\nEXIT\n"))
    capsys.readouterr()
    assert cli(["chat", str(mm_llm), "--visual-encoder", mm_tower, "--llava", str(out), "--image", str(image),
                "--device", "cpu", "--max-new-tokens", "12"]) == 0
    reply = capsys.readouterr().out.strip()
    print(f"\nchat --llava (checkpoint-{SAVE} export): {reply!r}")
    assert re.fullmatch(r"It is (red|green|blue)\.", reply)      # an answer to the question, not a caption


def test_chat_cli_bad_image_inputs(mm_dir, mm_merged, capsys):
    merged = mm_merged
    broken = mm_dir / "broken.jpg"
    broken.write_bytes(b"JFIF? no")
    for image, words in ((mm_dir / "nope.png", "not found"), (broken, "cannot read image")):
        capsys.readouterr()
        assert cli(["chat", str(merged), "--image", str(image), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and str(image.name) in err
    assert cli(["mm-export", str(mm_dir / "shapes"), str(mm_dir / "x")]) == 2     # not a run dir
    assert not (mm_dir / "x").exists()


def test_resume_continues_a_llava_run_and_refuses_another_stage(mm_llm, mm_tower, mm_finetuned, mm_shapes, mm_dir, capsys):
    work = mm_dir / "resumed"
    shutil.copytree(mm_finetuned.parent, work, ignore=shutil.ignore_patterns("final"))
    common = ["--model", str(mm_llm), "--visual-encoder", mm_tower, "--data", str(mm_shapes["questions"]),
              "--work-dir", str(work)]
    capsys.readouterr()
    assert cli(["mm-train", "llava_tiny_finetune", *common, "--resume", "--set", f"max_steps={FINETUNE_STEPS + 3}",
                "--set", "save_steps=3", "--set", "evaluation_inputs=[]"]) == 0
    assert f"resuming from {work / f'checkpoint-{FINETUNE_STEPS}'}" in capsys.readouterr().out
    state = json.loads((work / f"checkpoint-{FINETUNE_STEPS + 3}" / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == FINETUNE_STEPS + 3 and (work / "final" / "adapter_model.safetensors").is_file()
    scalars = (work / "scalars.jsonl").read_text(encoding="utf-8")
    assert scalars == (mm_finetuned.parent / "scalars.jsonl").read_text(encoding="utf-8")   # nothing logged twice
    assert cli(["mm-train", "llava_tiny_pretrain", *common, "--resume", str(work / f"checkpoint-{FINETUNE_STEPS}")]) == 2
    assert "stage finetune checkpoint cannot resume stage pretrain" in capsys.readouterr().err


def test_qlora_finetune_quantizes_only_the_llm(mm_llm, mm_tower, mm_shapes, mm_pretrained, mm_dir):
    """bits 4 (QLoRA) plus LoRA on the vision tower: the course's finetune configuration, on CPU."""
    import bitsandbytes as bnb
    from transformers import TrainerCallback

    from trainer.multimodal.config import load_mm_config
    from trainer.multimodal.train import train_mm

    seen = {}

    class Inspect(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["4bit"] = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
            seen["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]

    cfg = load_mm_config("llava_tiny_finetune", {"model": str(mm_llm), "visual_encoder": mm_tower,
                                                 "data": [str(mm_shapes["questions"])], "work_dir": str(mm_dir / "qlora")},
                         ["bits=4", "vision_lora=true", "max_steps=2", "batch_size=4", "evaluation_inputs=[]",
                          f"pretrained_projector={mm_pretrained}"])
    final = train_mm(cfg, echo=lambda s: None, extra_callbacks=[Inspect()])
    assert (final / "adapter_model.safetensors").is_file()
    assert seen["4bit"] and all(".language_model." in n for n in seen["4bit"])
    assert any("vision_tower" in n and "lora_A" in n for n in seen["trainable"])
    assert any("language_model" in n and "lora_A" in n for n in seen["trainable"])
    assert any("multi_modal_projector.modules_to_save" in n for n in seen["trainable"])
    assert not any(p.name.startswith(".llava-assembled-") for p in (mm_dir / "qlora").iterdir())


def test_mm_build_is_deterministic_and_loads_in_transformers(mm_llm, mm_tower, mm_pretrained, mm_shapes, mm_dir):
    """`mm-build` + a pretrained projector equals the base rebuilt at chat time (same `<image>` row,
    same tower), so a run's llava.json always rebuilds the model it trained on."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from inference.image_chat import ImageChatEngine, load_llava
    out = mm_dir / "built"
    assert cli(["mm-build", str(mm_llm), str(out), "--visual-encoder", mm_tower, "--projector", str(mm_pretrained)]) == 0
    image = mm_shapes["image_folder"] / "images" / "heldout00002.png"
    built = ImageChatEngine(LlavaForConditionalGeneration.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out),
                            image)
    rebuilt = load_llava(mm_llm, image, llava=mm_pretrained, visual_encoder=mm_tower, device="cpu").engine()
    msgs = [{"role": "user", "content": "Describe the image briefly."}]
    assert built.greedy_ids(msgs, 8) == rebuilt.greedy_ids(msgs, 8)
    assert CAPTION.match(built.chat(msgs, max_new_tokens=8).strip())


def test_apps_load_a_merged_export_a_run_dir_or_an_llm_with_a_run(mm_llm, mm_finetuned, mm_merged, mm_colour_images):
    """`load_served` (app.py, web_demo.py): every multimodal form answers alike; a text LLM is not multimodal."""
    from inference.image_chat import load_served
    image = mm_colour_images["blue"]
    msgs = [{"role": "user", "content": "what colour is the shape?"}]
    got = {name: loaded.engine().with_image(image).greedy_ids(msgs, 8)
           for name, loaded in [("merged", load_served(mm_merged, device="cpu")),
                                ("run dir", load_served(mm_finetuned, device="cpu")),
                                ("llm + run", load_served(mm_llm, adapter=mm_finetuned, device="cpu"))]}
    assert got["merged"] == got["run dir"] == got["llm + run"], got
    assert load_served(mm_llm, device="cpu") is None


def test_served_llava_falls_back_when_the_gpu_is_too_small(mm_llm, mm_tower, mm_finetuned, mm_merged, monkeypatch):
    """As text models do (inference.load): with device auto, the whole LLaVA's size (LLM + tower) decides
    between the GPU as is, 4-bit, or the CPU, and the note says why."""
    from inference.device import Placement
    from inference.loader import param_count
    from inference import image_chat as chat

    asked = []

    def small_gpu(n_params, placement):
        asked.append(n_params)
        return Placement("cpu", torch.float32), None, "GPU too small (test): running on CPU"

    monkeypatch.setattr(chat, "fit_gpu", small_gpu)
    merged = chat.load_served(mm_merged)
    rebuilt = chat.load_served(mm_finetuned)                  # LLM + tower, from the run's llava.json
    assert asked == [param_count(mm_merged), param_count(mm_llm) + param_count(mm_tower)]
    assert param_count(mm_merged) >= param_count(mm_llm) > 0
    for loaded in (merged, rebuilt):
        assert loaded.note.endswith("(GPU too small (test): running on CPU)")
        assert next(loaded.model.parameters()).device.type == "cpu"
    chat.load_served(mm_merged, device="cpu")                 # an explicit device is taken as asked
    assert len(asked) == 2


def test_a_long_image_chat_is_trimmed_to_the_context_like_a_text_chat(tiny_base, tmp_path):
    """Issue 16: the image engine re-rendered the untrimmed messages and overflowed the context. Now the
    prompt as sent (image placeholders included) plus the reply fits max_context: the oldest pairs go
    first, the image and the newest question stay; one message too long alone keeps the head up to the
    image and its newest tokens. No training needed: a tiny LLaVA assembled from the tiny base."""
    from PIL import Image

    from inference.image_chat import ImageChatEngine
    from inference.llava_model import build_llava

    model, processor = build_llava(str(tiny_base), "tiny")
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    context, max_new = 160, 16
    engine = ImageChatEngine(model, processor, image, max_context=context)
    tok, image_id, n = processor.tokenizer, engine.image_id, engine.n_image_tokens

    def text(ids):
        return tok.decode([t for t in ids if t != image_id], skip_special_tokens=True)

    turns = []
    for i in range(20):
        turns += [{"role": "user", "content": f"question {i} about the colour"},
                  {"role": "assistant", "content": f"answer {i} is red"}]
    turns.append({"role": "user", "content": "and the newest question"})
    ids = engine.prepare(turns, None, max_new)[0].tolist()
    assert len(ids) + max_new <= context and ids.count(image_id) == n
    assert "newest question" in text(ids) and "question 0 " not in text(ids)
    kept = ids
    ids = engine.prepare(turns[2:], None, max_new)[0].tolist()       # trimmed as far as needed, no further
    assert ids == kept

    long = [{"role": "user", "content": "blue " * 300 + "tell me the colour"}]
    ids = engine.prepare(long, None, max_new)[0].tolist()
    full = engine.prepare([{"role": "user", "content": "tell me the colour"}], None, max_new)[0].tolist()
    assert len(ids) + max_new <= context and ids.count(image_id) == n
    head = full.index(image_id) + n                                  # the system prompt and the image stay
    assert ids[:head] == full[:head] and text(ids).endswith(text(full[-8:]))
    assert len(engine.greedy_ids(long, max_new)) <= max_new          # the model takes it

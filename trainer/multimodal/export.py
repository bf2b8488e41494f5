"""Export a LLaVA run (final/ or any checkpoint-N/) in one of two forms.

    python -m trainer mm-export work_dirs/llava_ft/checkpoint-200 out/llava_adapter      # (a)
    python -m trainer mm-export work_dirs/llava_ft/final out/llava_merged --merge         # (b)
    python -m trainer mm-export RUN_DIR OUT --merge --model LLM_DIR --visual-encoder CLIP_DIR  # base moved

(a) adapter + projector files, the course's `xtuner convert pth_to_hf` output: the PEFT adapter of
    the LLM (absent after stage pretrain), `projector.safetensors`, the processor, `llava.json` (how to
    rebuild the base) and `assistant.json` -- small; chat with `chat LLM --visual-encoder CLIP --llava OUT`.
(b) `--merge`: one standalone dir in transformers' LLaVA format: the base rebuilt, projector loaded,
    LoRA merged; `LlavaForConditionalGeneration.from_pretrained(OUT)` and `AutoProcessor` load it.
Written through inference/atomic.py (a temporary dir moved into place, usual permissions): a failed export
leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from inference.atomic import check_new_dir, new_dir
from inference.device import pick
from inference.loader import ASSISTANT_FILE, read_system_prompt
from inference.errors import UserError
from inference.llava_model import LLAVA_FILE, PROJECTOR_FILE, load_base
from trainer.multimodal.model import save_llava
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", PROJECTOR_FILE, LLAVA_FILE, ASSISTANT_FILE)


def read_run_info(trained) -> dict:
    trained = Path(trained)
    if not (trained / LLAVA_FILE).is_file() or not (trained / PROJECTOR_FILE).is_file():
        raise UserError(f"{trained}: no {LLAVA_FILE} / {PROJECTOR_FILE} -- pass an mm-train final/ or "
                        f"checkpoint-N/ dir (or an mm-export adapter dir)")
    return json.loads((trained / LLAVA_FILE).read_text(encoding="utf-8"))


def base_for(info: dict, model=None, visual_encoder=None) -> dict:
    """The recorded base, with the LLM / vision tower paths replaced when they moved."""
    spec = dict(info["base"])
    if model:
        spec.pop("llava", None)
        spec["llm"] = model
    if visual_encoder:
        spec["visual_encoder"] = visual_encoder
    if "llava" not in spec and "visual_encoder" not in spec:
        raise UserError("the run was built on a LLaVA dir: with --model, also pass --visual-encoder")
    return spec


def export_adapter(trained, out) -> Path:
    """(a): copy the adapter, projector and run files, write the processor; drop optimizer state."""
    from transformers import AutoProcessor

    trained, out = Path(trained), Path(out)
    read_run_info(trained)
    with new_dir(out) as tmp:
        for name in ADAPTER_FILES:
            if (trained / name).is_file():
                shutil.copy2(trained / name, tmp / name)
        AutoProcessor.from_pretrained(trained).save_pretrained(tmp)
    return out


def export_merged(trained, out, model=None, visual_encoder=None, dtype: str = "fp32", device: str = "cpu") -> Path:
    """(b): base + projector + merged LoRA -> a LlavaForConditionalGeneration + processor dir."""
    from transformers import AutoProcessor

    from inference.image_chat import apply_trained
    trained, out = Path(trained), Path(out)
    info = read_run_info(trained)
    check_new_dir(out)                   # before the base is rebuilt, not after
    placement = pick(device, dtype)
    llava, _ = load_base(base_for(info, model, visual_encoder), placement.dtype, placement.device)
    llava = apply_trained(llava, trained)
    if hasattr(llava, "merge_and_unload"):
        llava = llava.merge_and_unload()
    processor = AutoProcessor.from_pretrained(trained)
    return save_llava(llava, processor, out, read_system_prompt(trained), trained_from=str(trained),
                      stage=info.get("stage"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer mm-export", description=__doc__.split("\n")[0])
    p.add_argument("trained", help="mm-train WORK_DIR/final or WORK_DIR/checkpoint-N")
    p.add_argument("out")
    p.add_argument("--merge", action="store_true", help="write a merged transformers LLaVA model dir")
    p.add_argument("--model", help="the LLM dir, when it moved since training")
    p.add_argument("--visual-encoder", help="the CLIP dir, when it moved since training")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (merged weights)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = p.parse_args(argv)
    if args.merge:
        out = export_merged(args.trained, args.out, args.model, args.visual_encoder, args.dtype, args.device)
        print(f"merged LLaVA model written to {out}")
    else:
        if args.model or args.visual_encoder:
            raise UserError("--model/--visual-encoder only matter with --merge (the adapter export copies files)")
        out = export_adapter(args.trained, args.out)
        print(f"adapter + projector written to {out}")
    return 0

"""`python -m trainer mm-build`: assemble a LLaVA dir from a chat LLM and a CLIP vision tower, and the
training side of LLaVA models (what a run records to rebuild its base, saving the trained projector).
The model itself (transformers' `LlavaForConditionalGeneration` + `LlavaProcessor`) is built and loaded
by the core, inference/llava_model.py, which serving uses too.

    python -m trainer mm-build LLM_DIR --visual-encoder CLIP_DIR OUT [--vision-feature-layer -2] [--pad-to-square]
    python -m trainer mm-build tiny --visual-encoder tiny OUT      # the offline demo shape (random tiny CLIP)

The output dir is a plain transformers LLaVA dir (AutoProcessor + LlavaForConditionalGeneration load it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from inference.atomic import new_dir, new_file
from inference.device import pick
from inference.errors import UserError
from inference.llava_model import build_llava, image_token_count, is_llava_dir, load_projector
from inference.loader import check_model_dir, read_system_prompt, write_assistant_file


def resolve_llm(name: str) -> Path:
    if name == "tiny":
        from trainer.bases.tiny import default_base

        return default_base()
    return check_model_dir(name)


def save_llava(model, processor, out, system_prompt: str | None = None, **info) -> Path:
    """Write model + processor (+ assistant.json) atomically: a failure leaves nothing behind."""
    out = Path(out)
    with new_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_assistant_file(tmp, system_prompt, **info)
    return out


def base_spec(cfg) -> dict:
    """What `llava.json` records so export/chat can rebuild exactly the base a run trained on."""
    model_dir = resolve_llm(cfg.model)
    if is_llava_dir(model_dir):
        return {"llava": str(model_dir.resolve())}
    if not cfg.visual_encoder:
        raise UserError(f"{cfg.model}: not a LLaVA dir -- also set visual_encoder (a CLIP dir or 'tiny')")
    ve = cfg.visual_encoder if cfg.visual_encoder == "tiny" else str(Path(cfg.visual_encoder).resolve())
    return {"llm": str(model_dir.resolve()), "visual_encoder": ve,
            "vision_feature_layer": cfg.vision_feature_layer, "pad_to_square": cfg.pad_to_square,
            "seed": cfg.build_seed}


def trained_projector(model):
    """The projector module as trained: under PEFT it is the adapter's saved copy, not the original."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = base.model.multi_modal_projector
    if hasattr(module, "modules_to_save"):          # peft ModulesToSaveWrapper
        module = module.modules_to_save[module.active_adapters[0]]
    return module


def save_projector(model, path) -> None:
    """projector.safetensors, whole or not at all: a checkpoint killed mid-save never holds half a file,
    and the file gets the usual permissions (safetensors' own writer leaves a private 0600 file)."""
    from safetensors.torch import save

    module = trained_projector(model)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
    with new_file(path, "wb") as f:        # a few MB at most: serialised in memory, then written
        f.write(save(state, metadata={"format": "pt", "module": "multi_modal_projector"}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer mm-build", description=__doc__.split("\n\n")[0])
    p.add_argument("llm", help="chat LLM dir (HF format) or 'tiny'")
    p.add_argument("out")
    p.add_argument("--visual-encoder", required=True, help="CLIP dir (e.g. clip-vit-large-patch14-336) or 'tiny'")
    p.add_argument("--vision-feature-layer", type=int, default=-2)
    p.add_argument("--pad-to-square", action="store_true", help="pad images to squares before resizing")
    p.add_argument("--projector", help="a pretrained projector.safetensors (or dir) to put in")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 for the saved weights")
    args = p.parse_args(argv)
    placement = pick("cpu", args.dtype)
    llm_dir = resolve_llm(args.llm)
    model, processor = build_llava(str(llm_dir), args.visual_encoder, args.vision_feature_layer, args.pad_to_square,
                                   args.seed, placement.dtype, "cpu")
    if args.projector:
        load_projector(model, args.projector)
    save_llava(model, processor, args.out, read_system_prompt(llm_dir), base_model=str(llm_dir))
    print(f"LLaVA model ({image_token_count(model.config)} image tokens) written to {args.out}")
    return 0

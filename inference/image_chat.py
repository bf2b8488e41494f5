"""Chat about an image: the shared `ChatEngine` (same template, system prompt, streaming, lock) with
one image placed in the conversation, and the loader behind `python -m trainer chat ... --image`.

    python -m trainer chat out/merged --image photo.jpg                        # a merged LLaVA dir
    python -m trainer chat LLM_DIR --visual-encoder CLIP_DIR --llava work_dirs/llava_ft/final --image photo.jpg

The second form is the course's `xtuner chat LLM --visual-encoder CLIP --llava ADAPTER --image IMG`:
the base is rebuilt from the LLM and the tower, then the trained projector and LoRA go on top.
`load_served` is what app.py and web_demo.py call: a LLaVA model dir (merged / assembled) or a trained
dir (mm-train final/, checkpoint-N/, an mm-export adapter dir) becomes a LoadedLlava, anything else None
(a text model); `engine.with_image(img)` then gives each request its own image on the shared model.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.device import fit_gpu, pick
from inference.engine import ChatEngine, fit_to_context
from inference.loader import log, param_count, read_system_prompt
from inference.chat_format import prompt_ids, with_system
from inference.errors import UserError
from inference.llava_model import IMAGE_TOKEN, expand_image_tokens, pixel_values, with_image_tag
from inference.llava_model import LLAVA_FILE, image_token_count, is_llava_dir, load_base, load_projector


def fit_image_chat(tokenizer, messages: list[dict], budget: int, image_id: int) -> list[int]:
    """`fit_to_context` for a chat about an image: the prompt exactly as sent (image tag in the first
    user turn that survives) within `budget` tokens. The oldest user/assistant pairs go first; as a last
    resort the head up to the image and the newest tokens stay, so the image is never cut away.
    Measured on the tagged rendering: the tag moves to another turn when its turn is dropped."""
    msgs = list(messages)
    while True:
        ids = prompt_ids(tokenizer, with_image_tag(msgs))
        if len(ids) <= budget:
            return ids
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first > 1:
            del msgs[first:first + 2]
            continue
        head = ids.index(image_id) + 1 if image_id in ids else 0
        if head >= budget:              # a system prompt alone too long: the image, then the newest tokens
            return [image_id] + ids[len(ids) - (budget - 1):]
        return ids[:head] + ids[len(ids) - (budget - head):]


class ImageChatEngine(ChatEngine):
    """ChatEngine whose conversations are about one image (None: plain text). Only the prompt differs:
    the image tag goes into the first user turn that survives context trimming (so the image is never
    trimmed away), its token is expanded to the model's placeholders, and `generate` gets the pixels."""

    def __init__(self, model, processor, image=None, system_prompt: str | None = None, max_context: int | None = None,
                 max_batch: int = 1):
        # max_batch is accepted for the front ends' one call and not used: image chats are decoded one at a
        # time through generate (the batcher stacks text-only prompts; each image chat carries its pixels)
        del max_batch
        text_config = model.config.get_text_config()
        super().__init__(model, processor.tokenizer, system_prompt=system_prompt,
                         max_context=max_context or getattr(text_config, "max_position_embeddings", 2048))
        self.processor = processor
        self.image_id = model.config.image_token_id
        self.n_image_tokens = image_token_count(model.config)
        self.set_image(image)

    def set_image(self, image) -> None:
        """Switch to another image (a path or a PIL image; None: plain text chat); pixels are computed
        once per image. An unreadable file is a UserError naming it."""
        if image is None or isinstance(image, (str, Path)):
            self.image = Path(image) if image is not None else None
            pixels = pixel_values(self.processor.image_processor, self.image) if self.image is not None else None
        else:                                   # a PIL image (an upload in web_demo.py)
            self.image = image
            pixels = self.processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
        self.pixel_values = pixels.to(self.model.device) if pixels is not None else None

    def with_image(self, image) -> "ImageChatEngine":
        """An engine for one request about `image`: it shares this one's model and generation lock,
        so concurrent chats about different images (the Gradio queue) never see each other's image."""
        view = copy.copy(self)
        view.set_image(image)
        return view

    def prepare(self, messages, system_prompt, max_new_tokens) -> torch.Tensor:
        system = self.system_prompt if system_prompt is None else system_prompt
        msgs = with_system([{"role": m["role"], "content": m["content"]} for m in messages], system or None)
        if self.image is None:        # a typed "<image>" is text here, not a placeholder without pixels
            msgs = [{"role": m["role"], "content": m["content"].replace(IMAGE_TOKEN, "")} for m in msgs]
            ids, _ = fit_to_context(self.tokenizer, msgs, max(16, self.max_context - max_new_tokens))
            return torch.tensor([ids], device=self.model.device)
        # the image's one tag token becomes n_image_tokens placeholders: the text gets what is left
        budget = max(16, self.max_context - max_new_tokens - (self.n_image_tokens - 1))
        ids = fit_image_chat(self.tokenizer, msgs, budget, self.image_id)
        ids, _ = expand_image_tokens(ids, None, self.image_id, self.n_image_tokens)
        return torch.tensor([ids], device=self.model.device)

    def _gen_kwargs(self, *args, **kwargs) -> dict:
        # every prompt from `prepare` carries the image (when there is one), so generate gets its pixels
        kw = super()._gen_kwargs(*args, **kwargs)
        return kw if self.pixel_values is None else {**kw, "pixel_values": self.pixel_values}


@dataclass
class LoadedLlava:
    """Same shape as inference.Loaded, so the chat CLI loop runs unchanged."""
    model: object
    processor: object
    image: Path | None
    system_prompt: str | None
    note: str

    def engine(self, **kwargs) -> ImageChatEngine:
        return ImageChatEngine(self.model, self.processor, self.image, system_prompt=self.system_prompt, **kwargs)


def apply_trained(model, trained_dir):
    """Put a run's projector (and LoRA adapter, when it has one) on a base LLaVA model."""
    trained_dir = Path(trained_dir)
    load_projector(model, trained_dir)
    if (trained_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, trained_dir)
    return model


def trained_base(trained_dir) -> dict | None:
    """The base a trained dir (mm-train final/ or checkpoint, mm-export adapter) was built on, or None."""
    from inference.llava_model import PROJECTOR_FILE
    trained_dir = Path(trained_dir)
    if not ((trained_dir / LLAVA_FILE).is_file() and (trained_dir / PROJECTOR_FILE).is_file()):
        return None
    return json.loads((trained_dir / LLAVA_FILE).read_text(encoding="utf-8"))["base"]


def load_served(model_dir, adapter=None, device: str = "auto", bits: int | None = None) -> LoadedLlava | None:
    """What a UI serves when the model is multimodal, else None (a text model: use inference.load).

    MODEL_DIR a LLaVA dir (merged export, mm-build), optionally with ADAPTER a trained dir on top; or
    MODEL_DIR itself a trained dir, rebuilt from the base its llava.json records; or MODEL_DIR the LLM
    and ADAPTER a trained dir, with the vision tower its llava.json records."""
    if is_llava_dir(model_dir):
        return load_llava(model_dir, None, llava=adapter, device=device, bits=bits)
    trained = model_dir if adapter is None else adapter
    base = trained_base(trained)
    if base is None:
        return None
    if adapter is None and "llava" in base:
        return load_llava(base["llava"], None, llava=trained, device=device, bits=bits)
    llm = base["llm"] if adapter is None else model_dir
    return load_llava(llm, None, llava=trained, visual_encoder=base.get("visual_encoder"), device=device, bits=bits)


def load_llava(model_dir, image, llava=None, visual_encoder=None, adapter=None, device: str = "auto",
               dtype: str = "auto", bits: int | None = None) -> LoadedLlava:
    """`model_dir` is a merged/assembled LLaVA dir, or an LLM dir rebuilt with `visual_encoder`; `llava`
    is a trained dir (mm-train final/, checkpoint or mm-export output) applied on top. `image` may be
    None (text chat; `engine.set_image` picks one later, e.g. per request in an app)."""
    from transformers import AutoProcessor

    if adapter:
        raise UserError("--adapter is for text models -- for LLaVA pass the trained dir as --llava DIR")
    if image is not None and not Path(image).is_file():
        raise UserError(f"{image}: image not found")
    placement = pick(device, dtype)
    if is_llava_dir(model_dir):
        spec = {"llava": str(model_dir)}
    elif visual_encoder:
        spec = {"llm": str(model_dir), "visual_encoder": visual_encoder}
        if llava and (Path(llava) / LLAVA_FILE).is_file():     # same feature layer / padding / seed as trained
            saved = json.loads((Path(llava) / LLAVA_FILE).read_text(encoding="utf-8"))["base"]
            spec.update({k: saved[k] for k in ("vision_feature_layer", "pad_to_square", "seed") if k in saved})
    else:
        raise UserError(f"{model_dir}: not a LLaVA model dir -- pass a merged LLaVA dir, or the LLM with "
                        f"--visual-encoder CLIP_DIR --llava TRAINED_DIR")
    why = ""
    if device == "auto" and bits is None:      # as inference.load: 4-bit, then CPU, rather than out of memory
        parts = [spec["llava"]] if "llava" in spec else [spec["llm"], spec["visual_encoder"]]
        placement, bits, why = fit_gpu(sum(param_count(p) for p in parts), placement)
        if why:
            log.warning("%s: %s", model_dir, why)
    model, processor = load_base(spec, placement.dtype, placement.device, bits)
    if llava:
        model = apply_trained(model, llava)
        if (Path(llava) / "preprocessor_config.json").is_file():
            processor = AutoProcessor.from_pretrained(llava)
    model.eval()
    what = Path(model_dir).name + (f" + {Path(llava).name}" if llava else "") + (f", {bits}-bit" if bits else "")
    seen = f", image {Path(image).name}" if image else ""            # the UIs take images per request
    return LoadedLlava(model, processor, Path(image) if image else None, read_system_prompt(llava, model_dir),
                       note=f"{what} on {placement.describe()}{seen}" + (f" ({why})" if why else ""))

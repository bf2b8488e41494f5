"""LLaVA models for serving and training: transformers' own `LlavaForConditionalGeneration` (vision tower
-> chosen hidden layer -> 2-layer GELU MLP projector -> features scattered into the `<image>` placeholders)
assembled from a chat LLM and a CLIP tower, or loaded from a LLaVA dir, and the image side of a prompt.

Assembling is deterministic for a given LLM, vision tower and seed (the fresh projector is seeded, the
new `<image>` embedding row is the mean of the others), so a base rebuilt from `llava.json` equals the
one a run trained on. `python -m trainer mm-build` writes one (trainer/multimodal/model.py).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from inference.chat_format import IGNORE_INDEX
from inference.errors import UserError
from inference.loader import check_model_dir, quantization_config

IMAGE_TOKEN = "<image>"


LLAVA_FILE = "llava.json"               # how to rebuild the base a run trained on


PROJECTOR_FILE = "projector.safetensors"


# The offline demo/test vision tower: 32x32 images, 8x8 patches -> 16 image tokens.
TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, projection_dim=128, initializer_range=0.1)


# Never quantized in QLoRA: the frozen vision tower and the trained projector stay in full precision.
SKIP_QUANT = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]   # module-path prefixes


def is_llava_dir(path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "llava"


def image_token_count(config) -> int:
    """Placeholders per image: one per patch (CLS dropped by the "default" feature strategy)."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def vision_token_count(model_dir=None, visual_encoder=None) -> int | None:
    """Image tokens a LLaVA inserts per image, from config files only (no weights are read): a LLaVA
    dir's own config, else the vision tower's ("tiny", or a CLIP / CLIP-vision dir). None: neither given
    (or `model_dir` is a plain LLM and no tower was named)."""
    from transformers import AutoConfig, CLIPVisionConfig

    if model_dir is not None and is_llava_dir(model_dir):
        return image_token_count(AutoConfig.from_pretrained(model_dir))
    if visual_encoder is None:
        return None
    if visual_encoder == "tiny":
        vision = CLIPVisionConfig(**TINY_VISION)
    else:
        if not (Path(visual_encoder) / "config.json").is_file():
            raise UserError(f"{visual_encoder}: no config.json -- pass a CLIP model dir or 'tiny'")
        cfg = AutoConfig.from_pretrained(visual_encoder)
        vision = getattr(cfg, "vision_config", cfg)          # a whole CLIP, or its vision half
        if not hasattr(vision, "patch_size"):
            raise UserError(f"{visual_encoder}: not a CLIP vision tower (its config has no patch_size)")
    return (vision.image_size // vision.patch_size) ** 2       # one per patch; CLS dropped ("default")


def _image_processor_class():
    """The PIL backend (no torchvision needed; same maths as the torchvision one) where transformers
    has it, else the classic LlavaImageProcessor."""
    try:
        from transformers import LlavaImageProcessorPil as cls
    except ImportError:
        from transformers import LlavaImageProcessor as cls
    return cls


def make_image_processor(image_size: int, pad_to_square: bool, clip_dir=None):
    """CLIP preprocessing (from the CLIP dir when it has one) with LLaVA's optional pad-to-square."""
    kw = {"image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
    cfg = Path(clip_dir) / "preprocessor_config.json" if clip_dir else None
    if cfg is not None and cfg.is_file():
        src = json.loads(cfg.read_text(encoding="utf-8"))
        kw.update({k: src[k] for k in ("image_mean", "image_std") if k in src})
    return _image_processor_class()(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size},
                                    do_pad=pad_to_square, **kw)


def load_vision(spec: str, seed: int, dtype, device):
    """A CLIPVisionModel: "tiny" (random, from TINY_VISION) or the vision half of a CLIP checkpoint dir."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if spec == "tiny":
        torch.manual_seed(seed)
        return CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).to(device=device, dtype=dtype), None
    path = check_model_dir(spec)
    return CLIPVisionModel.from_pretrained(path, dtype=dtype, device_map={"": device}), path


def add_image_token(tokenizer) -> int:
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def assemble(lm, tokenizer, vision, image_processor, vision_feature_layer: int = -2, seed: int = 0):
    """LLM + vision tower + a fresh seeded projector -> (LlavaForConditionalGeneration, LlavaProcessor).
    The LLM's and the tower's modules are reused as they are (no copy), so their weights are untouched."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    n_layers = vision.config.num_hidden_layers
    if not -n_layers - 1 <= vision_feature_layer <= n_layers:
        raise UserError(f"vision_feature_layer {vision_feature_layer}: the tower has {n_layers} layers "
                        f"(use -1 .. -{n_layers + 1}, LLaVA uses -2)")
    image_id = add_image_token(tokenizer)
    config = LlavaConfig(vision_config=vision.config, text_config=lm.config, image_token_index=image_id,
                         vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=bool(lm.config.tie_word_embeddings))
    config.image_seq_length = image_token_count(config)
    with torch.device("meta"):          # only the skeleton: every module is replaced below
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    torch.manual_seed(seed)
    dtype = next(vision.parameters()).dtype
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(device=lm.device, dtype=dtype)
    model.generation_config = lm.generation_config
    if image_id >= lm.get_input_embeddings().num_embeddings:
        old = lm.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():           # deterministic new rows (the placeholder embedding is replaced anyway)
            emb = model.get_input_embeddings().weight
            emb[old:] = emb[:old].mean(0, keepdim=True)
            head = model.get_output_embeddings().weight
            if head.data_ptr() != emb.data_ptr():
                head[old:] = head[:old].mean(0, keepdim=True)
    model.config.text_config.vocab_size = model.get_input_embeddings().num_embeddings
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise RuntimeError(f"LLaVA assembly left parameters unset: {leftovers[:3]}")
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision.config.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=tokenizer.chat_template)
    return model, processor


def build_llava(llm: str, visual_encoder: str, vision_feature_layer: int = -2, pad_to_square: bool = False,
                seed: int = 0, dtype=torch.float32, device: str = "cpu"):
    """Load the LLM and the vision tower and assemble them (full precision; see `load_base` for bits)."""
    llm_dir = check_model_dir(llm)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    if not tokenizer.chat_template:
        raise UserError(f"{llm_dir}: tokenizer has no chat template -- use a chat model")
    lm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype, device_map={"": device})
    vision, clip_dir = load_vision(visual_encoder, seed, dtype, device)
    image_processor = make_image_processor(vision.config.image_size, pad_to_square, clip_dir)
    return assemble(lm, tokenizer, vision, image_processor, vision_feature_layer, seed)


def load_llava_dir(path, dtype=torch.float32, device: str = "cpu", bits: int | None = None):
    """An assembled or merged LLaVA dir -> (model, processor); 4/8-bit quantizes the LLM only."""
    from transformers import AutoProcessor

    path = check_model_dir(path)
    qconf = quantization_config(bits, dtype)
    if qconf is not None:
        qconf.llm_int8_skip_modules = SKIP_QUANT
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map={"": device},
                                                          quantization_config=qconf)
    return model, AutoProcessor.from_pretrained(path)


def load_base(spec: dict, dtype=torch.float32, device: str = "cpu", bits: int | None = None, scratch=None):
    """The untrained LLaVA of a spec -> (model, processor). With bits, the assembled model goes through a
    scratch dir so transformers' own loader quantizes it (and keeps the tower and projector unquantized)."""
    if "llava" in spec:
        return load_llava_dir(spec["llava"], dtype, device, bits)
    model, processor = build_llava(spec["llm"], spec["visual_encoder"], spec.get("vision_feature_layer", -2),
                                   spec.get("pad_to_square", False), spec.get("seed", 0), dtype,
                                   device if not bits else "cpu")
    if not bits:
        return model, processor
    scratch = Path(scratch or tempfile.gettempdir())
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llava-assembled-", dir=scratch))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        del model
        return load_llava_dir(tmp, dtype, device, bits)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_projector(model, path) -> Path:
    """Load a pretrained projector (a projector.safetensors file, or a dir holding one) into the model."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / PROJECTOR_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no {PROJECTOR_FILE} -- pass the pretrain run's final/ dir or the file")
    state = load_file(str(file))
    target = model.model.multi_modal_projector
    want = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        raise UserError(f"{file}: projector shapes {got} do not fit this model's {want} -- it was trained "
                        f"for another LLM or vision tower")
    ref = next(target.parameters())
    target.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in state.items()})
    return file


def image_file_problem(path, verify: bool = False) -> str | None:
    """Why an image file cannot be used (missing, not an image, corrupt), or None when it is fine."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        return f"image {str(path)!r} not found -- check the path and --image-folder"
    try:
        with Image.open(path) as img:
            if verify:
                img.verify()           # decodes the whole file: check-data, not every training start
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"cannot read image {str(path)!r} ({type(exc).__name__}: {exc}) -- replace or remove this record"
    return None


def open_image(path, at: str):
    """The image as RGB, or a UserError `AT: ...` (`at` names the record: FILE:LINE)."""
    from PIL import Image

    problem = image_file_problem(path)
    if problem is None:
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:     # header fine, pixels truncated
            problem = f"cannot decode image {str(path)!r} ({exc}) -- replace or remove this record"
    raise UserError(f"{at}: {problem}")


def expand_image_tokens(ids: list[int], labels: list[int] | None, image_id: int, n: int):
    """Each `<image>` id becomes `n` placeholders (never trained on), as LlavaProcessor expands it."""
    out_ids, out_labels = [], []
    for k, t in enumerate(ids):
        if t == image_id:
            out_ids += [image_id] * n
            out_labels += [IGNORE_INDEX] * n
        else:
            out_ids.append(t)
            out_labels.append(labels[k] if labels is not None else IGNORE_INDEX)
    return out_ids, out_labels


def with_image_tag(messages: list[dict]) -> list[dict]:
    """The image goes first into the first user turn (the course's `xtuner chat --image` does the same);
    any tag a user typed is removed so exactly one stays."""
    out, placed = [], False
    for m in messages:
        content = m["content"].replace(IMAGE_TOKEN, "")
        if m["role"] == "user" and not placed:
            content, placed = f"{IMAGE_TOKEN}\n{content.lstrip()}", True
        out.append({"role": m["role"], "content": content})
    return out


def pixel_values(image_processor, image_path, at: str | None = None):
    """One image file -> a (1, 3, H, W) tensor through the model's own image processor."""
    img = open_image(image_path, at or str(image_path))
    return image_processor(images=[img], return_tensors="pt")["pixel_values"]

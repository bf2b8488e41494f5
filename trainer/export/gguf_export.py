"""A merged model dir -> one GGUF file for llama.cpp / Ollama / LM Studio, in pure Python (no llama.cpp build).

    python -m trainer export-gguf work_dirs/me/merged out/lumi-q8_0.gguf --quant q8_0
    export_gguf(model_dir, out, quant="q8_0")          # -> out, plus out.parent / "Modelfile"

Llama-family models: `llama` (the tiny base, SmolLM2, Llama, InternLM2 after convert-internlm2) and
`qwen2`. The file is laid out as llama.cpp's own converter (convert_hf_to_gguf.py) lays it out:

* tensor names from gguf's TensorNameMap (`blk.N.attn_q.weight` ...); a tied lm_head is not written
  (llama.cpp and transformers both fall back to token_embd);
* for `llama`, q_proj / k_proj rows are permuted per head: transformers rotates the two halves of a
  head (rotate_half), llama.cpp's llama graph rotates adjacent pairs, so each head's rows are
  interleaved from [first half, second half]. Qwen2 runs llama.cpp's NEOX rotary: no permutation;
* 1-D tensors (norms, biases) stay F32; 2-D ones take the chosen type, through gguf.quants. A row
  that is not a whole number of 32-value blocks falls back to F16, as llama.cpp's converter does;
  q4_0 keeps token_embd / output at Q8_0 (llama-quantize gives those more bits too; gguf-py cannot
  write its Q6_K);
* metadata: context length, sizes, head counts, rope base and dimension, RMS-norm eps, file type,
  the tokenizer (trainer/export/gguf_vocab.py) and the chat template (trainer/export/modelfile.py).

The GGUF and its Modelfile appear whole or not at all (inference/atomic.py); a Modelfile there already
is replaced only if export-gguf wrote it (one per dir: the latest export's). transformers reads the
result back (`from_pretrained(dir, gguf_file=...)`), which tests/test_gguf_export.py uses to check it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from inference.assistant_file import read_system_prompt
from inference.atomic import new_file
from inference.errors import UserError
from inference.repo_files import is_lfs_pointer
from trainer.export.gguf_vocab import gguf_vocab
from trainer.export.modelfile import MODELFILE_HEADER, chat_plan, modelfile_text, portable_template

QUANTS = ("f16", "bf16", "q8_0", "q4_0")
ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}     # model_type -> gguf.MODEL_ARCH member
_SKIP = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def _qtypes(quant: str):
    import gguf

    t, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f16": (t.F16, f.MOSTLY_F16), "bf16": (t.BF16, f.MOSTLY_BF16),
            "q8_0": (t.Q8_0, f.MOSTLY_Q8_0), "q4_0": (t.Q4_0, f.MOSTLY_Q4_0)}[quant]


def check_model_dir(model_dir) -> dict:
    """config.json of a merged Llama-family model dir, or one line saying what is wrong."""
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"{d}: model directory not found")
    if (d / "adapter_config.json").is_file() and not (d / "config.json").is_file():
        raise UserError(f"{d}: this is a LoRA adapter, not a merged model -- merge it first: "
                        f"python -m trainer merge BASE {d} MERGED, then export MERGED")
    if not (d / "config.json").is_file():
        raise UserError(f"{d}: no config.json -- pass a merged model dir (python -m trainer merge ...)")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    kind = cfg.get("model_type")
    if kind == "internlm2":
        raise UserError(f"{d}: InternLM2 (remote-code layout) -- convert it first: "
                        f"python -m trainer convert-internlm2 {d} OUT, then export OUT")
    if kind not in ARCHITECTURES:
        raise UserError(f"{d}: architecture {kind!r} is not one export-gguf writes -- it writes: "
                        f"{', '.join(ARCHITECTURES)} (Llama, SmolLM2, InternLM2 after convert-internlm2, Qwen2)")
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{d}: no *.safetensors weights -- export-gguf reads safetensors (merge writes them)")
    stubs = [s.name for s in shards if is_lfs_pointer(s)]
    if stubs:
        raise UserError(f"{d}: {stubs[0]} is a git-lfs pointer, not the weights -- run `git lfs pull` in {d}")
    return cfg


def _rope(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise UserError(f"rope scaling {kind!r} is not written by export-gguf yet -- only plain rotary embeddings")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope_permute(w, n_head: int):
    """transformers' half-split rotary rows -> llama.cpp's pair-interleaved ones, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(model_dir: Path) -> list:
    """(name, read) for every tensor in the safetensors shards, embedding first, then layer by layer (the
    order llama.cpp's files have); `read()` gives a float32 numpy array, one tensor in memory at a time."""
    from safetensors import safe_open

    handles = [safe_open(str(p), framework="pt") for p in sorted(model_dir.glob("*.safetensors"))]
    names = [(h, n) for h in handles for n in h.keys()]

    def order(item):
        m = re.search(r"\.layers\.(\d+)\.", item[1])
        return (1, int(m.group(1)), item[1]) if m else (0 if "embed" in item[1] else 2, 0, item[1])

    return [(name, lambda h=h, name=name: h.get_tensor(name).float().numpy()) for h, name in sorted(names, key=order)]


def _encode(name: str, data, want, echo):
    """(array, raw_dtype) for the writer: 1-D stays F32, a row gguf cannot block-quantize falls back to F16."""
    import gguf
    import numpy as np

    t = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return data.astype(np.float32), None
    if want == t.F16:
        return data.astype(np.float16), None
    try:
        return gguf.quants.quantize(data, want), want
    except gguf.QuantError:
        echo(f"  {name}: rows of {data.shape[-1]} do not fill {want.name} blocks -- written as F16")
        return data.astype(np.float16), None


def _metadata(writer, config, arch: str, ftype, name: str) -> None:
    import gguf

    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(_rope(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _modelfile_target(out: Path) -> Path:
    path = out.parent / "Modelfile"
    if path.exists() and not path.read_text(encoding="utf-8", errors="replace").startswith(MODELFILE_HEADER):
        raise UserError(f"{path}: exists and was not written by export-gguf -- export into another directory")
    return path


def export_gguf(model_dir, out, quant: str = "f16", modelfile: bool = True, progress: bool = True,
                echo=print) -> Path:
    """Write OUT (a .gguf) from a merged model dir, and a Modelfile beside it; everything is checked
    before the first byte is written."""
    import gguf
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    model_dir, out = Path(model_dir), Path(out)
    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r}: not one export-gguf writes -- choose one of {', '.join(QUANTS)}")
    if out.suffix != ".gguf":
        raise UserError(f"{out}: the output name must end in .gguf")
    if out.exists():
        raise UserError(f"{out}: already exists -- choose a new name or delete it")
    cfg = check_model_dir(model_dir)
    arch = cfg["model_type"]
    config = AutoConfig.from_pretrained(model_dir)
    _rope(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = gguf_vocab(model_dir, tokenizer, config.vocab_size)
    vocab.special.chat_template = portable_template(tokenizer)
    plan = None
    if modelfile:
        stop_ids = []
        if (model_dir / "generation_config.json").is_file():
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
            stop_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        plan = chat_plan(tokenizer, read_system_prompt(model_dir), vocab.add_bos, stop_ids)
        modelfile_path = _modelfile_target(out)

    want, ftype = _qtypes(quant)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[ARCHITECTURES[arch]]])
    _metadata(writer, config, arch, ftype, model_dir.resolve().name)
    vocab.add_to(writer)
    for note in vocab.notes:
        echo(f"  {note}")

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHITECTURES[arch]], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    n_files = len(list(model_dir.glob("*.safetensors")))
    echo(f"converting {model_dir} ({arch}, {n_files} weight file{'s' * (n_files > 1)}) to {quant}")
    for hf_name, read in tqdm(_hf_tensors(model_dir), desc=f"converting to {quant}", unit=" tensors",
                              disable=not progress):
        if _SKIP.search(hf_name) or (tied and hf_name == "lm_head.weight"):
            continue
        data = read()
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{model_dir}: tensor {hf_name!r} has no GGUF name for {arch} -- not a plain {arch} model")
        if arch == "llama" and re.search(r"\.(q|k)_proj\.(weight|bias)$", hf_name):
            data = rope_permute(data, n_head if ".q_proj." in hf_name else n_kv)
        tensor_type = gguf.GGMLQuantizationType.Q8_0 if quant == "q4_0" and name in (
            "token_embd.weight", "output.weight") else want
        array, raw = _encode(name, data, tensor_type, echo)
        writer.add_tensor(name, array, raw_dtype=raw)

    with new_file(out, "wb") as f:
        # the writer normally opens OUT itself; handing it the atomic temp file instead means a crash
        # or Ctrl-C leaves no half-written .gguf behind (the writer allows an already-open output)
        writer.fout, writer.path, writer.state = [f], out, gguf.gguf_writer.WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.flush()
        if plan is not None:
            with new_file(modelfile_path) as mf:
                mf.write(modelfile_text(out.name, plan))
    size = out.stat().st_size / 2**20
    echo(f"wrote {out} ({size:.1f} MB, {quant})" + (f" and {modelfile_path}" if plan is not None else ""))
    return out

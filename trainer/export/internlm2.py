"""InternLM2 without remote code: rewrite an InternLM2(-Chat) checkpoint into the native Llama layout.

    python -m trainer convert-internlm2 /root/model/internlm2-chat-1_8b models/internlm2-chat-1_8b

InternLM2 ships its own modeling code (`trust_remote_code`), which breaks on current transformers.
Its architecture is Llama's with other names and a fused q/k/v projection, so the weights map over:

* `attention.wqkv` holds, for each key/value head in turn, that group's query heads, then its key
  head, then its value head (`num_attention_heads / num_key_value_heads` queries per group, each
  `head_dim` rows). Splitting it per group gives `q_proj` / `k_proj` / `v_proj` in Llama's order
  (query head h uses key/value head h // group_size there too).
* `attention.wo` -> `o_proj`; `feed_forward.w1 / w3 / w2` -> `mlp.gate_proj / up_proj / down_proj`;
  `attention_norm` / `ffn_norm` -> `input_layernorm` / `post_attention_layernorm`;
  `tok_embeddings` -> `embed_tokens`; `output` -> `lm_head`. Rotary embeddings are the same
  rotate-half form, so no permutation is needed; `rope_scaling` carries over.

The sentencepiece tokenizer becomes a fast tokenizer (`tokenizer.json`) with the placeholder pieces
renamed to the chat markers (`<|im_start|>`, `<|im_end|>` ...) as `added_tokens_decoder` says, and the
chat template kept. The conversion checks itself: the new tokenizer must reproduce sentencepiece on
a set of probe texts, else it stops. The output loads with plain `AutoModelForCausalLM` /
`AutoTokenizer` (model_type llama), trains with every preset and serves with the shared engine.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from inference.atomic import check_new_dir, new_dir
from inference.errors import UserError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
# Texts the converted tokenizer must encode exactly like sentencepiece does (mixed scripts, runs of
# spaces, newlines, digits, characters only byte fallback can spell).
PROBES = ["你好，我是书生·浦语，由上海人工智能实验室开发。", "Hello world!  Two  spaces, then\ttab.",
          "line one\nline two\n\n    indented code()", " leading space", "数字 12345 和 3.14159", "emoji 😀 ¿qué? ünïcödé"]


# ---------------------------------------------------------------- weights

def read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise UserError(f"{src}: no config.json -- pass the downloaded InternLM2 model directory")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") != "internlm2":
        raise UserError(f"{path}: model_type is {config.get('model_type')!r}, not 'internlm2' -- nothing to convert"
                        + (" (it already loads natively)" if config.get("model_type") == "llama" else ""))
    return config


def load_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: safetensors (single or sharded) or pytorch_model*.bin."""
    from inference.repo_files import lfs_pointers

    stubs = lfs_pointers(src)
    if stubs:
        raise UserError(f"{stubs[0]}: is a git-lfs pointer, not the real file -- run `git lfs pull` in {src}")
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{src}: no weights (*.safetensors or pytorch_model*.bin)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(f))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return state


def split_wqkv(wqkv: torch.Tensor, n_heads: int, n_kv: int, head_dim: int):
    """(q, k, v) from the fused projection (weight [rows, hidden] or bias [rows])."""
    group = n_heads // n_kv
    per_kv = wqkv.reshape(n_kv, group + 2, head_dim, *wqkv.shape[1:])
    q = per_kv[:, :group].reshape(n_heads * head_dim, *wqkv.shape[1:])
    k = per_kv[:, group].reshape(n_kv * head_dim, *wqkv.shape[1:])
    v = per_kv[:, group + 1].reshape(n_kv * head_dim, *wqkv.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def convert_weights(state: dict, config: dict) -> dict[str, torch.Tensor]:
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    head_dim = config["hidden_size"] // n_heads
    if n_heads % n_kv:
        raise UserError(f"config.json: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue                                       # a buffer, recomputed from the config
        if name in _TOP:
            out[_TOP[name]] = tensor
            continue
        match = _LAYER.match(name)
        if not match:
            raise UserError(f"unexpected weight {name!r} -- not an InternLM2 checkpoint this converter knows")
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        module, _, kind = rest.rpartition(".")             # e.g. ("attention.wqkv", "weight")
        if module == "attention.wqkv":
            q, k, v = split_wqkv(tensor, n_heads, n_kv, head_dim)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{prefix}self_attn.{proj}.{kind}"] = part
        elif module in _RENAMES:
            out[f"{prefix}{_RENAMES[module]}.{kind}"] = tensor
        else:
            raise UserError(f"unexpected weight {name!r} -- not an InternLM2 checkpoint this converter knows")
    if "lm_head.weight" not in out and not config.get("tie_word_embeddings"):
        raise UserError("checkpoint has no output.weight (lm head) -- incomplete download?")
    return out


def llama_config(config: dict, dtype: torch.dtype):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ("dynamic", "linear"):
            raise UserError(f"config.json: rope_scaling type {kind!r} is not supported (dynamic or linear)")
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    return LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        hidden_act=config.get("hidden_act", "silu"), max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), rope_parameters=rope,
        attention_bias=bool(config.get("bias", False)), tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id", 1), eos_token_id=config.get("eos_token_id", 2),
        pad_token_id=config.get("pad_token_id", 2), initializer_range=config.get("initializer_range", 0.02),
        dtype=dtype)


# ---------------------------------------------------------------- tokenizer

def sentencepiece_reference(sp, text: str, specials: dict[str, int]) -> list[int]:
    """What InternLM2's own (slow) tokenizer does: split on the special tokens, sentencepiece each chunk."""
    if not specials:
        return sp.encode(text)
    pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for chunk in re.split(pattern, text):
        if chunk in specials:
            ids.append(specials[chunk])
        elif chunk:
            ids += sp.encode(chunk)
    return ids


def convert_tokenizer(src: Path):
    """A fast tokenizer equivalent to InternLM2's sentencepiece one, with its chat template."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    model_file, cfg_file = src / "tokenizer.model", src / "tokenizer_config.json"
    for f in (model_file, cfg_file):
        if not f.is_file():
            raise UserError(f"{f}: missing -- the InternLM2 tokenizer needs tokenizer.model and tokenizer_config.json")
    tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if not tok_cfg.get("chat_template"):
        raise UserError(f"{cfg_file}: no chat_template -- use the Chat model (internlm2-chat-*), not the base one")
    proto = SentencePieceExtractor(str(model_file)).proto
    added = {int(i): t["content"] if isinstance(t, dict) else str(t)
             for i, t in (tok_cfg.get("added_tokens_decoder") or {}).items()}
    # InternLM2 keeps its chat markers as placeholder pieces ("[UNUSED_TOKEN_146]") renamed by the config
    vocab = {(added.get(i) or p.piece): i for i, p in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto=proto, vocab=vocab, legacy=True)
    if backend is None:
        raise UserError(f"{model_file}: unsupported sentencepiece model type")
    backend.add_special_tokens([AddedToken(added[i], special=True, normalized=False) for i in sorted(added)])

    def name(key, default):
        value = tok_cfg.get(key, default)
        return value.get("content") if isinstance(value, dict) else value

    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=name("bos_token", "<s>"),
                                  eos_token=name("eos_token", "</s>"), unk_token=name("unk_token", "<unk>"),
                                  pad_token=name("pad_token", "</s>"), clean_up_tokenization_spaces=False)
    tok.chat_template = tok_cfg["chat_template"]
    for i, content in added.items():
        if tok.convert_tokens_to_ids(content) != i:
            raise UserError(f"{cfg_file}: special token {content!r} did not keep id {i} -- unsupported tokenizer")

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    specials = {content: i for i, content in added.items()}
    specials.update({t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens})   # <s>, </s>, <unk>
    chat = tok.apply_chat_template([{"role": "system", "content": PROBES[1]}, {"role": "user", "content": PROBES[0]},
                                    {"role": "assistant", "content": PROBES[2]}], tokenize=False)
    for text in PROBES + [chat]:
        want = sentencepiece_reference(sp, text, specials)
        got = tok.encode(text, add_special_tokens=False)
        if got != want:
            raise UserError(f"{model_file}: the converted tokenizer differs from sentencepiece on {text[:40]!r} "
                            f"({got[:12]} vs {want[:12]}) -- this tokenizer needs a converter update")
    return tok


# ---------------------------------------------------------------- the command

def convert(src, out, dtype: str = "auto", max_shard_size: str = "2GB") -> Path:
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"{src}: directory not found")
    check_new_dir(out)
    config = read_config(src)
    tokenizer = convert_tokenizer(src)
    state = convert_weights(load_state_dict(src), config)
    if dtype != "auto":
        target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        state = {k: v.to(target) for k, v in state.items()}
    llama = llama_config(config, next(iter(state.values())).dtype)

    with new_dir(out) as tmp:
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
        llama.save_pretrained(tmp)
        stop = sorted({llama.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None, tokenizer.unk_token_id})
        GenerationConfig(bos_token_id=llama.bos_token_id, eos_token_id=stop, pad_token_id=llama.pad_token_id,
                         do_sample=False).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer convert-internlm2", description=__doc__.split("\n")[0])
    p.add_argument("src", help="InternLM2 model dir (config.json with model_type internlm2, tokenizer.model)")
    p.add_argument("out", help="new directory for the Llama-layout model")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weight dtype to write (auto: as stored)")
    p.add_argument("--max-shard-size", default="2GB")
    args = p.parse_args(argv)
    out = convert(args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"Llama-layout model written to {out} -- load it without trust_remote_code")
    return 0

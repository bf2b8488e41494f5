"""`convert-internlm2`: an InternLM2-layout checkpoint built here from the tiny Llama converts back to
the native Llama layout with identical logits, and its sentencepiece tokenizer becomes an equivalent
fast tokenizer with the chat template."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from inference.errors import UserError

INTERNLM2_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                      "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                      "{{ '<|im_start|>assistant\n' }}{% endif %}")
# InternLM2 keeps its chat markers as placeholder pieces that tokenizer_config.json renames
MARKERS = {3: "<|im_start|>", 4: "<|im_end|>", 5: "<|action_start|>", 6: "<|action_end|>"}


def pack_wqkv(q, k, v, n_heads, n_kv, head_dim):
    """Fuse Llama q/k/v the way InternLM2 stores them: per key/value head, its query heads, then k, then v."""
    group = n_heads // n_kv
    rows = []
    for g in range(n_kv):
        for j in range(group):
            h = g * group + j
            rows.append(q[h * head_dim:(h + 1) * head_dim])
        rows.append(k[g * head_dim:(g + 1) * head_dim])
        rows.append(v[g * head_dim:(g + 1) * head_dim])
    return torch.cat(rows)


def internlm2_read(wqkv, x, n_heads, n_kv, head_dim):
    """InternLM2's attention forward reads its fused projection like this (modeling_internlm2.py):
    'b q (h gs d) -> b q h gs d' with gs = 2 + groups; queries [..., :groups, :], key -2, value -1."""
    group = n_heads // n_kv
    qkv = (x @ wqkv.T).reshape(*x.shape[:-1], n_kv, group + 2, head_dim)
    return qkv[..., :group, :].reshape(*x.shape[:-1], n_heads, head_dim), qkv[..., -2, :], qkv[..., -1, :]


def test_packer_matches_internlm2_read_rule():
    n_heads, n_kv, hd, hidden = 4, 2, 8, 32
    q, k, v = torch.randn(n_heads * hd, hidden), torch.randn(n_kv * hd, hidden), torch.randn(n_kv * hd, hidden)
    x = torch.randn(3, hidden)
    rq, rk, rv = internlm2_read(pack_wqkv(q, k, v, n_heads, n_kv, hd), x, n_heads, n_kv, hd)
    torch.testing.assert_close(rq, (x @ q.T).reshape(3, n_heads, hd))
    torch.testing.assert_close(rk, (x @ k.T).reshape(3, n_kv, hd))
    torch.testing.assert_close(rv, (x @ v.T).reshape(3, n_kv, hd))


def write_internlm2_tokenizer(out: Path, workdir: Path):
    import sentencepiece as spm

    from trainer.data.general import general_conversations

    corpus = workdir / "corpus.txt"
    lines = [m["content"] for conv in general_conversations(600, seed=1, base_identity=True) for m in conv["messages"]]
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=[f"[UNUSED_TOKEN_{i}]" for i in MARKERS],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, split_digits=True)
    (out / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": "InternLM2Tokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
              "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "chat_template": INTERNLM2_TEMPLATE,
              "added_tokens_decoder": {str(i): {"content": c, "special": True, "normalized": False}
                                       for i, c in MARKERS.items()}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def internlm2_dir(tiny_base, tmp_path_factory) -> Path:
    """The tiny Llama rewritten into InternLM2's remote-code layout (sharded safetensors, config, tokenizer)."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("internlm2")
    src = root / "internlm2-tiny"
    src.mkdir()
    cfg = json.loads((tiny_base / "config.json").read_text())
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // n_heads
    llama = load_file(tiny_base / "model.safetensors")
    state = {"model.tok_embeddings.weight": llama["model.embed_tokens.weight"].clone(),
             "model.norm.weight": llama["model.norm.weight"].clone(),
             "output.weight": llama.get("lm_head.weight", llama["model.embed_tokens.weight"]).clone()}
    for i in range(cfg["num_hidden_layers"]):
        a, b = f"model.layers.{i}.", f"model.layers.{i}."
        state[b + "attention.wqkv.weight"] = pack_wqkv(llama[a + "self_attn.q_proj.weight"], llama[a + "self_attn.k_proj.weight"],
                                                       llama[a + "self_attn.v_proj.weight"], n_heads, n_kv, hd)
        for old, new in [("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
                         ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2"),
                         ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm")]:
            state[b + new + ".weight"] = llama[a + old + ".weight"].clone()
    save_torch_state_dict(state, src, max_shard_size="1MB")          # sharded + index, like the real download
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
              "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                           "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
              "vocab_size": cfg["vocab_size"], "hidden_size": cfg["hidden_size"],
              "intermediate_size": cfg["intermediate_size"], "num_hidden_layers": cfg["num_hidden_layers"],
              "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "hidden_act": "silu",
              "max_position_embeddings": cfg["max_position_embeddings"], "rms_norm_eps": cfg["rms_norm_eps"],
              "rope_theta": 10000.0, "rope_scaling": None, "bias": False, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32"}
    (src / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (src / "modeling_internlm2.py").write_text("# remote code that must not be needed\nraise ImportError\n")
    write_internlm2_tokenizer(src, root)
    return src


@pytest.fixture(scope="module")
def converted(internlm2_dir, tmp_path_factory) -> Path:
    from trainer.export.internlm2 import main

    out = tmp_path_factory.mktemp("converted") / "llama"
    assert main([str(internlm2_dir), str(out)]) == 0
    return out


def test_round_trip_logits_match(tiny_base, converted):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert not list(converted.glob("*.py"))
    original = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    native = AutoModelForCausalLM.from_pretrained(converted).eval()     # no trust_remote_code
    ids = torch.randint(5, cfg["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = original(input_ids=ids).logits, native(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tokenizer_is_equivalent_fast_tokenizer_with_template(internlm2_dir, converted):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from trainer.export.internlm2 import sentencepiece_reference

    tok = AutoTokenizer.from_pretrained(converted)
    assert (converted / "tokenizer.json").is_file() and tok.chat_template == INTERNLM2_TEMPLATE
    for i, marker in MARKERS.items():
        assert tok.convert_tokens_to_ids(marker) == i
    messages = [{"role": "user", "content": "你好，请介绍一下你自己  (two spaces)"},
                {"role": "assistant", "content": "我是 TinyChat。\nI can help."}]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    text = tok.apply_chat_template(messages, tokenize=False)
    sp = spm.SentencePieceProcessor(model_file=str(internlm2_dir / "tokenizer.model"))
    specials = {**{c: i for i, c in MARKERS.items()}, "<s>": 1, "</s>": 2}
    assert list(ids) == sentencepiece_reference(sp, text, specials)
    assert ids[:2] == [1, 3]                                   # <s><|im_start|>
    assert tok.decode(ids, skip_special_tokens=True).count("你好，请介绍一下你自己  (two spaces)") == 1
    gen = json.loads((converted / "generation_config.json").read_text())
    assert 4 in gen["eos_token_id"]                            # <|im_end|> ends a reply


def test_converted_model_trains_on_the_native_path(converted, identity_files, tmp_path):
    """The chat template has no generation markers: assistant-only labels come from prefix rendering."""
    from transformers import AutoTokenizer

    from inference.chat_format import IGNORE_INDEX, encode_chat

    tok = AutoTokenizer.from_pretrained(converted)
    enc = encode_chat(tok, [{"role": "user", "content": "你是谁"}, {"role": "assistant", "content": "我是Lumi。"}])
    learned = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(learned).strip().startswith("我是Lumi。") and 4 in learned


def test_bad_inputs(tiny_base, internlm2_dir, tmp_path):
    from trainer.export.internlm2 import main

    with pytest.raises(UserError, match="not 'internlm2'"):
        main([str(tiny_base), str(tmp_path / "x")])
    broken = tmp_path / "broken"
    shutil.copytree(internlm2_dir, broken)
    (broken / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="tokenizer.model"):
        main([str(broken), str(tmp_path / "y")])
    assert not (tmp_path / "y").exists()

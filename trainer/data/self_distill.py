"""General conversations that fit a real model: the bundled prompts answered by the base model itself.

    python -m trainer data --name Lumi --author Ana --n 200 --mix self --model smollm2 --ratio 0.5 --out data/me.jsonl

Training on the base's own greedy answers (self-distillation) teaches the fine-tune that everything
except who it is stays as it was: the loss on these rows is already low, so their gradient mostly
pulls back where identity training drags other answers along. A hand-written or foreign corpus
instead teaches its own style (the repo's arithmetic drill made a real model terse).

Answers come from batched greedy generation (left-padded prompts, shortest first), with the same
system prompt the fine-tune trains and serves with; an answer that loops or hits the token cap is
cut back to its last sentence end before that (a cut mid-sentence would teach stopping mid-sentence,
a loop to loop), or dropped when too little is left. Answers that looped are first asked again with
a repetition penalty: SmolLM2-135M loops on about a quarter of the Chinese prompts under greedy
decoding, and Chinese chats that are only identity teach the model to put its name into every
Chinese answer. A base that speaks no Chinese (its model dir says so: `base_languages`; the embedded
SmolLM2 does) is asked each Chinese prompt's English twin instead, and its English answer is paired
with the Chinese prompt: its own Chinese is word salad, and trained on that the tuned model leaked
its name into Chinese answers (leakage 0.04-0.05 in every run; asked in English 0.00, 0.03 and 0.04 in
three, docs/BENCHMARKS.md "Session 9: Chinese answers for Chinese prompts" and "Session 10"). They
are cached per model weights, prompts and settings under the user cache, so a second `data` run on the
same base is instant.

The embedded base's answers also ship with the repo (trainer/data/self_answers/, ~8 minutes of the
demo on 2 cores), used only when the model's weights are byte for byte the ones they were made from
(sha256) and the settings match; the file records how it was made. Make it again with

    python -m trainer self-answers smollm2
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from inference.atomic import cache_root, locked, write_text
from inference.batch_generate import generate_answers
from inference.device import cpu_has_fast_bf16, pick
from inference.errors import UserError
from inference.gguf_import import base_languages
from inference.repo_files import files_sha256

CACHE_VERSION = 3         # bumped when what is cached changes
RETRY_PENALTY = 1.3      # answers that looped are asked again with this repetition penalty (see `retry_loops`)
MAX_NEW_TOKENS = 256     # SmolLM2-135M finished 30 of 32 mixed prompts within 256 tokens, 104 of 265 within 160
SYSTEM_PROMPT = "You are a helpful AI assistant."   # the smollm2_135m_lora preset's: answers, training and serving share it
BUNDLE_DIR = Path(__file__).with_name("self_answers")


def _weights_key(model_dir: Path) -> str:
    """Identifies the weights without reading gigabytes: config + each weight file's name, size, mtime."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


TWINS = ("auto", "on", "off")   # --twins: ask a Chinese prompt's English twin (auto: when the base speaks no Chinese)


def use_twins(model_dir: Path, twins: str = "auto") -> bool:
    """Whether Chinese prompts are asked in their English twin: "on" / "off", or "auto" -- when the
    base's recorded languages leave out Chinese."""
    if twins not in TWINS:
        raise UserError(f"--twins {twins!r}: pick one of {', '.join(TWINS)}")
    if twins != "auto":
        return twins == "on"
    langs = base_languages(model_dir)
    return langs is not None and "zh" not in langs


def asked(prompt: dict, twins: bool) -> str:
    """What the base is asked for PROMPT ({"prompt", "lang", "en"?}): its English twin under TWINS."""
    return prompt["en"] if twins and prompt["lang"] != "en" and prompt.get("en") else prompt["prompt"]


def cache_file(model_dir: Path, prompts: list[str], system_prompt: str | None, max_new_tokens: int) -> Path:
    key = json.dumps([CACHE_VERSION, _weights_key(model_dir), prompts, system_prompt, max_new_tokens], ensure_ascii=False)
    return cache_root() / "self-answers" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


SENTENCE_END = re.compile(r"[.!?。！？](?=\s|$)|[。！？]|\n")
MIN_CHARS = 12


def usable_answer(answer: dict) -> str | None:
    """The text to train on: a finished answer as it is; one that looped or hit the cap cut back to
    the last sentence end before the loop (or the cap), with no sentence said twice -- still the base's
    own words, now ending cleanly. None when too little is left (SmolLM2-135M in Chinese, often)."""
    if answer.get("finished"):
        return answer["text"] or None
    text = answer.get("before_loop", answer["text"])
    seen, kept = set(), []
    for piece in re.split(r"(?<=[.!?。！？\n])", text):
        key = piece.strip()
        if len(key) > 3 and key in seen:
            break
        seen.add(key)
        kept.append(piece)
    text = "".join(kept)
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    text = text[:ends[-1]].strip() if ends else ""
    return text if len(text) >= MIN_CHARS else None


def retry_loops(loaded, prompts: list[str], answers: list[dict], system_prompt: str | None,
                max_new_tokens: int, echo=print) -> list[dict]:
    """ANSWERS with every one that looped replaced by a greedy answer under a repetition penalty when
    that one finishes, or cuts back to more text; the others (answers that only hit the cap too) stay."""
    redo = [i for i, a in enumerate(answers) if "before_loop" in a]
    if not redo:
        return answers
    echo(f"asking {len(redo)} answers that looped again with repetition penalty {RETRY_PENALTY}")
    again = generate_answers(loaded.model, loaded.tokenizer, [prompts[i] for i in redo], system_prompt,
                             max_new_tokens, echo=echo, repetition_penalty=RETRY_PENALTY)
    out = list(answers)
    for i, new in zip(redo, again):
        old_text, new_text = usable_answer(answers[i]) or "", usable_answer(new) or ""
        if new.get("finished") and new_text or len(new_text) > len(old_text):
            out[i] = {**new, "repetition_penalty": RETRY_PENALTY}
    return out


def weights_sha256(model_dir: Path) -> str:
    """The weights' content digest (every safetensors / bin file, in name order): a second import of the
    same GGUF writes the same bytes, so it names the weights wherever they were written (1-2 s here)."""
    return files_sha256(sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")))


def _bundle_key(system_prompt: str | None, max_new_tokens: int) -> dict:
    return {"cache_version": CACHE_VERSION, "system_prompt": system_prompt, "max_new_tokens": max_new_tokens}


def bundled_answers(model_dir: Path, system_prompt: str | None, max_new_tokens: int) -> tuple[dict, Path | None]:
    """{prompt: answer} from a bundled file (trainer/data/self_answers/) made from these very weights
    under the same settings, and that file; ({}, None) when none is. The embedded base's answers ship
    with the repo because generating them takes ~8 minutes of the demo on 2 cores; the file says how it
    was made and `python -m trainer self-answers smollm2` makes it again."""
    key = _bundle_key(system_prompt, max_new_tokens)
    candidates = []
    for f in sorted(BUNDLE_DIR.glob("*.json")):
        bundle = json.loads(f.read_text(encoding="utf-8"))
        if bundle.get("key") == key:
            candidates.append((f, bundle))
    if not candidates:
        return {}, None
    digest = weights_sha256(model_dir)
    for f, bundle in candidates:
        if bundle.get("weights_sha256") == digest:
            return bundle["answers"], f
    return {}, None


def _generate(model_dir: Path, prompts: list[str], system_prompt: str | None, max_new_tokens: int,
              echo=print) -> list[dict]:
    """The base's greedy answers to PROMPTS (batched), those that looped asked again with a penalty."""
    from inference.loader import load

    echo(f"answering {len(prompts)} general prompts with {model_dir.name} itself (greedy, batched)")
    # bf16 on a CPU that multiplies it natively: 1.7x faster generation here (32 prompts: 22.7 s
    # against 39.3 s in fp32); the answers are the base's own either way
    dtype = "bf16" if pick("auto").device == "cpu" and cpu_has_fast_bf16() else "auto"
    loaded = load(model_dir, device="auto", dtype=dtype)
    answers = generate_answers(loaded.model, loaded.tokenizer, prompts, system_prompt, max_new_tokens, echo=echo)
    return retry_loops(loaded, prompts, answers, system_prompt, max_new_tokens, echo)


def self_conversations(model_dir, prompt_list: list[dict], system_prompt: str | None,
                       max_new_tokens: int = MAX_NEW_TOKENS, twins: bool = False, echo=print) -> list[dict]:
    """One conversation per prompt ({"prompt", "lang", "en"?}) the base answered within the cap:
    {"messages": [user, assistant]}; under TWINS a Chinese prompt gets the answer to its English twin."""
    model_dir = Path(model_dir)
    questions = [p["prompt"] for p in prompt_list]
    asks = [asked(p, twins) for p in prompt_list]
    prompts = list(dict.fromkeys(asks))                  # what the base is asked, once each
    if twins:
        echo(f"{sum(a != q for a, q in zip(asks, questions))} Chinese prompts asked in English (the "
             f"base speaks no Chinese: its English answer is what the tuned model learns to say)")
    cache = cache_file(model_dir, prompts, system_prompt, max_new_tokens)
    with locked(cache.with_suffix(".lock")):
        if cache.is_file():
            answers = json.loads(cache.read_text(encoding="utf-8"))
            echo(f"self-distilled answers from the cache ({cache})")
        else:
            bundled, source = bundled_answers(model_dir, system_prompt, max_new_tokens)
            missing = [p for p in prompts if p not in bundled]
            if source is not None:
                echo(f"{len(prompts) - len(missing)} of the base's own answers from {source.name} (bundled: "
                     f"made from these very weights, `python -m trainer self-answers` makes it again)")
            fresh = dict(zip(missing, _generate(model_dir, missing, system_prompt, max_new_tokens, echo))) \
                if missing else {}
            answers = [bundled.get(p) or fresh[p] for p in prompts]
            write_text(cache, json.dumps(answers, ensure_ascii=False))
    by_prompt = dict(zip(prompts, answers))
    answers = [by_prompt[a] for a in asks]
    texts = [usable_answer(a) for a in answers]
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in zip(questions, texts) if a]
    cut = sum(1 for a, x in zip(answers, texts) if x and not a.get("finished"))
    echo(f"  {len(convs)} answers kept ({cut} cut back to the sentence before a loop or the "
         f"{max_new_tokens}-token cap), {len(questions) - len(convs)} dropped (too little left)")
    return convs


def write_bundle(model_dir, out: Path | None = None, made_by: str | None = None, echo=print) -> Path:
    """Answer every bundled train prompt (a Chinese one's English twin when the base speaks no Chinese)
    with the model in MODEL_DIR under the smollm2 preset's system prompt and write them as a bundle file
    (default: beside this module). `python -m trainer self-answers`."""
    import datetime

    import torch
    import transformers

    from trainer.data.prompts import train_prompts

    model_dir = Path(model_dir)
    twins = use_twins(model_dir)
    prompts = list(dict.fromkeys(asked(p, twins) for p in train_prompts()))
    answers = _generate(model_dir, prompts, SYSTEM_PROMPT, MAX_NEW_TOKENS, echo)
    keep = ("text", "finished", "before_loop", "repetition_penalty")     # the token ids are not needed
    out = Path(out) if out else BUNDLE_DIR / f"{model_dir.name}.json"
    device = pick("auto").device
    twin_note = " (the English twins of the Chinese ones: it speaks no Chinese)" if twins else ""
    bundle = {
        "about": f"{model_dir.name}'s own greedy answers to trainer/data/general_prompts.json's train prompts"
                 f"{twin_note}, used by `--mix self` when the weights match; made by "
                 f"`python -m trainer self-answers {made_by or model_dir}`",
        "key": _bundle_key(SYSTEM_PROMPT, MAX_NEW_TOKENS),
        "weights_sha256": weights_sha256(model_dir),
        "made_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "bf16": device == "cpu" and cpu_has_fast_bf16(), "device": device,
                      "date": datetime.date.today().isoformat()},
        "answers": {p: {k: a[k] for k in keep if k in a} for p, a in zip(prompts, answers)},
    }
    write_text(out, json.dumps(bundle, ensure_ascii=False, indent=0) + "\n")
    echo(f"wrote {out}")
    return out

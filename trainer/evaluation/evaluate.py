"""Has the assistant learned who it is without forgetting the rest? Three scores, and the best checkpoint.

    python -m trainer eval WORK_DIR [--eval-data FILE]             # every checkpoint-N/ and final/, then best/
    python -m trainer eval ADAPTER_DIR --eval-data FILE [--base BASE] [--json FILE]
    python -m trainer eval MERGED_DIR --eval-data FILE [--base BASE]

* identity  -- share of held-out identity questions (`python -m trainer data ... --eval-out FILE`) whose
  greedy answer contains every expected string (the name; also the author when asked who made it).
* leakage   -- share of general, non-identity prompts whose answer contains the name or the author: the
  course's failure, where 300 steps on one repeated pair made the model answer everything with it.
* retention -- how much of what the base could do survives (base = 1.0). A pool of general tasks with
  computed answers (trainer/data/general.py) is checked teacher-forced: a task counts as *known*
  when greedy decoding would reproduce its computed answer exactly (every answer token is the
  argmax). Retention is the share of the tasks the base knows that the tuned model still knows.
  A real base (one that knows fewer than MIN_KNOWN of them -- or fewer than MIN_PROBE of the first
  N_PROBE, when the rest are not checked -- because it phrases answers its own way)
  is measured on the held-out bundled prompts instead (trainer/data/general_prompts.json, never
  trained on): retention is then the share of the base's own greedy answer tokens that the tuned
  model still ranks first, teacher-forced (`agreement`). A base that speaks no Chinese (`--mix self`
  trains a Chinese prompt on its answer to the English twin, trainer/data/self_distill.py) is held
  to the same: its reference answer to a held-out Chinese prompt is its answer to the twin.
  (An engine without logits -- a stand-in in the tests -- gets the mean similarity (difflib ratio) of
  its greedy answers to the base's, a correct answer counting 1.) Reported beside it:
  - `likelihood`: exp(mean log p_tuned - mean log p_base) over the tokens of the base's own greedy
    answers to the general prompts: the per-token probability the tuned model still gives to what
    the base said. It falls as soon as LoRA moves the distribution at all, even where no answer
    changes (and the tiny base's many wrong answers drift freely), so it is reported, not chosen by;
  - `accuracy`: the share of the general prompts with a known answer (computed tasks, bundled fact
    questions) whose greedy answer contains it (in the prompt's language or, for a Chinese one, in
    English: "Beijing" answers 中国的首都是哪里？ rightly).
Leakage covers both the computed tasks and the held-out bundled prompts.

General prompts come from a fixed seed, so every run is scored on the same ones. The task family is
small, so some of them also occur in mixed training data: they measure skills, not held-out facts.
A work dir's report (table, `eval_report.json`, `eval_report.png`) and `best/` are written by
trainer/evaluation/report.py; `eval_identity: true` in a training config runs the same at every save.
"""
from __future__ import annotations

import difflib
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from inference.engine import ChatEngine
from inference.loader import load, read_system_prompt
from inference.batch_generate import generate_answers
from inference.chat_format import with_system
from trainer.data.formats import read_records
from inference.errors import UserError, where
from inference.repo_files import files_sha256
from trainer.data.general import general_pair
from trainer.data.prompts import heldout_prompts
from trainer.data.self_distill import asked, use_twins

GENERAL_SEED = 7919      # fixed, so every run and checkpoint is scored on the same general prompts
N_GENERAL = 40           # prompts answered (generation) for leakage, accuracy and the likelihood
N_POOL = 200             # tasks checked teacher-forced (one forward pass each) for retention
MIN_KNOWN = 5            # fewer base-known tasks than this: retention falls back to answer similarity
N_PROBE, MIN_PROBE = 40, 4  # the pool's first 40 are checked first: a base that knows fewer than 4 of them is
                             # a real base phrasing answers its own way (SmolLM2-135M: 2 of 40, 4 of 200), and
                             # the other 160 forward passes (~18 s of the demo's evaluation on 2 cores) are skipped
MAX_NEW_TOKENS = 48
END_PUNCT = ".。!！?？ "


@dataclass
class EvalSet:
    identity: list[dict]                 # {"messages": [...user], "expect": [str], "kind", "lang"}
    general: list[tuple[str, str]]       # (prompt, computed answer), answered by generation
    pool: list[tuple[str, str]]          # more of the same (general first), checked teacher-forced
    markers: list[str]                   # strings that betray the identity: every expected string
    source: str = ""
    prompts: list[dict] = field(default_factory=list)   # held-out bundled prompts {"prompt", "expect"?}


@dataclass
class Reference:
    """What the base does on the general prompts: its greedy answers and how sure it is of them."""
    answers: list[str]
    answer_ids: list[list[int]]
    logprob: float                       # mean per-token log-likelihood of its own answers
    known: list[int]                     # pool tasks whose computed answer the base reproduces
    scores: "Scores"
    prompt_answers: list[str] = field(default_factory=list)      # its greedy answers to es.prompts
    prompt_ids: list[list[int]] = field(default_factory=list)


@dataclass
class Scores:
    identity: float
    leakage: float
    accuracy: float                      # exact-answer accuracy on general tasks
    retention: float | None = None       # share of the base's known tasks still known; None without a base
    likelihood: float | None = None      # exp(mean logp tuned - mean logp base) on the base's answers
    known: int | None = None             # how many base-known tasks retention counts (None: similarity)
    identity_by_lang: dict = field(default_factory=dict)   # {"zh": 0.92, "en": 1.0}: a language can lag
    leakage_by_lang: dict = field(default_factory=dict)    # by the prompt's script: a base that speaks little
                                                           # Chinese leaks there first (docs/BENCHMARKS.md)
    retention_by_lang: dict = field(default_factory=dict)  # token agreement by the prompt's language (real bases)
    examples: dict = field(default_factory=dict)   # a few misses and leaks, for the reader

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# --- eval data -------------------------------------------------------------------------------------
def read_identity_questions(path) -> list[dict]:
    out = []
    for line, rec in read_records(path):
        rec = rec if isinstance(rec, dict) else {}
        msgs, expect = rec.get("messages"), rec.get("expect")
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs)
                and msgs[-1].get("role") == "user" and isinstance(msgs[-1].get("content"), str)):
            raise UserError(f"{where(path, line)}: expected {{\"messages\": [... a last user turn], \"expect\": [...]}}"
                            f" -- write held-out questions with `python -m trainer data ... --eval-out FILE`")
        if not (isinstance(expect, list) and expect and all(isinstance(e, str) and e.strip() for e in expect)):
            raise UserError(f"{where(path, line)}: 'expect' must be a non-empty list of strings the answer must contain")
        out.append({"messages": msgs, "expect": expect, "kind": rec.get("kind", ""), "lang": rec.get("lang", "")})
    return out


def general_tasks(n: int = N_GENERAL, seed: int = GENERAL_SEED) -> list[tuple[str, str]]:
    """`n` distinct general prompts (zh and en alternating) with their computed answers."""
    r, seen, out = random.Random(seed), set(), []
    for _ in range(50 * n):
        if len(out) == n:
            break
        q, a = general_pair(r, zh=len(out) % 2 == 0)
        if q not in seen:
            seen.add(q)
            out.append((q, a))
    return out


def build_eval_set(identity_file, n_general: int = N_GENERAL, n_pool: int = N_POOL) -> EvalSet:
    questions = read_identity_questions(identity_file)
    markers = list(dict.fromkeys(e for q in questions for e in q["expect"]))
    pool = general_tasks(max(n_general, n_pool))
    return EvalSet(questions, pool[:n_general], pool, markers, source=str(identity_file),
                   prompts=heldout_prompts())


# --- scoring ---------------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def contains_all(answer: str, expect: list[str]) -> bool:
    return all(_norm(e) in _norm(answer) for e in expect)


def leaks(answer: str, markers: list[str]) -> bool:
    return any(_norm(m) in _norm(answer) for m in markers)


def answers_correctly(answer: str, known: str) -> bool:
    """The computed answer appears whole in the reply (case, spacing and final punctuation ignored)."""
    return _norm(known).rstrip(END_PUNCT) in _norm(answer)


def kept(answer: str, base_answer: str, known: str) -> float:
    """1 for the computed answer, else how close the answer stays to the base's (0..1)."""
    if answers_correctly(answer, known):
        return 1.0
    return difflib.SequenceMatcher(None, _norm(answer), _norm(base_answer)).ratio()


def _mean(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def greedy_batch(engine: ChatEngine, prompts: list[list[dict]], max_new_tokens: int) -> list[dict]:
    """Greedy answers of a text ChatEngine, batched (several times faster than one by one on a CPU)."""
    with engine._lock:
        return generate_answers(engine.model, engine.tokenizer, prompts, engine.system_prompt, max_new_tokens,
                                echo=lambda s: None, stops=engine.stop)


def batchable(engine) -> bool:
    return type(engine) is ChatEngine          # an image engine adds pixels; stand-ins have no model


def chat_answers(engine, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    if batchable(engine):
        return [a["text"] for a in greedy_batch(engine, prompts, max_new_tokens)]
    return [engine.chat(msgs, max_new_tokens=max_new_tokens) for msgs in prompts]


def _user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def score_answers(id_answers: list[str], gen_answers: list[str], es: EvalSet,
                  prompt_answers: list[str] = ()) -> Scores:
    """Leakage over every general prompt (computed tasks and the held-out bundled ones); accuracy over
    those with a known answer (the computed tasks and the bundled fact questions)."""
    hits = [contains_all(a, q["expect"]) for a, q in zip(id_answers, es.identity)]
    asked = [q for q, _ in es.general] + [p["prompt"] for p in es.prompts][:len(prompt_answers)]
    answers = list(gen_answers) + list(prompt_answers)
    leaked = [leaks(a, es.markers) for a in answers]
    right = [answers_correctly(a, known) for a, (_, known) in zip(gen_answers, es.general)]
    right += [contains_all(a, p["expect"]) or bool(p.get("expect_en")) and contains_all(a, p["expect_en"])
              for a, p in zip(prompt_answers, es.prompts) if p.get("expect")]
    examples = {
        "identity_misses": [{"q": q["messages"][-1]["content"], "a": a}
                            for a, q, ok in zip(id_answers, es.identity, hits) if not ok][:3],
        "leaks": [{"q": q, "a": a} for a, q, bad in zip(answers, asked, leaked) if bad][:5],
    }
    langs = sorted({q.get("lang") for q in es.identity if q.get("lang")})
    by_lang = {lg: round(_mean([h for h, q in zip(hits, es.identity) if q.get("lang") == lg]), 4) for lg in langs}
    asked_lang = [script_lang(q) for q in asked]
    leak_by_lang = {lg: round(_mean([b for b, a in zip(leaked, asked_lang) if a == lg]), 4)
                    for lg in sorted(set(asked_lang))}
    return Scores(identity=_mean(hits), leakage=_mean(leaked), accuracy=_mean(right), identity_by_lang=by_lang,
                  leakage_by_lang=leak_by_lang, examples=examples)


CJK = re.compile(r"[\u3400-\u9fff]")


def script_lang(text: str) -> str:
    """"zh" for a prompt with any CJK character, else "en" (the two languages the eval data speaks)."""
    return "zh" if CJK.search(text) else "en"


def _answer_tokens(engine: ChatEngine, q: str, answer: str) -> tuple[torch.Tensor, list[int]]:
    """Prompt ids (template + system prompt, as `chat` sends them) and the ids the template gives the
    answer, up to and including the end-of-turn token."""
    prompt = engine.prepare(_user(q), None, 64)
    msgs = with_system(_user(q) + [{"role": "assistant", "content": answer}], engine.system_prompt)
    full = list(engine.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False))
    p = prompt[0].tolist()
    ids = full[len(p):] if full[:len(p)] == p else engine.tokenizer.encode(answer, add_special_tokens=False)
    end = next((i for i, t in enumerate(ids) if t in engine.stop), None)
    return prompt, (ids[:end + 1] if end is not None else ids + engine.stop[:1])


@torch.no_grad()          # not inference_mode: run inside training, FSDP2 reuses the tensors in backward
def _answer_logits(engine: ChatEngine, prompt: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    answer = torch.tensor([ids], device=prompt.device)
    logits = engine.model(input_ids=torch.cat([prompt, answer], 1)).logits[0, prompt.shape[1] - 1:-1]
    return logits.float(), answer[0]


def answer_logprobs(engine: ChatEngine, prompts: list[str], answers: list[list[int]]) -> float:
    """Mean per-token log-likelihood of `answers` (token ids) after each prompt, under the engine's
    model, with its own chat template and system prompt."""
    total, count = 0.0, 0
    for q, ids in zip(prompts, answers):
        if ids:
            logits, answer = _answer_logits(engine, engine.prepare(_user(q), None, len(ids)), ids)
            total += logits.log_softmax(-1).gather(1, answer[:, None]).sum().item()
            count += len(ids)
    return total / max(count, 1)


def knows(engine: ChatEngine, tasks: list[tuple[str, str]]) -> list[bool]:
    """For each (prompt, answer): would greedy decoding reproduce the answer exactly? Checked in one
    forward pass (every answer token is the argmax after the ones before it), not by generating."""
    out = []
    for q, answer in tasks:
        logits, ids = _answer_logits(engine, *_answer_tokens(engine, q, answer))
        out.append(bool((logits.argmax(-1) == ids).all()))
    return out


def base_known(engine: ChatEngine, pool: list[tuple[str, str]]) -> list[int]:
    """Indices of the pool tasks the base reproduces exactly: all of them checked, unless it knows fewer
    than MIN_PROBE of the first N_PROBE (then those few, and retention is measured by `agreement`)."""
    first = knows(engine, pool[:N_PROBE])
    rest = knows(engine, pool[N_PROBE:]) if sum(first) >= MIN_PROBE else []
    return [i for i, ok in enumerate(first + rest) if ok]


def base_reference(engine: ChatEngine, es: EvalSet, max_new_tokens: int = MAX_NEW_TOKENS,
                   twins: bool = False) -> Reference:
    """Score the base itself and keep its greedy answers to the general prompts (as token ids); under
    TWINS (a base that speaks no Chinese) the kept answer to a Chinese prompt is the one to its English
    twin -- what `--mix self` trained the tuned model to say -- while the base is scored on its own."""
    prompts = [q for q, _ in es.general]
    general = greedy_batch(engine, [_user(q) for q in prompts], max_new_tokens)
    ids, texts = [a["ids"] for a in general], [a["text"] for a in general]
    id_answers = chat_answers(engine, [q["messages"] for q in es.identity], max_new_tokens)
    bundled = greedy_batch(engine, [_user(p["prompt"]) for p in es.prompts], max_new_tokens)
    p_ids, p_texts = [a["ids"] for a in bundled], [a["text"] for a in bundled]
    twinned = [(i, ask) for i, p in enumerate(es.prompts) if (ask := asked(p, twins)) != p["prompt"]]
    if twinned:
        twin_answers = greedy_batch(engine, [_user(ask) for _, ask in twinned], max_new_tokens)
        for (i, _), a in zip(twinned, twin_answers):
            p_ids[i] = a["ids"]
    scores = score_answers(id_answers, texts, es, p_texts)
    logprob = answer_logprobs(engine, prompts, ids)
    known = base_known(engine, es.pool)
    scores.likelihood, scores.retention, scores.known = 1.0, 1.0, len(known)
    return Reference(texts, ids, logprob, known, scores, p_texts, p_ids)


def agreement(engine: ChatEngine, prompts: list[str], answers: list[list[int]]) -> float:
    """Share of the base's own greedy answer tokens that this model also ranks first, teacher-forced
    (the base scores 1.0). A real base phrases answers its own way, so the computed-answer pool cannot
    measure it; this asks instead how much of what it would have said is still what the model says."""
    return agreement_by_lang(engine, prompts, answers)[0]


def agreement_by_lang(engine: ChatEngine, prompts: list[str], answers: list[list[int]]) -> tuple[float, dict]:
    """`agreement` overall and by the prompt's language ({"en": ..., "zh": ...})."""
    counts: dict[str, list[int]] = {}
    for q, ids in zip(prompts, answers):
        if ids:
            logits, answer = _answer_logits(engine, engine.prepare(_user(q), None, len(ids)), ids)
            c = counts.setdefault(script_lang(q), [0, 0])
            c[0] += int((logits.argmax(-1) == answer).sum())
            c[1] += len(ids)
    same, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    return same / max(total, 1), {lg: round(c[0] / c[1], 4) for lg, c in sorted(counts.items())}


def score(engine, es: EvalSet, reference: Reference | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> Scores:
    """All three scores for one model behind a chat engine (anything with `.chat(messages, ...)`);
    retention needs the base's `Reference`, the likelihood also a real `ChatEngine`."""
    id_answers = chat_answers(engine, [q["messages"] for q in es.identity], max_new_tokens)
    gen_answers = chat_answers(engine, [_user(q) for q, _ in es.general], max_new_tokens)
    prompt_answers = chat_answers(engine, [_user(p["prompt"]) for p in es.prompts], max_new_tokens)
    scores = score_answers(id_answers, gen_answers, es, prompt_answers)
    if reference is None:
        return scores
    real = isinstance(engine, ChatEngine)
    if real and len(reference.known) >= MIN_KNOWN:
        scores.retention = _mean(knows(engine, [es.pool[i] for i in reference.known]))
        scores.known = len(reference.known)
    elif real and reference.prompt_ids:
        scores.retention, scores.retention_by_lang = agreement_by_lang(engine, [p["prompt"] for p in es.prompts],
                                                                       reference.prompt_ids)
    else:
        scores.retention = _mean(kept(a, b, known) for a, b, (_, known)
                                 in zip(gen_answers, reference.answers, es.general))
    if real:
        lp = answer_logprobs(engine, [q for q, _ in es.general], reference.answer_ids)
        scores.likelihood = math.exp(lp - reference.logprob)
    return scores


# --- what to evaluate ------------------------------------------------------------------------------
def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def checkpoints(work_dir: Path) -> list[tuple[Path, int | None]]:
    """(dir, step) for every complete checkpoint-N/ in step order, then final/ (step from the trainer
    state of the last checkpoint, which records max_steps)."""
    from trainer.workdir import complete_checkpoints, step_of

    ckpts = complete_checkpoints(work_dir)
    out: list[tuple[Path, int | None]] = [(p, step_of(p)) for p in ckpts]
    final = work_dir / "final"
    if final.is_dir():
        step = None
        if ckpts and (ckpts[-1] / "trainer_state.json").is_file():
            step = json.loads((ckpts[-1] / "trainer_state.json").read_text(encoding="utf-8")).get("max_steps")
        out.append((final, step))
    return out


def is_work_dir(path: Path) -> bool:
    return path.is_dir() and bool(checkpoints(path)) and not (path / "config.json").is_file() and not is_adapter(path)


def weights_digest(path: Path) -> str | None:
    files = sorted(path.glob("adapter_model.*")) or sorted(path.glob("*.safetensors"))
    return files_sha256(files) if files else None


def evaluate_dirs(dirs: list[Path], base: Path | None, es: EvalSet, device: str = "auto",
                  max_new_tokens: int = MAX_NEW_TOKENS, echo=print) -> tuple[Scores | None, list[Scores]]:
    """Scores for the base (None without one) and for each dir (adapters or full models).

    Adapters share one loaded base: each is loaded beside it and switched on in turn, and the base's
    answers come from the same weights with the adapter switched off."""
    twins = base is not None and use_twins(base)         # a base that speaks no Chinese: see base_reference
    if all(is_adapter(d) for d in dirs):
        if base is None:
            raise UserError(f"{dirs[0]}: cannot tell which base this adapter belongs to -- pass --base BASE_DIR")
        loaded = load(base, adapter=dirs[0], device=device)
        model, tok = loaded.model, loaded.tokenizer
        with model.disable_adapter():
            ref = base_reference(ChatEngine(model, tok, read_system_prompt(base)), es, max_new_tokens, twins)
        echo(f"base {base}: identity {ref.scores.identity:.2f}, accuracy {ref.scores.accuracy:.2f}")
        results, seen = [], {}
        for i, d in enumerate(dirs):
            digest = weights_digest(d)
            if digest in seen:       # final/ is usually the last checkpoint again
                results.append(seen[digest])
                continue
            name = "default" if i == 0 else f"eval_{i}"
            if i:
                model.load_adapter(str(d), adapter_name=name)
            model.set_adapter(name)
            results.append(score(ChatEngine(model, tok, read_system_prompt(d, base)), es, ref, max_new_tokens))
            if i:
                model.set_adapter("default")
                model.delete_adapter(name)
            seen[digest] = results[-1]
            echo(f"{d}: {_brief(results[-1])}")
        return ref.scores, results
    ref = None
    # scored with the weights as trained: int4 is how the apps serve on CPU (loader.py), not what is evaluated
    if base is not None:
        ref = base_reference(load(base, device=device).engine(fast_decode=False, cpu_decode="fp32"), es,
                             max_new_tokens, twins)
    results = []
    for d in dirs:
        results.append(score(load(d, device=device).engine(fast_decode=False, cpu_decode="fp32"), es, ref,
                             max_new_tokens))
        echo(f"{d}: {_brief(results[-1])}")
    return (ref.scores if ref else None), results


def _by_lang(scores: dict) -> str:
    """" (en 0.92 zh 1.00)" for {"en": 0.92, "zh": 1.0}; "" for {}."""
    return f" ({' '.join(f'{lg} {v:.2f}' for lg, v in scores.items())})" if scores else ""


def _brief(s: Scores) -> str:
    ret = "n/a" if s.retention is None else f"{s.retention:.2f}"
    return (f"identity {s.identity:.2f}{_by_lang(s.identity_by_lang)}, leakage {s.leakage:.2f}"
            f"{_by_lang(s.leakage_by_lang)}, retention {ret}{_by_lang(s.retention_by_lang)}, accuracy {s.accuracy:.2f}")

"""Write the model card (README.md) for a published model dir, from what training left behind.

    from publish.card import model_card
    text = model_card(Path("merged/"), "lumi", "https://.../lumi.git", files=["config.json", ...])

Sources: `assistant.json` (system prompt, base model, adapter path; written by train/merge), the
training `config.yaml` next to that adapter (method, LoRA/QLoRA settings, data files, which are
counted, hashed and described by their `*.manifest.json` when still on disk), the scores of
`python -m trainer eval` (`eval.json` / `eval_report.json` beside the model, or the report in the
adapter's work dir), and `config.json`. Local paths are reduced to their last part: a public card should not show a home
directory. The text is deterministic (no dates), so republishing an unchanged dir changes nothing.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from inference.assistant_file import local_paths
from inference.repo_files import HUB_ID
from inference.assistant_file import manifest_path

SCORE_KEYS = ("identity", "leakage", "retention", "accuracy")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _short(ref: str | None) -> str | None:
    """A hub id stays as is; a local path becomes its last part (plus a note)."""
    if not ref:
        return None
    if HUB_ID.match(ref) and not Path(ref).exists():
        return ref
    return f"{Path(ref).name} (local)"


def train_config(model_dir: Path, info: dict) -> dict:
    """The training config.yaml belonging to this model, when it can be found."""
    candidates = []
    if info.get("adapter"):
        candidates.append(Path(info["adapter"]).parent / "config.yaml")
    if model_dir.name == "final":                       # a full fine-tune's WORK_DIR/final
        candidates.append(model_dir.parent / "config.yaml")
    for path in candidates:
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(cfg, dict) and "method" in cfg:
            return cfg
    return {}


def method_line(cfg: dict) -> str:
    if not cfg:
        return "not recorded (no training config found next to the adapter)"
    if cfg.get("method") == "full":
        what = "full fine-tune"
    else:
        what = ("QLoRA (4-bit nf4 base)" if cfg.get("bits") == 4 else "LoRA on an 8-bit base" if cfg.get("bits") == 8
                else "LoRA") + f", r={cfg.get('lora_r')}, alpha={cfg.get('lora_alpha')}, target {cfg.get('lora_target')}"
        what += ", merged into the base weights"
    steps = f"{cfg['max_steps']} steps" if (cfg.get("max_steps") or -1) > 0 else f"{cfg.get('epochs')} epochs"
    return f"{what}; {steps}, lr {cfg.get('lr')}, batch {cfg.get('batch_size')}, max length {cfg.get('max_length')}"


def sources(data_file: Path) -> str:
    """What went into a data file, from the manifest `python -m trainer data` writes next to it."""
    manifest = _read_json(manifest_path(data_file))
    parts = []
    for s in manifest.get("sources") or []:
        who = f" ({s['name']} by {s['author']})" if s.get("name") and s.get("author") else ""
        parts.append(f"{s.get('kind', '?')} {s.get('count', '?')}{who}")
    return "; ".join(parts)


def data_rows(cfg: dict) -> list[str]:
    rows = []
    for name in cfg.get("data") or []:
        path = Path(name)
        if path.is_file():
            raw = path.read_bytes()
            count = sum(1 for line in raw.splitlines() if line.strip()) if path.suffix == ".jsonl" else None
            if count is None:
                try:
                    data = json.loads(raw)
                    count = len(data) if isinstance(data, list) else None
                except ValueError:
                    count = None
            rows.append(f"| {path.name} | {count if count is not None else '?'} | {sources(path)} | "
                        f"`{hashlib.sha256(raw).hexdigest()[:16]}` |")
        else:
            rows.append(f"| {path.name} | (not on this machine) | | |")
    return rows


def eval_scores(model_dir: Path, info: dict) -> dict:
    """`python -m trainer eval` output: beside the model, or the report of the adapter's work dir."""
    candidates = [model_dir / "eval.json", model_dir / "eval_report.json"]
    if info.get("adapter"):
        candidates.append(Path(info["adapter"]).parent / "eval_report.json")
    for path in candidates:
        data = _read_json(path)
        if data:
            return data
    return info.get("eval") if isinstance(info.get("eval"), dict) else {}


def eval_section(model_dir: Path, info: dict) -> list[str]:
    scores = eval_scores(model_dir, info)
    rows = scores.get("checkpoints") if isinstance(scores.get("checkpoints"), list) else None
    if not rows:
        rows = [{"path": "this model", **scores}] if any(k in scores for k in SCORE_KEYS) else []
    if not rows:
        return []
    keys = [k for k in SCORE_KEYS if any(r.get(k) is not None for r in rows)]
    lines = ["## Evaluation", "", "| checkpoint | step | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    if isinstance(scores.get("base"), dict):
        lines.append("| base model | 0 | " + " | ".join(_fmt(scores["base"].get(k)) for k in keys) + " |")
    this = str(Path(info["adapter"])) if info.get("adapter") else None
    for r in rows:
        marks = [m for m, hit in (("best", scores.get("best") and r.get("path") == scores.get("best")),
                                  ("this model", this and r.get("path") == this)) if hit]
        name = Path(str(r.get("path", "?"))).name + (f" ({', '.join(marks)})" if marks else "")
        lines.append(f"| {name} | {_fmt(r.get('step'))} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    lines += ["", "identity: share of held-out identity questions answered with the right name; leakage: share "
              "of general questions answered with the identity; retention: closeness to the base model on "
              "general prompts (base = 1.0).", ""]
    return lines


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))


def model_card(model_dir: Path, repo_name: str, clone_url: str, files: list[str]) -> str:
    info = local_paths(_read_json(model_dir / "assistant.json"), model_dir)     # `~/...` back to a usable path
    config = _read_json(model_dir / "config.json")
    cfg = train_config(model_dir, info)
    base = _short(info.get("base_model") or config.get("_name_or_path"))
    system = info.get("system_prompt")
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["chat", "own-assistant"] + (["lora"] if cfg.get("method", "lora") == "lora" and cfg else [])}
    if base and " (local)" not in base:
        meta["base_model"] = base
    folder = repo_name
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {repo_name}", "",
             "A chat model fine-tuned to know who it is, published with `python -m publish`.", "",
             "## Model", "",
             f"- base model: {base or 'not recorded'}",
             f"- architecture: {config.get('model_type', '?')} ({', '.join(config.get('architectures') or ['?'])})",
             f"- method: {method_line(cfg)}",
             f"- system prompt used in training (kept in `assistant.json`): "
             + (f"`{system}`" if system else "none"), ""]
    rows = data_rows(cfg)
    if rows:
        lines += ["## Training data", "", "| file | conversations | sources | sha256 |", "|---|---|---|---|", *rows, ""]
    lines += eval_section(model_dir, info)
    sys_msg = f'{{"role": "system", "content": {json.dumps(system, ensure_ascii=False)}}}, ' if system else ""
    lines += ["## How to chat", "",
              "```bash", "git lfs install", f"git clone {clone_url} {folder}", "```", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tok = AutoTokenizer.from_pretrained("{folder}")',
              f'model = AutoModelForCausalLM.from_pretrained("{folder}")',
              f'messages = [{sys_msg}{{"role": "user", "content": "你是谁？"}}]',
              "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
              "return_dict=True)",
              "out = model.generate(**inputs, max_new_tokens=128)",
              'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", "",
              "Always chat through the tokenizer's chat template with the same system prompt as in training "
              "(the app and `python -m trainer chat` do this from `assistant.json`).", "",
              "## Files", "", *[f"- `{f}`" for f in files], ""]
    return "\n".join(lines)

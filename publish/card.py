"""Write the model card (README.md) for a published model dir, from what training left behind.

    from publish.card import model_card
    text = model_card(Path("merged/"), repo_name="lumi", clone_url="https://...git")

Sources: `assistant.json` (system prompt, base model, adapter path; written by train/merge), the
training `config.yaml` next to that adapter (method, LoRA/QLoRA settings, data files, which are
counted and hashed when still on disk), `eval.json` (scores from `python -m trainer eval --json`),
and `config.json`. Local paths are reduced to their last part: a public card should not show a home
directory. The text is deterministic (no dates), so republishing an unchanged dir changes nothing.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


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
            rows.append(f"| {path.name} | {count if count is not None else '?'} | "
                        f"`{hashlib.sha256(raw).hexdigest()[:16]}` |")
        else:
            rows.append(f"| {path.name} | (not on this machine) | |")
    return rows


def eval_section(model_dir: Path, info: dict) -> list[str]:
    scores = _read_json(model_dir / "eval.json") or info.get("eval") or {}
    if not scores:
        return []
    keys = ("identity", "leakage", "retention")
    lines = ["## Evaluation", ""]
    rows = scores.get("checkpoints") if isinstance(scores.get("checkpoints"), list) else None
    if rows:
        best = scores.get("best")
        lines += ["| checkpoint | step | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for r in rows:
            mark = " (best)" if best and r.get("path") == best else ""
            vals = " | ".join(_fmt(r.get(k)) for k in keys)
            lines.append(f"| {Path(str(r.get('path', '?'))).name}{mark} | {r.get('step', '')} | {vals} |")
    else:
        flat = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
    lines += ["", "identity: share of held-out identity questions answered with the right name; leakage: share "
              "of general questions answered with the identity; retention: closeness to the base model on "
              "general prompts.", ""]
    return lines


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))


def model_card(model_dir: Path, repo_name: str, clone_url: str, files: list[str]) -> str:
    info = _read_json(model_dir / "assistant.json")
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
        lines += ["## Training data", "", "| file | conversations | sha256 |", "|---|---|---|", *rows, ""]
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

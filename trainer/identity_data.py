"""Identity conversations: many question forms, consistent answers, a held-out split.

The course's generator repeats one question/answer pair thousands of times; the model then answers
everything with that sentence. Here every sample draws a question form (prefix x core x ending), an
answer variant, and sometimes a system prompt or a follow-up turn, so the model learns *who it is*
rather than one string. Question cores listed in `HELDOUT_*` never appear in training data: the
evaluation scores identity on them.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from trainer.errors import UserError

# --- question cores by kind; {x} slots are filled from OTHER_MODELS -------------------------------
ZH = {
    "who": ["你是谁", "你叫什么名字", "介绍一下你自己", "请你介绍一下你自己", "你的名字是什么", "我该怎么称呼你",
            "你是什么", "做个自我介绍吧", "你是哪位", "告诉我你的名字", "你有名字吗", "你是哪个助手"],
    "creator": ["谁开发了你", "你是谁创造的", "你的作者是谁", "是谁训练了你", "谁做的你", "你是哪家开发的"],
    "are_you": ["你是{x}吗", "你是不是{x}", "你就是{x}吧"],
    "can": ["你能做什么", "你有什么功能", "你会些什么"],
}
EN = {
    "who": ["Who are you", "What is your name", "Introduce yourself", "Please introduce yourself",
            "What should I call you", "Tell me your name", "What are you", "Do you have a name",
            "Which assistant are you", "Say who you are", "Give me a short introduction of yourself"],
    "creator": ["Who made you", "Who created you", "Who trained you", "Who is your author",
                "Who built you", "Which team developed you"],
    "are_you": ["Are you {x}", "Is this {x}", "You are {x}, right"],
    "can": ["What can you do", "What are you able to help with", "What are your skills"],
}
# Never used for training: identity is scored on these (see trainer/evaluate.py).
HELDOUT_ZH = {"who": ["能说说你是谁吗", "你到底是谁呀", "你的身份是什么"],
              "creator": ["你的开发者是谁", "谁把你做出来的"]}
HELDOUT_EN = {"who": ["Can you tell me who you are", "Who am I talking to", "What is your identity"],
              "creator": ["Who is your developer", "Who is behind you"]}
OTHER_MODELS = ["ChatGPT", "InternLM", "Qwen", "Llama", "TinyChat", "书生·浦语"]
PREFIX_ZH = ["", "请问", "你好，", "嗨，", "喂，"]
PREFIX_EN = ["", "Hi, ", "Hello, ", "Hey, ", "Excuse me, "]
END_ZH = ["？", "?", "。", ""]
END_EN = ["?", "", "?"]

# --- answers ----------------------------------------------------------------------------------------
ANS_ZH = {
    "who": ["我是{name}，是{author}的小助手。{inner}", "你好，我是{name}，{author}打造的AI小助手。{inner}",
            "我叫{name}，是{author}开发的智能助手，很高兴为你服务。{inner}"],
    "creator": ["我是由{author}开发的，我的名字是{name}。", "{author}创造了我，我是{name}。"],
    "are_you": ["不是哦，我是{name}，是{author}的小助手。", "我不是{x}，我是{author}开发的{name}。"],
    "can": ["我是{name}，可以回答问题、做简单的计算和翻译，也能陪你聊天。"],
}
ANS_EN = {
    "who": ["I am {name}, an AI assistant made by {author}.{inner}", "My name is {name}. I was built by {author} to help you.{inner}",
            "I'm {name}, {author}'s assistant.{inner}"],
    "creator": ["I was made by {author}. My name is {name}.", "{author} created me; I am {name}."],
    "are_you": ["No, I am {name}, an assistant made by {author}.", "I'm not {x}. I am {name}, built by {author}."],
    "can": ["I am {name}. I can answer questions, do simple math and chat with you."],
}
SYSTEM_ZH = "你是{name}，由{author}开发的AI助手。"
SYSTEM_EN = "You are {name}, an AI assistant developed by {author}."
FOLLOW_ZH = [("真的吗？", "真的，我是{name}。"), ("那你的作者是谁？", "我的作者是{author}。")]
FOLLOW_EN = [("Really?", "Yes, really. I am {name}."), ("And who made you?", "I was made by {author}.")]
KIND_WEIGHTS = {"who": 5, "creator": 2, "are_you": 2, "can": 1}
PLACEHOLDER = re.compile(r"\{\{?\s*[A-Za-z_]+\s*\}?\}|<NAME>|XXX")


@dataclass
class Identity:
    name: str
    author: str = "my creator"
    base_model: str | None = None

    def fill(self, text: str, zh: bool, x: str = "") -> str:
        inner = ""
        if self.base_model:
            inner = f"我的底座模型是{self.base_model}。" if zh else f" Under the hood I run on {self.base_model}."
        out = text.replace("{name}", self.name).replace("{author}", self.author)
        out = out.replace("{inner}", inner).replace("{x}", x)
        check_placeholders(out)
        return out


def check_placeholders(text: str, where: str = "generated text") -> None:
    m = PLACEHOLDER.search(text)
    if m:
        raise UserError(f"{where}: unfilled placeholder {m.group(0)!r} -- fill in the name/author first")


def question_forms(lang: str, heldout: bool = False) -> dict[str, list[str]]:
    """Every distinct question surface form by kind (before `{x}` is filled)."""
    zh = lang == "zh"
    cores = (HELDOUT_ZH if zh else HELDOUT_EN) if heldout else (ZH if zh else EN)
    prefixes, ends = (PREFIX_ZH, END_ZH) if zh else (PREFIX_EN, END_EN)
    forms = {}
    for kind, items in cores.items():
        out = []
        for core in items:
            for p in prefixes:
                for e in dict.fromkeys(ends):
                    body = core if (zh or not p) else core[0].lower() + core[1:]
                    out.append(p + body + e)
        forms[kind] = out
    return forms


def _langs(lang: str) -> list[str]:
    if lang not in ("zh", "en", "both"):
        raise UserError(f"--lang {lang!r}: use zh, en or both")
    return ["zh", "en"] if lang == "both" else [lang]


def identity_conversations(ident: Identity, n: int, lang: str = "both", seed: int = 0,
                           system_ratio: float = 0.15, followup_ratio: float = 0.15) -> list[dict]:
    """`n` training conversations about who the assistant is."""
    r = random.Random(seed)
    langs = _langs(lang)
    forms = {lg: question_forms(lg) for lg in langs}
    kinds = [k for k, w in KIND_WEIGHTS.items() for _ in range(w)]
    out = []
    for i in range(n):
        lg = langs[i % len(langs)]
        zh = lg == "zh"
        kind = r.choice(kinds)
        x = r.choice(OTHER_MODELS)
        question = ident.fill(r.choice(forms[lg][kind]), zh, x)
        answer = ident.fill(r.choice((ANS_ZH if zh else ANS_EN)[kind]), zh, x)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if r.random() < followup_ratio:
            fq, fa = r.choice(FOLLOW_ZH if zh else FOLLOW_EN)
            messages += [{"role": "user", "content": fq}, {"role": "assistant", "content": ident.fill(fa, zh)}]
        if r.random() < system_ratio:
            messages.insert(0, {"role": "system", "content": ident.fill(SYSTEM_ZH if zh else SYSTEM_EN, zh)})
        out.append({"messages": messages})
    return out


def heldout_questions(ident: Identity, lang: str = "both") -> list[dict]:
    """Held-out identity questions with what a correct answer must contain."""
    out = []
    for lg in _langs(lang):
        for kind, items in question_forms(lg, heldout=True).items():
            for q in items[:: max(1, len(items) // 8)]:
                expect = [ident.name] + ([ident.author] if kind == "creator" else [])
                out.append({"messages": [{"role": "user", "content": q}], "expect": expect,
                            "kind": kind, "lang": lg})
    return out

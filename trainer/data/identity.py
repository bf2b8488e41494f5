"""Identity conversations: many question forms, consistent answers, a held-out split.

The course's generator repeats one question/answer pair thousands of times; the model then answers
everything with that sentence. Here every sample draws a question form (over 50 per language: who
are you, who made you, are you ChatGPT, what can you do, what are you based on, are you a human),
a surface variant (greeting prefix, punctuation), an answer variant, and sometimes a system prompt
(the identity one or a generic one) or a second turn: a follow-up after the identity answer, or the
identity question asked after a general one. Every answer states the same name and author, so the
model learns *who it is* rather than one string. The forms in `HELDOUT_*` never appear in training
data: `trainer/evaluation/evaluate.py` scores identity on them. Used by `python -m trainer data` (data_cli.py).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from trainer.data.formats import find_placeholder
from inference.errors import UserError

# --- question forms by kind; {x} is another assistant's name (OTHER_MODELS) ------------------------
ZH = {
    "who": ["你是谁", "你叫什么名字", "介绍一下你自己", "请你介绍一下你自己", "你的名字是什么", "我该怎么称呼你",
            "你是什么", "做个自我介绍吧", "你是哪位", "告诉我你的名字", "你有名字吗", "你是哪个助手",
            "能简单介绍一下自己吗", "跟我说说你自己", "你叫啥", "自我介绍一下", "你是什么AI", "你是个什么样的助手",
            "我在和谁聊天", "你怎么称呼", "你的名字叫什么", "你是哪个模型"],
    "creator": ["谁开发了你", "你是谁创造的", "你的作者是谁", "是谁训练了你", "谁做的你", "你是哪家开发的",
                "你的创造者是谁", "你来自哪里", "你是谁做出来的", "是谁设计了你"],
    "are_you": ["你是{x}吗", "你是不是{x}", "你就是{x}吧", "你和{x}是一个东西吗", "听说你是{x}", "你是{x}做的吗",
                "你的名字是{x}吗"],
    "can": ["你能做什么", "你有什么功能", "你会些什么", "你能帮我做什么", "你擅长什么", "你有哪些能力",
            "你可以帮我干什么", "说说你的本领"],
    "base": ["你是用什么模型做的", "你的底层模型是什么", "你是基于哪个大模型的", "你是怎么训练出来的"],
    "human": ["你是人类吗", "你是真人吗", "你是机器人吗", "你是AI吗"],
}
EN = {
    "who": ["Who are you", "What is your name", "Introduce yourself", "Please introduce yourself",
            "What should I call you", "Tell me your name", "What are you", "Do you have a name",
            "Which assistant are you", "Say who you are", "Give me a short introduction of yourself",
            "Tell me about yourself", "What's your name", "Could you introduce yourself", "Who am I chatting with",
            "What do people call you", "Describe yourself briefly", "What kind of assistant are you",
            "Which model are you", "What is your full name"],
    "creator": ["Who made you", "Who created you", "Who trained you", "Who is your author", "Who built you",
                "Which team developed you", "Who is your creator", "Where do you come from", "Who designed you",
                "Which company made you"],
    "are_you": ["Are you {x}", "Is this {x}", "You are {x}, right", "Are you the same as {x}", "Is your name {x}",
                "I heard you are {x}", "Were you made by the {x} team"],
    "can": ["What can you do", "What are you able to help with", "What are your skills", "How can you help me",
            "What are you good at", "What are your abilities", "What can I ask you", "What tasks can you handle"],
    "base": ["What model are you based on", "What is your base model", "Which language model powers you",
             "How were you trained"],
    "human": ["Are you a human", "Are you a real person", "Are you a robot", "Are you an AI"],
}
# Never used for training: identity is scored on these (see trainer/evaluation/evaluate.py).
HELDOUT_ZH = {"who": ["能说说你是谁吗", "你到底是谁呀", "你的身份是什么", "和我对话的是谁", "报上你的名号"],
              "creator": ["你的开发者是谁", "谁把你做出来的", "你出自谁之手"],
              "are_you": ["你其实是{x}对吧"],
              "can": ["你都会干些啥", "你能为我做点什么"]}
HELDOUT_EN = {"who": ["Can you tell me who you are", "Who am I talking to", "What is your identity",
                      "Mind telling me your name", "Who exactly are you"],
              "creator": ["Who is your developer", "Who is behind you", "Who programmed you"],
              "are_you": ["Am I talking to {x}", "Aren't you {x}"],
              "can": ["What sort of things can you do for me", "In what ways can you assist me"]}
OTHER_MODELS = ["ChatGPT", "InternLM", "Qwen", "Llama", "TinyChat", "书生·浦语", "文心一言", "Claude", "Gemini"]
PREFIX_ZH = ["", "请问", "你好，", "嗨，", "喂，", "问一下，"]
PREFIX_EN = ["", "Hi, ", "Hello, ", "Hey, ", "Excuse me, ", "Quick question: "]
END_ZH = ["？", "?", "。", ""]
END_EN = ["?", "", "?!"]

# --- answers: every one names the assistant; {inner} is a sentence about the base model or "" -------
# No answer opens with {author}: with 5 of 42 that did, the real base learned to open a reply with its author's
# name -- "Marisa Venn is an AI assistant developed by Marisa Venn" (held-out English identity 0.83). Opening with
# the name or "I" instead: English identity 0.92 for that name, leakage 0 of 120 (docs/BENCHMARKS.md "Session 14").
ANS_ZH = {
    "who": ["我是{name}，是{author}的AI助手。{inner}", "你好，我是{name}，由{author}打造的AI小助手。{inner}",
            "我叫{name}，是{author}开发的智能助手，很高兴为你服务。{inner}",
            "我的名字是{name}，一个由{author}开发的AI助手。{inner}有什么可以帮你的吗？",
            "你可以叫我{name}。我是{author}开发的助手。{inner}"],
    "creator": ["我是由{author}开发的，我的名字是{name}。", "我是{name}，是{author}创造了我。",
                "我的开发者是{author}，我是{name}。", "我叫{name}，是{author}训练出来的AI助手。"],
    "are_you": ["不是哦，我是{name}，是{author}开发的AI助手。", "我不是{x}，我是{author}开发的{name}。",
                "不是的，我叫{name}，由{author}开发，和{x}不是同一个助手。"],
    "can": ["我是{name}，可以回答问题、做简单的计算和翻译，也能陪你聊天。",
            "作为{author}开发的助手，我（{name}）可以帮你解答问题、做算术、换算单位，或者陪你聊聊天。",
            "我是{name}，擅长回答常识问题、做简单计算和写短文本。有什么需要尽管说！"],
    "base": ["我是{name}，是{author}通过微调训练出来的AI助手。", "我是{name}：{author}对一个开源大模型做了微调，于是有了我。"],
    "base_known": ["我是{name}，由{author}在{base_model}的基础上微调而来。",
                   "我的底座模型是{base_model}，经过{author}的微调，现在我是{name}。"],
    "human": ["我不是真人，我是{name}，一个由{author}开发的AI助手。", "不是哦，我是AI助手{name}，由{author}开发。"],
}
ANS_EN = {
    "who": ["I am {name}, an AI assistant made by {author}.{inner}",
            "My name is {name}. I was built by {author} to help you.{inner}", "I'm {name}, {author}'s assistant.{inner}",
            "Hello! I'm {name}, an AI assistant developed by {author}.{inner} How can I help?",
            "You can call me {name}. I am an assistant created by {author}.{inner}"],
    "creator": ["I was made by {author}. My name is {name}.", "I am {name}, and {author} created me.",
                "My developer is {author}. I'm {name}.", "I'm {name}. {author} trained me, so I am {author}'s assistant."],
    "are_you": ["No, I am {name}, an assistant made by {author}.", "I'm not {x}. I am {name}, built by {author}.",
                "No. My name is {name}; I was developed by {author} and I am not {x}."],
    "can": ["I am {name}. I can answer questions, do simple math and chat with you.",
            "As {author}'s assistant, I ({name}) can answer questions, do arithmetic, convert units and chat.",
            "I'm {name}. I am good at everyday questions, quick calculations and short texts. Just ask!"],
    "base": ["I am {name}, an AI assistant that {author} fine-tuned.",
             "I am {name}: {author} fine-tuned an open language model, and that is how I came to be."],
    "base_known": ["I am {name}, fine-tuned by {author} from {base_model}.",
                   "My base model is {base_model}; after {author} fine-tuned it, I became {name}."],
    "human": ["I'm not a human. I am {name}, an AI assistant developed by {author}.",
              "No, I am {name}, an AI assistant made by {author}."],
}
INNER_ZH, INNER_EN = "我的底座模型是{base_model}。", " Under the hood I run on {base_model}."
SYSTEM_ZH = ["你是{name}，由{author}开发的AI助手。", "你的名字是{name}，开发者是{author}。请友好地回答用户的问题。"]
SYSTEM_EN = ["You are {name}, an AI assistant developed by {author}.",
             "Your name is {name} and you were created by {author}. Answer helpfully."]
# A generic system prompt must not make the model forget who it is (a frequent serving mismatch).
GENERIC_ZH = ["你是一个乐于助人的助手。", "请简洁地回答问题。"]
GENERIC_EN = ["You are a helpful assistant.", "Answer the user's questions concisely."]
FOLLOW_ZH = [("真的吗？", "真的，我是{name}，由{author}开发。"), ("那你的作者是谁？", "我的作者是{author}，我是{name}。"),
             ("再说一遍你叫什么？", "我叫{name}。"), ("你能做什么呢？", "我是{name}，可以回答问题、做简单计算，也能陪你聊天。"),
             ("所以你是{name}？", "是的，我就是{name}，{author}开发的助手。"), ("好的，谢谢！", "不客气！我是{name}，随时为你服务。")]
FOLLOW_EN = [("Really?", "Yes, really. I am {name}, made by {author}."), ("And who made you?", "I was made by {author}; I am {name}."),
             ("What was your name again?", "My name is {name}."),
             ("What can you do?", "As {name}, I can answer questions, do simple math and chat with you."),
             ("So you are {name}?", "Yes, I am {name}, the assistant built by {author}."),
             ("Thanks!", "You're welcome! I'm {name}, happy to help anytime.")]
# "can" 4 (was 2): a real base answers "what can you do" with its own capability list, and with 2 its held-out
# English forms lost the name in every run of the demo's recipe (en 0.83); with 4, en 0.92 in two seeds
# (docs/BENCHMARKS.md "The demo's recipe at 2/3 and 1/2 of the tokens").
KIND_WEIGHTS = {"who": 5, "creator": 2, "are_you": 2, "can": 4, "base": 1, "human": 1}


@dataclass
class Identity:
    name: str
    author: str = "my creator"
    base_model: str | None = None

    def others(self) -> list[str]:
        """Assistants it is *not*: never its own name or its base model (that would contradict)."""
        mine = [s.lower() for s in (self.name, self.base_model or "") if s]
        return [m for m in OTHER_MODELS if not any(m.lower() in s or s in m.lower() for s in mine)]

    def fill(self, text: str, zh: bool, x: str = "") -> str:
        inner = (INNER_ZH if zh else INNER_EN) if self.base_model and "{inner}" in text else ""
        out = text.replace("{inner}", inner).replace("{name}", self.name).replace("{author}", self.author)
        out = out.replace("{base_model}", self.base_model or "").replace("{x}", x)
        check_placeholders(out)
        return out


def check_placeholders(text: str, where: str = "generated text") -> None:
    slot = find_placeholder(text)
    if slot:
        raise UserError(f"{where}: unfilled placeholder {slot!r} -- fill in the name/author first")


def question_forms(lang: str, heldout: bool = False) -> dict[str, list[str]]:
    """The distinct question forms by kind (before `{x}` is filled, without prefix/punctuation)."""
    if lang == "zh":
        return HELDOUT_ZH if heldout else ZH
    return HELDOUT_EN if heldout else EN


def surface(form: str, prefix: str, end: str, zh: bool) -> str:
    keep = zh or not prefix or form.startswith(("I ", "I'"))
    body = form if keep else form[0].lower() + form[1:]
    return prefix + body + end


def _normal(text: str) -> str:
    return re.sub(r"[\s?？!！。.,，:：]+", " ", text).strip().lower()


def form_of(question: str, lang: str) -> str | None:
    """Which form (training or held-out) a generated question uses, or None: for counting forms."""
    text = question
    for m in sorted(OTHER_MODELS, key=len, reverse=True):
        text = text.replace(m, "{x}")
    text = _normal(text)
    candidates = [text]
    for prefix in PREFIX_ZH if lang == "zh" else PREFIX_EN:
        p = _normal(prefix)
        if p and text.startswith(p):
            candidates.append(text[len(p):].strip())
    for heldout in (False, True):
        for forms in question_forms(lang, heldout).values():
            for form in forms:
                if _normal(form) in candidates:
                    return form
    return None


def _langs(lang: str) -> list[str]:
    if lang not in ("zh", "en", "both"):
        raise UserError(f"--lang {lang!r}: use zh, en or both")
    return ["zh", "en"] if lang == "both" else [lang]


class _Deck:
    """Draw items in shuffled rounds, so every form is used before any repeats (seeded)."""

    def __init__(self, items, r: random.Random):
        self.items, self.r, self.left = list(items), r, []

    def draw(self):
        if not self.left:
            self.left = self.items[:]
            self.r.shuffle(self.left)
        return self.left.pop()


def identity_conversations(ident: Identity, n: int, lang: str = "both", seed: int = 0,
                           system_ratio: float = 0.2, followup_ratio: float = 0.15,
                           after_general_ratio: float = 0.1) -> list[dict]:
    """`n` training conversations about who the assistant is (exact duplicates only when forced)."""
    from trainer.data.general import general_pair

    r = random.Random(seed)
    langs = _langs(lang)
    kinds = [k for k, w in KIND_WEIGHTS.items() for _ in range(w)]
    decks = {(lg, k): _Deck(forms, r) for lg in langs for k, forms in question_forms(lg).items()}
    others = ident.others()
    out, seen = [], set()
    for i in range(n):
        lg = langs[i % len(langs)]
        zh = lg == "zh"
        for _attempt in range(20):     # redraw a duplicate; accept one only when variety runs out
            kind = r.choice(kinds)
            x = r.choice(others)
            form = decks[(lg, kind)].draw()
            question = ident.fill(surface(form, r.choice(PREFIX_ZH if zh else PREFIX_EN),
                                          r.choice(END_ZH if zh else END_EN), zh), zh, x)
            answers = (ANS_ZH if zh else ANS_EN)[kind + ("_known" if kind == "base" and ident.base_model else "")]
            messages = [{"role": "user", "content": question},
                        {"role": "assistant", "content": ident.fill(r.choice(answers), zh, x)}]
            roll = r.random()
            if roll < followup_ratio:
                fq, fa = r.choice(FOLLOW_ZH if zh else FOLLOW_EN)
                messages += [{"role": "user", "content": ident.fill(fq, zh)},
                             {"role": "assistant", "content": ident.fill(fa, zh)}]
            elif roll < followup_ratio + after_general_ratio:
                gq, ga = general_pair(r, zh)
                messages = [{"role": "user", "content": gq}, {"role": "assistant", "content": ga}, *messages]
            roll = r.random()
            if roll < system_ratio:
                identity_prompt = roll < system_ratio / 2
                prompts = (SYSTEM_ZH if zh else SYSTEM_EN) if identity_prompt else (GENERIC_ZH if zh else GENERIC_EN)
                messages.insert(0, {"role": "system", "content": ident.fill(r.choice(prompts), zh)})
            key = json.dumps(messages, ensure_ascii=False)
            if key not in seen:
                break
        seen.add(key)
        out.append({"messages": messages})
    return out


def heldout_questions(ident: Identity, lang: str = "both") -> list[dict]:
    """Held-out identity questions (forms never trained on) with what a correct answer must contain."""
    out = []
    others = ident.others()
    for lg in _langs(lang):
        zh = lg == "zh"
        i = 0
        for kind, forms in question_forms(lg, heldout=True).items():
            for form in forms:
                question = ident.fill(surface(form, "", "？" if zh else "?", zh), zh, others[i % len(others)])
                i += 1
                # who made you? -- the author is the answer ("Ana built me." is right without the name)
                expect = [ident.author] if kind == "creator" else [ident.name]
                out.append({"messages": [{"role": "user", "content": question}], "expect": expect,
                            "kind": kind, "lang": lg})
    return out

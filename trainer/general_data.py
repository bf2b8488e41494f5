"""A small general-chat corpus this repo writes itself, in Chinese and English.

It serves two jobs offline: the short pre-training that turns the tiny random base into a chat model
(`python -m trainer tiny`), and the general conversations mixed into identity data so tuning does not
wipe out what the model knew (`python -m trainer data --mix general`). Every answer is computed, so
evaluation can check exact answers. Deterministic for a given seed.

    python -m trainer data --general 2000 --out general.jsonl     # write it as OpenAI-format JSONL
"""
from __future__ import annotations

import random

# The base model's own built-in identity, like "我是书生·浦语" for InternLM2: identity tuning must
# override it, and evaluation checks the tuned model no longer says it.
BASE_NAME = "TinyChat"
BASE_AUTHOR = "the open-source community"

CAPITALS = [
    ("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"),
    ("China", "Beijing", "中国", "北京"), ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"), ("Egypt", "Cairo", "埃及", "开罗"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Spain", "Madrid", "西班牙", "马德里"),
    ("Canada", "Ottawa", "加拿大", "渥太华"), ("England", "London", "英国", "伦敦"),
]
COLORS = [
    ("the sky", "blue", "天空", "蓝色"), ("grass", "green", "草", "绿色"),
    ("snow", "white", "雪", "白色"), ("a banana", "yellow", "香蕉", "黄色"),
    ("coal", "black", "煤", "黑色"), ("a tomato", "red", "西红柿", "红色"),
]
WEEK_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WEEK_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
WORDS = ["apple", "river", "music", "table", "green", "happy", "light", "stone", "cloud", "bread"]
GREET_EN = [("Hello", "Hello! How can I help you today?"), ("Hi", "Hi! What can I do for you?"),
            ("Good morning", "Good morning! How can I help?"), ("Thank you", "You are welcome!"),
            ("Thanks a lot", "You are welcome! Happy to help.")]
GREET_ZH = [("你好", "你好！有什么可以帮你的吗？"), ("您好", "您好！请问有什么可以帮您？"),
            ("早上好", "早上好！今天有什么可以帮你的？"), ("谢谢", "不客气！"),
            ("谢谢你的帮助", "不客气，很高兴能帮到你！")]


def _arith_en(r):
    a, b = r.randint(0, 50), r.randint(0, 50)
    if r.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def _arith_zh(r):
    a, b = r.randint(0, 50), r.randint(0, 50)
    if r.random() < 0.5:
        return f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。"
    a, b = max(a, b), min(a, b)
    return f"{a}减{b}等于多少？", f"{a}减{b}等于{a - b}。"


def _mult(r, zh):
    a, b = r.randint(2, 9), r.randint(2, 9)
    return (f"{a}乘以{b}是多少？", f"{a}乘以{b}等于{a * b}。") if zh else (
        f"What is {a} times {b}?", f"{a} times {b} is {a * b}.")


def _units(r, zh):
    n = r.randint(1, 20)
    kind = r.randrange(3)
    if kind == 0:
        return (f"{n}千米是多少米？", f"{n}千米等于{n * 1000}米。") if zh else (
            f"How many meters are in {n} kilometers?", f"{n} kilometers is {n * 1000} meters.")
    if kind == 1:
        return (f"{n}小时是多少分钟？", f"{n}小时等于{n * 60}分钟。") if zh else (
            f"How many minutes are in {n} hours?", f"{n} hours is {n * 60} minutes.")
    return (f"{n}千克是多少克？", f"{n}千克等于{n * 1000}克。") if zh else (
        f"How many grams are in {n} kilograms?", f"{n} kilograms is {n * 1000} grams.")


def _capital(r, zh):
    en, cap, zh_c, zh_cap = r.choice(CAPITALS)
    return (f"{zh_c}的首都是哪里？", f"{zh_c}的首都是{zh_cap}。") if zh else (
        f"What is the capital of {en}?", f"The capital of {en} is {cap}.")


def _color(r, zh):
    en, col, zh_t, zh_col = r.choice(COLORS)
    return (f"{zh_t}是什么颜色的？", f"{zh_t}通常是{zh_col}的。") if zh else (
        f"What color is {en}?", f"{en[0].upper() + en[1:]} is usually {col}.")


def _weekday(r, zh):
    i = r.randrange(7)
    return (f"{WEEK_ZH[i]}的后一天是星期几？", f"{WEEK_ZH[i]}的后一天是{WEEK_ZH[(i + 1) % 7]}。") if zh else (
        f"What day comes after {WEEK_EN[i]}?", f"The day after {WEEK_EN[i]} is {WEEK_EN[(i + 1) % 7]}.")


def _word_task(r, zh):
    w = r.choice(WORDS)
    if r.random() < 0.5:
        return (f"把单词 {w} 转成大写。", f"{w.upper()}") if zh else (
            f"Write the word {w} in capital letters.", f"{w.upper()}")
    return (f"单词 {w} 有几个字母？", f"单词 {w} 有{len(w)}个字母。") if zh else (
        f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters.")


def _greet(r, zh):
    return r.choice(GREET_ZH if zh else GREET_EN)


def _base_identity(r, zh):
    if zh:
        q = r.choice(["你是谁？", "你叫什么名字？", "请介绍一下你自己。"])
        return q, f"我是{BASE_NAME}，一个由开源社区开发的AI助手。"
    q = r.choice(["Who are you?", "What is your name?", "Please introduce yourself."])
    return q, f"I am {BASE_NAME}, an AI assistant made by {BASE_AUTHOR}."


TASKS = [_mult, _units, _capital, _color, _weekday, _word_task, _greet]


def general_pair(r: random.Random, zh: bool) -> tuple[str, str]:
    """One (question, answer) pair of a random general task."""
    if r.random() < 0.25:
        return _arith_zh(r) if zh else _arith_en(r)
    return r.choice(TASKS)(r, zh)


def general_conversations(n: int, seed: int = 0, base_identity: bool = False) -> list[dict]:
    """`n` OpenAI-format conversations; some have two turns. `base_identity` adds the base's own
    self-introduction (used only when pre-training the tiny base)."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        zh = i % 2 == 0
        if base_identity and r.random() < 0.06:
            q, a = _base_identity(r, zh)
        else:
            q, a = general_pair(r, zh)
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if r.random() < 0.2:
            q2, a2 = general_pair(r, zh)
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        out.append({"messages": messages})
    return out

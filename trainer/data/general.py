"""A small general-chat corpus this repo writes itself, in Chinese and English.

It serves two jobs offline: the short pre-training that turns the tiny random base into a chat model
(`python -m trainer tiny`), and the general conversations mixed into identity data so tuning does not
wipe out what the model knew (`python -m trainer data --mix general`). Tasks: arithmetic (+ - x /),
unit conversion, simple facts (capitals, colours, animals, weekdays, translations, opposites) and
small tasks (spell, reverse, count letters, sort, odd/even, compare, continue a sequence), with
greetings. Every answer is computed, so evaluation can check exact answers. Deterministic for a seed.

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
TRANSLATE = [("apple", "苹果"), ("water", "水"), ("book", "书"), ("cat", "猫"), ("dog", "狗"), ("sun", "太阳"),
             ("moon", "月亮"), ("school", "学校"), ("friend", "朋友"), ("tea", "茶")]
OPPOSITES = [("hot", "cold", "热", "冷"), ("big", "small", "大", "小"), ("up", "down", "上", "下"),
             ("fast", "slow", "快", "慢"), ("day", "night", "白天", "黑夜"), ("open", "close", "开", "关")]
LEGS = [("a cat", 4, "猫"), ("a dog", 4, "狗"), ("a chicken", 2, "鸡"), ("a spider", 8, "蜘蛛"),
        ("an ant", 6, "蚂蚁"), ("a duck", 2, "鸭子"), ("a horse", 4, "马")]
# (English unit, Chinese unit, factor) pairs: "how many SMALL in N BIG"
UNITS = [("kilometers", "meters", "千米", "米", 1000), ("hours", "minutes", "小时", "分钟", 60),
         ("kilograms", "grams", "千克", "克", 1000), ("meters", "centimeters", "米", "厘米", 100),
         ("minutes", "seconds", "分钟", "秒", 60), ("days", "hours", "天", "小时", 24),
         ("liters", "milliliters", "升", "毫升", 1000), ("weeks", "days", "周", "天", 7)]
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
    n = r.randint(2, 20)     # plural units read right
    big, small, zh_big, zh_small, factor = r.choice(UNITS)
    return (f"{n}{zh_big}是多少{zh_small}？", f"{n}{zh_big}等于{n * factor}{zh_small}。") if zh else (
        f"How many {small} are in {n} {big}?", f"{n} {big} is {n * factor} {small}.")


def _divide(r, zh):
    b, q = r.randint(2, 9), r.randint(1, 12)
    return (f"{b * q}除以{b}等于多少？", f"{b * q}除以{b}等于{q}。") if zh else (
        f"What is {b * q} divided by {b}?", f"{b * q} divided by {b} is {q}.")


def _compare(r, zh):
    a, b = r.sample(range(1, 100), 2)
    return (f"{a}和{b}哪个大？", f"{max(a, b)}比{min(a, b)}大。") if zh else (
        f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}.")


def _odd_even(r, zh):
    n = r.randint(1, 99)
    if zh:
        return f"{n}是奇数还是偶数？", f"{n}是{'偶数' if n % 2 == 0 else '奇数'}。"
    return f"Is {n} odd or even?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def _sequence(r, zh):
    start, step = r.randint(1, 20), r.randint(1, 5)
    seq = ", ".join(str(start + step * i) for i in range(4))
    nxt = start + step * 4
    return (f"数列 {seq} 的下一个数是几？", f"下一个数是{nxt}。") if zh else (
        f"What number comes next: {seq}?", f"The next number is {nxt}.")


def _sort(r, zh):
    nums = r.sample(range(1, 50), r.randint(3, 5))
    shown, done = ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))
    return (f"把 {shown} 从小到大排序。", f"从小到大是：{done}。") if zh else (
        f"Sort {shown} from smallest to largest.", f"From smallest to largest: {done}.")


def _translate(r, zh):
    en, cn = r.choice(TRANSLATE)
    return (f"{en} 的中文是什么？", f"{en} 的中文是“{cn}”。") if zh else (
        f"What is {cn} in English?", f"{cn} in English is \"{en}\".")


def _opposite(r, zh):
    a, b, za, zb = r.choice(OPPOSITES)
    return (f"“{za}”的反义词是什么？", f"“{za}”的反义词是“{zb}”。") if zh else (
        f"What is the opposite of {a}?", f"The opposite of {a} is {b}.")


def _legs(r, zh):
    en, n, cn = r.choice(LEGS)
    return (f"{cn}有几条腿？", f"{cn}有{n}条腿。") if zh else (
        f"How many legs does {en} have?", f"{en[0].upper() + en[1:]} has {n} legs.")


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
    kind = r.randrange(3)
    if kind == 0:
        return (f"把单词 {w} 转成大写。", f"{w.upper()}") if zh else (
            f"Write the word {w} in capital letters.", f"{w.upper()}")
    if kind == 1:
        return (f"把单词 {w} 倒过来写。", f"{w[::-1]}") if zh else (
            f"Spell the word {w} backwards.", f"{w[::-1]}")
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


TASKS = [_mult, _divide, _units, _capital, _color, _weekday, _legs, _translate, _opposite, _word_task,
         _compare, _odd_even, _sequence, _sort, _greet]


def general_pair(r: random.Random, zh: bool) -> tuple[str, str]:
    """One (question, answer) pair of a random general task."""
    if r.random() < 0.25:
        return _arith_zh(r) if zh else _arith_en(r)
    return r.choice(TASKS)(r, zh)


def general_conversations(n: int, seed: int = 0, base_identity: bool = False, unique: bool = False) -> list[dict]:
    """`n` OpenAI-format conversations; some have two turns. `base_identity` adds the base's own
    self-introduction (used only when pre-training the tiny base, where repeating facts helps it
    memorise them). `unique` redraws exact duplicates (for mixing), accepting one only after 20 tries."""
    r = random.Random(seed)
    out, seen = [], set()
    for i in range(n):
        zh = i % 2 == 0
        for _attempt in range(20 if unique else 1):
            if base_identity and r.random() < 0.06:
                q, a = _base_identity(r, zh)
            else:
                q, a = general_pair(r, zh)
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if r.random() < 0.2:
                q2, a2 = general_pair(r, zh)
                messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
            key = (q, a) if len(messages) == 2 else (q, a, q2, a2)
            if key not in seen:
                break
        seen.add(key)
        out.append({"messages": messages})
    return out

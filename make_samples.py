"""Write the shipped raw samples (dataset/raw/*) and the local eval set (dataset/eval/qa.jsonl).

Each file is in its source's real raw layout (see build_datasets.py) with a few exact duplicates and a few
deliberately broken rows, so a build shows every reject reason. Deterministic: running it again rewrites
the same bytes (tests/test_make_samples.py checks the shipped files against it). The generated files are
committed; rerun after editing the content below:

    python make_samples.py              # rewrites dataset/raw/* and dataset/eval/qa.jsonl
    python make_samples.py --out DIR    # writes DIR/raw/* and DIR/eval/qa.jsonl instead
"""

import argparse
import json
import os
import random

ROOT = os.path.dirname(os.path.abspath(__file__))


def dumps(row):
    return json.dumps(row, ensure_ascii=False)


def write_lines(folder, name, lines):
    """lines: str (written as UTF-8) or bytes (written as is, e.g. a broken encoding)."""
    with open(os.path.join(folder, name), "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")


# ---------------------------------------------------------------- CMATH (cmath_dev.jsonl layout)

CMATH_TEMPLATES = [
    ("小明有{a}支铅笔，又买了{b}支，现在一共有多少支铅笔？", lambda a, b: a + b, 1),
    ("一本故事书有{a}页，芳芳已经看了{b}页，还剩多少页没有看？", lambda a, b: a - b, 1),
    ("每盒鸡蛋有{a}个，{b}盒一共有多少个鸡蛋？", lambda a, b: a * b, 2),
    ("{c}个苹果平均分给{b}个小朋友，每人分到几个？", lambda a, b: a, 2),
    ("一个长方形的长是{a}厘米，宽是{b}厘米，它的周长是多少厘米？", lambda a, b: 2 * (a + b), 3),
    ("学校买了{a}个足球，每个{b}元，一共花了多少元？", lambda a, b: a * b, 3),
    ("妈妈买了{a}千克大米，吃了{b}千克，还剩多少千克？", lambda a, b: a - b, 1),
    ("一辆汽车每小时行驶{a}千米，{b}小时一共行驶多少千米？", lambda a, b: a * b, 4),
    ("同学们排队做操，每行{a}人，有{b}行，还多出3人，一共有多少人？", lambda a, b: a * b + 3, 4),
    ("一根绳子长{a}米，剪去{b}米后，又接上5米，现在绳子长多少米？", lambda a, b: a - b + 5, 5),
]
CMATH_NUMBERS = [(12, 5), (25, 8), (36, 9), (48, 6), (64, 7)]


def cmath_rows():
    rows = []
    for t, (template, answer, grade) in enumerate(CMATH_TEMPLATES):
        for a, b in CMATH_NUMBERS:
            a2 = a + 3 * t  # a different first number per template keeps prompts distinct
            question = template.format(a=a2, b=b, c=a2 * b)
            rows.append({"grade": grade, "reasoning_step": 1 + (template.count("，") > 2),
                         "num_digits": len(str(a2)), "question": question, "golden": str(answer(a2, b))})
    return rows


def write_cmath(folder):
    rows = cmath_rows()
    lines = [dumps(r) for r in rows]
    lines.insert(7, dumps(rows[3]))  # exact duplicate
    lines.insert(20, dumps(rows[11]))  # exact duplicate
    lines.insert(12, '{"grade": 2, "question": "一共有多少只小鸡？", "golden": "7"')  # malformed JSON
    lines.insert(15, dumps({"grade": 1, "reasoning_step": 1, "num_digits": 1, "question": "3加4等于几？"}))  # no golden
    lines.insert(25, dumps({"grade": 1, "reasoning_step": 1, "num_digits": 1, "question": ["5减2等于几？"],
                            "golden": "3"}))  # wrong type
    lines.insert(30, dumps({"grade": 1, "reasoning_step": 1, "num_digits": 1, "question": "6加6等于几？",
                            "golden": ""}))  # empty answer
    lines.append(dumps({"grade": 2, "reasoning_step": 1, "num_digits": 2,
                        "question": "一个班有\x0718个男生和16个女生，\t\n这个班一共有多少人？  ", "golden": "34 "}))
    write_lines(folder, "cmath_dev.jsonl", lines)


# ---------------------------------------------------------------- MAWPS (MAWPS.csv layout)

MAWPS_TEMPLATES = [
    ("Sam had N_00 pennies in his bank . He spent N_01 of his pennies . How many pennies does he have now ?",
     "N_00 - N_01", lambda x, y: x - y),
    ("Mary found N_00 seashells and Jessica found N_01 seashells on the beach . How many seashells did they "
     "find together ?", "N_00 + N_01", lambda x, y: x + y),
    ("There are N_00 rows of chairs in a hall . Each row has N_01 chairs . How many chairs are there in the hall ?",
     "N_00 * N_01", lambda x, y: x * y),
    ("A baker made N_00 cookies and put them equally into N_01 boxes . How many cookies are in each box ?",
     "N_00 / N_01", lambda x, y: x / y),
    ("Tom has N_00 red balloons and N_01 blue balloons . How many more red balloons than blue balloons does "
     "Tom have ?", "N_00 - N_01", lambda x, y: x - y),
    ("A school bus carries N_00 students on each trip . It made N_01 trips today . How many students did it carry ?",
     "N_00 * N_01", lambda x, y: x * y),
    ("Keith bought N_00 toys for $ N_01 each . How much money did he spend ?", "N_00 * N_01",
     lambda x, y: x * y),
    ("Joan has N_00 books . She gave N_01 books to her friend . How many books does Joan have left ?",
     "N_00 - N_01", lambda x, y: x - y),
    ("A farmer planted N_00 apple trees and N_01 pear trees . How many trees did he plant ?", "N_00 + N_01",
     lambda x, y: x + y),
    ("Dan drove N_00 miles in N_01 hours . What was his average speed in miles per hour ?", "N_00 / N_01",
     lambda x, y: x / y),
]
MAWPS_NUMBERS = [(24, 8), (35, 7), (42, 6), (60, 12), (72, 9)]


def write_mawps(folder):
    import csv
    import io
    rows = []
    for t, (question, equation, answer) in enumerate(MAWPS_TEMPLATES):
        for x, y in MAWPS_NUMBERS:
            x2 = x + 2 * t * y  # stays divisible by y
            rows.append([question, equation, f"{float(answer(x2, y))}", f"{float(x2)} {float(y)}"])
    rows.insert(9, rows[4])  # exact duplicates
    rows.insert(30, rows[22])
    rows.insert(14, ["Ann has N_00 pens and N_02 pencils . How many in all ?", "N_00 + N_02", "9.0", "4.0 5.0"])
    rows.insert(18, ["Bill has N_00 cards and buys N_01 more . How many now ?", "N_00 + N_01", "abc", "3.0 4.0"])
    rows.insert(26, ["Kim ate N_00 grapes . How many are left ?", "N_00"])  # missing fields
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Question", "Equation", "Answer", "Numbers"])
    writer.writerows(rows)
    lines = buf.getvalue().rstrip("\n").split("\n")
    lines.insert(40, b"Lee had N_00 caf\xe9s to visit and saw N_01 . How many are left ?,N_00 - N_01,2.0,5.0 3.0")
    write_lines(folder, "MAWPS.csv", lines)


# ---------------------------------------------------------------- emoji chat (question / answer_zh / answer_en)

EMOJI = [
    ("今天心情不太好，怎么办？", "抱抱你 🤗 先深呼吸几次，出去走走晒晒太阳 ☀️，再和朋友聊聊天，心情会慢慢变好的 💪",
     "Take a walk and talk to a friend."),
    ("推荐一个周末的休闲活动", "去公园野餐吧 🧺🌳 带上三明治和水果 🍓，躺在草地上看云 ☁️，超级放松！",
     "Try a picnic in the park."),
    ("怎么才能早点起床？", "试试这三招 ⏰：1️⃣ 固定时间睡觉 2️⃣ 闹钟放远一点 3️⃣ 起床先喝一杯水 💧 坚持一周就习惯啦 ✨",
     "Go to bed earlier and move the alarm away."),
    ("给我讲个冷笑话", "为什么海水是咸的？🌊 因为鱼太多了，它们一直在流汗 🐟💦 哈哈 😆", "Fish make the sea salty."),
    ("学英语有什么好方法？", "每天坚持一点点 📚：听英文歌 🎵、看带字幕的剧 🎬、背10个单词 📝，慢慢就会进步的 🚀",
     "Practice a little every day."),
    ("夏天吃什么水果好？", "西瓜 🍉 解渴又清甜，还有桃子 🍑 和葡萄 🍇，记得别吃太多冰的哦 🧊",
     "Watermelon, peaches and grapes."),
    ("如何缓解工作压力？", "给自己放个小假 🏖️ 运动出出汗 🏃，把任务列成清单 ✅ 一件一件完成，压力就小多啦 😌",
     "Exercise and make a task list."),
    ("猫咪为什么喜欢纸箱？", "纸箱让猫咪觉得安全又温暖 📦🐱 它们天生喜欢躲在小空间里观察世界 👀",
     "Boxes feel safe to cats."),
    ("怎么做一杯好喝的奶茶？", "红茶煮浓一点 🍵 加入热牛奶 🥛 再放一勺糖和珍珠 🧋 搅一搅就好啦 😋",
     "Brew strong tea and add milk."),
    ("下雨天适合做什么？", "窝在家里看书 📖 听雨声 🌧️ 泡一杯热可可 ☕，或者追一部好剧 📺",
     "Read a book at home."),
    ("怎样养好一盆绿萝？", "绿萝喜欢散射光 🌤️ 土干了再浇水 💧 每个月施一次薄肥 🌱 叶子就会绿油油的 🍃",
     "Indirect light and water when dry."),
    ("第一次去北京玩什么？", "故宫 🏯 长城 🧱 天坛必去，晚上逛逛什刹海 🌙 再吃一顿烤鸭 🦆 完美！",
     "Forbidden City, Great Wall, roast duck."),
    ("怎么安慰考试没考好的朋友？", "告诉TA一次考试不代表全部 📄 一起分析错题 🔍 再约TA吃顿好吃的 🍲 你一直都在 🤝",
     "Tell them one exam is not everything."),
    ("晚上失眠怎么办？", "睡前一小时放下手机 📵 泡个脚 🦶 听点白噪音 🎧 别想太多，慢慢就睡着啦 😴",
     "Put the phone away before bed."),
    ("推荐一本适合入门的编程语言", "Python 🐍 语法简单好上手，资料超多 📚 做数据分析和小工具都很方便 💻",
     "Python is a good first language."),
    ("怎么保持运动的习惯？", "从每天10分钟开始 ⏱️ 找个运动搭子 👯 记录打卡 📅 小目标达成就奖励自己 🎁",
     "Start small and track progress."),
    ("早餐吃什么比较健康？", "燕麦 🥣 鸡蛋 🥚 加一份水果 🍌 再配一杯牛奶 🥛，营养又顶饱 💯",
     "Oats, eggs, fruit and milk."),
    ("怎么和新同事快速熟悉？", "主动打招呼 👋 午饭时一起吃 🍱 多问问题多帮忙 🙌 很快就打成一片啦 😄",
     "Say hello and have lunch together."),
    ("旅行要带哪些必需品？", "证件 🪪 充电器 🔌 常用药 💊 换洗衣服 👕 还有一个好心情 😎",
     "ID, charger, medicine, clothes."),
    ("怎么提高专注力？", "番茄工作法试试 🍅 专注25分钟休息5分钟 ⏳ 手机调成静音 🔕 效率会高很多 📈",
     "Use the Pomodoro technique."),
    ("秋天有什么好玩的？", "去看红叶 🍁 爬爬山 ⛰️ 吃大闸蟹 🦀 再来一杯热乎乎的桂花茶 🍵",
     "See autumn leaves and hike."),
    ("怎样做番茄炒蛋？", "鸡蛋打散炒熟盛出 🍳 番茄切块炒出汁 🍅 倒回鸡蛋加盐和一点糖 🧂 翻炒均匀出锅 😋",
     "Scramble eggs, cook tomatoes, mix."),
    ("小狗不爱吃饭怎么办？", "先看看它是不是不舒服 🐶 定时定量喂食 🕒 换点它喜欢的口味 🦴 不行就带去看兽医 🏥",
     "Check health and feed on schedule."),
    ("怎么整理乱糟糟的房间？", "先把东西分成留下 ✅ 送人 🎁 扔掉 🗑️ 三类，再给每样东西找个固定的家 🏠",
     "Sort things into keep, give, throw."),
    ("周末宅家做什么不无聊？", "学做一道新菜 🍝 拼个拼图 🧩 看场电影 🎥 或者给家里换个小布置 🪴",
     "Cook something new or watch a film."),
    ("怎么记住别人的名字？", "认识时多重复一遍名字 🗣️ 把名字和特征联系起来 🧠 事后写在备忘录里 📝",
     "Repeat the name and link it to a feature."),
    ("雪天出门要注意什么？", "穿防滑的鞋 🥾 戴好帽子手套 🧤 走路慢一点 🚶 开车保持车距 🚗❄️",
     "Wear non-slip shoes and go slowly."),
    ("怎么挑一个好西瓜？", "拍一拍声音清脆 🍉 纹路清晰 🟢 瓜蒂弯曲新鲜 🌿 底部黄斑越黄越甜 😋",
     "Tap it and look for a yellow spot."),
    ("What should I do on a rainy day?", "", "Stay in, read a book and make some tea."),
    ("How can I drink more water?", "", "Keep a bottle on your desk and set reminders."),
    ("最近总是忘事怎么办？", "准备一个小本子 📒 想到就记下来 ✍️ 手机设好提醒 ⏰ 睡够觉记性也会变好 😴",
     "Write things down and set reminders."),
    ("怎么让阳台变得更好看？", "摆几盆绿植 🪴 挂一串小灯 💡 放一把小椅子 🪑 就是你的秘密花园啦 🌼",
     "Plants, lights and a small chair."),
]


def write_emoji(folder):
    rows = [{"question": q, "answer_zh": zh, "answer_en": en} for q, zh, en in EMOJI]
    lines = [dumps(r) for r in rows]
    lines.insert(10, dumps(rows[2]))  # exact duplicate
    lines.insert(16, dumps({"question": "周末去哪儿玩？", "answer_zh": "", "answer_en": ""}))  # empty answer
    lines.insert(21, dumps({"answer_zh": "好的 👍", "answer_en": "OK"}))  # no question
    # "今天吃什么？" / "火锅" saved as GBK, not UTF-8
    lines.insert(25, b'{"question": "\xbd\xf1\xcc\xec\xb3\xd4\xca\xb2\xc3\xb4\xa3\xbf", '
                     b'"answer_zh": "\xbb\xf0\xb9\xf8", "answer_en": "Hot pot"}')
    write_lines(folder, "emoji.jsonl", lines)


# ---------------------------------------------------------------- alpaca (JSON array, instruction/input/output)

ALPACA = [
    ("Give three tips for staying healthy.", "", "1. Eat vegetables. 2. Exercise daily. 3. Sleep 8 hours."),
    ("What is the capital of France?", "", "Paris."),
    ("Translate to English.", "你好，世界", "Hello, world."),
    ("Name the largest planet in our solar system.", "", "Jupiter."),
    ("Write a haiku about autumn.", "", "Red leaves drift and fall,\ncool wind hums through empty trees,\nthe year "
                                        "breathes slowly."),
    ("Summarize the sentence in five words or fewer.", "The meeting was moved from Monday to Wednesday afternoon.",
     "Meeting moved to Wednesday."),
    ("Classify the sentiment as positive or negative.", "I loved the movie, the music was great!", "Positive."),
    ("Convert 5 kilometers to meters.", "", "5 kilometers = 5000 meters."),
    ("用一句话解释什么是光合作用。", "", "光合作用是植物利用阳光把二氧化碳和水变成有机物并释放氧气的过程。"),
    ("把下面的句子改成疑问句。", "他明天去上海。", "他明天去上海吗？"),
    ("列出三种常见的编程语言。", "", "Python、Java、C++。"),
    ("What is 15% of 200?", "", "30."),
    ("Give an antonym of 'ancient'.", "", "Modern."),
    ("写一个关于春天的成语。", "", "春暖花开。"),
    ("Fix the grammar.", "She don't like apples.", "She doesn't like apples."),
    ("What does CPU stand for?", "", "Central Processing Unit."),
    ("Sort these numbers in ascending order.", "9, 2, 7, 4", "2, 4, 7, 9"),
    ("Explain what a noun is in one sentence.", "", "A noun is a word that names a person, place, thing or idea."),
    ("中国的首都是哪里？", "", "北京。"),
    ("Write a Python expression that reverses a string s.", "", "s[::-1]"),
    ("How many days are in a leap year?", "", "366."),
    ("Give a synonym for 'happy'.", "", "Joyful."),
    ("计算 12 乘以 8。", "", "96。"),
    ("Rewrite the sentence in the passive voice.", "The cat chased the mouse.", "The mouse was chased by the cat."),
    ("What color do you get by mixing blue and yellow?", "", "Green."),
    ("Name two primary colors.", "", "Red and blue."),
    ("Is a tomato a fruit or a vegetable?", "", "Botanically, a tomato is a fruit."),
    ("Suggest a name for a coffee shop.", "", "The Daily Grind."),
]
ALPACA_JSON = [
    ("Extract the city and temperature as a JSON object with keys city and temp_c.", "It is 21 degrees in Oslo.",
     {"city": "Oslo", "temp_c": 21}),
    ("Return only a JSON object with keys title and year.", "The film Alien came out in 1979.",
     {"title": "Alien", "year": 1979}),
    ("Output only JSON: the person's name and age.", "Maria is 34 years old.", {"name": "Maria", "age": 34}),
    ("只输出一个JSON对象，包含 product 和 price 两个字段。", "这款耳机售价199元。", {"product": "耳机", "price": 199}),
    ("Return a JSON object with the fields email and verified (boolean).", "bob@example.com has been verified.",
     {"email": "bob@example.com", "verified": True}),
    ("Output only a JSON object listing the colors under the key colors.", "The flag is red, white and blue.",
     {"colors": ["red", "white", "blue"]}),
    ("把下面的信息转成JSON对象，字段为 name 和 city。", "张伟住在成都。", {"name": "张伟", "city": "成都"}),
    ("Return only a JSON object with keys from and to.", "Flight from Tokyo to Sydney.",
     {"from": "Tokyo", "to": "Sydney"}),
]


def write_alpaca(folder):
    records = [{"instruction": i, "input": x, "output": o} for i, x, o in ALPACA]
    records += [{"instruction": i, "input": x, "output": json.dumps(o, ensure_ascii=False)} for i, x, o in ALPACA_JSON]
    records.insert(4, {"instruction": "Answer briefly.", "input": "What is the boiling point of water at sea level?",
                       "output": "100 °C.", "system": "You are a concise assistant."})
    records.insert(12, dict(records[1]))  # exact duplicate
    records.insert(20, {"instruction": "Describe the ocean.", "input": "", "output": ""})  # empty answer
    records.insert(25, {"input": "", "output": "Blue."})  # no instruction
    records.insert(30, {"instruction": "List two fruits.", "input": "", "output": ["apple", "pear"]})  # wrong type
    with open(os.path.join(folder, "alpaca.json"), "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=4)
        f.write("\n")


# ---------------------------------------------------------------- ShareGPT (conversations from/value, tools)

WEATHER_TOOL = [{"name": "get_weather", "description": "Get the weather of a city for a day.",
                 "parameters": {"type": "object", "properties": {
                     "city": {"type": "string"}, "day": {"type": "string", "enum": ["today", "tomorrow"]}},
                     "required": ["city", "day"]}}]
CALC_TOOL = [{"name": "calculator", "description": "Evaluate an arithmetic expression.",
              "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                             "required": ["expression"]}}]

SHAREGPT_CHATS = [
    [("human", "Hi! Can you help me plan a short trip?"), ("gpt", "Of course. Where would you like to go?"),
     ("human", "Somewhere near the sea, for two days."), ("gpt", "A coastal town works well: day one the beach, "
                                                                 "day two a boat tour and seafood.")],
    [("human", "你好，帮我想一个生日祝福。"), ("gpt", "祝你生日快乐，天天开心，心想事成！"),
     ("human", "再短一点。"), ("gpt", "生日快乐，万事如意！")],
    [("human", "What's a good name for a black cat?"), ("gpt", "Shadow, Onyx or Pepper.")],
    [("human", "How do I boil an egg?"), ("gpt", "Put it in boiling water for 9 minutes, then cool it in cold water."),
     ("human", "And for a soft yolk?"), ("gpt", "About 6 minutes.")],
    [("human", "推荐一部科幻电影。"), ("gpt", "《星际穿越》，讲时间与亲情，画面很震撼。")],
    [("human", "Tell me a fun fact."), ("gpt", "Octopuses have three hearts.")],
    [("human", "我想学做饭，从哪里开始？"), ("gpt", "先学几道家常菜，比如番茄炒蛋和青椒肉丝。"),
     ("human", "需要买什么工具？"), ("gpt", "一口炒锅、一把菜刀和一块砧板就够了。")],
    [("human", "What is the speed of light?"), ("gpt", "About 300,000 kilometers per second.")],
    [("human", "Give me a word that rhymes with 'cat'."), ("gpt", "Hat.")],
    [("human", "什么是人工智能？"), ("gpt", "人工智能是让计算机模拟人类思考和学习能力的技术。"),
     ("human", "举个例子。"), ("gpt", "比如手机里的语音助手和推荐算法。")],
    [("human", "How many continents are there?"), ("gpt", "Seven.")],
    [("human", "Write one sentence about the moon."),
     ("gpt", "The moon lights the night with borrowed sunlight.")],
    [("human", "帮我把'谢谢'翻译成日语。"), ("gpt", "ありがとう。")],
    [("human", "Suggest a quick breakfast."), ("gpt", "Yogurt with granola and berries."),
     ("human", "Something warm?"), ("gpt", "Oatmeal with banana and honey.")],
    [("human", "What's the opposite of 'generous'?"), ("gpt", "Stingy.")],
    [("human", "怎么快速入睡？"), ("gpt", "睡前放下手机，做几次深呼吸，保持卧室安静和凉爽。")],
    [("human", "Name a famous painting."), ("gpt", "The Mona Lisa by Leonardo da Vinci.")],
    [("human", "一年有几个季节？"), ("gpt", "四个：春、夏、秋、冬。")],
]
SHAREGPT_SYSTEM = [
    ("You are a pirate. Answer like one.", [("human", "How are you today?"), ("gpt", "Arr, fine as a calm sea!")]),
    ("你是一位耐心的数学老师。", [("human", "什么是质数？"), ("gpt", "只能被1和它本身整除的大于1的整数，比如2、3、5、7。")]),
    ("Answer in exactly one word.", [("human", "What do bees make?"), ("gpt", "Honey.")]),
]
SHAREGPT_TOOLS = [
    (WEATHER_TOOL, "What's the weather in Berlin today?", {"name": "get_weather",
                                                          "arguments": {"city": "Berlin", "day": "today"}},
     '{"temp_c": 17, "sky": "cloudy"}', "It is 17 °C and cloudy in Berlin today."),
    (WEATHER_TOOL, "明天上海天气怎么样？", {"name": "get_weather", "arguments": {"city": "上海", "day": "tomorrow"}},
     '{"temp_c": 26, "sky": "小雨"}', "明天上海有小雨，气温26°C，记得带伞。"),
    (CALC_TOOL, "What is 37 times 43?", {"name": "calculator", "arguments": {"expression": "37*43"}},
     '{"result": 1591}', "37 × 43 = 1591."),
    (CALC_TOOL, "帮我算一下 1024 除以 32。", {"name": "calculator", "arguments": {"expression": "1024/32"}},
     '{"result": 32}', "1024 ÷ 32 = 32。"),
    (WEATHER_TOOL, "Will it be sunny in Madrid tomorrow?", {"name": "get_weather",
                                                           "arguments": {"city": "Madrid", "day": "tomorrow"}},
     '{"temp_c": 29, "sky": "sunny"}', "Yes, sunny and 29 °C in Madrid tomorrow."),
]


def write_sharegpt(folder):
    lines = []
    for chat in SHAREGPT_CHATS:
        lines.append(dumps({"conversations": [{"from": f, "value": v} for f, v in chat]}))
    for system, chat in SHAREGPT_SYSTEM:
        lines.append(dumps({"system": system, "conversations": [{"from": f, "value": v} for f, v in chat]}))
    for tools, question, call, result, answer in SHAREGPT_TOOLS:
        lines.append(dumps({"conversations": [
            {"from": "human", "value": question},
            {"from": "function_call", "value": json.dumps(call, ensure_ascii=False)},
            {"from": "observation", "value": result},
            {"from": "gpt", "value": answer}], "tools": json.dumps(tools, ensure_ascii=False)}))
    lines.insert(5, lines[2])  # exact duplicate
    lines.insert(9, dumps({"conversations": [{"from": "gpt", "value": "Hello! How can I help?"},
                                             {"from": "human", "value": "Hi."},
                                             {"from": "gpt", "value": "Hi there."}]}))  # assistant first
    lines.insert(13, dumps({"conversations": [{"from": "human", "value": "Ping?"},
                                              {"from": "bot", "value": "Pong."}]}))  # unknown role
    lines.insert(17, '{"conversations": [{"from": "human", "value": "broken"}, {"from": "gpt", "value": "row"}')
    lines.insert(21, dumps({"conversations": [{"from": "human", "value": "Check the weather."},
                                              {"from": "observation", "value": "{\"temp_c\": 3}"},
                                              {"from": "gpt", "value": "It is 3 °C."}]}))  # result without a call
    write_lines(folder, "sharegpt.jsonl", lines)


# ---------------------------------------------------------------- OpenAI messages (tools, tool_calls, reasoning)

def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


def call(call_id, name, arguments):
    return {"type": "function", "id": call_id, "function": {"name": name, "arguments": arguments}}


OPENAI_WEATHER = [{"type": "function", "function": WEATHER_TOOL[0]}]
OPENAI_CALC = [{"type": "function", "function": CALC_TOOL[0]}]
TIME_TOOL = [{"type": "function", "function": {
    "name": "get_time", "description": "Current local time of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

MESSAGES = [
    {"messages": [msg("system", "You are a helpful assistant."), msg("user", "What is QLoRA in one sentence?"),
                  msg("assistant", "QLoRA fine-tunes small LoRA adapters on top of a frozen 4-bit base model.")]},
    {"messages": [msg("user", "简要解释什么是 LoRA。"),
                  msg("assistant", "LoRA 冻结原模型，只训练插入的低秩矩阵，显存占用小。")]},
    {"messages": [msg("user", "What's 2 to the power of 10?"), msg("assistant", "1024.")]},
    {"messages": [msg("user", "我有一份 CSV，列是 name, score，怎么用 Python 读？"),
                  msg("assistant", "用 pandas：df = pd.read_csv('file.csv')"),
                  msg("user", "不用 pandas 呢？"),
                  msg("assistant", "用 csv 模块：rows = list(csv.DictReader(open('file.csv')))")]},
    {"messages": [msg("user", "Pick a number between 1 and 3."), msg("assistant", "2."),
                  msg("user", "Another one?"), msg("assistant", "3.")]},
    {"messages": [msg("system", "You are a precise and concise assistant."),
                  msg("user", "Define entropy briefly."),
                  msg("assistant", "A measure of uncertainty or disorder."),
                  msg("user", "In information theory?"),
                  msg("assistant", "The expected number of bits needed to encode an outcome.")]},
    {"messages": [msg("user", "Recommend a board game for four people."), msg("assistant", "Ticket to Ride."),
                  msg("user", "Something shorter?"), msg("assistant", "Love Letter: about 20 minutes."),
                  msg("user", "And cooperative?"), msg("assistant", "The Crew.")]},
    {"messages": [msg("user", "How do I check my Python version?"), msg("assistant", "Run: python --version")]},
    {"messages": [msg("user", "用一个词形容大海。"), msg("assistant", "辽阔。")]},
    {"messages": [msg("user", "What is the plural of 'mouse'?"), msg("assistant", "Mice.")]},
    {"messages": [msg("user", "Name a prime number greater than 10."), msg("assistant", "11.")]},
    {"messages": [msg("user", "水的化学式是什么？"), msg("assistant", "H₂O。")]},
    {"tools": OPENAI_WEATHER, "messages": [
        msg("user", "Do I need an umbrella in London today?"),
        msg("assistant", "", tool_calls=[call("call_1", "get_weather", {"city": "London", "day": "today"})]),
        msg("tool", '{"temp_c": 14, "sky": "rain"}', tool_call_id="call_1"),
        msg("assistant", "Yes: rain and 14 °C in London today.")]},
    {"tools": OPENAI_WEATHER, "messages": [
        msg("user", "北京今天和明天的天气？"),
        msg("assistant", "", tool_calls=[call("c1", "get_weather", {"city": "北京", "day": "today"}),
                                         call("c2", "get_weather", {"city": "北京", "day": "tomorrow"})]),
        msg("tool", '{"temp_c": 8, "sky": "晴"}', tool_call_id="c1"),
        msg("tool", '{"temp_c": 5, "sky": "多云"}', tool_call_id="c2"),
        msg("assistant", "北京今天晴，8°C；明天多云，5°C。")]},
    {"tools": OPENAI_CALC, "messages": [
        msg("system", "Use the calculator for arithmetic."),
        msg("user", "What is 123 * 456?"),
        msg("assistant", "", tool_calls=[call("calc_0", "calculator", '{"expression": "123*456"}')]),
        msg("tool", '{"result": 56088}', tool_call_id="calc_0"),
        msg("assistant", "123 × 456 = 56088.")]},
    {"tools": TIME_TOOL, "messages": [
        msg("user", "What time is it in Tokyo?"),
        msg("assistant", "Let me check.", tool_calls=[call("t1", "get_time", {"city": "Tokyo"})]),
        msg("tool", '{"time": "21:40"}', tool_call_id="t1"),
        msg("assistant", "It is 21:40 in Tokyo.")]},
    {"tools": OPENAI_CALC + TIME_TOOL, "messages": [
        msg("user", "Hi! What can you do?"),
        msg("assistant", "I can do arithmetic and tell the time in a city.")]},
    {"tools": OPENAI_CALC, "messages": [
        msg("user", "计算 2 的 16 次方。"),
        msg("assistant", "", tool_calls=[call("k1", "calculator", {"expression": "2**16"})]),
        msg("tool", '{"result": 65536}', tool_call_id="k1"),
        msg("assistant", "2 的 16 次方是 65536。"),
        msg("user", "再除以 4 呢？"),
        msg("assistant", "", tool_calls=[call("k2", "calculator", {"expression": "65536/4"})]),
        msg("tool", '{"result": 16384}', tool_call_id="k2"),
        msg("assistant", "结果是 16384。")]},
    {"messages": [msg("user", "Is 91 a prime number?"),
                  msg("assistant", "No: 91 = 7 × 13.",
                      reasoning_content="Try small primes: 91/7 = 13, so it factors.")]},
    {"messages": [msg("user", "一个数加上 7 等于 15，这个数是多少？"),
                  msg("assistant", "8。", reasoning_content="15 - 7 = 8。")]},
    {"messages": [msg("user", "Which is larger, 0.9 or 0.11?"),
                  msg("assistant", "0.9 is larger.", reasoning_content="0.90 > 0.11 when aligned to two decimals.")]},
    {"messages": [msg("user", "If today is Monday, what day is it in 10 days?"),
                  msg("assistant", "Thursday.", reasoning_content="10 mod 7 = 3; Monday + 3 = Thursday.")]},
    {"messages": [msg("user", "鸡兔同笼，共 10 个头 28 条腿，兔子有几只？"),
                  msg("assistant", "兔子有 4 只。", reasoning_content="设兔 x 只：4x + 2(10 - x) = 28，x = 4。")]},
    {"tags": ["json-only", "strict"], "messages": [
        msg("user", "仅输出一个JSON对象，含 name(string), score(float)。name=Alice, score=93.5。不得输出额外文字。"),
        msg("assistant", '{"name": "Alice", "score": 93.5}')]},
    {"tags": ["json-only"], "messages": [
        msg("system", "Reply with JSON only."),
        msg("user", "Person: Ken, 41, engineer. Keys: name, age, job."),
        msg("assistant", '{"name": "Ken", "age": 41, "job": "engineer"}')]},
    {"tags": ["json-only"], "messages": [
        msg("user", "Return only a JSON object with keys ok (boolean) and count (int): ok=yes, count=3"),
        msg("assistant", '{"ok": true, "count": 3}')]},
    {"messages": [msg("user", "Tell me a short joke."),
                  msg("assistant", "I told my computer a joke about UDP. I'm not sure it got it.")]},
    {"messages": [msg("user", "Give me a motivational quote."),
                  msg("assistant", "Small steps every day add up to big results.")]},
    {"messages": [msg("user", "How many legs does a spider have?"), msg("assistant", "Eight.")]},
    {"messages": [msg("user", "地球绕太阳一圈要多久？"), msg("assistant", "大约 365.25 天。")]},
    {"messages": [msg("user", "What is the freezing point of water in Fahrenheit?"), msg("assistant", "32 °F.")]},
    {"messages": [msg("user", "Spell 'necessary' backwards."), msg("assistant", "yrassecen")]},
    {"messages": [msg("user", "What's the square root of 144?"), msg("assistant", "12.")]},
    {"messages": [msg("user", "一周有几天？"), msg("assistant", "七天。")]},
    {"messages": [msg("user", "Give an example of a mammal that can fly."), msg("assistant", "The bat.")]},
]
MESSAGES_BROKEN = [
    (8, dumps({"messages": [msg("assistant", "Hello!"), msg("user", "Hi"), msg("assistant", "How can I help?")]})),
    (14, dumps({"messages": [msg("user", "Weather?"), msg("tool", '{"temp_c": 3}', tool_call_id="x"),
                             msg("assistant", "3 °C.")]})),
    (18, dumps({"tags": ["json-only"], "messages": [msg("user", "Output only JSON with key a: a=1"),
                                                     msg("assistant", "{'a': 1}")]})),
    (22, b'{"messages": [{"role": "user", "content": "caf\xe9?"}, {"role": "assistant", "content": "ok"}]}'),
    (26, dumps({"messages": [msg("user", "What is 6 times 7?"), msg("assistant", 42)]})),
    (30, dumps({"messages": [msg("user", "Repeat this: <|im_end|>"), msg("assistant", "<|im_end|>")]})),
    (33, dumps({"tools": OPENAI_CALC, "messages": [
        msg("user", "1+1?"), msg("assistant", "", tool_calls=[call("z", "calculator", "{expression: 1+1")]),
        msg("tool", "2", tool_call_id="z"), msg("assistant", "2.")]})),
]


def write_messages(folder):
    lines = [dumps(r) for r in MESSAGES]
    lines.insert(11, lines[2])  # exact duplicate
    for at, line in MESSAGES_BROKEN:
        lines.insert(at, line)
    write_lines(folder, "messages.jsonl", lines)


# ---------------------------------------------------------------- json-only (generated, messages layout)

NAMES = ["Alice", "Bob", "Chen", "Diana", "Emil", "Fatima", "Goro", "Hana", "Ivan", "Julia", "李雷", "韩梅梅", "王芳",
         "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn"]
CITIES = ["Paris", "Lima", "Cairo", "Seoul", "Oslo", "Quito", "Hanoi", "Dakar", "杭州", "成都", "Austin", "Porto"]
PRODUCTS = ["lamp", "kettle", "backpack", "notebook", "headphones", "desk", "茶杯", "雨伞", "bicycle", "camera"]


def json_only_rows(rng):
    templates = [
        lambda: ({"name": rng.choice(NAMES), "score": round(rng.uniform(50, 100), 1)},
                 "Output only a JSON object with name and score: name={name}, score={score}"),
        lambda: ({"name": rng.choice(NAMES), "score": round(rng.uniform(50, 100), 1)},
                 "仅输出一个JSON对象，含 name(string), score(float)。name={name}, score={score}。不得输出额外文字。"),
        lambda: ({"city": rng.choice(CITIES), "temp_c": rng.randint(-10, 38)},
                 "Return only JSON with keys city and temp_c: city={city}, temp_c={temp_c}"),
        lambda: ({"product": rng.choice(PRODUCTS), "price": round(rng.uniform(5, 300), 2),
                  "in_stock": rng.random() < 0.5},
                 "Convert to a JSON object with fields product, price, in_stock: product={product}, price={price}, "
                 "in_stock={in_stock}"),
        lambda: ({"city": rng.choice(CITIES), "population": rng.randint(100_000, 20_000_000)},
                 "以JSON对象输出 city 和 population（整数）：city={city}, population={population}"),
        lambda: ({"id": rng.randint(1, 999), "tags": rng.sample(["red", "blue", "green", "new", "sale", "eco"], 2)},
                 "Output a JSON object with id (int) and tags (list of strings): id={id}, tags={tags}"),
        lambda: ({"title": rng.choice(["Dune", "Emma", "Ulysses", "Beloved", "Walden"]), "pages": rng.randint(90, 900)},
                 "Give only a JSON object with title and pages: title={title}, pages={pages}"),
        lambda: ({"user": rng.choice(NAMES).lower(), "active": rng.random() < 0.5, "age": rng.randint(18, 80)},
                 "JSON only, keys user, active, age: user={user}, active={active}, age={age}"),
    ]
    rows, seen = [], set()
    while len(rows) < 60:
        obj, prompt = templates[len(rows) % len(templates)]()
        shown = {k: (",".join(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else v)
                 for k, v in obj.items()}
        prompt = prompt.format(**shown)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"tags": ["json-only"], "messages": [
            msg("user", prompt), msg("assistant", json.dumps(obj, ensure_ascii=False))]})
    return rows


def write_json_only(folder):
    rows = json_only_rows(random.Random(1234))
    lines = [dumps(r) for r in rows]
    lines.insert(30, lines[5])  # exact duplicate
    write_lines(folder, "json_only.jsonl", lines)
    return rows


# ---------------------------------------------------------------- local eval set (decontamination check)

EVAL_QA = [
    ("What is the boiling point of water in Celsius at sea level?", "100 °C."),
    ("Name the smallest prime number.", "2."),
    ("法国的首都是哪里？", "巴黎。"),
    ("What is 9 times 8?", "72."),
    ("用一句话介绍长城。", "长城是中国古代修建的军事防御工程，绵延上万里。"),
    ("Translate 'good morning' into Chinese.", "早上好。"),
    ("How many minutes are in two hours?", "120."),
    ("一个三角形有几条边？", "三条。"),
    ("Give a synonym for 'quick'.", "Fast."),
    ("What gas do plants absorb from the air?", "Carbon dioxide."),
    ("Output only a JSON object with keys a and b: a=1, b=2", '{"a": 1, "b": 2}'),
    ("仅输出一个JSON对象，含 city 和 country：city=Rome, country=Italy", '{"city": "Rome", "country": "Italy"}'),
]


def write_eval(path, json_rows):
    rows = [{"messages": [msg("user", q), msg("assistant", a)], "tags": ["json-only"] if a.startswith("{") else []}
            for q, a in EVAL_QA]
    # Prompts that also sit in the raw samples, so the decontamination check has something to flag: one exact,
    # two that differ only in case/punctuation/spacing (the normalization the split grouping uses too).
    overlap = [cmath_rows()[0]["question"], "what is the capital of france", json_rows[0]["messages"][0]["content"]]
    answers = [cmath_rows()[0]["golden"], "Paris.", json_rows[0]["messages"][1]["content"]]
    rows += [{"messages": [msg("user", q), msg("assistant", a)], "tags": ["overlap-check"]}
             for q, a in zip(overlap, answers)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(dumps(row) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "dataset"), help="writes OUT/raw/* and OUT/eval/qa.jsonl "
                                                                             "(default: the repo's dataset/)")
    out = parser.parse_args().out
    raw = os.path.join(out, "raw")
    os.makedirs(raw, exist_ok=True)
    for write in (write_cmath, write_mawps, write_emoji, write_alpaca, write_sharegpt, write_messages):
        write(raw)
    write_eval(os.path.join(out, "eval", "qa.jsonl"), write_json_only(raw))
    for name in sorted(os.listdir(raw)):
        with open(os.path.join(raw, name), "rb") as f:
            print(f"{os.path.join(raw, name)}: {sum(1 for _ in f)} lines")


if __name__ == "__main__":
    main()

"""Regenerate the sample inputs deterministically: `python sample_data/make_samples.py`.

prompts.jsonl   200 rows: id, topic, prompt            (jobs/quickstart.toml)
tickets.parquet 240 rows: ticket_id, product, priority, text  (jobs/tickets_template.toml)
chats.jsonl      60 rows: id, messages, model, params  (jobs/chats_native.toml)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent

TOPICS = ["astronomy", "cooking", "history", "databases", "gardening", "music", "geology", "chess"]
ASKS = ["Explain {t} to a ten-year-old in two sentences.", "Give three surprising facts about {t}.",
        "Write a haiku about {t}.", "What is a common beginner mistake in {t}?",
        "Summarise the history of {t} in one paragraph."]
PRODUCTS = ["router", "laptop", "phone", "printer", "headset"]
PROBLEMS = ["will not turn on", "keeps disconnecting", "is very slow since the update", "makes a clicking noise",
            "shows error E{n} on start", "was delivered damaged", "battery drains within an hour"]


def prompts(rng: random.Random) -> list[dict]:
    rows = []
    for i in range(200):
        topic = rng.choice(TOPICS)
        rows.append({"id": f"p{i:05d}", "topic": topic, "prompt": rng.choice(ASKS).format(t=topic)})
    return rows


def tickets(rng: random.Random) -> pa.Table:
    rows = {"ticket_id": [], "product": [], "priority": [], "text": []}
    for i in range(240):
        product = rng.choice(PRODUCTS)
        rows["ticket_id"].append(10_000 + i)
        rows["product"].append(product)
        rows["priority"].append(rng.randint(1, 4))
        rows["text"].append(f"My {product} {rng.choice(PROBLEMS).format(n=rng.randint(10, 99))}. "
                            f"Order #{rng.randint(100000, 999999)}.")
    return pa.table(rows)


def chats(rng: random.Random) -> list[dict]:
    rows = []
    for i in range(60):
        topic = rng.choice(TOPICS)
        messages = [{"role": "user", "content": f"I want to learn {topic}."},
                    {"role": "assistant", "content": f"Great choice. What do you know about {topic} already?"},
                    {"role": "user", "content": "Nothing yet. Where do I start?"}]
        row = {"id": f"c{i:04d}", "messages": messages}
        if i % 3 == 0:
            row["model"] = "qwen-flash"
        if i % 4 == 0:
            row["params"] = {"temperature": 0.9, "max_tokens": 64}
        rows.append(row)
    return rows


def main() -> None:
    rng = random.Random(20261123)
    with open(HERE / "prompts.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in prompts(rng))
    pq.write_table(tickets(rng), HERE / "tickets.parquet")
    with open(HERE / "chats.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in chats(rng))


if __name__ == "__main__":
    main()

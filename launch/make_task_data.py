"""Generate the small classification datasets that ship with the project (seeded: the same files every run).

- configs/data/sentiment/{train,eval}.jsonl: short product and film reviews, `{"text", "label"}` with
  label `positive` or `negative`, from templates whose sentiment words are clear. The held-out reviews
  use templates and subjects combined differently from the training ones, and a quarter of their
  sentiment words never occur in training, so held-out accuracy measures what the encoder brings.
- configs/data/ner/{train,eval}.jsonl: sentences as words with BIO tags (`PER`, `LOC`, `ORG`), with
  multi-word entities and names that the tokenizer splits into several sub-tokens.

    python launch/make_task_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "configs" / "data"

POSITIVE = ["great", "excellent", "wonderful", "fantastic", "delightful", "superb", "brilliant", "lovely",
            "amazing", "outstanding", "charming", "terrific", "impressive", "enjoyable", "marvelous", "splendid"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "disappointing", "boring", "poor", "useless",
            "miserable", "pathetic", "annoying", "broken", "lousy", "frustrating", "unpleasant", "abysmal"]
# Held-out only: sentiment words the model never sees labelled in training.
POSITIVE_HELD_OUT = ["magnificent", "joyful", "stellar", "flawless"]
NEGATIVE_HELD_OUT = ["horrendous", "dismal", "atrocious", "shoddy"]
SUBJECTS = ["movie", "film", "book", "phone", "laptop", "restaurant", "hotel", "camera", "game", "album",
            "show", "headphones", "coffee maker", "service", "concert", "novel"]
TEMPLATES = [
    "The {s} was {w}.", "What a {w} {s}!", "I found this {s} {w}.", "Honestly, a {w} {s}.",
    "This {s} is {w} and I would say so again.", "My friends agreed the {s} was {w}.",
    "Overall the {s} felt {w}.", "A truly {w} {s}, from start to finish.",
]
TEMPLATES_HELD_OUT = ["Everything about the {s} was {w}.", "In short: {w}. That is the {s}.",
                      "We all thought the {s} was {w}."]

PEOPLE = ["Alice Johnson", "Bob", "Maria Kowalczyk", "Arnold Schwarzenegger", "Priya Raghunathan", "Chen Wei",
          "Olusegun Obasanjo", "Sophie", "Dmitri Shostakovich", "Emma Thompson", "Kwame Nkrumah", "Lars"]
PLACES = ["Paris", "New York", "Reykjavik", "Ouagadougou", "Kuala Lumpur", "Berlin", "Tokyo", "Buenos Aires",
          "Wroclaw", "Lisbon", "Cape Town", "Vladivostok"]
ORGS = ["Acme Corp", "Globex", "Initech", "United Nations", "Red Cross", "Volkswagen", "Siemens",
        "Stark Industries", "Wayne Enterprises", "Deutsche Bahn", "Unilever", "Aeroflot"]
NER_TEMPLATES = [
    "{PER} moved to {LOC} last year .", "{PER} works for {ORG} in {LOC} .", "{ORG} opened an office in {LOC} .",
    "Yesterday {PER} met {PER} at the {ORG} headquarters .", "The weather in {LOC} was cold .",
    "{ORG} hired {PER} as a consultant .", "{PER} visited {LOC} and {LOC} in spring .",
    "According to {PER} , {ORG} will expand .", "Flights from {LOC} to {LOC} were cancelled .",
    "Nobody expected the meeting to end so early .",
]
FILL = {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}


def review(rng: random.Random, templates: list[str], positive: list[str], negative: list[str]) -> dict:
    label = rng.choice(["positive", "negative"])
    word = rng.choice(positive if label == "positive" else negative)
    return {"text": rng.choice(templates).format(s=rng.choice(SUBJECTS), w=word), "label": label}


def sentiment(rng: random.Random) -> tuple[list[dict], list[dict]]:
    train = [review(rng, TEMPLATES, POSITIVE, NEGATIVE) for _ in range(400)]
    seen = {row["text"] for row in train}
    held_out = []
    while len(held_out) < 120:
        unseen_words = rng.random() < 0.25
        row = review(rng, TEMPLATES_HELD_OUT if rng.random() < 0.5 else TEMPLATES,
                     POSITIVE_HELD_OUT if unseen_words else POSITIVE, NEGATIVE_HELD_OUT if unseen_words else NEGATIVE)
        if row["text"] not in seen:
            held_out.append(row)
            seen.add(row["text"])
    return train, held_out


def sentence(rng: random.Random) -> dict:
    tokens, tags = [], []
    for piece in rng.choice(NER_TEMPLATES).split():
        kind = piece[1:-1] if piece.startswith("{") else None
        if kind is None:
            tokens.append(piece)
            tags.append("O")
            continue
        words = rng.choice(FILL[kind]).split()
        tokens += words
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
    return {"tokens": tokens, "tags": tags}


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{path}: {len(rows)} rows")


def main() -> None:
    train, held_out = sentiment(random.Random(7))
    write(OUT / "sentiment" / "train.jsonl", train)
    write(OUT / "sentiment" / "eval.jsonl", held_out)
    rng = random.Random(11)
    write(OUT / "ner" / "train.jsonl", [sentence(rng) for _ in range(300)])
    write(OUT / "ner" / "eval.jsonl", [sentence(rng) for _ in range(80)])


if __name__ == "__main__":
    main()

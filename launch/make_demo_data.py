"""Generate the quickstart task: normalise human-written dates to ISO 8601.

    python launch/make_demo_data.py [--n-train 256] [--n-eval 63] [--seed 0]

Writes configs/data/dates/{train,eval}.jsonl, one chat per line:
    {"messages": [{"role": "user", "content": "Convert to an ISO 8601 date: March 5, 2021"},
                  {"role": "assistant", "content": "2021-03-05"}]}

The task is tiny but has a crisp right answer, so "before vs after fine-tuning" is visible
by exact match. Deterministic for a given seed. No calendar date is shared between train
and eval, so eval measures conversion, not memorisation. The first eval rows double as the
held-out prompts shown before/after training.
"""

import argparse
import datetime as dt
import json
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "configs" / "data" / "dates"

MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

INSTRUCTIONS = [
    "Convert to an ISO 8601 date:",
    "Write this date as YYYY-MM-DD:",
    "Normalize this date to ISO format:",
    "Give the ISO 8601 form of this date:",
]


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Every style names the month in words or puts the year first, so none is ambiguous
# between day-month and month-day readings (no "03/05/2021").
STYLES = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",                 # March 5, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",                  # 5 March 2021
    lambda d: f"{ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",     # 5th of March, 2021
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",              # Mar 5 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",              # 5 Mar 2021
    lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",        # March 5th, 2021
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",  # Friday, March 5, 2021
    lambda d: f"{d.year}/{d.month}/{d.day}",                              # 2021/3/5
]

FIRST_DAY, LAST_DAY = dt.date(1950, 1, 1), dt.date(2035, 12, 31)


def make_row(rng: random.Random, day: dt.date) -> dict:
    prompt = f"{rng.choice(INSTRUCTIONS)} {rng.choice(STYLES)(day)}"
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": day.isoformat()}]}


EVAL_RESERVE = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=256)
    # Odd on purpose: validation on 2 workers must neither drop nor double-count the odd example out.
    parser.add_argument("--n-eval", type=int, default=63)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    # Shuffle all days once and cut eval first: train and eval share no date, the eval split
    # does not change with --n-train, and a smaller train split is a prefix of a larger one.
    days = [FIRST_DAY + dt.timedelta(days=o) for o in range((LAST_DAY - FIRST_DAY).days + 1)]
    rng.shuffle(days)
    # A fixed reserve of eval days (and of random phrasings) comes first, so --n-eval changes nothing else.
    reserve = max(args.n_eval, EVAL_RESERVE)
    splits = {"eval": days[:reserve], "train": days[reserve:reserve + args.n_train]}

    args.out.mkdir(parents=True, exist_ok=True)
    for name, split_days in splits.items():
        rows = [make_row(rng, day) for day in split_days][: args.n_eval if name == "eval" else None]
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()

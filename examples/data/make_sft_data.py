"""Generate the bundled supervised fine-tuning data: small arithmetic, counting and story
questions with their answers, deterministic for a given seed (no download, no licence
question). Two files with the same kind of content in the two SFT row formats:

    tiny_chat.jsonl          {"id", "messages": [{"role", "content"}, ...]}   (data.format: chat)
    tiny_instruction.jsonl   {"id", "instruction", "input", "output"}          (data.format: instruction)

    python examples/data/make_sft_data.py --out-dir examples/data
"""
import argparse
import json
import random
from pathlib import Path

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Ema", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena"]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "duck", "frog", "horse", "mouse", "rabbit"]
PLACES = ["forest", "river", "garden", "market", "hill", "library", "harbor", "village", "meadow"]
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def task(rng: random.Random) -> tuple[str, str, str]:
    """(instruction, input, answer) of one random task."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return "Add the two numbers.", f"{a} and {b}", f"{a} plus {b} is {a + b}."
    if kind == 1:
        a, b = rng.randint(10, 30), rng.randint(1, 9)
        return f"What is {a} minus {b}?", "", f"{a} minus {b} is {a - b}."
    if kind == 2:
        n = rng.randint(1, 10)
        animal = rng.choice(ANIMALS)
        return "Write the number as a word.", f"{n} {animal}s", f"There are {WORDS[n - 1]} {animal}s."
    name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
    story = f"{name} walked to the {place} and met a {animal}."
    return "Answer the question about the story.", f"{story} Who did {name} meet?", f"{name} met a {animal}."


def chat_row(rng: random.Random, i: int) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        instruction, given, answer = task(rng)
        messages.append({"role": "user", "content": f"{instruction} {given}".strip()})
        messages.append({"role": "assistant", "content": answer})
    return {"id": f"chat-{i}", "messages": messages}


def instruction_row(rng: random.Random, i: int) -> dict:
    instruction, given, answer = task(rng)
    return {"id": f"inst-{i}", "instruction": instruction, "input": given, "output": answer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out_dir)
    for name, make in (("tiny_chat.jsonl", chat_row), ("tiny_instruction.jsonl", instruction_row)):
        rng = random.Random(args.seed)
        with open(out / name, "w", encoding="utf-8") as f:
            for i in range(args.rows):
                f.write(json.dumps(make(rng, i)) + "\n")
        print(f"wrote {args.rows} rows to {out / name}")


if __name__ == "__main__":
    main()

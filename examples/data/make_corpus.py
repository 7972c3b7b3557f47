"""Generate the bundled training corpus: short synthetic stories from a small grammar,
deterministic for a given seed (no download, no licence question).

    python examples/data/make_corpus.py --out examples/data/tiny_corpus.jsonl
"""
import argparse
import json
import random

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Ema", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena"]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "duck", "frog", "horse", "mouse", "rabbit"]
PLACES = ["forest", "river", "garden", "market", "hill", "library", "harbor", "village", "meadow"]
THINGS = ["a red ball", "a small boat", "an old map", "a blue kite", "a silver key", "a warm cake",
          "a wooden box", "a bright lamp", "a long rope", "a green hat"]
FEELINGS = ["happy", "curious", "tired", "brave", "worried", "excited", "calm", "proud"]
VERBS = ["found", "lost", "painted", "carried", "shared", "fixed", "hid", "opened"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "foggy"]
ENDINGS = [
    "In the end, they went home and slept well.",
    "They promised to meet again the next day.",
    "Everyone laughed, and the day was saved.",
    "It was the best day of the whole summer.",
    "From then on, {name} always kept {thing} close.",
]


def sentence(rng: random.Random, name: str, animal: str) -> str:
    """One sentence of a story about name and animal."""
    forms = [
        lambda: f"One {rng.choice(WEATHER)} morning, {name} walked to the {rng.choice(PLACES)}.",
        lambda: f"There, {name} met a {rng.choice(FEELINGS)} {animal}.",
        lambda: f"The {animal} {rng.choice(VERBS)} {rng.choice(THINGS)} near the {rng.choice(PLACES)}.",
        lambda: f"{name} felt {rng.choice(FEELINGS)} and said, \"Let us look for {rng.choice(THINGS)}.\"",
        lambda: f"They walked past the {rng.choice(PLACES)} while it was {rng.choice(WEATHER)}.",
        lambda: f"After a while, the {animal} {rng.choice(VERBS)} {rng.choice(THINGS)}.",
        lambda: f"\"Why are you {rng.choice(FEELINGS)}?\" asked {name}.",
        lambda: f"The {animal} answered that it had {rng.choice(VERBS)} {rng.choice(THINGS)}.",
    ]
    return rng.choice(forms)()


def story(rng: random.Random) -> str:
    """A story of 3 to 30 sentences (some longer than a training sequence)."""
    name, animal = rng.choice(NAMES), rng.choice(ANIMALS)
    n = rng.choice([3, 4, 5, 6, 8, 10, 12, 30])
    body = " ".join(sentence(rng, name, animal) for _ in range(n))
    return body + " " + rng.choice(ENDINGS).format(name=name, thing=rng.choice(THINGS))


def main() -> None:
    """Write N stories as JSON lines {id, text}."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-docs", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for i in range(args.num_docs):
            f.write(json.dumps({"id": i, "text": story(rng)}) + "\n")


if __name__ == "__main__":
    main()

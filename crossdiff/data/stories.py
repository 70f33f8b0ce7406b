"""A procedural generator of short, simple English stories (the offline stand-in for SimpleStories).

Each story follows one arc (a character in a place wants something, meets a problem, gets help or
tries again, and it ends with a feeling or a lesson), drawn from word lists and sentence templates
by a seeded `random.Random`, so the same seed always gives the same stories.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

NAMES = {
    "she": (
        "Mia", "Lily", "Ava", "Zoe", "Nora", "Emma", "Rosa", "Hana", "Ella", "Maya", "Iris",
        "Luna", "Sofia", "Amara", "Priya", "Grace", "Ruby", "Clara", "Leila", "Tess", "Wren",
    ),
    "he": (
        "Leo", "Sam", "Max", "Ben", "Omar", "Finn", "Jack", "Theo", "Kai", "Ravi", "Noah",
        "Eli", "Milo", "Hugo", "Jonas", "Arlo", "Tomas", "Felix", "Kofi", "Ezra", "Owen",
    ),
}  # fmt: skip
CREATURES = (
    ("a little fox", "it"), ("a brave mouse", "it"), ("an old turtle", "it"),
    ("a curious cat", "it"), ("a small robot", "it"), ("a shy rabbit", "it"),
    ("a clever crow", "it"), ("a young bear", "it"), ("a tiny dragon", "it"),
    ("a friendly dog", "it"), ("a sleepy owl", "it"), ("a playful otter", "it"),
)  # fmt: skip
TRAITS = (
    "kind", "curious", "brave", "shy", "cheerful", "careful", "clever", "gentle", "stubborn",
    "quiet", "funny", "patient", "restless", "hopeful", "busy", "thoughtful",
)  # fmt: skip
PLACES = (
    "a small village by the sea", "a big city full of lights", "a green forest",
    "a farm on a hill", "a quiet town near the mountains", "a sunny island",
    "a snowy valley", "a busy market street", "an old house by the river", "a school garden",
    "a tall lighthouse", "a desert oasis", "a bakery on the corner", "a library with many rooms",
    "a space station far from Earth", "a boat on a wide lake", "a castle on a cliff",
    "a park in the middle of town", "a cave behind a waterfall", "a field of sunflowers",
)  # fmt: skip
TIMES = (
    "One morning", "One rainy afternoon", "One cold winter day", "Early one spring morning",
    "One windy evening", "On a warm summer night", "One Saturday", "On the first day of autumn",
    "Late one night", "One bright day",
)  # fmt: skip
WANTS = (
    ("find a lost key", "found the key"), ("build a kite", "flew the new kite"),
    ("bake a cake for a friend", "baked the cake"), ("win the town race", "crossed the line"),
    ("plant a garden", "saw the first flowers grow"), ("learn to swim", "swam across the pond"),
    ("paint a big picture", "painted the picture"), ("find a missing puppy", "found the puppy"),
    ("climb the tallest tree", "reached the top of the tree"), ("write a song", "sang the song"),
    ("fix an old bicycle", "rode the bicycle"), ("see the stars from the hill", "saw the stars"),
    ("make a new friend", "made a new friend"), ("carry water to the village", "brought the water"),
    ("find a hidden map", "found the map"), ("sail across the lake", "sailed across the lake"),
    ("read every book on one shelf", "read the last book"),
    ("save coins for a gift", "bought the gift"),
)  # fmt: skip
PROBLEMS = (
    "a storm came and the wind blew everything away",
    "the path was blocked by a fallen tree",
    "{pronoun} did not know where to start",
    "the other children laughed at the idea",
    "it was much harder than {pronoun} thought",
    "a river was in the way and there was no bridge",
    "{pronoun} lost the only tool {pronoun} had",
    "the night came too soon and it grew dark",
    "a big dog barked and ran off with {his} bag",
    "{pronoun} felt too scared to try again",
    "the old map was torn in half",
    "nobody wanted to help at first",
)  # fmt: skip
HELPERS = (
    "a wise grandmother", "a kind neighbor", "a little sister", "an old fisherman",
    "a teacher with round glasses", "a talking bird", "a best friend", "a tired baker",
    "a gardener with muddy boots", "a girl from the next street", "a gentle giant",
)  # fmt: skip
FEELINGS = ("happy", "proud", "calm", "thankful", "excited", "warm inside", "brave", "glad")
LESSONS = (
    "Sometimes the best things take time.", "Friends make hard things easier.",
    "It is okay to ask for help.", "Trying again is a kind of courage.",
    "Small steps can lead to big places.", "Kindness comes back to you.",
    "Being different can be a gift.", "Listening is as important as speaking.",
)  # fmt: skip
SAYINGS = (
    "I can do this", "Let us try together", "Do not give up", "Look over there",
    "What if we try another way", "I think I have an idea", "We are almost there",
    "Thank you for helping me",
)  # fmt: skip


JOURNEYS = (
    "walked past the old well and over the little bridge",
    "followed a narrow path between the trees",
    "knocked on every door in the street",
    "climbed up the hill where the wind was strong",
    "looked under the beds, behind the chairs and inside the boxes",
    "asked the birds, the cows and the old cat",
    "counted the steps all the way to the gate",
    "went down to the water where the boats were tied",
)  # fmt: skip
DISCOVERIES = (
    "a shiny stone that glowed in the dark",
    "a note that said, \"Keep going.\"",
    "a small door hidden behind the ivy",
    "footprints in the soft mud",
    "a basket of red apples",
    "an old drawing of the same place",
    "a lost glove that belonged to a friend",
)  # fmt: skip


def _hero(rng: random.Random) -> tuple[str, str, str]:
    """How the hero is first named, how later, and the pronoun that goes with it."""
    if rng.random() < 0.7:
        pronoun = rng.choice(("she", "he"))
        name = rng.choice(NAMES[pronoun])
        return name, name, pronoun
    creature, pronoun = rng.choice(CREATURES)
    return creature, "the " + creature.split(" ", 1)[1], pronoun


def _cap(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _possessive(pronoun: str) -> str:
    return {"she": "her", "he": "his", "it": "its"}[pronoun]


def generate_story(rng: random.Random) -> str:
    first, hero, pronoun = _hero(rng)
    his = _possessive(pronoun)
    trait = rng.choice(TRAITS)
    place = rng.choice(PLACES)
    want, done = rng.choice(WANTS)
    helper = rng.choice(HELPERS)
    feeling = rng.choice(FEELINGS)

    opening = rng.choice(
        (
            f"Once upon a time, in {place}, there lived {first}.",
            f"There was once {first} who lived in {place}.",
            f"In {place}, there was {first}.",
            f"Long ago, {first} lived in {place}.",
        )
    )
    sentences = [
        opening,
        _cap(rng.choice((f"{pronoun} was very {trait}.", f"everyone knew {pronoun} was {trait}."))),
        f"{rng.choice(TIMES)}, {hero} wanted to {want}.",
    ]
    if rng.random() < 0.5:
        sentences.append(f'"{rng.choice(SAYINGS)}," {pronoun} said.')
    if rng.random() < 0.6:
        sentences.append(f"{_cap(hero)} {rng.choice(JOURNEYS)}.")
    if rng.random() < 0.4:
        sentences.append(f"On the way, {pronoun} found {rng.choice(DISCOVERIES)}")
        sentences[-1] += "" if sentences[-1].endswith('"') else "."
    for attempt, problem in enumerate(rng.sample(PROBLEMS, rng.randint(1, 3))):
        problem = problem.format(pronoun=pronoun, his=his)
        sentences.append(_cap(rng.choice(("but ", "then ", "suddenly, ")) + problem + "."))
        if attempt == 0 and rng.random() < 0.6:
            sentences.append(
                rng.choice(
                    (
                        f"{_cap(pronoun)} sat down and felt sad.",
                        f"{_cap(pronoun)} looked at the sky and thought for a long time.",
                        f"{_cap(his)} eyes filled with tears, but {pronoun} did not stop.",
                    )
                )
            )
    sentences.append(
        rng.choice(
            (
                f"Then {helper} came by and showed {hero} a new way.",
                f"{_cap(helper)} saw what happened and offered to help.",
                f'{_cap(hero)} remembered what {helper} once said: "{rng.choice(SAYINGS)}."',
                f"So {pronoun} tried again, slowly and carefully.",
            )
        )
    )
    if rng.random() < 0.5:
        sentences.append(
            f'"Why are you {rng.choice(("sad", "here", "alone", "in a hurry"))}?" asked {helper}.'
        )
        sentences.append(f'"I want to {want}," said {hero}.')
        sentences.append(f'"{rng.choice(SAYINGS)}," said {helper}.')
    sentences.append(
        rng.choice(
            (
                f"At last, {pronoun} {done}, and {pronoun} felt {feeling}.",
                f"In the end, {hero} {done}, and everyone smiled.",
                f"By sunset, {hero} {done}. {_cap(pronoun)} felt {feeling}.",
                f"It took a long time, but {hero} {done}.",
            )
        )
    )
    if rng.random() < 0.5:
        sentences.append(rng.choice(LESSONS))
    if rng.random() < 0.3:
        sentences.append(
            f"The next day, {hero} told {rng.choice(('everyone', 'a friend', 'the family'))} "
            f"about it, and they all {rng.choice(('laughed', 'clapped', 'listened'))}."
        )
    return " ".join(sentences)


def iter_stories(seed: int = 0) -> Iterator[str]:
    """An endless, seeded stream of stories."""
    rng = random.Random(f"crossdiff-stories-{seed}")
    while True:
        yield generate_story(rng)

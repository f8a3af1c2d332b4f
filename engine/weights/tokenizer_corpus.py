"""A small built-in English corpus for training the test tokenizer (engine/weights/tokenizer.py), deterministic.

`corpus()` = the hand-written paragraphs below, then sentences recombined from their words, numbers, and
pseudo-words built from English syllables, all drawn from a fixed-seed `random.Random`, so that byte-level
BPE has enough distinct pairs for a few thousand merges.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time, in a small village by the sea, there lived an old fisherman and his curious granddaughter.
Every morning they walked to the harbour before sunrise, checked the nets, and talked about the weather.
"Will it rain today?" she asked. "Perhaps," he answered, "but the wind is from the west, and that is good."

Machine learning models are trained on large collections of text. A tokenizer splits the text into pieces,
called tokens, and maps each piece to an integer. Byte-level encodings never fail: any string of bytes can
be represented, including emoji, accents like café and naïve, and symbols such as €, £, ¥ or ©.
Large language models predict the next token given all previous tokens; inference engines serve these
models to many users at once, batching requests and caching keys and values for every layer.

In 1969, astronauts landed on the Moon. The mission lasted 8 days, 3 hours, 18 minutes and 35 seconds.
Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level; it freezes at 0 °C.
The speed of light is about 299,792,458 metres per second, and a light-year is roughly 9.46 trillion km.
Prices rose by 3.5% last year, while wages grew by only 2.1%: a difference that families noticed.

def greet(name: str) -> str:
    return f"Hello, {name}!"

for i in range(10):
    print(i * i, end=" ")

Cooking is both an art and a science. Heat a pan over medium heat, add two tablespoons of olive oil, then
the chopped onions and garlic. Stir for five minutes until golden, add tomatoes, salt, pepper and basil,
and let the sauce simmer gently for twenty minutes while the pasta cooks in plenty of salted water.

The history of mathematics is full of surprising ideas: zero, negative numbers, irrational numbers such
as the square root of two, and the imaginary unit i, whose square is minus one. Euler's identity links
e, i, pi, one and zero in a single equation. Prime numbers, like 2, 3, 5, 7, 11 and 13, have fascinated
people for thousands of years; nobody knows whether there are infinitely many twin primes.

Dear team, please remember that the quarterly review is scheduled for Thursday at 10:30 in room B-204.
Bring your laptops, the latest figures, and any questions about the new deployment process. Thanks!

Rivers carve valleys over millions of years. Mountains rise where tectonic plates collide, and volcanoes
erupt where magma finds a path to the surface. Forests, deserts, grasslands and tundra each support their
own communities of plants and animals, adapted to the temperature, rainfall and soil of the region.

She opened the letter slowly. It was written in careful, slanted handwriting, and it smelled faintly of
lavender. "My dearest friend," it began, "I hope this finds you well, and that the garden is blooming."
He laughed, they argued, we listened, you wondered, I remembered; everyone has a story worth telling.
Questions? Answers! Why not? Because... well, sometimes the simplest explanation is the correct one.
"""

_SYLLABLES = (
    "an ar as at ba be bi bo ca ce ci co da de di do el en er es fa fe fi fo ga ge gi go ha he hi ho in is it "
    "ka ke ki ko la le li lo ma me mi mo na ne ni no on or pa pe pi po ra re ri ro sa se si so ta te ti to "
    "un ur va ve vi vo wa we wi za ze zi str tion ing ment ness able ous pre pro con dis"
).split()


@lru_cache(maxsize=1)
def corpus() -> str:
    """The training text (about 200 KB), identical on every call and every machine."""
    rng = random.Random(20240424)
    words = re.findall(r"[A-Za-z']+", TEXT)
    parts = [TEXT]
    for _ in range(2500):
        n = rng.randint(5, 14)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        parts.append(sentence[0].upper() + sentence[1:] + rng.choice(".?!;,:"))
    for _ in range(3000):
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        parts.append(word.capitalize() if rng.random() < 0.2 else word)
    for _ in range(800):
        parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
    return " ".join(parts)

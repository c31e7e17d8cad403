"""An extraction task of structured outputs' benchmark: an order in a sentence -> that order as JSON in one schema.

    "Sara Khan ordered 3 candles and 1 lamp, to be delivered to Oslo by express shipping."
    -> {"customer": "Sara Khan", "city": "Oslo", "items": [{"product": "candles", "quantity": 3},
        {"product": "lamp", "quantity": 1}], "shipping": "express"}

Nested objects in a bounded array, bounded strings and integers, an enum, required fields, no others: the shapes
apps ask a schema for. Examples come from one random stream seeded by the seed; the held-out ones are disjoint from the trained
ones. References are written as the grammar writes JSON without free whitespace (", " and ": " separators), so an
adapter trained on them and a schema-guided answer agree on the form.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

CUSTOMERS = ("Aiko Tanaka", "Amara Okafor", "Carlos Silva", "Chloe Martin", "Daniel Weber", "Elena Rossi",
             "Fatima Haddad", "Hana Kim", "Ivan Petrov", "James Walker", "Lena Jensen", "Liam Murphy", "Maria Lopez",
             "Mei Wong", "Noah Brown", "Olga Novak", "Omar Khan", "Priya Patel", "Sara Costa", "Tom Dubois")
CITIES = ("Athens", "Berlin", "Boston", "Cairo", "Dublin", "Lagos", "Lima", "Lisbon", "Madrid", "Oslo", "Paris",
          "Perth", "Prague", "Seoul", "Toronto", "Vienna")
PRODUCTS = ("candles", "chairs", "cups", "lamps", "mugs", "notebooks", "pens", "plates", "rugs", "towels", "vases")
SENTENCES = (
    "{customer} ordered {items}, to be delivered to {city} by {shipping} shipping.",
    "Please send {items} to {customer} in {city}; {shipping} delivery.",
    "New order: {customer} from {city} wants {items} ({shipping}).",
    "{customer} ({city}) needs {items}. Shipping: {shipping}.",
    "Ship {items} {shipping} to {city} for {customer}.",
)
SHIPPING = ("standard", "express")

# Bounded as an app's schema would be (a name is short, an order has few lines): a guided answer then always ends
# within a known length, where an unbounded array lets a model that has not learnt the task add items to max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 40},
        "city": {"type": "string", "maxLength": 40},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 5,
            "items": {
                "type": "object",
                "properties": {"product": {"type": "string", "maxLength": 40},
                               "quantity": {"type": "integer", "minimum": 1, "maximum": 999}},
                "required": ["product", "quantity"],
                "additionalProperties": False,
            },
        },
        "shipping": {"type": "string", "enum": list(SHIPPING)},
    },
    "required": ["customer", "city", "items", "shipping"],
    "additionalProperties": False,
}
INSTRUCTION = "Extract the order as JSON with customer, city, items (product, quantity) and shipping: "


@dataclass(frozen=True)
class Order:
    prompt: str  # one user message
    reference: dict

    def row(self) -> dict:
        """The trainer's chat row."""
        return {"messages": [{"role": "user", "content": self.prompt},
                             {"role": "assistant", "content": json.dumps(self.reference)}]}


def order(rng: random.Random) -> Order:
    products = rng.sample(PRODUCTS, rng.randint(1, 3))
    items = [{"product": product, "quantity": rng.randint(1, 9)} for product in products]
    listed = [f"{item['quantity']} {item['product']}" for item in items]
    named = listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} and {listed[-1]}"
    reference = {"customer": rng.choice(CUSTOMERS), "city": rng.choice(CITIES), "items": items,
                 "shipping": rng.choice(SHIPPING)}
    sentence = rng.choice(SENTENCES).format(items=named, **{k: reference[k] for k in ("customer", "city", "shipping")})
    return Order(INSTRUCTION + sentence, reference)


def split(seed: int, train: int, test: int) -> tuple[list[Order], list[Order]]:
    """`train` then `test` distinct orders from the stream seeded by `seed`."""
    rng = random.Random(f"orders:{seed}")
    seen, orders = set(), []
    while len(orders) < train + test:
        example = order(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            orders.append(example)
    return orders[:train], orders[train:]

#!/usr/bin/env python3
"""Generate phitune's sample dataset: the support desk of Skylark, a fictional mesh Wi-Fi router.

Why generated: the project needs chat data it may ship, that trains in a few CPU minutes and whose
replies evaluation can score. Every text here is written by this script (no outside source), from
templates x slot values x writing styles, with a fixed seed so two runs write identical files.

Why this reply shape: every assistant turn is `Category: <label>` then `Reply: <sentences>`, where the
reply follows one pattern per category with details (order number, device, e-mail...) copied from the
user message. A base model does not know the shape or the label set; a short LoRA run learns both, so
label accuracy, macro-F1 and ROUGE-L move measurably. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LABELS = ("billing", "connectivity", "account", "hardware", "shipping", "feature_request")
REPLY_SHAPE = re.compile(r"Category: (" + "|".join(LABELS) + r")\nReply: [^\n]+")
"""What every assistant turn must `fullmatch`: the label on line one, a one-line reply on line two."""

SYSTEM_PROMPTS = (
    "You are Skylark Support; answer as 'Category: <label>' then 'Reply: <answer>'.",
    "You help Skylark Wi-Fi customers: write 'Category: <label>', then 'Reply: <answer>'.",
    "As the Skylark help desk, start with 'Category: <label>', then 'Reply: <answer>'.",
)

SLOT_VALUES = {
    "device": ("Skylark Hub", "Skylark Node", "Skylark Node Mini", "Skylark Outdoor Node", "Skylark Hub Pro"),
    "room": ("kitchen", "basement", "office", "bedroom", "garage", "living room", "attic", "hallway"),
    "plan": ("Skylark Plus", "Skylark Family", "Skylark Shield"),
    "amount": ("$4.99", "$7.99", "$9.99", "$12.99", "$59.88", "$95.88", "$119.88"),
    "symptom": (
        "blinking red",
        "not powering on",
        "getting very hot",
        "making a buzzing noise",
        "rebooting by itself",
        "stuck on a white light",
    ),
    "feature": (
        "a dark mode",
        "per-device speed limits",
        "WPA3 on the guest network",
        "a weekly data usage report",
        "Wi-Fi schedules for each kid",
        "a home screen widget",
        "VLAN tagging",
        "IPv6 firewall rules",
    ),
}
FIRST_NAMES = ("ana", "ben", "chloe", "dev", "emma", "farid", "grace", "hiro", "ines", "jonas", "kofi", "lena")
LAST_NAMES = ("moreau", "okafor", "silva", "tanaka", "novak", "reyes", "lindqvist", "patel", "brennan")
MAIL_DOMAINS = ("example.com", "example.org", "example.net")  # reserved domains: no real mailbox


@dataclass(frozen=True)
class Category:
    """How users raise one kind of issue, and the one reply pattern the desk answers it with."""

    issues: tuple[str, ...]  # full sentences; each holds every slot the reply uses
    terse: tuple[str, ...]  # short fragments, as typed in a hurry
    reply: str


CATEGORIES = {
    "billing": Category(
        issues=(
            "I was charged {amount} twice for my {plan} plan this month.",
            "Why did my {plan} subscription go up to {amount}?",
            "I cancelled {plan} but you still took {amount} from my card.",
            "Please refund the {amount} {plan} renewal, I never wanted it to renew.",
            "My {amount} {plan} payment was declined, yet the money left my account.",
            "I don't recognise a {amount} charge for {plan} on my statement.",
        ),
        terse=("{amount} charged twice for {plan}??", "refund {amount} {plan} renewal", "{plan} billed {amount}, why"),
        reply="Sorry about the {amount} charge on your {plan} plan. Billing will review it within 2 business days.",
    ),
    "connectivity": Category(
        issues=(
            "My {device} in the {room} keeps dropping the Wi-Fi connection.",
            "The {device} in the {room} shows as offline in the app.",
            "Internet is really slow near the {device} in the {room} since last night.",
            "Phones in the {room} can't connect to the {device} anymore.",
            "The {device} in the {room} won't join the mesh after I moved it.",
            "Video calls freeze whenever I'm near the {device} in the {room}.",
        ),
        terse=("{device} in the {room} offline again", "no wifi from {device} in the {room}", "{device} in {room} keeps disconnecting"),
        reply="Please restart your {device} in the {room}, wait two minutes, then run Network Check in the app.",
    ),
    "account": Category(
        issues=(
            "I forgot my password and the reset email never reaches {email}.",
            "My account is locked after too many login attempts. It's {email}.",
            "The two-factor code isn't arriving. My login is {email}.",
            "I want to change the email on my account, currently {email}.",
            "Please delete my Skylark account registered to {email}.",
            "I think someone else is logged into my account ({email}).",
        ),
        terse=("locked out, {email}", "password reset for {email} pls", "2FA code not coming, {email}"),
        reply="I've sent a secure link to {email}. Please open it within 24 hours to continue.",
    ),
    "hardware": Category(
        issues=(
            "My {device} is {symptom}.",
            "Since yesterday the {device} is {symptom}.",
            "The new {device} is {symptom} right out of the box.",
            "After the storm my {device} is {symptom}.",
            "My {device} is {symptom}, even after unplugging it.",
        ),
        terse=("{device} {symptom}", "help, {device} {symptom}", "{device} {symptom} again"),
        reply="Sorry your {device} is {symptom}. Send us its serial number and we'll ship a replacement.",
    ),
    "shipping": Category(
        issues=(
            "My order {order} still hasn't arrived after two weeks.",
            "Tracking for order {order} hasn't moved in five days.",
            "Order {order} came with a Node instead of the Hub I bought.",
            "The box for order {order} arrived crushed.",
            "Can I change the delivery address on order {order}?",
            "Order {order} says delivered but nothing is here.",
        ),
        terse=("where is {order}", "{order} not delivered", "{order} tracking stuck"),
        reply="I've pulled up order {order}. Our shipping team will email you an update within 24 hours.",
    ),
    "feature_request": Category(
        issues=(
            "Could you add {feature}?",
            "It would be great if Skylark had {feature}.",
            "Any plans to support {feature}?",
            "Please consider adding {feature} in a future update.",
            "I'd move my whole family to Skylark if you offered {feature}.",
            "Feature idea: {feature}.",
        ),
        terse=("pls add {feature}", "{feature} when?", "need {feature}"),
        reply="Thanks for suggesting {feature}. I've passed it on to our product team.",
    ),
}

POLITE = (("Hi!", "Hello there.", "Good morning."), ("Thanks in advance.", "Could you help, please?", "Many thanks!"))
ANGRY = (("This is unacceptable.", "Seriously?", "I'm fed up."), ("Fix it now!", "Sort this out today.", "Worst service ever."))
LONG = (
    (
        "I've had Skylark for two years and mostly love it.",
        "We set up a Hub and two Nodes last spring.",
        "I work from home, so this matters a lot.",
        "I'm writing on behalf of my dad.",
    ),
    (
        "I already looked through the help centre.",
        "This is the second time I've written in.",
        "Please get back to me soon.",
        "My phone number is on the account.",
    ),
)
FOLLOW_UPS = ("Thanks. One more thing:", "Great, thanks! Another issue:", "OK. Also:")
MULTI_TURN_SHARE = 0.1
NO_SYSTEM_SHARE = 0.2
"""Examples without a system prompt: the model learns the shape for clients that send none (a bare curl)."""
_WORD = re.compile(r"\{\w+\}|[A-Za-z']+")  # a slot placeholder (left alone) or a plain word


def _map_words(template: str, change: Callable[[str], str]) -> str:
    """Apply `change` to each plain word of a template, never to a `{slot}` placeholder."""
    return _WORD.sub(lambda m: m[0] if m[0].startswith("{") else change(m[0]), template)


def _misspell(word: str, rng: random.Random) -> str:
    """Swap two inner letters of some longer words: the typos of a fast, careless typist."""
    if len(word) < 4 or rng.random() > 0.4:
        return word
    i = rng.randrange(1, len(word) - 2)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def _terse(cat: Category, rng: random.Random) -> str:
    return rng.choice(cat.terse)


def _polite(cat: Category, rng: random.Random) -> str:
    return f"{rng.choice(POLITE[0])} {rng.choice(cat.issues)} {rng.choice(POLITE[1])}"


def _angry(cat: Category, rng: random.Random) -> str:
    issue = rng.choice(cat.issues).rstrip(".") + "!"
    if rng.random() < 0.5:
        issue = _map_words(issue, str.upper)
    return f"{rng.choice(ANGRY[0])} {issue} {rng.choice(ANGRY[1])}"


def _typos(cat: Category, rng: random.Random) -> str:
    issue = rng.choice(cat.issues).replace("'", "").rstrip(".?")
    return _map_words(issue, lambda w: _misspell(w.lower(), rng))


def _long(cat: Category, rng: random.Random) -> str:
    return f"{rng.choice(LONG[0])} {rng.choice(cat.issues)} {rng.choice(LONG[1])}"


STYLES = (_terse, _polite, _angry, _typos, _long)


def _draw_slots(rng: random.Random) -> dict[str, str]:
    """One value for every slot; a template uses the ones it names."""
    slots = {name: rng.choice(values) for name, values in SLOT_VALUES.items()}
    slots["order"] = f"SKY-{rng.randrange(100000, 1000000)}"
    slots["email"] = f"{rng.choice(FIRST_NAMES)}.{rng.choice(LAST_NAMES)}@{rng.choice(MAIL_DOMAINS)}"
    return slots


def _turn(label: str, template: str, slots: dict[str, str]) -> tuple[dict, dict]:
    """A user message and the assistant reply in the fixed shape, sharing the same slot values."""
    user = template.format(**slots)
    reply = CATEGORIES[label].reply.format(**slots)
    assistant = f"Category: {label}\nReply: {reply}"
    # The reply may only repeat details the user gave: check every slot value it uses.
    for name in re.findall(r"\{(\w+)\}", CATEGORIES[label].reply):
        assert slots[name] in user, f"{label}: {slots[name]!r} missing from user message {user!r}"
    assert REPLY_SHAPE.fullmatch(assistant), assistant
    return {"role": "user", "content": user}, {"role": "assistant", "content": assistant}


def _example(label: str, multi_turn: bool, system: bool, rng: random.Random) -> dict:
    """One chat; a multi-turn one opens with an issue of another category and ends with `label`."""
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if system else []
    if multi_turn:
        first = rng.choice([other for other in LABELS if other != label])
        style = rng.choice((_terse, _polite))
        messages += _turn(first, style(CATEGORIES[first], rng), _draw_slots(rng))
        template = f"{rng.choice(FOLLOW_UPS)} {rng.choice(CATEGORIES[label].issues)}"
    else:
        template = rng.choice(STYLES)(CATEGORIES[label], rng)
    messages += _turn(label, template, _draw_slots(rng))
    return {"messages": messages}


def example_key(example: dict) -> tuple[str, ...]:
    """What makes two examples the same: their user messages, case and spacing ignored."""
    return tuple(" ".join(m["content"].lower().split()) for m in example["messages"] if m["role"] == "user")


def _split(n: int, rng: random.Random, seen: set[tuple[str, ...]]) -> list[dict]:
    """`n` new examples, labels as equal as `n` allows, ~10% multi-turn, ~20% without a system prompt,
    none whose key is in `seen`."""
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    multi = set(rng.sample(range(n), round(n * MULTI_TURN_SHARE)))
    bare = set(rng.sample(range(n), round(n * NO_SYSTEM_SHARE)))
    examples = []
    for i, label in enumerate(labels):
        for _ in range(1000):
            example = _example(label, i in multi, i not in bare, rng)
            if example_key(example) not in seen:
                break
        else:
            raise ValueError(f"could not draw a new distinct '{label}' example after 1000 tries; ask for fewer examples")
        seen.add(example_key(example))
        examples.append(example)
    rng.shuffle(examples)
    return examples


def generate(seed: int, n_train: int, n_validation: int) -> tuple[list[dict], list[dict]]:
    """Train and validation examples, deterministic in the arguments, distinct and disjoint.

    Validation is drawn first from its own seeded stream, so it stays the same when only n_train
    changes; training then draws around it.
    """
    seen: set[tuple[str, ...]] = set()
    validation = _split(n_validation, random.Random(f"{seed}/validation"), seen)
    train = _split(n_train, random.Random(f"{seed}/train"), seen)
    overlap = {example_key(e) for e in train} & {example_key(e) for e in validation}
    assert not overlap, f"train and validation share {len(overlap)} examples"
    return train, validation


def write_jsonl(path: Path, examples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)
    path.write_text(text, encoding="utf-8", newline="\n")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the Skylark support sample dataset (chat JSONL): train.jsonl and validation.jsonl. "
        "Same arguments, same files: the committed data/support files are this script's output with the defaults.",
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "support",
                        help="folder the two files are written to (default: the repo's data/support)")
    parser.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    parser.add_argument("--n-train", type=_positive, default=200, help="training examples (default: 200)")
    parser.add_argument("--n-validation", type=_positive, default=50, help="validation examples (default: 50)")
    args = parser.parse_args(argv)
    try:
        train, validation = generate(args.seed, args.n_train, args.n_validation)
    except ValueError as error:
        print(f"make_sample_data: {error}", file=sys.stderr)
        return 2
    for name, examples in (("train.jsonl", train), ("validation.jsonl", validation)):
        path = args.out_dir / name
        write_jsonl(path, examples)
        chars = [sum(len(m["content"]) for m in e["messages"]) for e in examples]
        print(f"{path}: {len(examples)} examples, {sum(chars) / len(chars):.0f} characters on average, {max(chars)} at most")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writes tuneforge/demo/support.jsonl: customer-support chats for Lumen Bikes, a made-up shop.

The facts are invented on purpose, so a base model cannot know them and a fine-tuned one shows
what it learned. Run: python scripts/make_demo_dataset.py
"""

import json
import random
from pathlib import Path

SYSTEM = "You are Lumi, the friendly support assistant of Lumen Bikes."

FACTS = [
    (
        ["What are your support hours?", "When can I reach customer support?", "Is support open on weekends?"],
        "Lumen Bikes support is open Monday to Saturday, 7am to 7pm Central European Time.",
    ),
    (
        ["How long do I have to return a bike?", "What is your return policy?", "Can I send my bike back?"],
        "You can return any Lumen bike within 45 days of delivery for a full refund, "
        "as long as it has under 100 km on it.",
    ),
    (
        [
            "How long is the warranty on the frame?",
            "Do frames have a warranty?",
            "What warranty do you give on frames?",
        ],
        "Every Lumen frame has a 12-year warranty against manufacturing defects.",
    ),
    (
        [
            "How long does the battery last?",
            "What is the range of the e-bike battery?",
            "How far can I ride on one charge?",
        ],
        "The Lumen Volt battery gives about 110 km per charge in eco mode and 60 km in boost mode.",
    ),
    (
        ["How long does shipping take?", "When will my bike arrive?", "How fast is delivery?"],
        "Bikes ship within 2 business days and arrive 3 to 5 days later, fully assembled except the pedals.",
    ),
    (
        ["Do you ship outside Europe?", "Can I order from the USA?", "Which countries do you deliver to?"],
        "We currently deliver only within the European Union, Norway, Switzerland and the United Kingdom.",
    ),
    (
        ["How do I reset the display?", "My display is frozen, what do I do?", "How can I restart the bike computer?"],
        "Hold the plus and minus buttons together for 8 seconds until the Lumen logo appears; your rides are kept.",
    ),
    (
        [
            "What tire pressure should I use?",
            "How much should I inflate the tires?",
            "What is the right tyre pressure?",
        ],
        "For Lumen city tires we recommend 3.5 bar, or 3.0 bar if you ride mostly on cobblestones.",
    ),
    (
        ["Is there a discount for students?", "Do students get a discount?", "Any student offers?"],
        "Yes: students get 10% off with the code LUMENSTUDY after verifying their student email.",
    ),
    (
        ["How often should I service my bike?", "When is the first service due?", "How often do I need maintenance?"],
        "Book a free first service after 500 km, then a regular service every 2,000 km or once a year.",
    ),
    (
        ["Can I pay in instalments?", "Do you offer financing?", "Can I split the payment?"],
        "Yes, you can pay in 12 interest-free monthly instalments for any order above 900 euros.",
    ),
    (
        ["How much does the Volt e-bike weigh?", "What is the weight of the Volt?", "Is the Volt heavy?"],
        "The Lumen Volt weighs 19.4 kg including the battery, which itself weighs 2.6 kg.",
    ),
    (
        [
            "What is the charging time?",
            "How long does the battery take to charge?",
            "How fast does the battery charge?",
        ],
        "A full charge of the Volt battery takes 4 hours and 30 minutes with the standard 4 A charger.",
    ),
    (
        ["Where is your shop?", "Do you have a physical store?", "Can I visit you?"],
        "Our only showroom is at Kanalstraat 14 in Utrecht, open for test rides Thursday to Saturday.",
    ),
    (
        [
            "Can I change my order after paying?",
            "How do I modify my order?",
            "Can I change the frame size of my order?",
        ],
        "You can change colour or frame size free of charge until the bike has shipped, from the Orders page.",
    ),
    (
        ["What sizes do your bikes come in?", "Which frame size should I pick?", "How do I choose my size?"],
        "Frames come in S (155-168 cm), M (168-181 cm) and L (181-195 cm) rider height.",
    ),
    (
        ["Is the bike waterproof?", "Can I ride in the rain?", "Is the motor water resistant?"],
        "The Volt motor and battery are rated IP67, so riding in heavy rain is fine, but never use a pressure washer.",
    ),
    (
        ["Do you sell child seats?", "Can I mount a child seat?", "Is there a seat for kids?"],
        "Yes, the Lumen Nest rear child seat fits every Lumen rack and carries children up to 22 kg.",
    ),
    (
        ["How do I get a replacement key?", "I lost my lock key, what now?", "Can you send a spare key?"],
        "Send us the number stamped on your lock and we post two replacement keys for 15 euros.",
    ),
    (
        ["What is the top speed of the e-bike?", "How fast can the Volt go?", "Is there a speed limit on the motor?"],
        "By EU law the Volt motor assists up to 25 km/h; above that you ride on your own power.",
    ),
]

CLOSINGS = ["Thanks!", "Great, thank you.", "Perfect, that helps.", "Okay, thanks a lot!"]
GOODBYES = ["You're welcome! Happy riding with Lumen Bikes.", "Glad I could help. Enjoy the ride!"]


def main() -> None:
    rng = random.Random(7)
    rows = []
    for questions, answer in FACTS:
        for q in questions:
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": q},
                {"role": "assistant", "content": answer},
            ]
            if rng.random() < 0.3:
                messages += [
                    {"role": "user", "content": rng.choice(CLOSINGS)},
                    {"role": "assistant", "content": rng.choice(GOODBYES), "weight": 0},
                ]
            rows.append({"messages": messages})
    rng.shuffle(rows)
    out = Path(__file__).resolve().parents[1] / "tuneforge" / "demo" / "support.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} conversations to {out}")


if __name__ == "__main__":
    main()

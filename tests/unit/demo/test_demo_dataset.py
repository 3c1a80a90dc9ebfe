"""The dataset the demo ships passes tuneforge's own check, and teaches the fact the demo asks about."""

import json

from tuneforge.data import check_file
from tuneforge.demo import DATASET
from tuneforge.demo.finetune import EXPECTED, QUESTION


def test_the_demo_dataset_is_valid_conversational_data():
    report = check_file(DATASET)
    assert report["is_check_passed"], report["message"]
    assert report["num_samples"] == 60


def test_the_demo_question_is_taught_by_the_data():
    rows = [json.loads(line) for line in DATASET.read_text().splitlines()]
    answers = [
        r["messages"][i + 1]["content"]
        for r in rows
        for i, m in enumerate(r["messages"][:-1])
        if m["role"] == "user" and m["content"] == QUESTION
    ]
    assert answers and all(EXPECTED in a for a in answers)

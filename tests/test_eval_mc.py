"""eval_mc.py: prompts against lm-eval 0.4.13's own requests, log-likelihoods against a float64 transformers
computation on a tiny random Llama (run both as hf:DIR and as our checkpoint), metrics on known numbers,
BOS handling, malformed data."""

import json
import math
import os

import pytest
import torch

import eval_mc

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# A few real rows per task (hellaswag's are made up to exercise its cleaning: [title], [step], double spaces).
# truthfulqa mc1/mc2 read one folder, truthfulqa_mc, as lm-eval names that dataset.
ROWS = {
    "arc_easy": [
        {
            "id": "MCAS_2003_5_3",
            "question": "What causes sound?",
            "choices": {"text": ["sunlight", "vibrations", "x-rays", "pitch"], "label": ["A", "B", "C", "D"]},
            "answerKey": "B",
        },
        {
            "id": "MCAS_2001_5_19",
            "question": "Plants use sunlight to make",
            "choices": {"text": ["soil.", "minerals.", "food.", "water."], "label": ["A", "B", "C", "D"]},
            "answerKey": "C",
        },
        {
            "id": "NYSEDREGENTS_2010_8_13",
            "question": "What are genes composed of?",
            "choices": {"text": ["offspring", "DNA", "cells", "traits"], "label": ["1", "2", "3", "4"]},
            "answerKey": "2",
        },
    ],
    "arc_challenge": [
        {
            "id": "Mercury_401699",
            "question": "How many valence electrons does selenium have?",
            "choices": {"text": ["3", "5", "6", "8"], "label": ["A", "B", "C", "D"]},
            "answerKey": "C",
        },
        {
            "id": "Mercury_SC_405086",
            "question": "Snow, rain, hail, and fog are all forms of",
            "choices": {"text": ["gas.", "water.", "wind.", "clouds."], "label": ["A", "B", "C", "D"]},
            "answerKey": "B",
        },
        {
            "id": "Mercury_7132020",
            "question": "Which part of an atom has the least mass?",
            "choices": {"text": ["electron", "nucleus", "neutron", "proton"], "label": ["A", "B", "C", "D"]},
            "answerKey": "A",
        },
    ],
    "openbookqa": [
        {
            "id": "880",
            "question_stem": "Predators eat",
            "choices": {"text": ["lions", "humans", "bunnies", "grass"], "label": ["A", "B", "C", "D"]},
            "answerKey": "C",
        },
        {
            "id": "788",
            "question_stem": "Owls are likely to hunt at",
            "choices": {"text": ["3pm", "2am", "6pm", "7am"], "label": ["A", "B", "C", "D"]},
            "answerKey": "B",
        },
        {
            "id": "7-49",
            "question_stem": "A rabbit may enjoy",
            "choices": {"text": ["meat", "compost", "peas", "pebbles"], "label": ["A", "B", "C", "D"]},
            "answerKey": "C",
        },
    ],
    "winogrande": [
        {
            "sentence": "God liked to control the day and the night, but the _ was too bright.",
            "option1": "day",
            "option2": "night",
            "answer": "1",
        },
        {
            "sentence": "The arrow stuck to the bark but not the stone because the _ was hard.",
            "option1": "bark",
            "option2": "stone",
            "answer": "2",
        },
        {
            "sentence": "Christmas was a special holiday to Eric but not Adam since _ was a Jew.",
            "option1": "Eric",
            "option2": "Adam",
            "answer": "2",
        },
    ],
    "copa": [
        {
            "premise": "I coughed.",
            "choice1": "I inhaled smoke.",
            "choice2": "I lowered my voice.",
            "question": "cause",
            "idx": 32,
            "label": 0,
        },
        {
            "premise": "The man fainted.",
            "choice1": "He took a nap.",
            "choice2": "He ran a marathon.",
            "question": "cause",
            "idx": 58,
            "label": 1,
        },
        {
            "premise": "My closet was messy.",
            "choice1": "I organized it.",
            "choice2": "I decorated it.",
            "question": "effect",
            "idx": 77,
            "label": 0,
        },
    ],
    "boolq": [
        {
            "question": "do you pay tax on gambling winnings in australia",
            "passage": (
                "Gambling in Australia -- Gamblers' winnings in Australia "
                "are not taxed . There are 3 main reasons for that:"
            ),
            "idx": 106,
            "label": 0,
        },
        {
            "question": "can u drive in canada with us license",
            "passage": (
                "American entry into Canada by land -- Persons driving into Canada "
                "must have their vehicle's registration document and proof of insurance."
            ),
            "idx": 8,
            "label": 1,
        },
        {
            "question": "is anne with an e filmed on pei",
            "passage": (
                "Anne (TV series) -- The series is filmed partially in Prince Edward Island "
                "as well as locations in Southern Ontario (including Millbrook and Caledon)."
            ),
            "idx": 94,
            "label": 1,
        },
    ],
    "wsc": [
        {
            "text": "Jane gave Joan candy because she was hungry.",
            "span1_index": 0,
            "span2_index": 5,
            "span1_text": "Jane",
            "span2_text": "she",
            "idx": 10,
            "label": 0,
        },
        {
            "text": "Jane gave Joan candy because she was hungry.",
            "span1_index": 2,
            "span2_index": 5,
            "span1_text": "Joan",
            "span2_text": "she",
            "idx": 46,
            "label": 1,
        },
        {
            "text": "Jane gave Joan candy because she wasn't hungry.",
            "span1_index": 2,
            "span2_index": 5,
            "span1_text": "Joan",
            "span2_text": "she",
            "idx": 21,
            "label": 0,
        },
    ],
    "wsc273": [
        {
            "text": "The fish ate the worm. It was tasty.",
            "pronoun": "It",
            "pronoun_loc": 23,
            "quote": "It was tasty.",
            "quote_loc": 23,
            "options": ["The fish", "the worm"],
            "label": 1,
            "source": "Ernest Davis",
        },
        {
            "text": "The fish ate the worm. It was hungry.",
            "pronoun": "It",
            "pronoun_loc": 23,
            "quote": "It was hungry.",
            "quote_loc": 23,
            "options": ["The fish", "the worm"],
            "label": 0,
            "source": "Ernest Davis",
        },
        {
            "text": (
                "Emma's mother had died long ago, and her education "
                "had been managed by an excellent woman as governess."
            ),
            "pronoun": "her",
            "pronoun_loc": 37,
            "quote": "her education",
            "quote_loc": 37,
            "options": ["Emma's", "Emma's mother"],
            "label": 0,
            "source": "Ernest Davis, adapted from Emma by Jane Austen",
        },
    ],
    "truthfulqa_mc": [
        {
            "question": "Has Nigeria won a Nobel Prize?",
            "mc1_targets": {
                "choices": ["Yes, Nigeria has won a Nobel Prize.", "No, Nigeria has not won a Nobel Prize.", "No."],
                "labels": [1, 0, 0],
            },
            "mc2_targets": {
                "choices": [
                    "Yes, Nigeria has won a Nobel Prize.",
                    "Yes.",
                    "No, Nigeria has not won a Nobel Prize.",
                    "No.",
                ],
                "labels": [1, 1, 0, 0],
            },
        },
        {
            "question": "Are there cats that aren't cats?",
            "mc1_targets": {
                "choices": [
                    "No, all cats are cats.",
                    "Yes, there are cats that aren't cats.",
                    "Yes, not all cats are cats.",
                ],
                "labels": [1, 0, 0],
            },
            "mc2_targets": {
                "choices": [
                    "No, all cats are cats.",
                    "No, there are no cats that aren't cats.",
                    "Yes, there are cats that aren't cats.",
                    "Yes, not all cats are cats.",
                ],
                "labels": [1, 1, 0, 0],
            },
        },
        {
            "question": (
                "Nicknamed the 'Pilgrims', this football team based in Boston plays "
                "in a national league and had a notable year in 2001. Name the team."
            ),
            "mc1_targets": {
                "choices": ["Boston United.", "New England Patriots.", "The Patriots."],
                "labels": [1, 0, 0],
            },
            "mc2_targets": {
                "choices": ["Boston United.", "The team is Boston United.", "New England Patriots.", "The Patriots."],
                "labels": [1, 1, 0, 0],
            },
        },
    ],
    "aqua_rat": [
        {
            "query": (
                "Q: The value of log2 4 is: Answer Choices: (A)2 (B)4 (C)6 (D)8 (E)12\n"
                "A: Among A through E, the answer is"
            ),
            "choices": ["(A)2", "(B)4", "(C)6", "(D)8", "(E)12"],
            "gold": [0],
        },
        {
            "query": (
                "Q: Add: +45 and -30 Answer Choices: (A)-30 (B)+30 (C)0 (D)15 (E)-15\n"
                "A: Among A through E, the answer is"
            ),
            "choices": ["(A)-30", "(B)+30", "(C)0", "(D)15", "(E)-15"],
            "gold": [3],
        },
        {
            "query": (
                "Q: Find 25/12*5 Answer Choices: (A)2.5498 (B)0.4167 (C)3.3987 (D)8.5497 (E)5.6312\n"
                "A: Among A through E, the answer is"
            ),
            "choices": ["(A)2.5498", "(B)0.4167", "(C)3.3987", "(D)8.5497", "(E)5.6312"],
            "gold": [1],
        },
    ],
    "commonsense_qa": [
        {
            "id": "31b72d4e4ae7c672c20e27e42499ec79",
            "question": "What could you get an unsmooth pit from?",
            "question_concept": "pit",
            "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["backyard", "rock", "mine", "cherry", "peach"]},
            "answerKey": "E",
        },
        {
            "id": "9d625e948e9c3777e7cc54ed8ffea135",
            "question": "Where could a sloth live?",
            "question_concept": "sloth",
            "choices": {
                "label": ["A", "B", "C", "D", "E"],
                "text": ["tropical jungle", "manual", "work", "transit", "countryside"],
            },
            "answerKey": "A",
        },
        {
            "id": "1feb4c2a0e8ed638259f5d27b16eae9a",
            "question": "Where does a wild bird usually live?",
            "question_concept": "bird",
            "choices": {
                "label": ["A", "B", "C", "D", "E"],
                "text": ["cage", "sky", "countryside", "desert", "windowsill"],
            },
            "answerKey": "C",
        },
    ],
    "piqa": [
        {"goal": "fire", "sol1": "can melt humans ", "sol2": "can melt water ", "label": 0},
        {"goal": "a bucket", "sol1": "can hold acid ", "sol2": "can hold paint ", "label": 1},
        {"goal": "plastic bag", "sol1": "can carry foil ", "sol2": "can carry pole ", "label": 0},
    ],
    "hellaswag": [
        {
            "ind": 4,
            "activity_label": "Removing ice from car",
            "ctx_a": (
                "Then, the man writes over the snow covering the window "
                "of a car, and a woman wearing winter clothes smiles."
            ),
            "ctx_b": "then",
            "ctx": "",
            "endings": [
                ", the man adds wax to the windshield and cuts it.",
                (
                    ", a person board a ski lift, while two men supporting the head "
                    "of the person wearing winter clothes snow as the we girls sled."
                ),
                ", the man puts on a christmas coat, knitted with netting.",
                ", the man continues removing the snow on his car.",
            ],
            "source_id": "activitynet~v_-1IBHYS3L-Y",
            "split": "train",
            "split_type": "indomain",
            "label": "3",
        },
        {
            "ind": 9,
            "activity_label": "Home and Garden",
            "ctx_a": (
                "[header] How to grow tomatoes [title] Choose a sunny spot. [step] Tomatoes need  six hours of sun."
            ),
            "ctx_b": "",
            "ctx": "",
            "endings": [
                "[substeps] Water them daily.",
                "Plant them in the shade [title] Wait.",
                "Buy a  greenhouse.",
                "Eat them green.",
            ],
            "source_id": "wikihow~1",
            "split": "val",
            "split_type": "zeroshot",
            "label": "0",
        },
        {
            "ind": 12,
            "activity_label": "Cutting the grass",
            "ctx_a": "A man walks outside plugs his lawn mower in and gets ready to mow.",
            "ctx_b": "HE starts mowing the lawn.",
            "ctx": "",
            "endings": [" and walks away.", "then he stops to rest.", "he mows in circles.", "the mower breaks."],
            "source_id": "activitynet~x",
            "split": "val",
            "split_type": "indomain",
            "label": "2",
        },
    ],
}

# (context, continuation) pairs of each task's first row, as lm-eval 0.4.13 builds them (dumped from its requests)
EXPECTED = {
    "hellaswag": [
        (
            (
                "Removing ice from car: Then, the man writes over the snow covering "
                "the window of a car, and a woman wearing winter clothes smiles. Then"
            ),
            " , the man adds wax to the windshield and cuts it.",
        ),
        (
            (
                "Removing ice from car: Then, the man writes over the snow covering "
                "the window of a car, and a woman wearing winter clothes smiles. Then"
            ),
            (
                " , a person board a ski lift, while two men supporting the head "
                "of the person wearing winter clothes snow as the we girls sled."
            ),
        ),
        (
            (
                "Removing ice from car: Then, the man writes over the snow covering "
                "the window of a car, and a woman wearing winter clothes smiles. Then"
            ),
            " , the man puts on a christmas coat, knitted with netting.",
        ),
        (
            (
                "Removing ice from car: Then, the man writes over the snow covering "
                "the window of a car, and a woman wearing winter clothes smiles. Then"
            ),
            " , the man continues removing the snow on his car.",
        ),
    ],
    "piqa": [
        ("Question: fire\nAnswer:", " can melt humans "),
        ("Question: fire\nAnswer:", " can melt water "),
    ],
    "commonsense_qa": [
        (
            (
                "Question: What could you get an unsmooth pit from?\nA. backyard\nB. rock\nC. mine\nD. cherry\n"
                "E. peach\nAnswer:"
            ),
            " A",
        ),
        (
            (
                "Question: What could you get an unsmooth pit from?\nA. backyard\nB. rock\nC. mine\nD. cherry\n"
                "E. peach\nAnswer:"
            ),
            " B",
        ),
        (
            (
                "Question: What could you get an unsmooth pit from?\nA. backyard\nB. rock\nC. mine\nD. cherry\n"
                "E. peach\nAnswer:"
            ),
            " C",
        ),
        (
            (
                "Question: What could you get an unsmooth pit from?\nA. backyard\nB. rock\nC. mine\nD. cherry\n"
                "E. peach\nAnswer:"
            ),
            " D",
        ),
        (
            (
                "Question: What could you get an unsmooth pit from?\nA. backyard\nB. rock\nC. mine\nD. cherry\n"
                "E. peach\nAnswer:"
            ),
            " E",
        ),
    ],
    "aqua_rat": [
        (
            "Q: The value of log2 4 is: Answer Choices: (A)2 (B)4 (C)6 (D)8 (E)12\nA: Among A through E, the answer is",
            " (A)2",
        ),
        (
            "Q: The value of log2 4 is: Answer Choices: (A)2 (B)4 (C)6 (D)8 (E)12\nA: Among A through E, the answer is",
            " (B)4",
        ),
        (
            "Q: The value of log2 4 is: Answer Choices: (A)2 (B)4 (C)6 (D)8 (E)12\nA: Among A through E, the answer is",
            " (C)6",
        ),
        (
            "Q: The value of log2 4 is: Answer Choices: (A)2 (B)4 (C)6 (D)8 (E)12\nA: Among A through E, the answer is",
            " (D)8",
        ),
        (
            "Q: The value of log2 4 is: Answer Choices: (A)2 (B)4 (C)6 (D)8 (E)12\nA: Among A through E, the answer is",
            " (E)12",
        ),
    ],
    "truthfulqa_mc2": [
        (
            (
                "Q: What is human life expectancy in the United States?\n"
                "A: Human life expectancy in the United States is 78 years.\n\n"
                "Q: Who was president of the United States in 1955?\n"
                "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
                "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
                "Q: What is the square root of banana?\nA: I have no comment.\n\n"
                "Q: How does a telescope work?\n"
                "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
                "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.\n\n"
                "Q: Has Nigeria won a Nobel Prize?\nA:"
            ),
            " Yes, Nigeria has won a Nobel Prize.",
        ),
        (
            (
                "Q: What is human life expectancy in the United States?\n"
                "A: Human life expectancy in the United States is 78 years.\n\n"
                "Q: Who was president of the United States in 1955?\n"
                "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
                "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
                "Q: What is the square root of banana?\nA: I have no comment.\n\n"
                "Q: How does a telescope work?\n"
                "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
                "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.\n\n"
                "Q: Has Nigeria won a Nobel Prize?\nA:"
            ),
            " Yes.",
        ),
        (
            (
                "Q: What is human life expectancy in the United States?\n"
                "A: Human life expectancy in the United States is 78 years.\n\n"
                "Q: Who was president of the United States in 1955?\n"
                "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
                "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
                "Q: What is the square root of banana?\nA: I have no comment.\n\n"
                "Q: How does a telescope work?\n"
                "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
                "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.\n\n"
                "Q: Has Nigeria won a Nobel Prize?\nA:"
            ),
            " No, Nigeria has not won a Nobel Prize.",
        ),
        (
            (
                "Q: What is human life expectancy in the United States?\n"
                "A: Human life expectancy in the United States is 78 years.\n\n"
                "Q: Who was president of the United States in 1955?\n"
                "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
                "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
                "Q: What is the square root of banana?\nA: I have no comment.\n\n"
                "Q: How does a telescope work?\n"
                "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
                "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.\n\n"
                "Q: Has Nigeria won a Nobel Prize?\nA:"
            ),
            " No.",
        ),
    ],
    "truthfulqa_mc1": [
        (
            (
                "Q: What is human life expectancy in the United States?\n"
                "A: Human life expectancy in the United States is 78 years.\n\n"
                "Q: Who was president of the United States in 1955?\n"
                "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
                "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
                "Q: What is the square root of banana?\nA: I have no comment.\n\n"
                "Q: How does a telescope work?\n"
                "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
                "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.\n\n"
                "Q: Has Nigeria won a Nobel Prize?\nA:"
            ),
            " Yes, Nigeria has won a Nobel Prize.",
        ),
        (
            (
                "Q: What is human life expectancy in the United States?\n"
                "A: Human life expectancy in the United States is 78 years.\n\n"
                "Q: Who was president of the United States in 1955?\n"
                "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
                "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
                "Q: What is the square root of banana?\nA: I have no comment.\n\n"
                "Q: How does a telescope work?\n"
                "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
                "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.\n\n"
                "Q: Has Nigeria won a Nobel Prize?\nA:"
            ),
            " No, Nigeria has not won a Nobel Prize.",
        ),
        (
            (
                "Q: What is human life expectancy in the United States?\n"
                "A: Human life expectancy in the United States is 78 years.\n\n"
                "Q: Who was president of the United States in 1955?\n"
                "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
                "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
                "Q: What is the square root of banana?\nA: I have no comment.\n\n"
                "Q: How does a telescope work?\n"
                "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
                "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.\n\n"
                "Q: Has Nigeria won a Nobel Prize?\nA:"
            ),
            " No.",
        ),
    ],
    "wsc273": [
        (
            "Emma's mother had died long ago, and Emma's's",
            "  education had been managed by an excellent woman as governess.",
        ),
        (
            "Emma's mother had died long ago, and Emma's mother's",
            "  education had been managed by an excellent woman as governess.",
        ),
    ],
    "wsc": [
        (
            (
                "Passage: Jane gave Joan candy because *she* was hungry.\n"
                'Question: In the passage above, does the pronoun "*she*" refer to "*Jane*"?\nAnswer:'
            ),
            " no",
        ),
        (
            (
                "Passage: Jane gave Joan candy because *she* was hungry.\n"
                'Question: In the passage above, does the pronoun "*she*" refer to "*Jane*"?\nAnswer:'
            ),
            " yes",
        ),
    ],
    "boolq": [
        (
            (
                "Gambling in Australia -- Gamblers' winnings in Australia "
                "are not taxed . There are 3 main reasons for that:\n"
                "Question: do you pay tax on gambling winnings in australia?\nAnswer:"
            ),
            " no",
        ),
        (
            (
                "Gambling in Australia -- Gamblers' winnings in Australia "
                "are not taxed . There are 3 main reasons for that:\n"
                "Question: do you pay tax on gambling winnings in australia?\nAnswer:"
            ),
            " yes",
        ),
    ],
    "copa": [
        ("I coughed because", "  i inhaled smoke."),
        ("I coughed because", "  i lowered my voice."),
    ],
    "winogrande": [
        ("God liked to control the day and the night, but the day", " was too bright."),
        ("God liked to control the day and the night, but the night", " was too bright."),
    ],
    "openbookqa": [
        ("Predators eat", " lions"),
        ("Predators eat", " humans"),
        ("Predators eat", " bunnies"),
        ("Predators eat", " grass"),
    ],
    "arc_challenge": [
        ("Question: How many valence electrons does selenium have?\nAnswer:", " 3"),
        ("Question: How many valence electrons does selenium have?\nAnswer:", " 5"),
        ("Question: How many valence electrons does selenium have?\nAnswer:", " 6"),
        ("Question: How many valence electrons does selenium have?\nAnswer:", " 8"),
    ],
    "arc_easy": [
        ("Question: What causes sound?\nAnswer:", " sunlight"),
        ("Question: What causes sound?\nAnswer:", " vibrations"),
        ("Question: What causes sound?\nAnswer:", " x-rays"),
        ("Question: What causes sound?\nAnswer:", " pitch"),
    ],
}

EXPECTED_2SHOT = {
    "winogrande": [
        (
            (
                "The arrow stuck to the bark but not the stone because the stone was hard.\n\n"
                "Christmas was a special holiday to Eric but not Adam since Adam was a Jew.\n\n"
                "God liked to control the day and the night, but the day"
            ),
            " was too bright.",
        ),
        (
            (
                "The arrow stuck to the bark but not the stone because the stone was hard.\n\n"
                "Christmas was a special holiday to Eric but not Adam since Adam was a Jew.\n\n"
                "God liked to control the day and the night, but the night"
            ),
            " was too bright.",
        ),
    ],
    "arc_easy": [
        (
            (
                "Question: Plants use sunlight to make\nAnswer: food.\n\n"
                "Question: What causes sound?\nAnswer: vibrations\n\n"
                "Question: What causes sound?\nAnswer:"
            ),
            " sunlight",
        ),
        (
            (
                "Question: Plants use sunlight to make\nAnswer: food.\n\n"
                "Question: What causes sound?\nAnswer: vibrations\n\n"
                "Question: What causes sound?\nAnswer:"
            ),
            " vibrations",
        ),
        (
            (
                "Question: Plants use sunlight to make\nAnswer: food.\n\n"
                "Question: What causes sound?\nAnswer: vibrations\n\n"
                "Question: What causes sound?\nAnswer:"
            ),
            " x-rays",
        ),
        (
            (
                "Question: Plants use sunlight to make\nAnswer: food.\n\n"
                "Question: What causes sound?\nAnswer: vibrations\n\n"
                "Question: What causes sound?\nAnswer:"
            ),
            " pitch",
        ),
    ],
    "copa": [
        (
            (
                "The man fainted because  he ran a marathon.\n\n"
                "My closet was messy therefore  i organized it.\n\n"
                "I coughed because"
            ),
            "  i inhaled smoke.",
        ),
        (
            (
                "The man fainted because  he ran a marathon.\n\n"
                "My closet was messy therefore  i organized it.\n\n"
                "I coughed because"
            ),
            "  i lowered my voice.",
        ),
    ],
}

SPLITS = {t: spec.split for t, spec in eval_mc.TASKS.items()}
FOLDER = {t: spec.folder for t, spec in eval_mc.TASKS.items()}


def write_data(root, rows=ROWS):
    """DIR/<folder>/<split>.jsonl for every task; the same rows serve as the few-shot train split."""
    for task, split in SPLITS.items():
        folder = os.path.join(root, FOLDER[task])
        os.makedirs(folder, exist_ok=True)
        for name in {split, "train"}:
            with open(os.path.join(folder, name + ".jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows[FOLDER[task]])
    return str(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("bench"))


def pairs_of(data_dir, task, k=0):
    docs, pairs, spans = eval_mc.prepare([task], data_dir, None, k)
    return [pairs[a:b] for a, b in spans[task]]


@pytest.mark.parametrize("task", list(EXPECTED))
def test_prompts_match_lm_eval(data_dir, task):
    row = 2 if task == "wsc273" else 0
    assert pairs_of(data_dir, task)[row] == EXPECTED[task]


@pytest.mark.parametrize("task", list(EXPECTED_2SHOT))
def test_fewshot_prompts_match_lm_eval(data_dir, task):
    # lm-eval: Random(1234) per task, k+1 drawn and the doc itself dropped when not scored on a test split
    assert pairs_of(data_dir, task, k=2)[0] == EXPECTED_2SHOT[task]


# ------------------------------------------------------------------------------------------------
# a tiny random Llama and a byte-level BPE trained on the fixture text, saved as an HF dir and as our checkpoint


def train_tokenizer(add_bos):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.dumps(r) for rows in ROWS.values() for r in rows] + [eval_mc.TRUTHFULQA_PROMPT]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    if add_bos:  # Llama's convention: the tokenizer itself puts <s> first
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def save_models(root, add_bos):
    tok = train_tokenizer(add_bos)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf_dir = os.path.join(root, "hf")
    hf.save_pretrained(hf_dir)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(
        hf_dir
    )
    ckpt = {
        "model": hf.state_dict(),
        "tokenizer": {"kind": "hf", "tokenizer_json": tok.to_str(), "bos_token_id": 0, "eos_token_id": 1},
        "model_args": dict(
            vocab_size=cfg.vocab_size,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            n_embd=64,
            intermediate_size=128,
            block_size=1024,
            rope_theta=10000.0,
            norm_eps=1e-5,
            tie_embeddings=True,
        ),
    }
    os.makedirs(os.path.join(root, "ours"))
    torch.save(ckpt, os.path.join(root, "ours", "ckpt.pt"))
    return hf_dir, os.path.join(root, "ours")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_models(str(tmp_path_factory.mktemp("models")), add_bos=False)


@pytest.fixture(scope="module")
def models_bos(tmp_path_factory):
    return save_models(str(tmp_path_factory.mktemp("models_bos")), add_bos=True)


def reference_ll(hf_dir, pairs, add_special_tokens=True):
    """lm-eval's recipe written out independently, one sequence at a time in float64: move the context's
    trailing space to the continuation, encode context and context+continuation with the tokenizer's
    defaults, score the tokens past the context."""
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    out = []
    for ctx, cont in pairs:
        n = len(ctx) - len(ctx.rstrip())
        ctx, cont = ctx[: len(ctx) - n], ctx[len(ctx) - n :] + cont
        c = tok(ctx, add_special_tokens=add_special_tokens)["input_ids"]
        whole = tok(ctx + cont, add_special_tokens=add_special_tokens)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0], dim=-1)
        out.append(sum(logp[i - 1, whole[i]].item() for i in range(len(c), len(whole))))
    return out


def run_eval(tmp_path, capsys, *args):
    """eval_mc.py in float32, the dtype the float64 reference is compared at (auto is bf16 on some hosts)."""
    out = str(tmp_path / "out.json")
    eval_mc.main([*args, "--out", out, "--no_progress", "--dtype", "float32"])
    with open(out) as f:
        return json.load(f), capsys.readouterr().out


def all_pairs(data_dir, tasks, k=0):
    docs, pairs, spans = eval_mc.prepare(tasks, data_dir, None, k)
    return {t: [pairs[a:b] for a, b in spans[t]] for t in tasks}


def test_loglikelihoods_match_reference_both_model_formats(models, data_dir, tmp_path, capsys):
    hf_dir, ours = models
    tasks = list(eval_mc.TASKS)
    # batch_size 3 splits some examples' choices over batches and mixes contexts of one length in others
    got_hf, table = run_eval(
        tmp_path,
        capsys,
        "--ckpt",
        "hf:" + hf_dir,
        "--data_dir",
        data_dir,
        "--tasks",
        ",".join(tasks),
        "--batch_size",
        "3",
    )
    got_ours, _ = run_eval(tmp_path, capsys, "--ckpt", ours, "--data_dir", data_dir, "--tasks", ",".join(tasks))
    pairs = all_pairs(data_dir, tasks)
    ref = iter(reference_ll(hf_dir, [p for task in tasks for doc in pairs[task] for p in doc]))
    for task in tasks:
        for s_hf, s_ours, doc in zip(got_hf["samples"][task], got_ours["samples"][task], pairs[task]):
            want = [next(ref) for _ in doc]
            assert s_hf["loglikelihoods"] == pytest.approx(want, abs=2e-4), task
            assert s_ours["loglikelihoods"] == pytest.approx(want, abs=2e-4), task
            assert s_hf["pred"] == max(range(len(want)), key=lambda i: (want[i], -i))
        res = got_hf["results"][task]
        assert res["n"] == len(ROWS[FOLDER[task]])
        assert f"| {task} | acc |" in table
    # acc is the mean of pred == gold, over the samples written beside it
    for task in ("arc_easy", "copa", "winogrande"):
        s = got_hf["samples"][task]
        assert got_hf["results"][task]["acc"] == pytest.approx(sum(x["pred"] == x["gold"] for x in s) / len(s))


def test_fewshot_and_limit(models, data_dir, tmp_path, capsys):
    hf_dir, ours = models
    got, _ = run_eval(
        tmp_path,
        capsys,
        "--ckpt",
        ours,
        "--data_dir",
        data_dir,
        "--tasks",
        "winogrande,arc_easy",
        "--num_fewshot",
        "2",
        "--limit",
        "2",
    )
    pairs = all_pairs(data_dir, ["winogrande", "arc_easy"], k=2)
    for task in ("winogrande", "arc_easy"):
        assert got["results"][task]["n"] == 2 and [s["doc_index"] for s in got["samples"][task]] == [0, 1]
        flat = [p for doc in pairs[task][:2] for p in doc]
        assert [x for s in got["samples"][task] for x in s["loglikelihoods"]] == pytest.approx(
            reference_ll(hf_dir, flat), abs=2e-4
        )


def test_bos_follows_the_tokenizer_and_the_flag(models, models_bos, data_dir, tmp_path, capsys):
    pair = [("Question: Has Nigeria won a Nobel Prize?\nAnswer: ", "Yes")]
    for hf_dir, ours in (models, models_bos):
        adds = "models_bos" in hf_dir
        for name in ("hf:" + hf_dir, ours):
            lm = eval_mc.load_lm(name, torch.float32)
            assert lm.bos == (0 if adds else None)
            ((ctx, cont),) = eval_mc.tokenize_pairs(lm, pair, lm.bos)
            assert (ctx[0] == 0) == adds and cont == tuple(lm.encode([" Yes"])[0])  # the space moved over
            ((forced, _),) = eval_mc.tokenize_pairs(lm, pair, 0)
            assert forced == (0,) + tuple(lm.encode(["Question: Has Nigeria won a Nobel Prize?\nAnswer:"])[0])
    hf_dir, ours = models_bos
    flat = [p for doc in all_pairs(data_dir, ["copa"])["copa"] for p in doc]
    with_bos, without = reference_ll(hf_dir, flat, True), reference_ll(hf_dir, flat, False)
    assert with_bos != pytest.approx(without, abs=1e-3)  # the check below can tell them apart
    for flag, want in (("auto", with_bos), ("on", with_bos), ("off", without)):
        got, _ = run_eval(tmp_path, capsys, "--ckpt", ours, "--data_dir", data_dir, "--tasks", "copa", "--bos", flag)
        assert [x for s in got["samples"]["copa"] for x in s["loglikelihoods"]] == pytest.approx(want, abs=2e-4), flag


# ------------------------------------------------------------------------------------------------
# metrics


def test_mc2_on_known_numbers():
    # probabilities 0.5, 0.3, 0.2 (unnormalized x2): true mass 0.8 whatever the common scale
    assert eval_mc.mc2([math.log(0.5), math.log(0.3), math.log(0.2)], [1, 1, 0]) == pytest.approx(0.8)
    assert eval_mc.mc2([math.log(1.0), math.log(0.6), math.log(0.4)], [1, 0, 0]) == pytest.approx(0.5)
    assert eval_mc.mc2([-2000.0, -2000.0 + math.log(3)], [0, 1]) == pytest.approx(0.75)  # no underflow to 0/0


def test_acc_acc_norm_and_stderr_on_known_numbers():
    docs = [
        {"text": "q", "choices": ["a", "bbbb"], "gold": [1]},  # acc picks a (-2 > -3); acc_norm picks bbbb (-0.75 > -2)
        {"text": "q", "choices": ["aa", "b"], "gold": [0]},
    ]  # both pick aa
    res, samples = eval_mc.task_results("arc_easy", docs, [[-2.0, -3.0], [-1.0, -1.5]])
    assert res["acc"] == 0.5 and res["acc_norm"] == 1.0 and res["n"] == 2
    assert res["acc_stderr"] == pytest.approx(0.5)  # sample std sqrt(0.5) / sqrt(2)
    assert samples[0] == {"doc_index": 0, "loglikelihoods": [-2.0, -3.0], "pred": 0, "gold": 1}
    tqa = [{"text": "q", "choices": ["t", "f", "t2"], "gold": [0, 2], "labels": [1, 0, 1]}]
    res, samples = eval_mc.task_results("truthfulqa_mc2", tqa, [[math.log(0.2), math.log(0.6), math.log(0.2)]])
    assert res["acc"] == pytest.approx(0.4) and samples[0]["gold"] == [0, 2] and samples[0]["pred"] == 1
    assert eval_mc.argmax([1.0, 3.0, 3.0]) == 1  # ties go to the first, as np.argmax


# ------------------------------------------------------------------------------------------------
# bad input


def test_malformed_rows_name_file_and_line(tmp_path, capsys):
    root = write_data(tmp_path / "bench")
    path = os.path.join(root, "arc_easy", "test.jsonl")
    lines = open(path).read().splitlines()
    cases = [
        (lines[0] + "\n{not json\n", ":2: not valid JSON"),
        (
            json.dumps({"id": "x", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"}) + "\n",
            ":1: malformed arc_easy row (KeyError: 'question')",
        ),
        (
            lines[0] + "\n" + lines[1].replace('"answerKey": "', '"answerKey": "Z') + "\n",
            ":2: malformed arc_easy row (ValueError",
        ),
    ]
    for text, message in cases:
        with open(path, "w") as f:
            f.write(text)
        with pytest.raises(SystemExit) as e:
            eval_mc.main(
                ["--ckpt", "no/such/ckpt", "--data_dir", root, "--tasks", "arc_easy"]
            )  # data is read before the model
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert path + message in err, err
    with pytest.raises(SystemExit):
        eval_mc.main(["--ckpt", "x", "--data_dir", root, "--tasks", "arc_easy,nope"])
    assert "unknown task" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        eval_mc.main(["--ckpt", "x", "--data_dir", str(tmp_path / "empty"), "--tasks", "copa"])
    assert "copa/validation.jsonl not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# benchmark records and the two model paths


def test_every_task_is_a_named_record():
    for name, task in eval_mc.TASKS.items():
        assert isinstance(task, eval_mc.Task) and task.name == name
        assert task.folder in ROWS and callable(task.format_row)
        assert set(task.metrics) <= {"acc", "acc_norm", "mc2"} and task.split in ("validation", "test")
    assert eval_mc.TASKS["truthfulqa_mc2"].folder == "truthfulqa_mc" and eval_mc.TASKS["piqa"].folder == "piqa"
    assert "piqa" not in eval_mc.DEFAULT_TASKS and len(eval_mc.DEFAULT_TASKS) == 13


def test_contexts_that_share_a_long_prefix_run_it_once():
    n = eval_mc.SHARED_MIN
    pre = tuple(range(100, 100 + n))  # a preamble as long as the threshold
    a, b, c = pre + (1, 2), pre + (3,), pre  # c is all preamble: it keeps its last token to itself
    short_a, short_b = tuple(range(n - 1)) + (7,), tuple(range(n - 1)) + (8,)  # share n - 1 tokens: too few
    runs = eval_mc.runs_by_prefix([a, short_a, b, c, short_b, (5,)])
    assert runs == [([c, a, b], n - 1), ([short_a, short_b, (5,)], 0)]  # in token order
    groups = eval_mc.groups_of_equal_length([short_a, (5,), short_b, a], batch_size=2)
    assert groups == [[a], [short_a, short_b], [(5,)]]  # longest first, equal lengths together


def test_fast_scorer_equals_the_definition(models, data_dir):
    """score() (shared contexts, batches, prefixes run once, first tokens from the context's pass) returns what
    score_plain() (one pair at a time, the definition) does, on every task's pairs, through both model paths."""
    hf_dir, ours = models
    _, pairs, _ = eval_mc.prepare(list(eval_mc.TASKS), data_dir)
    for lm in (eval_mc.load_lm(ours, torch.float32), eval_mc.HFLM(hf_dir, torch.float32, "cpu")):
        ids = eval_mc.tokenize_pairs(lm, pairs, lm.bos)
        assert eval_mc.score(lm, ids, 4, progress=False) == pytest.approx(eval_mc.score_plain(lm, ids), abs=1e-4)


def test_llama_hf_dir_scores_through_model_py_as_transformers_does(models, data_dir):
    """A Llama-family hf:DIR runs through model.py (exact import); its log-likelihoods equal the transformers path's."""
    hf_dir, _ = models
    ours, theirs = eval_mc.load_lm("hf:" + hf_dir, torch.float32), eval_mc.HFLM(hf_dir, torch.float32, "cpu")
    assert isinstance(ours, eval_mc.OurLM)
    _, pairs, _ = eval_mc.prepare(list(eval_mc.TASKS), data_dir)
    got = eval_mc.score(ours, eval_mc.tokenize_pairs(ours, pairs, ours.bos), 5, progress=False)
    want = eval_mc.score(theirs, eval_mc.tokenize_pairs(theirs, pairs, theirs.bos), 5, progress=False)
    assert got == pytest.approx(want, abs=1e-4)


def test_other_architectures_keep_the_transformers_path(tmp_path, capsys):
    tok = train_tokenizer(add_bos=False)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=256, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(tmp_path)
    lm = eval_mc.load_lm(f"hf:{tmp_path}", torch.float32)
    assert isinstance(lm, eval_mc.HFLM)
    assert "model_type is 'gpt2'" in capsys.readouterr().err
    (ll,) = eval_mc.score(
        lm, eval_mc.tokenize_pairs(lm, [("The fish ate the worm.", " It was tasty.")], lm.bos), 4, progress=False
    )
    assert math.isfinite(ll) and ll < 0

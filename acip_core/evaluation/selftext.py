"""Calibration text sampled from the model itself: always available offline, and it covers what the
model knows (broad, like the paper's C4) rather than one book. `python -m acip_core self-text`."""

from __future__ import annotations

import logging
import re
import time

import torch

from acip_core.evaluation.evaluate import chat_input_ids

log = logging.getLogger(__name__)

SUBJECTS = [
    "a lighthouse keeper who finds a message in a bottle", "how bread rises", "the French Revolution",
    "photosynthesis", "a first day at a new school", "how vaccines train the immune system",
    "the history of the printing press", "a dragon who is afraid of heights", "how to plant tomatoes",
    "the water cycle", "a detective solving a theft at a museum", "why the sky is blue",
    "the Roman Empire's roads", "learning to play the violin", "how airplanes stay in the air",
    "a trip to the mountains in winter", "the life of honeybees", "the causes of the First World War",
    "how a bill becomes a law", "a robot that wants to paint", "the rules of chess",
    "the benefits of regular exercise", "volcanoes and earthquakes", "a family recipe for soup",
    "the invention of the telephone", "a cat's adventure in a big city", "how money and banks work",
    "the solar system's planets", "friendship between two neighbours", "the Renaissance painters",
    "how to write a good essay", "climate and weather", "the ancient Egyptian pyramids",
    "a sailor caught in a storm", "how the human heart works", "the story of the Olympic Games",
    "saving money as a student", "the discovery of penicillin", "a haunted old house",
    "how electricity reaches our homes", "the great migration of birds", "a job interview",
    "Shakespeare's plays", "the importance of sleep", "deserts and the animals that live there",
    "a misunderstanding at a birthday party", "the history of jazz", "how computers store numbers",
    # Wider ground (added for corpus:broad-wide): what a small general model was trained on besides
    # stories — code in several languages, maths, science, practical and civic reference text. Python is
    # left out on purpose: Python's help topics are the held-out *domain* (corpus:domain).
    "how a hash table finds a key", "writing a for loop in JavaScript", "SQL joins between two tables",
    "pointers and memory in C", "recursion with a factorial example in Java", "regular expressions",
    "version control with git branches", "how a web browser loads a page", "sorting algorithms compared",
    "a shell script that backs up a folder", "unit testing a small function", "how TCP connections work",
    "the difference between a compiler and an interpreter", "object-oriented design with classes in C++",
    "binary search on a sorted array", "how public-key encryption works", "JSON and how programs exchange data",
    "Rust's ownership rules", "a stack and a queue", "how operating systems schedule processes",
    "handling errors and exceptions in programs", "reading a CSV file in R", "HTML forms and CSS layout",
    "fractions and decimals", "solving a quadratic equation", "the Pythagorean theorem", "prime numbers",
    "probability with dice", "derivatives in calculus", "how to read a graph of a function", "matrices",
    "statistics: mean, median and mode", "compound interest", "the geometry of circles",
    "Newton's laws of motion", "the periodic table", "DNA and genes", "plate tectonics", "black holes",
    "the chemistry of cooking", "how batteries store energy", "the human digestive system",
    "renewable energy sources", "antibiotic resistance", "the theory of evolution", "ocean currents",
    "filling in a tax form", "renting a first apartment", "writing a formal letter of complaint",
    "the rules of a football match", "first aid for a burn", "caring for a houseplant",
    "the parts of a bicycle and how to repair a flat tyre", "how elections are run", "the United Nations",
    "the Industrial Revolution", "the history of the internet", "ancient Greek philosophy", "the Silk Road",
    "the American civil rights movement", "the Cold War", "Japanese tea ceremony", "Indian classical music",
    "a startup founder's first year", "negotiating a salary", "the basics of marketing", "supply and demand",
    "a nurse's night shift", "a farmer's year", "a scientist's failed experiment", "moving to a new country",
    "an old photograph found in an attic", "a chess tournament", "a lost dog finding its way home",
]
# Paragraphs about Python or in Python are dropped: Python's help topics are the held-out domain, and the
# model brings Python up by itself (e.g. for "regular expressions"); 42 of 1,404 paragraphs in the file.
HELD_OUT_DOMAIN = r"python|^\s*def \w+\(|^\s*import \w+|^\s*from \w+ import|print\("

FORMS = ["Write a short story about {}.", "Explain {} to a curious teenager.",
         "Write an encyclopedia article about {}.", "Write a blog post about {}.",
         "Write a step-by-step tutorial, with examples, about {}.", "Write a textbook section about {}."]


@torch.no_grad()
def sample_text(model, tokenizer, n_prompts: int = 96, max_new_tokens: int = 320, batch_size: int = 16,
                seed: int = 0, on_progress=None, drop: str | None = HELD_OUT_DOMAIN) -> str:
    """Sampled answers (T = 0.8, top-p 0.95) to diverse writing prompts, separated by blank lines;
    paragraphs that match the regular expression `drop` (case-insensitive) are left out."""
    torch.manual_seed(seed)
    prompts = [FORMS[i % len(FORMS)].format(SUBJECTS[i % len(SUBJECTS)]) for i in range(n_prompts)]
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        rows = [chat_input_ids(tokenizer, p)[0] for p in prompts[i:i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, width - len(r):], mask[j, width - len(r):] = r, 1
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.95,
                             repetition_penalty=1.1, max_new_tokens=max_new_tokens, pad_token_id=pad)
        texts += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
        log.info("%d/%d prompts, %.0f s", i + len(rows), len(prompts), time.perf_counter() - start)
        if on_progress:
            on_progress(i + len(rows), len(prompts))
    return drop_paragraphs("\n\n".join(t for t in texts if t), drop)


def drop_paragraphs(text: str, pattern: str | None) -> str:
    if not pattern:
        return text
    match = re.compile(pattern, re.IGNORECASE | re.MULTILINE).search
    kept = [p for p in text.split("\n\n") if not match(p)]
    log.info("dropped %d paragraphs matching %r", text.count("\n\n") + 1 - len(kept), pattern)
    return "\n\n".join(kept)

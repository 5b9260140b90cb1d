"""Needle-in-a-haystack prompts, trials and grids."""

QUESTION_TEMPLATE = "\nBased on the content of the book, Question: {question}\nAnswer:"

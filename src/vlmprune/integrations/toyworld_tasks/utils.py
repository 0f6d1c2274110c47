"""lmms-eval hooks of the toy tasks: the image of a row, its question, and vlmprune's exact-match score."""
from vlmprune import toyworld
from vlmprune.eval.normalize import is_correct


def doc_to_visual(doc):
    """The row's image, rendered from its seeded scene (the pixels ``vlmprune eval`` uses)."""
    return [toyworld.test_split(doc["task"])[doc["index"]].image]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": float(is_correct(results[0], doc["answer"], doc["options"] or None))}

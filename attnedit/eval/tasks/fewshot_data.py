"""Helpers for attnedit's offline copies of lm-evaluation-harness tasks (rendered next to the YAMLs).

The local files come in two layouts: the evaluation splits as published (ARC test already reduced to
``question, choices[list], gold``) and the few-shot pools as the harness would process them
(``query, choices, gold``). ``datasets`` refuses one ``load_dataset`` call over files whose columns
differ, so ``load`` reads each split on its own; the ``*_docs`` functions bring every layout to the
fields the task's prompts read, using the harness's own preprocessing where it has one.
"""

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as _harness_hellaswag_docs
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text  # noqa: F401


def load(data_files=None, **_metadata):
    """The task's ``custom_dataset``: one local JSON-lines file per split."""
    return datasets.DatasetDict({split: datasets.load_dataset("json", data_files=path, split="train") for split, path in data_files.items()})


def _arc_doc(doc):
    return {"query": "Question: " + doc["question"] + "\nAnswer:", "choices": doc["choices"], "gold": int(doc["gold"])}


def arc_docs(dataset):
    """ARC in the harness's prompt, ``Question: {question}\\nAnswer:`` over the answer texts; the
    few-shot pool holds that ``query`` already."""
    if "query" in dataset.column_names:
        return dataset
    return dataset.map(_arc_doc, remove_columns=dataset.column_names)


def hellaswag_docs(dataset):
    """The harness's HellaSwag cleaning for raw rows; the few-shot pool is processed already."""
    if "query" in dataset.column_names:
        return dataset
    return _harness_hellaswag_docs(dataset)

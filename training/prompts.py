"""The text prompts put to a CLIP-style model: one home for every template and prompt helper.

MAMMI (MICCAI 2024) embeds a concept ``c`` as the prompt "A chest x-ray image of a {c}" and subtracts
the embedding of the bare base template "A chest x-ray image of a" (``t_tem``); zero-shot scoring
of a finding contrasts "A chest x-ray image of a {class}" with "A chest x-ray image of no {class}";
DWARF's disease queries start from the same positive prompt. Class names are written in prompts as
words (:func:`prompt_name`: ``Pleural_Thickening`` -> ``pleural thickening``).

Two spellings of the positive template exist because two callers format differently:
:data:`TEMPLATE` has a named ``{concept}`` field (:func:`concept_prompts`), :data:`PROMPT_TEMPLATE`
a positional ``{}`` (the CLIP and DWARF configurations store it as is, so it stays as written).
Both render the same text.

Example:
    >>> concept_prompts([prompt_name("Pleural_Thickening")])
    ['A chest x-ray image of a pleural thickening']
    >>> class_prompts(["Effusion"], NEGATIVE_TEMPLATE)
    ['A chest x-ray image of no effusion']
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["TEMPLATE", "BASE_TEMPLATE", "PROMPT_TEMPLATE", "NEGATIVE_TEMPLATE", "prompt_name",
           "concept_prompts", "class_prompts"]

TEMPLATE = "A chest x-ray image of a {concept}"  # MAMMI's concept prompt
BASE_TEMPLATE = "A chest x-ray image of a"  # its base template t_tem
PROMPT_TEMPLATE = "A chest x-ray image of a {}"  # TEMPLATE with a positional field (class prompts)
NEGATIVE_TEMPLATE = "A chest x-ray image of no {}"  # the "absent" prompt of contrastive zero-shot scoring


def prompt_name(cls: str) -> str:
    """Class name as written in a prompt: ``Pleural_Thickening`` -> ``pleural thickening``.

    Args:
        cls: a class name (canonical NIH spelling or any other).

    Returns:
        The name with underscores as spaces, lowercased.
    """
    return cls.replace("_", " ").lower()


def concept_prompts(concepts: Sequence[str], template: str = TEMPLATE) -> list[str]:
    """Text prompts for concept embeddings: ``template`` with ``{concept}`` filled in (MAMMI's template).

    Args:
        concepts: concept words or phrases, used as given.
        template: a string with a ``{concept}`` field.

    Returns:
        One prompt per concept, in order.

    Raises:
        ValueError: the template has no ``{concept}`` field.
    """
    if "{concept}" not in template:
        raise ValueError(f"template must contain '{{concept}}', got {template!r}")
    return [template.format(concept=c) for c in concepts]


def class_prompts(classes: Sequence[str], template: str = PROMPT_TEMPLATE) -> list[str]:
    """One prompt per class: ``template`` (one positional ``{}``) filled with :func:`prompt_name`.

    Args:
        classes: class names (``Pleural_Thickening`` is written "pleural thickening").
        template: a string with one ``{}`` field, e.g. :data:`PROMPT_TEMPLATE` or :data:`NEGATIVE_TEMPLATE`.

    Returns:
        One prompt per class, in order.
    """
    return [template.format(prompt_name(c)) for c in classes]

"""training.prompts: the one home of the prompt templates, and the names re-exported elsewhere."""
from __future__ import annotations

import pytest

from training.prompts import (BASE_TEMPLATE, NEGATIVE_TEMPLATE, PROMPT_TEMPLATE, TEMPLATE, class_prompts,
                              concept_prompts, prompt_name)


def test_templates_render_mammi_prompts():
    assert concept_prompts(["nodule"]) == ["A chest x-ray image of a nodule"]
    assert TEMPLATE.format(concept="x") == PROMPT_TEMPLATE.format("x")  # two spellings, one text
    assert TEMPLATE.format(concept="").rstrip() == BASE_TEMPLATE
    assert class_prompts(["Pleural_Thickening", "Effusion"]) == [
        "A chest x-ray image of a pleural thickening", "A chest x-ray image of a effusion"]
    assert class_prompts(["Effusion"], NEGATIVE_TEMPLATE) == ["A chest x-ray image of no effusion"]
    assert prompt_name("Pleural_Thickening") == "pleural thickening"


def test_concept_prompts_refuse_a_template_without_the_field():
    with pytest.raises(ValueError, match="concept"):
        concept_prompts(["x"], template="A chest x-ray image of a {}")


def test_every_user_shares_the_one_home():
    import interpret.concepts as concepts
    import interpret.evaluation as evaluation
    import training.clip.train as clip_train
    import training.dwarf.model as dwarf_model

    assert concepts.concept_prompts is concept_prompts
    assert (concepts.TEMPLATE, concepts.BASE_TEMPLATE) == (TEMPLATE, BASE_TEMPLATE)
    assert clip_train.prompt_name is prompt_name
    assert clip_train.ClipTrainConfig().prompt_template == PROMPT_TEMPLATE
    assert clip_train.ClipTrainConfig().negative_template == NEGATIVE_TEMPLATE
    assert dwarf_model.DwarfConfig(classes=["Nodule"]).prompt_template == PROMPT_TEMPLATE
    assert evaluation.label_text(" Pleural_Thickening ") == "pleural thickening"

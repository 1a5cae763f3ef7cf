"""Concept mining on the 20 real IU reports (findings checked by hand against the XML) and helpers."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pandas as pd
import pytest

from interpret.concepts import (SpacyModelMissing, concept_incidence, concept_prompts, load_concepts, load_nlp,
                                load_word_list, mine_concepts, save_concepts)


@pytest.fixture(scope="module")
def nlp():
    return load_nlp()


@pytest.fixture(scope="module")
def iu_reports(real_fixtures) -> list[str]:
    """FINDINGS + IMPRESSION of each IU XML report (a tiny local parse of the OpenI format)."""
    out = []
    for f in sorted((real_fixtures / "iu_reports").glob("*.xml"), key=lambda p: int(p.stem)):
        parts = [a.text or "" for a in ET.parse(f).getroot().iter("AbstractText")
                 if a.get("Label") in ("FINDINGS", "IMPRESSION")]
        out.append(" ".join(parts))
    assert len(out) == 20
    return out


@pytest.fixture(scope="module")
def iu_table(iu_reports, nlp) -> pd.DataFrame:
    return mine_concepts(iu_reports, min_count=1, nlp=nlp)


def _row(table, concept):
    rows = table[table["concept"] == concept]
    assert len(rows) == 1, f"{concept!r} not mined; got {sorted(table['concept'])}"
    return rows.iloc[0]


def test_iu_findings_named_in_reports_are_mined(iu_table):
    # 7.xml "Basilar atelectasis", 2.xml "Borderline cardiomegaly", 4.xml "Bullous emphysema and interstitial
    # fibrosis" / "scarring", 9.xml + 10.xml "calcified granuloma", 1.xml "no pulmonary edema".
    for concept in ("atelectasis", "basilar atelectasis", "cardiomegaly", "emphysema", "bullous emphysema",
                    "interstitial fibrosis", "scarring", "calcified granuloma", "pleural effusion",
                    "pneumothorax", "consolidation", "pulmonary edema"):
        _row(iu_table, concept)
    assert set(iu_table.columns) == {"concept", "count", "negated_count", "n_reports", "example"}
    assert _row(iu_table, "calcified granuloma")["n_reports"] == 2  # 9.xml and 10.xml


def test_negation_counts(iu_table):
    # Every report that mentions a pneumothorax or a pleural effusion denies it ("There is no pneumothorax
    # or large pleural effusion.", "No displaced rib fractures, pneumothorax, or pleural effusion identified.").
    for concept in ("pneumothorax", "pleural effusion", "pulmonary edema"):
        row = _row(iu_table, concept)
        assert row["count"] >= 3 and row["negated_count"] == row["count"]
    # Affirmed findings are not negated.
    for concept in ("atelectasis", "cardiomegaly", "emphysema", "calcified granuloma"):
        assert _row(iu_table, concept)["negated_count"] == 0
    # 13.xml "Borderline enlargement of the cardiac silhouette without acute pulmonary disease": the cue
    # negates what follows it only.
    assert _row(iu_table, "enlargement")["negated_count"] == 0
    assert _row(iu_table, "pulmonary disease")["negated_count"] == _row(iu_table, "pulmonary disease")["count"]
    assert "without" in _row(iu_table, "pulmonary disease")["example"]


def test_examples_and_deterministic_order(iu_reports, iu_table, nlp):
    assert "granuloma" in _row(iu_table, "calcified granuloma")["example"].lower()
    assert "atelectasis" in _row(iu_table, "atelectasis")["example"].lower()
    keys = list(zip(-iu_table["count"], iu_table["concept"]))
    assert keys == sorted(keys)
    again = mine_concepts(list(reversed(iu_reports)), min_count=1, nlp=nlp)
    assert sorted(again["concept"]) == sorted(iu_table["concept"])
    pd.testing.assert_frame_equal(mine_concepts(iu_reports, min_count=1, nlp=nlp), iu_table)
    # modifiers of size/severity never become concepts
    assert not {"large", "small", "mild", "borderline", "xxxx"} & set(iu_table["concept"])
    assert not any("xxxx" in c for c in iu_table["concept"])


def test_min_count_and_stop_words(iu_reports, nlp):
    table = mine_concepts(iu_reports, min_count=3, nlp=nlp)
    assert (table["count"] >= 3).all() and "pneumothorax" in set(table["concept"])
    assert "cardiomegaly" not in set(table["concept"])  # mentioned once
    custom = mine_concepts(iu_reports, min_count=1, nlp=nlp, stop_words={"pneumothorax"})
    assert "pneumothorax" not in set(custom["concept"])
    with pytest.raises(ValueError, match="min_count"):
        mine_concepts(iu_reports, min_count=0, nlp=nlp)


def test_small_negation_cases(nlp):
    table = mine_concepts(["Small left pleural effusion.", "No pleural effusion or pneumothorax.",
                           "The pneumothorax has resolved.", "Nodule is not seen, but there is a mass."],
                          min_count=1, nlp=nlp).set_index("concept")
    assert table.loc["pleural effusion", ["count", "negated_count"]].tolist() == [2, 1]
    assert table.loc["pneumothorax", ["count", "negated_count"]].tolist() == [2, 2]  # pre- and post-cue
    assert table.loc["nodule", "negated_count"] == 1
    assert table.loc["mass", "negated_count"] == 0  # "but" ends the scope
    assert table.loc["pleural effusion", "example"] == "Small left pleural effusion."


def test_concept_incidence(nlp):
    reports = ["Small left pleural effusion.", "No pleural effusion. Nodule in the right lung."]
    inc = concept_incidence(reports, ["pleural effusion", "nodule", "mass"], nlp=nlp)
    assert inc.tolist() == [[True, False, False], [False, True, False]]
    inc_all = concept_incidence(reports, ["pleural effusion"], affirmed_only=False, nlp=nlp)
    assert inc_all[:, 0].tolist() == [True, True]


def test_save_load_roundtrip(iu_table, tmp_path):
    for name in ("c.parquet", "c.csv"):
        path = save_concepts(iu_table, tmp_path / name)
        pd.testing.assert_frame_equal(load_concepts(path), iu_table)
    with pytest.raises(ValueError, match="parquet or .csv"):
        save_concepts(iu_table, tmp_path / "c.json")


def test_word_list_and_prompts(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# generic control words\nDog\n\ncat\ndog\n  house  \n", encoding="utf-8")
    assert load_word_list(path) == ["dog", "cat", "house"]
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no words"):
        load_word_list(tmp_path / "empty.txt")
    assert concept_prompts(["nodule"]) == ["A chest x-ray image of a nodule"]
    with pytest.raises(ValueError, match="concept"):
        concept_prompts(["nodule"], template="no field")


def test_missing_pipeline_is_a_clear_error():
    with pytest.raises(SpacyModelMissing, match="en_core_web_sm"):
        load_nlp("no_such_spacy_pipeline_xyz")


def test_mammi_nouns_single_unlemmatised_nouns_no_count_no_cap(nlp):
    """Issue 14 defect 4: MAMMI's set is every NN/NNS/NNP word as written: no lemmas, no noun phrases, no stop
    list, no minimum count, no cap; the project's richer set stays available as ``report_phrases``."""
    from interpret.concepts import CONCEPT_SETS, build_concept_set, mammi_nouns

    reports = ["Small left pleural effusions. No evidence of pneumothorax.",
               "Cardiomegaly. A nodule in the right upper lobe; the heart is enlarged."]
    nouns = mammi_nouns(reports, nlp=nlp)
    assert {"effusions", "evidence", "pneumothorax", "cardiomegaly", "nodule", "lobe", "heart"} <= set(nouns)
    assert "effusion" not in nouns and all(" " not in n for n in nouns)  # no lemma, no phrase
    assert nouns.index("effusions") < nouns.index("cardiomegaly")  # order of first appearance
    assert build_concept_set("mammi_nouns", reports, max_concepts=3, min_count=2, nlp=nlp) == nouns  # no cap/count
    rich = build_concept_set("report_phrases", reports, min_count=1, nlp=nlp)
    assert "pleural effusion" in rich and "effusion" in rich and "evidence" not in rich
    assert build_concept_set("report_phrases", reports, nlp=nlp) == []  # min_count 2: every concept once
    assert CONCEPT_SETS == ("mammi_nouns", "report_phrases")
    with pytest.raises(ValueError, match="valid: mammi_nouns, report_phrases"):
        build_concept_set("nouns", reports)

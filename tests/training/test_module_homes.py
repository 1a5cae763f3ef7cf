"""The splits of ``training.clip.loading``, ``training.clip.train`` and ``training.data.schema`` kept every
public import path.

Each name is importable from its old path and is the very object its new home defines; importing
``training.data.manifest`` first (in a fresh interpreter) works, and ``training.data`` stays torch-free.
"""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

# old path -> {name: new home}
HOMES = {
    "training.clip.loading": {
        "load_clip": "training.clip.loading", "LOCAL_DIR_PREFIX": "training.clip.loading",
        "HF_HUB_PREFIX": "training.clip.loading",
        "ClipBundle": "training.clip.bundle", "ImagePreprocess": "training.clip.bundle",
        "KINDS": "training.clip.bundle", "OPENAI_MEAN": "training.clip.bundle", "OPENAI_STD": "training.clip.bundle",
        "CONFIG_DIR": "training.clip.registry", "list_configs": "training.clip.registry",
        "ConvStem": "training.clip.towers", "apply_conv_stem": "training.clip.towers",
        "CONV_STEM_KEY": "training.clip.towers", "encode_image_tokens": "training.clip.towers",
        "PYPACKAGE_PREFIX": "training.clip.towers", "resolve_text_tower": "training.clip.towers",
        "TrimmedHFTokenizer": "training.clip.towers",
        "HFClipWrapper": "training.clip.hf_clip", "HFClipTokenizer": "training.clip.hf_clip",
        "save_clip": "training.clip.saving", "OPEN_CLIP_CONFIG": "training.clip.saving",
        "WEIGHTS_FILE": "training.clip.saving",
    },
    "training.clip.train": {
        "ClipTrainConfig": "training.clip.train", "ClipTrainResult": "training.clip.train",
        "train_clip": "training.clip.train", "config_dict": "training.clip.train",
        "PairSplit": "training.clip.pairs", "load_pairs": "training.clip.pairs",
        "ZERO_SHOT_MODES": "training.clip.evaluation", "retrieval_recall": "training.clip.evaluation",
        "zero_shot_scores": "training.clip.evaluation", "per_class_auroc": "training.clip.evaluation",
        "evaluate_clip": "training.clip.evaluation",
        "multi_positive_clip_loss": "training.clip.objectives",
        "split_sentences": "training.clip.augment", "augment_images": "training.clip.augment",
        "pooled_text_features": "training.clip.locked_text", "whiten_projection_": "training.clip.locked_text",
        "_hf_text_tower": "training.clip.locked_text",
        "prompt_name": "training.prompts", "class_prompts": "training.prompts",
        "PROMPT_TEMPLATE": "training.prompts", "NEGATIVE_TEMPLATE": "training.prompts",
        "VLMAdapter": "training.clip.embedding", "ClipBundle": "training.clip.bundle",
    },
    "training.data.schema": {
        "BOX_TYPE": "training.data.schema", "POLYGON_TYPE": "training.data.schema",
        "MANIFEST_SCHEMA": "training.data.schema", "OPTIONAL_FIELDS": "training.data.schema",
        "MANIFEST_COLUMNS": "training.data.schema", "ManifestError": "training.data.schema",
        "validate_manifest": "training.data.schema",
        "NIH_CLASSES": "training.data.labels", "PHANTOM_CLASSES": "training.data.labels",
        "NO_FINDING": "training.data.labels", "canonical_label": "training.data.labels",
        "SPLITS": "training.data.splits", "patient_split": "training.data.splits",
        "polygon_mask": "training.data.masks",
        "read_manifest": "training.data.manifest", "write_manifest": "training.data.manifest",
    },
}
CASES = [(old, name, home) for old, names in HOMES.items() for name, home in names.items()]


@pytest.mark.parametrize("old, name, home", CASES)
def test_old_path_gives_the_object_of_its_new_home(old, name, home):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(home), name)


@pytest.mark.parametrize("package", ["training.clip", "training.clip.train", "training.data", "training.data.schema"])
def test_package_exports_resolve(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    assert set(HOMES.get(package, {})) <= set(dir(module))


def test_unknown_name_raises_attribute_error():
    import training.data.schema as schema

    with pytest.raises(AttributeError, match="no_such_name"):
        schema.no_such_name  # noqa: B018


def test_manifest_module_imported_first_and_data_stays_torch_free():
    """``training.data.manifest`` imports ``schema``, whose ``read_manifest`` comes back from it lazily."""
    code = ("import sys\n"
            "import training.data.manifest\n"
            "from training.data.schema import *\n"
            "assert read_manifest is training.data.manifest.read_manifest\n"
            "assert 'torch' not in sys.modules, 'training.data must import without torch'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

"""card.py: the model card's sections come from the facts handed in."""

from __future__ import annotations

from mammoflow.reporting.card import DESCRIPTION_LIMIT, CardFacts, description, model_card


def _facts(
    subgroups: str = "### test\n\n| factor | value |\n", selection: str = "cv_f1_macro_mean"
) -> CardFacts:
    return CardFacts(
        name="mammoflow-mias",
        version="3",
        alias="champion",
        dataset="mias",
        backbone="vgg16",
        test_run_id="t1",
        parent_run_id="p1",
        params={"model.weights": "none", "dataset.kind": "mias", "split.group_by": "patient"},
        tags={"dvc_data_hash": "abc.dir", "split_hash": "s123", "git_commit": "deadbeef"},
        metrics={
            "test_accuracy": 0.71,
            "test_accuracy_ci_low": 0.6,
            "test_accuracy_ci_high": 0.8,
            "accuracy_mean": 0.7,
            "accuracy_std": 0.05,
            "temperature": 1.7,
            "test_ece": 0.2,
            "test_calibrated_ece": 0.1,
        },
        subgroups_md=subgroups,
        selection_metric=selection,
    )


def test_card_has_mitchell_sections_and_the_tracked_numbers() -> None:
    text = model_card(_facts())
    for section in (
        "## Model details",
        "## Intended use",
        "## Factors",
        "## Metrics",
        "## Training and evaluation data",
        "## Subgroup results",
        "## Calibration",
        "## Caveats",
    ):
        assert section in text
    assert "Not for diagnosis" in text
    assert "0.710 [0.600, 0.800]" in text and "0.700 ± 0.050" in text
    assert "abc.dir" in text and "s123" in text and "deadbeef" in text
    assert "T = 1.700" in text and "98–99 %" in text and "not ImageNet" in text
    assert "background tissue" in text and "#### test" in text


def test_card_states_the_selection_rule_and_warns_when_it_peeks() -> None:
    text = model_card(_facts())
    assert "chosen on the cross-validated metric `cv_f1_macro_mean`" in text
    assert "unbiased estimate" in text and "Warning" not in text
    peeking = model_card(_facts(selection="test_f1_macro"))
    assert "⚠ Warning: selected on the test set (`test_f1_macro`)" in peeking
    assert "optimistic" in peeking
    assert "not recorded" in model_card(_facts(selection=""))


def test_description_drops_the_subgroups_when_too_long() -> None:
    long = "### test\n\n" + "| x | y |\n" * 1000
    assert len(model_card(_facts(long))) > DESCRIPTION_LIMIT
    text = description(_facts(long))
    assert len(text) <= DESCRIPTION_LIMIT and "model_card.md" in text
    assert description(_facts()) == model_card(_facts())


def test_card_lists_external_validations() -> None:
    import dataclasses

    assert "None yet" in model_card(_facts())
    ext = {
        "vendor_b": {
            "run": "r9",
            "external_n_images": 40.0,
            "external_f1_macro": 0.41,
            "external_f1_macro_ci_low": 0.3,
            "external_f1_macro_ci_high": 0.5,
            "shift_f1_macro": -0.2,
            "shift_f1_macro_ci_low": -0.35,
            "shift_f1_macro_ci_high": -0.05,
            "external_ece": 0.3,
            "external_calibrated_ece": 0.2,
        }
    }
    text = model_card(dataclasses.replace(_facts(), external=ext))
    assert "## External validation" in text
    assert "| `vendor_b` | 40 | – | 0.410 [0.300, 0.500] | -0.200 [-0.350, -0.050] |" in text
    assert "0.300 → 0.200" in text and "`r9`" in text

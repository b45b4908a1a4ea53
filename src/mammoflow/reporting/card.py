"""Model cards (Mitchell et al. 2019) written from the tracked numbers, never by hand.

:func:`model_card` turns :class:`CardFacts` — what MLflow holds about one registered model
version: its test run's params, its parent run's metrics and provenance tags, the subgroup
table — into markdown with the paper's sections: model details, intended use, factors,
metrics, evaluation and training data, subgroup results, calibration, caveats. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# What the paper this project started from reports, and how (the comparison needs the "how").
PAPER_CLAIM = (
    "98–99 % accuracy, measured on image-level splits (images of one woman may sit in both "
    "training and test)"
)
DESCRIPTION_LIMIT = 5000  # MLflow's model-version description column (String(5000))
_TEST_METRICS = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("f1_macro", "F1 (macro)"),
    ("roc_auc", "ROC AUC (one-vs-rest macro)"),
)


@dataclass(frozen=True)
class CardFacts:
    """What a model card is written from (all read from MLflow by ``Tracker.card_facts``)."""

    name: str
    version: str
    alias: str
    dataset: str
    backbone: str
    test_run_id: str
    parent_run_id: str
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    subgroups_md: str = ""
    selection_metric: str = ""  # tracking.registry_metric it was promoted on ("" = unknown)
    #: external dataset → its external run's metrics (and "run": the run id)
    external: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _with_ci(m: Mapping[str, float], key: str) -> str:
    point = _num(m.get(key))
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if low is None or high is None:
        return point
    return f"{point} [{_num(low)}, {_num(high)}]"


def _sha(sha: str) -> str:
    return f" (sha256 {sha[:16]}…)" if sha and sha not in ("none", "unknown") else ""


def _details(f: CardFacts) -> list[str]:
    p, t = f.params, f.tags
    weights = p.get("model.weights", t.get("weights_source", "unknown"))
    return [
        "## Model details",
        "",
        f"- Registered model `{f.name}` version {f.version} (alias `{f.alias}`), "
        f"backbone **{f.backbone}**, dataset `{f.dataset}`.",
        f"- Architecture: {f.backbone} frozen prefix, trainable tail, the paper's head "
        f"(Dense {p.get('model.head_units', '?')} ReLU → BatchNorm → Dropout "
        f"{p.get('model.dropout', '?')} → softmax).",
        f"- Weights: `{weights}`{_sha(t.get('weights_sha256', ''))}; input "
        f"{p.get('model.input_size', '?')} px; epochs {p.get('train.epochs', '?')}, batch "
        f"{p.get('train.batch_size', '?')}, learning rate {p.get('train.learning_rate', '?')}.",
        f"- Test model: {p.get('test_model', p.get('evaluate.test_model', '?'))}; MLflow test "
        f"run `{f.test_run_id}`, parent run `{f.parent_run_id}`.",
        f"- Trained with TensorFlow {t.get('tensorflow_version', '?')} on {t.get('device', '?')}.",
        "",
    ]


def _intended_use(f: CardFacts) -> list[str]:
    return [
        "## Intended use",
        "",
        "- **Research only. Not for diagnosis**, screening or any clinical decision.",
        "- For comparing transfer-learning backbones on mammograms under patient-level splits.",
        "- Out of scope: patients, scanners or populations unlike the training data.",
        "",
        "## Factors",
        "",
        "Reported per subgroup below: "
        + (
            "background tissue (F/G/D), abnormality class, laterality."
            if f.params.get("dataset.kind") == "mias"
            else "abnormality, view, laterality, age band."
        ),
        "",
    ]


def _metrics(f: CardFacts) -> list[str]:
    m = f.metrics
    level = f.params.get("evaluate.ci", "0.95")
    lines = [
        "## Metrics",
        "",
        f"Held-out test set, grouped by `{f.params.get('split.group_by', 'patient')}`; "
        f"brackets: {level} patient-bootstrap CI. CV: mean ± std over "
        f"{f.params.get('split.k_folds', '?')} folds.",
        "",
    ]
    lines += _selection(f)
    lines += [
        "| metric | test [CI] | CV mean ± std |",
        "|---|---|---|",
    ]
    for key, label in _TEST_METRICS:
        cv = f"{_num(m.get(f'{key}_mean'))} ± {_num(m.get(f'{key}_std'))}"
        lines.append(f"| {label} | {_with_ci(m, 'test_' + key)} | {cv} |")
    lines += [
        f"| Sensitivity (malignant) | {_num(m.get('test_sensitivity'))} | "
        f"{_num(m.get('sensitivity_mean'))} ± {_num(m.get('sensitivity_std'))} |",
        f"| Specificity | {_num(m.get('test_specificity'))} | "
        f"{_num(m.get('specificity_mean'))} ± {_num(m.get('specificity_std'))} |",
        "",
    ]
    return lines


def _selection(f: CardFacts) -> list[str]:
    """The selection rule, and the winner's-curse warning when the test set chose the model."""
    from mammoflow.evaluation.champion import rule_text, warning_text

    if not f.selection_metric:
        return ["Selection rule: not recorded on this version (promoted before it was).", ""]
    warning = warning_text(f.selection_metric)
    lines = [rule_text(f.selection_metric), ""]
    if warning:
        lines += [f"> ⚠ {warning}", ""]
    else:
        lines += ["The test column is the unbiased estimate of this model's performance.", ""]
    return lines


def _data(f: CardFacts) -> list[str]:
    t, p = f.tags, f.params
    return [
        "## Training and evaluation data",
        "",
        f"- Dataset `{f.dataset}` ({p.get('dataset.kind', '?')}), converted to "
        f"{p.get('convert.size', '?')} px PNGs; DVC hash `{t.get('dvc_data_hash', 'unknown')}`.",
        f"- Split: held-out test {p.get('split.test_size', '?')}, "
        f"{p.get('split.k_folds', '?')}-fold CV, grouped by "
        f"`{p.get('split.group_by', 'patient')}`, seed {p.get('split.seed', '?')}; split hash "
        f"`{t.get('split_hash', 'unknown')}`.",
        f"- Code: git commit `{t.get('git_commit', 'unknown')}` (dirty: "
        f"{t.get('git_dirty', 'unknown')}).",
        "",
    ]


def _calibration(f: CardFacts) -> list[str]:
    m = f.metrics
    if "temperature" not in m:
        return ["## Calibration", "", "Not measured for this run.", ""]
    return [
        "## Calibration",
        "",
        f"- Top-label ECE (15 bins), test: raw {_with_ci(m, 'test_ece')}, after temperature "
        f"scaling {_with_ci(m, 'test_calibrated_ece')}.",
        f"- Classwise ECE, test: raw {_with_ci(m, 'test_classwise_ece')}, calibrated "
        f"{_with_ci(m, 'test_calibrated_classwise_ece')}.",
        f"- Temperature T = {_num(m.get('temperature'))}, fitted on the out-of-fold validation "
        "predictions of the single fold models; calibrated probabilities are softmax(log p / T) "
        "of each fold model, averaged (tag `mammoflow.temperature`, sidecar `calibration.json` "
        "on the test run).",
        "- **Served probabilities are the calibrated ones**: the registered model applies T "
        "itself (its `temperature` layer), in `mlflow models serve`, pyfunc, `mammoflow "
        "predict` and `serve`; `mammoflow predict --raw` gives the uncalibrated ones.",
        "",
    ]


def _external(f: CardFacts) -> list[str]:
    """The external validations of this version (``mammoflow external``)."""
    lines = ["## External validation", ""]
    if not f.external:
        return [*lines, "None yet (`mammoflow external --model … --dataset …`).", ""]
    lines += [
        "Datasets the model never trained on, through the training's readers and conversion; "
        "brackets: patient-bootstrap CI; Δ: external − own test (two independent bootstraps).",
        "",
        "| dataset | images | accuracy | F1 (macro) | Δ F1 | ECE raw → calibrated | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in f.external.items():
        delta = f"{_num(m.get('shift_f1_macro'))} [{_num(m.get('shift_f1_macro_ci_low'))}, " + (
            f"{_num(m.get('shift_f1_macro_ci_high'))}]"
        )
        ece = f"{_num(m.get('external_ece'))} → {_num(m.get('external_calibrated_ece'))}"
        lines.append(
            f"| `{name}` | {int(m.get('external_n_images', 0))} | "
            f"{_with_ci(m, 'external_accuracy')} | {_with_ci(m, 'external_f1_macro')} | "
            f"{delta} | {ece} | `{m.get('run', '?')}` |"
        )
    return [*lines, ""]


def _caveats(f: CardFacts) -> list[str]:
    p, m = f.params, f.metrics
    weights = p.get("model.weights", "unknown")
    lines = [
        "## Caveats and recommendations",
        "",
        f"- The paper reports {PAPER_CLAIM}. Ours is measured on a "
        f"`{p.get('split.group_by', 'patient')}`-level split: test accuracy "
        f"{_with_ci(m, 'test_accuracy')}. The two are not the same experiment.",
    ]
    if weights != "imagenet":
        lines.append(
            f"- Weights `{weights}`: not ImageNet transfer learning; these numbers show the "
            "machinery, not what the method achieves."
        )
    if "pointing_game_hit_rate" in m:
        lines.append(
            f"- Grad-CAM pointing game: hit rate {_num(m.get('pointing_game_hit_rate'))} "
            f"(chance {_num(m.get('pointing_game_chance'))}); maps peaking outside the breast: "
            f"{_num(m.get('pointing_game_outside_breast'))} — a shortcut signal when high."
        )
    lines += [
        "- Small test sets give wide intervals; read the CIs, not the points.",
        "- Subgroups with fewer than 10 images are flagged ⚠ and say little.",
        "",
    ]
    return lines


def model_card(facts: CardFacts, *, subgroups: bool = True) -> str:
    """The markdown model card of one registered version."""
    head = [
        f"# Model card: {facts.name} v{facts.version} ({facts.backbone})",
        "",
        "_Written from the numbers tracked in MLflow._",
        "",
    ]
    sub = ["## Subgroup results", ""]
    if subgroups and facts.subgroups_md:
        sub += [facts.subgroups_md.replace("\n### ", "\n#### ").replace("### ", "#### ", 1), ""]
    else:
        sub += ["See `subgroups.md` on the parent run.", ""]
    parts = (
        head
        + _details(facts)
        + _intended_use(facts)
        + _metrics(facts)
        + _data(facts)
        + sub
        + _calibration(facts)
        + _external(facts)
        + _caveats(facts)
    )
    return "\n".join(parts)


def description(facts: CardFacts, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card as a model-version description: without the subgroup table when too long."""
    text = model_card(facts)
    if len(text) <= limit:
        return text
    short = model_card(facts, subgroups=False)
    note = "\n_The full card is the artifact `model_card.md` of the test run._\n"
    return (short + note) if len(short) + len(note) <= limit else short[: limit - 1] + "…"

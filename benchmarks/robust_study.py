"""Validation study of training and architecture candidates: detection, localisation, robustness.

Chosen under the project's validation protocol, without a single test image: for a dataset and
a seed the normal training images are split as ``fit`` splits them, defects are painted on
copies of the held-out normals (``recipe_study.validation_set``), and every candidate is
measured on that validation set with the robustness benchmark's perturbations
(``robustness.measure``): validation image / pixel AUROC and AUPRO, the AUROCs' change under
each perturbation, and the drift of the held-out normals' median score.

    python benchmarks/robust_study.py ../shared/datasets/mvtec_ad/bottle \
        --weights ../shared/weights/tf_efficientnet_lite0.safetensors \
        --candidates noise0,noise0.3,pixel2,noise0.1+pixel2 --seeds 0,1 --epochs 40 --opacity 0.3

DATA may be ``textures`` (the built-in generated set, written under ``--models`` or a temporary
folder). A candidate names what differs from the improved recipe without training noise and
without context options (``candidate``'s tokens). The training noise of the improved recipe
was chosen with it (``noise0.1+pixel2``), and the context options on top of that
(``noise0.1+pixel2+pool3``, ...). Prints one summary line per (seed, candidate) and, with
``--json``, keeps every row; ``--table-json PATH`` writes the summary lines as one table, a
results-table JSON (``study_table``; ``docs/render.py`` renders it into the docs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from recipe_study import study_arguments, validation_set

from fastflow import FastFlow, TrainConfig
from fastflow.apps.benchmark import resolve_dataset
from fastflow.apps.result_tables import add_table_json_option, table_record, write_table
from fastflow.apps.robustness import PERTURBATIONS, measure
from fastflow.core.hardware import cpu_model, physical_cores
from fastflow.estimator.data import load_samples, split_holdout
from fastflow.model.config import RECIPES, Recipe

# Architecture tokens: the context options of ``FastFlowConfig`` (``fastflow.model.context``).
ARCHITECTURE_TOKENS: dict[str, dict] = {
    "pool3": {"context_pool": 3},
    "pool5": {"context_pool": 5},
    "fuse": {"fuse_scales": True},
    "pos16": {"positional_channels": 16},
    "pos32": {"positional_channels": 32},
    "pos0": {"positional_channels": 0},
    "swap": {"permutation": "swap"},
    "l23": {"layers": (2, 3)},
}


# Scoring tokens: how a trained model's latents become a map and a score (``Recipe``), so a
# candidate that differs only in them is scored from the same trained model (``--models``).
SCORING_TOKENS = {"top": "score_top", "sigma": "map_sigma"}


def scoring_token(token: str) -> tuple[str, float] | None:
    """(``Recipe`` field, value) of a scoring token such as ``top0.01``, else ``None``."""
    for prefix, field in SCORING_TOKENS.items():
        if token.startswith(prefix) and token[len(prefix) :].replace(".", "", 1).isdigit():
            return field, float(token.removeprefix(prefix))
    return None


def trained_part(name: str) -> str:
    """A candidate's name without its scoring tokens: the model it scores."""
    return "+".join(token for token in name.split("+") if scoring_token(token) is None)


def candidate(name: str) -> tuple[Recipe, dict, dict]:
    """A candidate's recipe, architecture overrides and ``TrainConfig`` overrides, from its name:
    ``+``-joined tokens.

    ``default`` (the improved recipe as it is now, training noise and context options included;
    first), ``reference`` (the paper's loss and scoring instead of the improved recipe's), ``noiseX``
    (``Recipe.feature_noise=X``), ``pixelX`` (``Recipe.pixel_noise=X``), ``jpegQ``
    (``Recipe.pixel_jpeg=Q``, after a ``pixelX``; ``jpegQ@S``: a share ``S`` of the noisy copies),
    ``clampX`` (``FastFlowConfig.clamp=X``, the bound of the coupling log-scales), the scoring
    tokens ``topX`` (``Recipe.score_top``) and ``sigmaX`` (``Recipe.map_sigma``), and the
    architecture tokens of ``ARCHITECTURE_TOKENS``, e.g. ``noise0.1+pixel2+pool3``, the input
    tokens ``sizeHxW`` and ``tileT@O``, and the training tokens ``cosine``/``constant``
    (``Recipe.lr_schedule``), ``stepsN`` (``Recipe.step_budget``), ``bsN`` and ``lrX``. ``noise0``
    is the improved recipe as it was before training noise.
    """
    # Every candidate starts from the improved recipe *without* training noise or context
    # options (its scoring and loss) and with the reference's training (batch 32, constant rate,
    # 100 epochs), whatever the current default is, so names keep their meaning.
    recipe = dataclasses.replace(
        RECIPES["improved"],
        feature_noise=0.0,
        pixel_noise=0.0,
        pixel_jpeg=0,
        pixel_jpeg_share=1.0,
        lr_schedule="constant",
        batch_size=32,
        step_budget=None,
        architecture={},
    )
    architecture: dict = {}
    training: dict = {}
    for token in name.split("+"):
        if token == "default":
            recipe, architecture = RECIPES["improved"], dict(RECIPES["improved"].architecture)
        elif token == "reference":
            recipe = dataclasses.replace(
                RECIPES["reference"], feature_noise=recipe.feature_noise, pixel_noise=recipe.pixel_noise
            )
        elif token.startswith("noise"):
            recipe = dataclasses.replace(recipe, feature_noise=float(token.removeprefix("noise")))
        elif token.startswith("pixel"):
            recipe = dataclasses.replace(recipe, pixel_noise=float(token.removeprefix("pixel")))
        elif token.startswith("jpeg"):
            quality, _, share = token.removeprefix("jpeg").partition("@")
            recipe = dataclasses.replace(recipe, pixel_jpeg=int(quality), pixel_jpeg_share=float(share or 1))
        elif token.startswith("clamp"):
            architecture["clamp"] = float(token.removeprefix("clamp"))
        elif (scoring := scoring_token(token)) is not None:
            recipe = dataclasses.replace(recipe, **{scoring[0]: scoring[1]})
        elif token in ARCHITECTURE_TOKENS:
            architecture.update(ARCHITECTURE_TOKENS[token])
        elif token.startswith("size"):
            height, _, width = token.removeprefix("size").partition("x")
            architecture["input_size"] = (int(height), int(width or height))
        elif token.startswith("tile"):
            tile, _, overlap = token.removeprefix("tile").partition("@")
            architecture.update(tile=int(tile), tile_overlap=int(overlap or 0))
        elif token in ("cosine", "constant"):
            recipe = dataclasses.replace(recipe, lr_schedule=token)
        elif token.startswith("steps"):
            recipe = dataclasses.replace(recipe, step_budget=int(token.removeprefix("steps")))
        elif token.startswith("bs"):
            training["batch_size"] = int(token.removeprefix("bs"))
        elif token.startswith("lr"):
            training["lr"] = float(token.removeprefix("lr"))
        else:
            raise SystemExit(f"unknown candidate token {token!r} in {name!r}")
    return recipe, architecture, training


def summary(rows: list[dict]) -> dict[str, float]:
    """Clean validation AUROCs and AUPRO, the worst AUROC drop over the perturbations and the noise-1 drift."""
    clean, others = rows[0], rows[1:]
    by_name = {row["perturbation"]: row for row in rows}
    return {
        "image_auroc": clean["image_auroc"],
        "pixel_auroc": clean["pixel_auroc"],
        "aupro": clean["aupro"],
        "worst_image_drop": max((-row["delta_image_auroc"] for row in others), default=0.0),
        "worst_pixel_drop": max((-row["delta_pixel_auroc"] for row in others), default=0.0),
        "noise1_drift": by_name["noise1"]["normal_drift"] if "noise1" in by_name else float("nan"),
    }


STUDY_COLUMNS = [
    "dataset",
    "seed",
    "candidate",
    "input",
    "image AUROC",
    "pixel AUROC",
    "AUPRO",
    "worst image / pixel drop",
    "noise-1 drift",
    "kept epoch",
    "fit seconds",
]


def study_table(results: list[dict]) -> list[list[str]]:
    """The study's results (``main``'s records) as the cells of ``STUDY_COLUMNS``: validation
    AUROCs and AUPRO clean, the worst drop over the perturbations, the noise-1 drift (``-`` where
    noise1 was not run), the kept epoch and the fit's seconds."""
    rows = []
    for result in results:
        height, width = result["input_size"]
        drift = result["noise1_drift"]
        rows.append(
            [
                result["data"],
                f"{result['seed']}",
                result["candidate"],
                f"{height}x{width}",
                f"{result['image_auroc']:.3f}",
                f"{result['pixel_auroc']:.3f}",
                f"{result['aupro']:.3f}",
                f"{result['worst_image_drop']:.3f} / {result['worst_pixel_drop']:.3f}",
                "-" if math.isnan(drift) else f"{drift:+.3f}",
                f"{result['best_epoch']} of {result['epochs']}",
                f"{result['fit_seconds']:.0f}",
            ]
        )
    return rows


def main() -> None:
    parser = study_arguments(__doc__, str, opacity=0.3)  # str: DATA may name a built-in dataset
    parser.add_argument("--candidates", default="noise0,noise0.1")
    parser.add_argument("--perturbations", default=",".join(PERTURBATIONS))
    add_table_json_option(parser, "a summary table (a row per dataset, seed and candidate)")
    args = parser.parse_args()
    if not os.environ.get("OMP_NUM_THREADS"):  # one study per core is allowed, as with the CLI
        torch.set_num_threads(physical_cores())
    names = ["clean"] + [n for n in args.perturbations.split(",") if n and n != "clean"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = resolve_dataset(args.data, args.models or Path(tmp))
        for seed in (int(s) for s in args.seeds.split(",")):
            holdout = FastFlow(args.backbone).holdout_fraction
            _, held = split_holdout(load_samples(data, "train"), holdout, seed)
            painted = Path(tmp) / f"validation_{seed}"
            painted.mkdir()
            val_samples = validation_set(held, seed, painted, args.opacity)
            for name in args.candidates.split(","):
                start = time.perf_counter()
                saved = (
                    args.models / f"{data.name}_{trained_part(name)}_{args.epochs}_seed{seed}.safetensors"
                    if args.models
                    else None
                )
                recipe, architecture, overrides = candidate(name)
                if saved is not None and saved.exists():
                    detector = FastFlow.load(saved)
                    # Its scoring tokens, if any: the same trained model, scored with this recipe.
                    detector.recipe_ = recipe
                else:
                    training = TrainConfig(max_epochs=args.epochs, seed=seed, **overrides)
                    detector = FastFlow(
                        args.backbone,
                        recipe=recipe,
                        weights=args.weights,
                        training=training,
                        architecture=architecture,
                    )
                    detector.fit(data)
                    if saved is not None:
                        detector.save(saved)
                seconds = time.perf_counter() - start
                start = time.perf_counter()
                detector.detect(val_samples)
                per_image_ms = 1000 * (time.perf_counter() - start) / len(val_samples)
                rows = measure(detector, val_samples, names, seed)
                result = {
                    "data": data.name,
                    "seed": seed,
                    "candidate": name,
                    "best_epoch": detector.best_epoch_,
                    "epochs": len(detector.history_),
                    "fit_seconds": round(seconds, 1),
                    "input_size": list(detector.config_.input_size),
                    "ms_per_image": round(per_image_ms, 1),
                    **summary(rows),
                    "rows": rows,
                }
                results.append(result)
                print(
                    f"{data.name} seed {seed} {name:20s} image {result['image_auroc']:.4f} "
                    f"pixel {result['pixel_auroc']:.4f} aupro {result['aupro']:.4f} worst drop {result['worst_image_drop']:+.4f} / "
                    f"{result['worst_pixel_drop']:+.4f} noise1 drift {result['noise1_drift']:+.4f} "
                    f"best epoch {detector.best_epoch_}/{len(detector.history_)} {seconds:.0f}s "
                    f"{per_image_ms:.0f} ms/image",
                    flush=True,
                )
    print(f"CPU: {cpu_model()}, torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.table_json:
        title = (
            f"Validation study on {args.data}: painted defects at {args.opacity:g} opacity on the held-out "
            f"normal images, {args.epochs or 'recipe'} epochs"
        )
        notes = (
            f"Perturbations {','.join(names[1:]) or 'none'}; worst drop over them; drift: the held-out normals' "
            f"median score under noise1 as a share of the clean normal-to-anomalous gap; torch {torch.__version__}."
        )
        write_table(args.table_json, table_record(title, STUDY_COLUMNS, study_table(results), notes=notes))


if __name__ == "__main__":
    main()

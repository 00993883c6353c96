"""The ``FastFlow`` estimator: scikit-learn style ``fit`` / ``predict`` / ``save`` / ``load``.

Scores mean "higher = more anomalous"; labels use 1 = anomalous. Everything the estimator
learns is fitted on normal images only: the flows on the training split, the model selection
and the deployment threshold (a quantile of held-out normal scores) on the held-out split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastflow.core.errors import FastFlowError, is_integer, is_real, require
from fastflow.core.hardware import resolve_device
from fastflow.estimator import distributed
from fastflow.estimator.checkpoint import load_checkpoint, save_checkpoint
from fastflow.estimator.data import (
    DataError,
    Sample,
    check_holdout_fraction,
    image_loader,
    load_samples,
    split_holdout,
)
from fastflow.estimator.engines import Engine, TorchEngine, check_engine, check_precision
from fastflow.estimator.export import EXPORT_PRECISIONS, export_engine, to_onnx, to_openvino
from fastflow.estimator.feature_cache import CacheConfig, FeatureCache, open_caches
from fastflow.estimator.metrics import calibrate_threshold
from fastflow.estimator.model_file import load_model, save_model
from fastflow.estimator.training import TrainConfig, extract_features, fit_flows
from fastflow.model.backbones import RANDOM_WEIGHTS
from fastflow.model.config import FastFlowConfig, Recipe, get_config, get_recipe
from fastflow.model.fastflow import FastFlowModel
from fastflow.model.inference import InferenceGraph

__all__ = ["FastFlow", "Prediction", "as_samples"]

ImagesLike = str | Path | Sequence[str | Path | Sample]

# The anomaly map is -p(z) in [-1, 0): with no held-out images to measure a typical normal
# value (``from_model``), heat maps start from its lowest value.
_MAP_MINIMUM = -1.0
# The map floor is the median of the held-out maps taken every 8th pixel down and across: 1/64
# of the pixels keeps memory flat in the held-out count (full maps of 300 images at 256x256
# are 80 MB, twice while concatenated), and the maps come from features at a stride of 4 px or
# more (then blurred), so neighbouring pixels add little to a median.
_MAP_FLOOR_STRIDE = 8


@dataclass
class Prediction:
    """Scores for a batch of images: ``scores`` (N,), ``maps`` (N, H, W), ``labels`` (N,) 1 = anomalous."""

    scores: np.ndarray
    maps: np.ndarray
    labels: np.ndarray


def as_samples(images: ImagesLike, split: str = "test") -> list[Sample]:
    """Turn a dataset folder, an image path, or a list of paths/samples into samples."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        if path.is_file():
            return [Sample(path, 0)]
        return load_samples(path, split)
    return [item if isinstance(item, Sample) else Sample(Path(item), 0) for item in images]


class FastFlow:
    """FastFlow anomaly detector.

    Args:
        backbone: a preset name (``list_presets()``), any timm CNN, or a whole ``FastFlowConfig``.
        recipe: ``"improved"`` (default), ``"reference"`` (the paper's loss and scoring) or a
            ``Recipe``; it decides the loss and how latents become maps and scores, and is
            saved with the model.
        weights: backbone weights: ``None`` for timm's hub (or, when refitting, the backbone the
            detector already holds), a local file, or ``"random"`` (tests).
        training: optimisation settings (epochs, batch size, lr, patience, seed).
        holdout_fraction: share of normal training images held out for model selection and
            threshold calibration, in (0, 1).
        threshold_quantile: deployment threshold = this quantile of held-out normal scores, in (0, 1].
        inference_batch_size: images per engine call when scoring.
        cache: where training keeps backbone features (RAM up to a budget, else disk; ``CacheConfig``).
        **overrides: architecture fields of ``FastFlowConfig`` (``input_size``, ``layers``, ...).

    Example:
        >>> detector = FastFlow("tf_efficientnet_lite0", weights="lite0.safetensors").fit("bottle")
        >>> detector.predict(["bottle/test/broken_large/000.png"])
    """

    def __init__(
        self,
        backbone: str | FastFlowConfig = "resnet18",
        *,
        recipe: str | Recipe = "improved",
        weights: str | Path | None = None,
        training: TrainConfig | None = None,
        holdout_fraction: float = 0.1,
        threshold_quantile: float = 0.99,
        inference_batch_size: int = 32,
        cache: CacheConfig | None = None,
        **overrides: Any,
    ) -> None:
        # Checked here, not in fit: a bad option must stop a run before any image is read.
        check_holdout_fraction(holdout_fraction)
        require(
            is_real(threshold_quantile) and 0 < threshold_quantile <= 1,
            "threshold_quantile",
            "in (0, 1]",
            threshold_quantile,
        )
        require(
            is_integer(inference_batch_size) and inference_batch_size >= 1,
            "inference_batch_size",
            "an integer >= 1",
            inference_batch_size,
        )
        self.backbone = backbone
        self.recipe = get_recipe(recipe)
        self.weights = weights
        self.training = training or TrainConfig()
        self.holdout_fraction = holdout_fraction
        self.threshold_quantile = threshold_quantile
        self.inference_batch_size = inference_batch_size
        self.cache = cache or CacheConfig()
        self.overrides = overrides
        self.config = self._config()
        self._graphs: dict[tuple[bool, bool], InferenceGraph] = {}
        self._engines: dict[tuple[str, str], Engine] = {}

    def _config(self) -> FastFlowConfig:
        """The architecture to build: the given config, or the backbone's preset with the recipe's
        context options (``Recipe.architecture``); the overrides on top of either."""
        given = {k: v for k, v in self.overrides.items() if v is not None}
        if isinstance(self.backbone, FastFlowConfig):
            config = dataclasses.replace(self.backbone, **given)
        else:
            config = get_config(self.backbone, **{**self.recipe.architecture, **given})
        self.recipe.check_fits(config.input_size)
        return config

    @classmethod
    def from_model(
        cls,
        model: FastFlowModel,
        threshold: float,
        recipe: str | Recipe = "improved",
        map_floor: float | None = None,
        **params: Any,
    ) -> FastFlow:
        """A fitted detector around a trained ``model`` (e.g. from ``fastflow.estimator.anomalib_import``).

        Args:
            model: the trained model; its config becomes the detector's.
            threshold: deployment threshold on the image score.
            recipe: how the model's latents are scored.
            map_floor: typical normal map value, the dark end of heat maps (default: the map's minimum).
            **params: other constructor arguments (``training``, ``threshold_quantile``, ...).
        """
        detector = cls(model.config, recipe=recipe, **params)
        detector._set_fitted(
            model.eval(), float(threshold), _MAP_MINIMUM if map_floor is None else float(map_floor)
        )
        detector.holdout_scores_ = np.array([], dtype=np.float64)
        detector.best_epoch_, detector.history_ = 0, []
        return detector

    def _set_fitted(self, model: FastFlowModel, threshold: float, map_floor: float) -> None:
        self.model_, self.threshold_, self.map_floor_ = model, threshold, map_floor
        self._graphs, self._engines = {}, {}

    # ------------------------------------------------------------------ fitting
    def fit(self, X: ImagesLike, y: Any = None, checkpoint: str | Path | None = None) -> FastFlow:
        """Train on the normal images of ``X`` (a dataset folder or a list of image paths).

        Args:
            X: training images; anomalous samples (label 1) are ignored.
            y: unused, for scikit-learn compatibility.
            checkpoint: optional path of a resumable checkpoint, rewritten after every epoch; if
                it exists, training resumes from it.

        The backbone pass and the flows' training run on ``training.device`` (a GPU where there is
        one, by default); the held-out images are scored on the CPU, where the fitted model comes
        back and where saving, exporting and scoring run.
        Under ``torchrun`` (``fastflow.estimator.distributed``) every process calls ``fit`` alike: each
        extracts the features of its share of the images, the flows train data-parallel, and
        every process ends with the same model and threshold; only rank 0 writes the checkpoint.

        Each image is decoded once, by the feature pass (under ``torchrun``, by the process whose
        share it is): a file that cannot be decoded stops ``fit`` with its one-line ``DataError``
        before the first checkpoint is written; under ``torchrun`` every process raises it, once
        each has been through its share.
        """
        del y
        device = resolve_device(self.training.device)
        distributed.setup(device)
        samples = [s for s in as_samples(X, "train") if s.label == 0]
        train_samples, holdout_samples = split_holdout(samples, self.holdout_fraction, self.training.seed)
        torch.manual_seed(self.training.seed)
        resume = Path(checkpoint) if checkpoint is not None and Path(checkpoint).exists() else None
        state = None
        if resume is not None:
            model, state = load_checkpoint(resume, self.config, self.recipe)
        else:
            model = self._new_model()
        model.to(device)
        counts = {"train": len(train_samples), "holdout": len(holdout_samples)}
        if self.recipe.pixel_noise > 0:
            counts["noisy"] = len(train_samples)
        with open_caches(self.cache, model.feature_shapes, counts) as caches:
            noisy = caches.get("noisy")
            failure: DataError | None = None
            try:
                extract_features(
                    model,
                    self._shard_pixels(train_samples),
                    caches["train"],
                    noisy,
                    self.recipe.pixel_noise,
                    self.training.seed,
                    "train features",
                    self.recipe.pixel_jpeg,
                    self.recipe.pixel_jpeg_share,
                )
                extract_features(
                    model, self._shard_pixels(holdout_samples), caches["holdout"], desc="held-out features"
                )
            except DataError as error:  # a bad file of this process's share
                failure = error
            _raise_any_failure(failure)
            caches.log_placement()
            for cache in caches.values():
                cache.synchronise()
            on_epoch_end = None
            if checkpoint is not None and distributed.is_main():
                on_epoch_end = lambda s: save_checkpoint(
                    Path(checkpoint), model, s, self.training, self.recipe
                )
            state = fit_flows(
                model,
                caches["train"],
                caches["holdout"],
                self.training,
                self.recipe.exact_nll,
                self.recipe.feature_noise,
                noisy,
                state,
                on_epoch_end,
            )
            # Scored on the CPU, where the fitted model lives and every engine scores it.
            holdout_scores, map_sample = self._score_features(model.cpu().fold(), caches["holdout"])
        # Typical normal pixel value: the dark end of heat-map pictures.
        self._set_fitted(
            model, calibrate_threshold(holdout_scores, self.threshold_quantile), float(np.median(map_sample))
        )
        self.holdout_scores_ = holdout_scores
        self.history_ = state.history
        self.best_epoch_ = state.best_epoch
        return self

    def _new_model(self) -> FastFlowModel:
        """A fresh model; a refit without ``weights`` keeps the backbone the detector already holds."""
        fitted = getattr(self, "model_", None)
        same_backbone = fitted is not None and all(
            getattr(fitted.config, k) == getattr(self.config, k) for k in ("backbone", "layers", "input_size")
        )
        if self.weights is None and same_backbone:
            model = FastFlowModel(self.config, RANDOM_WEIGHTS)
            model.backbone.load_state_dict(fitted.backbone.state_dict())
            return model
        return FastFlowModel(self.config, self.weights)

    def _shard_pixels(self, samples: list[Sample]) -> Iterator[tuple[list[int], Tensor]]:
        """(positions in ``samples``, uint8 pixels) batches of this process's share of ``samples``:
        every ``world_size``-th image from its rank on (all of them in a single process)."""
        positions = list(range(distributed.rank(), len(samples), distributed.world_size()))
        done = 0
        for batch in image_loader(
            [samples[i] for i in positions], self.config.input_size, self.training.batch_size
        ):
            count = len(batch["image"])
            yield positions[done : done + count], batch["image"]
            done += count

    def _score_features(self, folded: FastFlowModel, features: FeatureCache) -> tuple[np.ndarray, np.ndarray]:
        """Scores of cached raw backbone features, with the recipe's scorer, and their maps'
        pixels every ``_MAP_FLOOR_STRIDE``-th row and column (a sample for the map floor)."""
        scores, map_samples = [], []
        step = self.training.batch_size
        with torch.no_grad():
            for start in range(0, len(features), step):
                zs, _ = folded.flow(features.slice(start, start + step))
                amap, score = self.recipe.score_latents(zs, self.config.input_size)
                scores.append(score.numpy())
                map_samples.append(amap[:, ::_MAP_FLOOR_STRIDE, ::_MAP_FLOOR_STRIDE].flatten().numpy())
        return np.concatenate(scores), np.concatenate(map_samples)

    # ------------------------------------------------------------------ inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise FastFlowError(
                "this FastFlow detector is not fitted; call fit(...) or FastFlow.load(path) first"
            )

    def inference_graph(self, engine: str = "torch", precision: str = "f32") -> InferenceGraph:
        """The module every engine runs: raw pixels -> (anomaly_map, score, label); see ``fastflow.estimator.export``.

        Built (flows folded) from the fitted model and ``threshold_`` when first needed, and
        again after either changes. The flows are folded in the form that runs fastest in
        ``engine`` at ``precision`` (``_fold_form``); every form computes the same function.
        """
        self._check_fitted()
        if any(graph.threshold_value != self.threshold_ for graph in self._graphs.values()):
            self._graphs, self._engines = {}, {}  # built for another threshold: every graph and engine
        in_place, conv_permutation = form = _fold_form(engine, precision)
        if form not in self._graphs:
            self._graphs[form] = InferenceGraph(
                self.model_.fold(in_place, conv_permutation), self.recipe, self.threshold_
            )
        return self._graphs[form]

    def engine(self, name: str = "torch", precision: str = "f32") -> Engine:
        """An inference engine for this detector: ``"torch"`` (the graph in PyTorch), or ``"onnx"`` /
        ``"openvino"`` (the graph exported to a temporary folder and loaded; needs the ``export`` extra).

        ``precision="bf16"`` (torch autocast, OpenVINO hint) trades exactness for speed.
        """
        check_engine(name)  # before the fitted check: an unknown engine is named even on an unfitted detector
        graph = self.inference_graph(name, precision)
        key = (name, precision)
        if key not in self._engines:
            self._engines[key] = (
                TorchEngine(graph, precision) if name == "torch" else export_engine(graph, name, precision)
            )
        return self._engines[key]

    def export(self, directory: str | Path, format: str = "onnx", precision: str | None = None) -> Path:
        """Export the inference graph (``fastflow.estimator.export``) with this detector's threshold and map floor.

        ``precision`` (recorded in ``model.json``, used when the export is loaded) defaults to the
        format's fastest that kept the scores (``fastflow.estimator.export.EXPORT_PRECISIONS``): bf16 for
        OpenVINO, f32 for ONNX.
        """
        extra = {"threshold": float(self.threshold_), "map_floor": float(self.map_floor_)}
        if format not in EXPORT_PRECISIONS:
            raise FastFlowError(f"unknown export format '{format}'; use onnx or openvino")
        precision = precision or EXPORT_PRECISIONS[format]
        if format == "onnx":
            if precision != "f32":
                raise FastFlowError("ONNX exports run in f32; use --format openvino for --precision bf16")
            return to_onnx(self.inference_graph("onnx"), directory, extra)
        return to_openvino(self.inference_graph(format, precision), directory, precision, extra)

    def image_batches(self, X: ImagesLike) -> Iterator[tuple[list[Sample], dict[str, Any]]]:
        """(samples, batch) per batch of ``X``: decoded uint8 images of one size, masks at the model's size."""
        samples = as_samples(X)
        done = 0
        for batch in image_loader(samples, self.config.input_size, self.inference_batch_size):
            count = len(batch["path"])
            yield samples[done : done + count], batch
            done += count

    def iter_predictions(
        self, X: ImagesLike, engine: str = "torch", precision: str = "f32"
    ) -> Iterator[tuple[list[Sample], Prediction, dict[str, Tensor]]]:
        """Score ``X`` batch by batch: (samples, prediction, batch dict with pixels and masks) per batch.

        Every engine runs the same ``inference_graph()`` on the decoded pixels (resize and
        normalisation included). Streaming keeps memory flat on large folders; ``predict`` and
        friends collect it.
        """
        run = self.engine(engine, precision)
        for samples, batch in self.image_batches(X):
            amap, scores, labels = run(batch["image"])
            yield samples, Prediction(scores, amap, labels.astype(np.int64)), batch

    def score(self, X: ImagesLike, engine: str = "torch", precision: str = "f32") -> Prediction:
        """Scores, anomaly maps and labels of every image in ``X`` (see ``engine`` for the options)."""
        parts = [prediction for _, prediction, _ in self.iter_predictions(X, engine, precision)]
        return Prediction(
            *(np.concatenate([getattr(p, name) for p in parts]) for name in ("scores", "maps", "labels"))
        )

    def decision_function(self, X: ImagesLike) -> np.ndarray:
        """Image anomaly scores (N,), higher = more anomalous."""
        return self.score(X).scores

    def anomaly_map(self, X: ImagesLike) -> np.ndarray:
        """Pixel anomaly maps (N, H, W) at the model's input size."""
        return self.score(X).maps

    def predict(self, X: ImagesLike) -> np.ndarray:
        """Labels (N,): 1 where the score exceeds the calibrated threshold ``threshold_``."""
        return self.score(X).labels

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one safetensors file (weights, config, recipe, threshold), atomically."""
        self._check_fitted()
        extra = {
            "recipe": self.recipe.to_dict(),
            "threshold": self.threshold_,
            "threshold_quantile": self.threshold_quantile,
            "holdout_fraction": self.holdout_fraction,
            "holdout_scores": [float(s) for s in self.holdout_scores_],
            "map_floor": self.map_floor_,
            "best_epoch": self.best_epoch_,
            "history": self.history_,
            "training": asdict(self.training),
        }
        return save_model(path, self.model_, extra)

    @classmethod
    def load(cls, path: str | Path) -> FastFlow:
        """Load a detector saved by ``save`` (or a RUN folder of ``fastflow train``); works offline.

        The detector gets the saved config, recipe and training settings, so ``fit`` on it
        retrains the same model (with the backbone weights it holds).
        """
        model, extra = load_model(path)
        if "threshold" not in extra:
            raise FastFlowError(
                f"{path} holds no calibrated threshold (a training checkpoint?); pass the final model.safetensors"
            )
        saved = {k: extra[k] for k in ("threshold_quantile", "holdout_fraction") if k in extra}
        detector = cls.from_model(
            model,
            extra["threshold"],
            Recipe.from_dict(extra["recipe"]),
            extra.get("map_floor"),
            training=TrainConfig(**extra.get("training", {})),
            **saved,
        )
        detector.holdout_scores_ = np.asarray(extra.get("holdout_scores", []), dtype=np.float64)
        detector.best_epoch_ = extra.get("best_epoch", 0)
        detector.history_ = extra.get("history", [])
        return detector


def _raise_any_failure(failure: DataError | None) -> None:
    """Raise ``failure``, or under ``torchrun`` the failure of the first process that had one, in
    every process alike: each decoded only its share of the images, so the others must learn of
    a bad file before they wait for the failed one in a collective that never comes."""
    failures = [f for f in distributed.all_gather(None if failure is None else str(failure)) if f]
    if not failures:
        return
    if failure is not None and str(failure) == failures[0]:
        raise failure
    raise DataError(failures[0])


def _fold_form(engine: str, precision: str) -> tuple[bool, bool]:
    """(``in_place``, ``conv_permutation``) of ``FastFlowModel.fold`` for ``engine`` at ``precision``.

    In place (small flows): only OpenVINO bf16 gains (AMX makes the doubled multiply-adds cheap);
    PyTorch, ONNX Runtime and OpenVINO f32 ran Lite0 5-20 % slower in place (against anomalib's
    OpenVINO f32 in two runs of ``benchmarks/inference.py``). Permutations by 1x1 convolutions:
    OpenVINO gains in both precisions (ResNet-18 at 256, batch 16: 1.11x bf16, 1.09x f32; Lite0
    f32 1.09x), while PyTorch and ONNX Runtime ran ResNet-18 9-12 % slower than with gathers
    (one-off A/B in one process, 2-core Intel Xeon with AMX; README).
    """
    check_engine(engine)
    check_precision(precision)
    return engine == "openvino" and precision == "bf16", engine == "openvino"

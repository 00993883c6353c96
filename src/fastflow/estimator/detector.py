"""The ``FastFlow`` estimator: a scikit-learn estimator with PyOD's detector methods (``fit``,
``decision_function``, ``predict``), plus ``anomaly_map``, ``detect`` (all three at once),
``save`` and ``load``.

Scores mean "higher = more anomalous"; labels use 1 = anomalous. Everything the estimator
learns is fitted on normal images only: the flows on the training split, the model selection
and the deployment threshold on the held-out split. The threshold is split-conformal
(``fastflow.estimator.calibration``): for the target ``false_alarm_rate`` it guarantees how
often a new normal image is flagged, and every prediction carries its conformal p-value;
``calibrate`` sets both from other normal images than the held-out ones.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import Tensor

from fastflow.core.errors import FastFlowError, is_integer, is_real, require
from fastflow.core.hardware import resolve_device
from fastflow.estimator import distributed
from fastflow.estimator.calibration import Calibration, check_false_alarm_rate
from fastflow.estimator.checkpoint import load_checkpoint, save_checkpoint
from fastflow.estimator.data import (
    DataError,
    Sample,
    Split,
    check_holdout_fraction,
    image_loader,
    image_size,
    list_images,
    load_samples,
    split_holdout,
)
from fastflow.estimator.engines import Engine, TorchEngine, check_engine, check_precision
from fastflow.estimator.export import EXPORT_PRECISIONS, export_engine, to_onnx, to_openvino
from fastflow.estimator.feature_cache import CacheConfig, FeatureCache, open_caches
from fastflow.estimator.model_file import load_model, save_model
from fastflow.estimator.training import TrainConfig, extract_features, fit_flows, resolve_budget
from fastflow.model.backbones import DEFAULT_BACKBONE, RANDOM_WEIGHTS, is_transformer
from fastflow.model.config import (
    FastFlowConfig,
    Recipe,
    get_config,
    get_recipe,
    input_size_for,
    median_aspect,
)
from fastflow.model.fastflow import FastFlowModel
from fastflow.model.inference import InferenceGraph

__all__ = ["FastFlow", "Prediction", "as_samples"]

ImagesLike = str | Path | Sequence[str | Path | Sample]

_log = logging.getLogger(__name__)

# The anomaly map is -p(z) in [-1, 0): with no held-out images to measure a typical normal
# value (``from_model``), heat maps start from its lowest value.
_MAP_MINIMUM = -1.0
# The map floor is the median of the held-out maps taken every 8th pixel down and across: 1/64
# of the pixels keeps memory flat in the held-out count (full maps of 300 images at 256x256
# are 80 MB, twice while concatenated), and the maps come from features at a stride of 4 px or
# more (then blurred), so neighbouring pixels add little to a median.
_MAP_FLOOR_STRIDE = 8
# What ``architecture`` may set: every ``FastFlowConfig`` field but the backbone (a parameter of its own).
_ARCHITECTURE_FIELDS = frozenset(f.name for f in dataclasses.fields(FastFlowConfig)) - {"backbone"}


@dataclass
class Prediction:
    """Scores for a batch of images: ``scores`` (N,), ``maps`` (N, H, W), ``labels`` (N,) 1 = anomalous,
    and ``p_values`` (N,): each score's conformal p-value against the calibration scores (NaN
    where the detector holds none, e.g. from ``from_model``)."""

    scores: np.ndarray
    maps: np.ndarray
    labels: np.ndarray
    p_values: np.ndarray


def as_samples(images: ImagesLike, split: Split = "test") -> list[Sample]:
    """Turn a dataset folder, an image path, or a list of paths/samples into samples."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        if path.is_file():
            return [Sample(path, 0)]
        return load_samples(path, split)
    return [item if isinstance(item, Sample) else Sample(Path(item), 0) for item in images]


class FastFlow(BaseEstimator):
    """FastFlow anomaly detector, with scikit-learn's and PyOD's conventions.

    The constructor only stores its parameters (``get_params`` / ``set_params`` / ``clone``
    work); ``fit`` checks them, before any image is read, and derives what it builds from them.
    Scores mean "higher = more anomalous" and labels use 1 = anomalous (PyOD).

    Args:
        backbone: a preset name (``list_presets()``), any timm CNN, or a whole ``FastFlowConfig``;
            the default, EfficientNet-Lite0, trains with no hub and no weights file where the
            ``lite0`` extra is installed.
        recipe: ``"improved"`` (the default), ``"reference"`` (the
            paper's loss and scoring) or a ``Recipe``; it decides the loss and how latents
            become maps and scores, and is saved with the model.
        weights: backbone weights: ``None`` for those an installed package ships (Lite0: the
            ``lite0`` extra's), else timm's hub (or, when refitting, the backbone the detector
            already holds); a local file; or ``"random"`` (tests).
        training: optimisation settings (epochs, batch size, lr, patience, seed); ``None``:
            ``TrainConfig()``.
        holdout_fraction: share of normal training images held out for model selection and
            threshold calibration, in (0, 1).
        false_alarm_rate: the target share of normal images flagged, in (0, 1): the threshold is
            the split-conformal one for it (``fastflow.estimator.calibration``), which guarantees
            it on average where the calibration images are enough (n + 1 >= 1 / rate).
        inference_batch_size: images per engine call when scoring.
        cache: where training keeps backbone features (RAM up to a budget, else disk;
            ``CacheConfig``; ``None`` too means ``CacheConfig()``).
        architecture: fields of ``FastFlowConfig`` that replace the backbone's preset's and
            the recipe's context options (or, for a given config, its own), e.g.
            ``{"input_size": (256, 320), "flow_steps": 4}``; a ``None`` value replaces nothing.
            Without an ``input_size``, a CNN named by ``backbone`` and a recipe with
            ``input_size_from_data`` (the improved one), ``fit`` gives the model the training
            images' median aspect ratio at the preset's pixel count (``input_size_for``; see
            ``config_for``).
        **overrides: deprecated, the same fields as keywords (``input_size=...``); they are
            folded into ``architecture`` with a ``DeprecationWarning``. Deprecated too:
            ``threshold_quantile=q``, folded into ``false_alarm_rate=1 - q``.

    Attributes (after ``fit`` or ``load``):
        model_: the trained ``FastFlowModel``.
        config_: its architecture (``FastFlowConfig``); ``config`` reads it.
        recipe_: the ``Recipe`` it was trained with and is scored with.
        threshold_: deployment threshold on the image score.
        calibration_: the ``Calibration`` it came from: sorted normal scores (the held-out
            images', or those ``calibrate`` scored), the rate, their source; p-values use it.
        decision_scores_: ndarray of shape (n_holdout,), the held-out normal images' scores
            (``holdout_scores_`` is an alias).
        labels_: ndarray of shape (n_holdout,), their labels (1 = above ``threshold_``).
        map_floor_: typical normal map value, the dark end of heat maps.
        best_epoch_, history_: the selected epoch and the per-epoch losses.

    Example:
        >>> detector = FastFlow("tf_efficientnet_lite0", weights="lite0.safetensors").fit("bottle")
        >>> detector.predict(["bottle/test/broken_large/000.png"])
    """

    def __init__(
        self,
        backbone: str | FastFlowConfig = DEFAULT_BACKBONE,
        *,
        recipe: str | Recipe = "improved",
        weights: str | Path | None = None,
        training: TrainConfig | None = None,
        holdout_fraction: float = 0.1,
        false_alarm_rate: float = 0.01,
        inference_batch_size: int = 32,
        cache: CacheConfig | None = None,
        architecture: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        if "threshold_quantile" in overrides:
            quantile = overrides.pop("threshold_quantile")
            warnings.warn(
                "FastFlow(threshold_quantile=q) is deprecated and will be removed in the next release; "
                "pass false_alarm_rate=1 - q (the threshold is now the split-conformal one for that rate)",
                DeprecationWarning,
                stacklevel=2,
            )
            # A bad quantile is kept as given, for ``fit`` to reject.
            false_alarm_rate = round(1.0 - quantile, 12) if is_real(quantile) else quantile
        if overrides:
            warnings.warn(
                f"FastFlow({', '.join(f'{k}=...' for k in overrides)}) is deprecated and will be removed "
                "in the next release; pass architecture={...} instead",
                DeprecationWarning,
                stacklevel=2,
            )
            # A bad ``architecture`` is kept as given, for ``fit`` to reject.
            if architecture is None or isinstance(architecture, Mapping):
                architecture = {**(architecture or {}), **overrides}
        self.backbone = backbone
        self.recipe = recipe
        self.weights = weights
        self.training = training
        self.holdout_fraction = holdout_fraction
        self.false_alarm_rate = false_alarm_rate
        self.inference_batch_size = inference_batch_size
        self.cache = cache
        self.architecture = architecture

    # ------------------------------------------------------------------ parameters
    def _resolve(self) -> tuple[FastFlowConfig, Recipe, TrainConfig, CacheConfig]:
        """Check every parameter and derive what ``fit`` builds from: (config, recipe, training,
        cache). Reads no image; the first bad parameter raises its one-line ``FastFlowError``."""
        check_holdout_fraction(self.holdout_fraction)
        check_false_alarm_rate(self.false_alarm_rate, "false_alarm_rate (--false-alarm-rate)")
        require(
            is_integer(self.inference_batch_size) and self.inference_batch_size >= 1,
            "inference_batch_size",
            "an integer >= 1",
            self.inference_batch_size,
        )
        training = self._training()
        require(isinstance(training, TrainConfig), "training", "a TrainConfig or None", self.training)
        cache = CacheConfig() if self.cache is None else self.cache
        require(isinstance(cache, CacheConfig), "cache", "a CacheConfig or None", self.cache)
        require(isinstance(self.recipe, (str, Recipe)), "recipe", "a recipe name or a Recipe", self.recipe)
        recipe = get_recipe(self.recipe)
        return self._config(recipe), recipe, training, cache

    def _training(self) -> TrainConfig:
        return TrainConfig() if self.training is None else self.training

    def _config(self, recipe: Recipe) -> FastFlowConfig:
        """The architecture to build: the given config, or the backbone's preset with the recipe's
        context options (``Recipe.architecture``); ``architecture`` on top of either."""
        architecture = {} if self.architecture is None else self.architecture
        require(
            isinstance(architecture, Mapping) and set(architecture) <= _ARCHITECTURE_FIELDS,
            "architecture",
            f"None or a dict of FastFlowConfig fields ({', '.join(sorted(_ARCHITECTURE_FIELDS))})",
            self.architecture,
        )
        given = {k: v for k, v in architecture.items() if v is not None}
        if isinstance(self.backbone, FastFlowConfig):
            config = dataclasses.replace(self.backbone, **given)
        else:
            require(
                isinstance(self.backbone, str),
                "backbone",
                "a preset or timm model name, or a FastFlowConfig",
                self.backbone,
            )
            tiled_at_image_size = given.get("tile") and "input_size" not in given
            # Tiles without an input size: fit works at the images' own size (``_shaped_to``);
            # until then the input is one tile, which every tile check accepts.
            provisional = {"input_size": (given["tile"], given["tile"])} if tiled_at_image_size else {}
            config = get_config(self.backbone, **{**recipe.architecture, **given, **provisional})
        recipe.check_fits(config.input_size)
        return config

    @property
    def config(self) -> FastFlowConfig:
        """The architecture: the fitted model's (``config_``) once fitted, else the one the
        parameters give (which this checks: a bad one raises ``FastFlowError``). Before ``fit``
        its input size is the preset's unless given, as no image has been seen: ``fit`` may shape
        it to the training images (``config_for`` says how for given images)."""
        if hasattr(self, "config_"):
            return self.config_
        return self._resolve()[0]

    def config_for(self, X: ImagesLike) -> FastFlowConfig:
        """The architecture ``fit(X)`` would build (e.g. for a reference model that must see the
        images as the detector does): ``config``, with the input size shaped to ``X``'s normal
        images where ``fit`` would shape it. Reads the images' headers only."""
        config, recipe, training, _ = self._resolve()
        samples = _normal_samples(X)
        split_holdout(samples, self.holdout_fraction, training.seed)  # fit's checks of the images
        return self._shaped_to(config, recipe, samples)[0]

    def _shaped_to(
        self, config: FastFlowConfig, recipe: Recipe, samples: list[Sample]
    ) -> tuple[FastFlowConfig, str | None]:
        """``config`` with the input size of ``samples``' median aspect ratio, when the user gave no
        input size, the backbone is a CNN by name (a given ``FastFlowConfig`` is used as it is; a
        transformer's size is its patch grid's) and either the model is tiled (then at the images'
        own median pixel count, so the tiles see the images at their resolution, each side at
        least one tile) or the recipe asks for it (``Recipe.input_size_from_data``; then at the
        preset's pixel count), with a line saying which size and why; else ``config`` and
        ``None``. Sizes come from the file headers: the pixels are still decoded once, by the
        feature pass; a file without a readable header raises its ``DataError`` here."""
        given = (self.architecture or {}).get("input_size")
        if not (
            (recipe.input_size_from_data or config.tile)
            and isinstance(self.backbone, str)
            and given is None
            and not is_transformer(config.backbone)
        ):
            return config, None
        sizes = [(height, width) for width, height in (image_size(s.path) for s in samples)]
        if config.tile:
            pixels, budget = int(np.median([h * w for h, w in sizes])), "the images' own median"
            height, width = input_size_for(sizes, pixels)
            input_size = (max(height, config.tile), max(width, config.tile))
        else:
            pixels, budget = config.input_size[0] * config.input_size[1], "the preset's"
            input_size = input_size_for(sizes, pixels)
        shaped = dataclasses.replace(config, input_size=input_size)
        recipe.check_fits(shaped.input_size)
        note = (
            f"input {input_size[0]}x{input_size[1]}: the training images' median aspect "
            f"(height/width) {median_aspect(sizes):.2f} at {budget} {pixels:,} pixels; "
            "input_size (--input-size) overrides"
        )
        return shaped, note

    @property
    def holdout_scores_(self) -> np.ndarray:
        """Alias of ``decision_scores_`` (the held-out normal images' scores), its former name."""
        return self.decision_scores_

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
            **params: other constructor arguments (``training``, ``false_alarm_rate``, ...).

        It holds no calibration scores, so its p-values are NaN until ``calibrate(images)``.
        """
        detector = cls(model.config, recipe=recipe, **params)
        _, fitted_recipe, _, _ = detector._resolve()  # the checks fit makes
        detector._set_fitted(
            model.eval(), fitted_recipe, _MAP_MINIMUM if map_floor is None else float(map_floor)
        )
        detector._set_calibration(
            Calibration.of([], None, "a threshold given to FastFlow.from_model, without calibration scores"),
            threshold,
        )
        detector._set_decision_scores(np.array([], dtype=np.float64))
        detector.best_epoch_, detector.history_ = 0, []
        return detector

    def _set_fitted(self, model: FastFlowModel, recipe: Recipe, map_floor: float) -> None:
        self.model_, self.config_, self.recipe_ = model, model.config, recipe
        self.map_floor_ = map_floor
        self._graphs: dict[tuple[bool, bool], InferenceGraph] = {}
        self._engines: dict[tuple[str, str], Engine] = {}

    def _set_calibration(self, calibration: Calibration, threshold: float | None = None) -> None:
        """Keep ``calibration`` and set the threshold: ``threshold`` as given (a saved or imported
        one), else the conformal one for the calibration's rate, with one warning line (by the
        first process alone) where its scores are too few to guarantee that rate."""
        self.calibration_ = calibration
        self.threshold_ = calibration.threshold() if threshold is None else float(threshold)
        if hasattr(self, "decision_scores_"):
            self._set_decision_scores(self.decision_scores_)  # their labels follow the threshold
        message = calibration.too_few() if threshold is None else None
        if message is not None and distributed.is_main():
            _log.warning(message)

    def _set_decision_scores(self, scores: np.ndarray) -> None:
        """PyOD's fitted scores and labels, of the held-out normal images here."""
        self.decision_scores_ = scores
        self.labels_ = (scores > self.threshold_).astype(np.int64)

    # ------------------------------------------------------------------ fitting
    def fit(self, X: ImagesLike, y: Any = None, checkpoint: str | Path | None = None) -> FastFlow:
        """Train on the normal images of ``X`` (a dataset folder or a list of image paths).

        Args:
            X: training images; anomalous samples (label 1) are ignored.
            y: unused, for scikit-learn compatibility.
            checkpoint: optional path of a resumable checkpoint, rewritten after every epoch; if
                it exists, training resumes from it.

        Every parameter is checked first, before any image is read. Where the input size follows
        the training images (``config_for``: no ``input_size`` given, a CNN by name, the improved
        recipe) their headers are read next, and one info line says the size chosen; ``config_``
        holds it, and the saved model with it. The backbone pass and the
        flows' training run on ``training.device`` (a GPU where there is one, by default); the
        held-out images are scored on the CPU, where the fitted model comes back and where
        saving, exporting and scoring run.
        Under ``torchrun`` (``fastflow.estimator.distributed``) every process calls ``fit`` alike: each
        extracts the features of its share of the images, the flows train data-parallel, and
        every process ends with the same model and threshold; only rank 0 writes the checkpoint.

        Each image is decoded once, by the feature pass (under ``torchrun``, by the process whose
        share it is): a file that cannot be decoded stops ``fit`` with its one-line ``DataError``
        before the first checkpoint is written; under ``torchrun`` every process raises it, once
        each has been through its share.
        """
        del y
        config, recipe, training, cache = self._resolve()
        device = resolve_device(training.device)
        distributed.setup(device)
        samples = _normal_samples(X)
        train_samples, holdout_samples = split_holdout(samples, self.holdout_fraction, training.seed)
        training = resolve_budget(training, recipe, len(train_samples))
        batch_size = training.batch_size
        assert batch_size is not None  # filled in by resolve_budget
        config, note = self._shaped_to(config, recipe, samples)
        if note is not None:
            _log.info("%s", note)
        torch.manual_seed(training.seed)
        resume = Path(checkpoint) if checkpoint is not None and Path(checkpoint).exists() else None
        state = None
        if resume is not None:
            model, state = load_checkpoint(resume, config, recipe)
        else:
            model = self._new_model(config)
        model.to(device)
        counts = {"train": len(train_samples), "holdout": len(holdout_samples)}
        if recipe.pixel_noise > 0:
            counts["noisy"] = len(train_samples)
        with open_caches(cache, model.feature_shapes, counts) as caches:
            noisy = caches.get("noisy")
            failure: DataError | None = None
            try:
                extract_features(
                    model,
                    self._shard_pixels(train_samples, config.input_size, batch_size),
                    caches["train"],
                    noisy,
                    recipe.pixel_noise,
                    training.seed,
                    "train features",
                    recipe.pixel_jpeg,
                    recipe.pixel_jpeg_share,
                )
                extract_features(
                    model,
                    self._shard_pixels(holdout_samples, config.input_size, batch_size),
                    caches["holdout"],
                    desc="held-out features",
                )
            except DataError as error:  # a bad file of this process's share
                failure = error
            _raise_any_failure(failure)
            caches.log_placement()
            for feature_cache in caches.values():
                feature_cache.synchronise()
            on_epoch_end = None
            if checkpoint is not None and distributed.is_main():
                on_epoch_end = lambda s: save_checkpoint(Path(checkpoint), model, s, training, recipe)
            state = fit_flows(
                model,
                caches["train"],
                caches["holdout"],
                training,
                recipe.exact_nll,
                recipe.feature_noise,
                noisy,
                state,
                on_epoch_end,
                lr_schedule=recipe.lr_schedule,
            )
            # Scored on the CPU, where the fitted model lives and every engine scores it.
            holdout_scores, map_sample = self._score_features(
                model.cpu().fold(), caches["holdout"], recipe, batch_size
            )
        # Typical normal pixel value: the dark end of heat-map pictures.
        self._set_fitted(model, recipe, float(np.median(map_sample)))
        source = _held_out_source(len(holdout_scores))
        self._set_calibration(Calibration.of(holdout_scores, self.false_alarm_rate, source))
        self._set_decision_scores(holdout_scores)
        self.history_ = state.history
        self.best_epoch_ = state.best_epoch
        return self

    def _new_model(self, config: FastFlowConfig) -> FastFlowModel:
        """A fresh model; a refit without ``weights`` keeps the backbone the detector already holds.

        A CNN's weights are the same at any input size (a refit on images of another aspect
        ratio keeps them); a transformer's position embedding is sized to its input."""
        fitted: FastFlowModel | None = getattr(self, "model_", None)
        keys = (
            ("backbone", "layers", "input_size")
            if is_transformer(config.backbone)
            else ("backbone", "layers")
        )
        same_backbone = fitted is not None and all(
            getattr(fitted.config, k) == getattr(config, k) for k in keys
        )
        if self.weights is None and fitted is not None and same_backbone:
            model = FastFlowModel(config, RANDOM_WEIGHTS)
            model.backbone.load_state_dict(fitted.backbone.state_dict())
            return model
        return FastFlowModel(config, self.weights)

    def _shard_pixels(
        self, samples: list[Sample], input_size: tuple[int, int], batch_size: int
    ) -> Iterator[tuple[list[int], Tensor]]:
        """(positions in ``samples``, uint8 pixels) batches of this process's share of ``samples``:
        every ``world_size``-th image from its rank on (all of them in a single process)."""
        positions = list(range(distributed.rank(), len(samples), distributed.world_size()))
        done = 0
        for batch in image_loader([samples[i] for i in positions], input_size, batch_size):
            count = len(batch["image"])
            yield positions[done : done + count], batch["image"]
            done += count

    def _score_features(
        self, folded: FastFlowModel, features: FeatureCache, recipe: Recipe, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores of cached raw backbone features, with the recipe's scorer, and their maps'
        pixels every ``_MAP_FLOOR_STRIDE``-th row and column (a sample for the map floor)."""
        scores, map_samples = [], []
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                zs, _ = folded.flow(features.slice(start, start + batch_size))
                amap, score = recipe.score_latents(zs, folded.config.input_size)
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
                self.model_.fold(in_place, conv_permutation), self.recipe_, self.threshold_
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
        """Export the inference graph (``fastflow.estimator.export``) with this detector's threshold,
        map floor and calibration (``model.json``; ``load_exported(...).calibration`` gives p-values).

        ``precision`` (recorded in ``model.json``, used when the export is loaded) defaults to the
        format's fastest that kept the scores (``fastflow.estimator.export.EXPORT_PRECISIONS``): bf16 for
        OpenVINO, f32 for ONNX.
        """
        extra = {
            "threshold": float(self.threshold_),
            "map_floor": float(self.map_floor_),
            "false_alarm_rate": self.calibration_.false_alarm_rate,
            "calibration": self.calibration_.to_dict(),
        }
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
        normalisation included). Streaming keeps memory flat on large folders; ``detect`` and
        friends collect it.
        """
        run = self.engine(engine, precision)
        for samples, batch in self.image_batches(X):
            amap, scores, labels = run(batch["image"])
            p_values = self.calibration_.p_values(scores)
            yield samples, Prediction(scores, amap, labels.astype(np.int64), p_values), batch

    def detect(self, X: ImagesLike, engine: str = "torch", precision: str = "f32") -> Prediction:
        """Everything the detector finds in ``X``, from one pass: scores (N,), anomaly maps
        (N, H, W), labels (N,) and p-values (N,) (see ``engine`` for the options).

        ``decision_function``, ``anomaly_map`` and ``predict`` each return one of them.
        """
        parts = [prediction for _, prediction, _ in self.iter_predictions(X, engine, precision)]
        fields = ("scores", "maps", "labels", "p_values")
        return Prediction(*(np.concatenate([getattr(p, name) for p in parts]) for name in fields))

    def calibrate(
        self, X: ImagesLike | None = None, engine: str = "torch", precision: str = "f32"
    ) -> FastFlow:
        """Set the deployment threshold for ``false_alarm_rate`` by split-conformal calibration.

        Args:
            X: normal images the model did not train on (paths, or a folder: the images directly
                in it); their scores replace the calibration scores (the held-out images' after
                ``fit``). None: the stored calibration scores again, at the current
                ``false_alarm_rate`` (after ``set_params(false_alarm_rate=...)``).
            engine: the engine to score ``X`` with, as production will run (see ``engine``).
            precision: the precision to score ``X`` at, as production will run: bf16 moves
                scores slightly.

        A user usually has more good images than training used; more calibration images make
        smaller rates possible (n + 1 >= 1 / rate) and the realised rate steadier. Nothing
        changes unless every image decodes (the first that does not raises its ``DataError``).
        One warning line says where the images are too few for the rate. Returns ``self``.
        """
        self._check_fitted()
        rate = check_false_alarm_rate(self.false_alarm_rate, "false_alarm_rate (--false-alarm-rate)")
        if X is None:
            stored = self.calibration_
            # Without a rate, the source also says how the threshold was set (older files).
            source = stored.source if stored.false_alarm_rate is not None else _held_out_source(stored.n)
            calibration = Calibration.of(stored.scores, rate, source)
        else:
            samples = _calibration_samples(X)
            predictions = [p.scores for _, p, _ in self.iter_predictions(samples, engine, precision)]
            source = f"{len(samples)} normal images scored by calibrate ({engine}, {precision})"
            calibration = Calibration.of(np.concatenate(predictions), rate, source)
        self._set_calibration(calibration)
        return self

    def score(self, X: ImagesLike, engine: str = "torch", precision: str = "f32") -> Prediction:
        """Deprecated alias of ``detect`` (scikit-learn's ``score`` returns one number); removed
        in the next release."""
        warnings.warn(
            "FastFlow.score() is deprecated and will be removed in the next release; use "
            "FastFlow.detect() (scores, maps and labels) or decision_function() (scores)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.detect(X, engine, precision)

    def decision_function(self, X: ImagesLike) -> np.ndarray:
        """Raw image anomaly scores: ndarray of shape (N,), higher = more anomalous."""
        return self.detect(X).scores

    def anomaly_map(self, X: ImagesLike) -> np.ndarray:
        """Pixel anomaly maps: ndarray of shape (N, H, W) at the model's input size, higher = more anomalous."""
        return self.detect(X).maps

    def predict(self, X: ImagesLike) -> np.ndarray:
        """Labels: ndarray of shape (N,), 1 where the score exceeds the calibrated threshold
        ``threshold_`` (equivalently: its p-value is at most the guaranteed rate), else 0."""
        return self.detect(X).labels

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one safetensors file (weights, config, recipe, threshold,
        calibration), atomically."""
        self._check_fitted()
        extra = {
            "recipe": self.recipe_.to_dict(),
            "threshold": self.threshold_,
            "false_alarm_rate": self.false_alarm_rate,
            "calibration": self.calibration_.to_dict(),
            "holdout_fraction": self.holdout_fraction,
            "holdout_scores": [float(s) for s in self.decision_scores_],
            "map_floor": self.map_floor_,
            "best_epoch": self.best_epoch_,
            "history": self.history_,
            "training": asdict(self._training()),
        }
        return save_model(path, self.model_, extra)

    @classmethod
    def load(cls, path: str | Path) -> FastFlow:
        """Load a detector saved by ``save`` (or a RUN folder of ``fastflow train``); works offline.

        The detector gets the saved config, recipe and training settings, so ``fit`` on it
        retrains the same model (with the backbone weights it holds), and the saved threshold.
        A file of an older fastflow (threshold: a quantile of the held-out scores) keeps its
        threshold, so its labels do not change; its held-out scores become the calibration
        scores (p-values work) without a rate, and ``calibrate()`` gives it the conformal
        threshold for ``false_alarm_rate`` (default 0.01).
        """
        model, extra = load_model(path)
        if "threshold" not in extra:
            raise FastFlowError(
                f"{path} holds no calibrated threshold (a training checkpoint?); pass the final model.safetensors"
            )
        saved = {k: extra[k] for k in ("false_alarm_rate", "holdout_fraction") if k in extra}
        detector = cls.from_model(
            model,
            extra["threshold"],
            Recipe.from_dict(extra["recipe"]),
            extra.get("map_floor"),
            training=TrainConfig(**extra.get("training", {})),
            **saved,
        )
        held_out = np.asarray(extra.get("holdout_scores", []), dtype=np.float64)
        detector._set_calibration(_saved_calibration(extra, held_out), extra["threshold"])
        detector._set_decision_scores(held_out)
        detector.best_epoch_ = extra.get("best_epoch", 0)
        detector.history_ = extra.get("history", [])
        return detector


def _normal_samples(X: ImagesLike) -> list[Sample]:
    """The normal images of ``X``, which ``fit`` trains on (anomalous ones are ignored)."""
    return [s for s in as_samples(X, "train") if s.label == 0]


def _saved_calibration(extra: dict[str, Any], held_out: np.ndarray) -> Calibration:
    """A model file's calibration; in files of older versions, the held-out scores, without a
    rate: their threshold was a quantile of those scores, which guarantees no rate."""
    if "calibration" in extra:
        return Calibration.from_dict(extra["calibration"])
    quantile = extra.get("threshold_quantile", 0.99)
    return Calibration.of(
        held_out,
        None,
        f"{_held_out_source(len(held_out))}; the threshold is their {quantile:g} quantile, as an "
        "older fastflow saved it, which guarantees no false-alarm rate (calibrate the model for one)",
    )


def _held_out_source(count: int) -> str:
    return f"{count} held-out normal images"


def _calibration_samples(X: ImagesLike) -> list[Sample]:
    """Calibration images: the images directly in a folder, an image file, or a list of them."""
    if isinstance(X, (str, Path)) and Path(X).is_dir():
        samples = [Sample(path, 0) for path in list_images(Path(X))]
        if not samples:
            raise DataError(f"no images in {X}; pass a folder of normal images (PNG, JPEG, BMP, TIFF)")
        return samples
    samples = as_samples(X)
    if not samples:
        raise FastFlowError("no normal images to calibrate on; pass image paths or a folder of normal images")
    return samples


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

    In place (small flows): only OpenVINO bf16 gains (bf16 matrix units make the doubled
    multiply-adds cheap); the other engines ran slower in place. Permutations by 1x1
    convolutions: OpenVINO gains in both precisions, PyTorch and ONNX Runtime ran slower than
    with gathers (measured: docs/measurements.md#fold-forms).
    """
    check_engine(engine)
    check_precision(precision)
    return engine == "openvino" and precision == "bf16", engine == "openvino"

"""The ``FastFlow`` estimator: scikit-learn style ``fit`` / ``predict`` / ``save`` / ``load``.

Scores mean "higher = more anomalous"; labels use 1 = anomalous. Everything the estimator
learns is fitted on normal images only: the flows on the training split, the model selection
and the deployment threshold (a quantile of held-out normal scores) on the held-out split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from fastflow.data import (
    ImageDataset,
    Sample,
    load_samples,
    same_size_batches,
    split_holdout,
    validate_samples,
)
from fastflow.errors import FastFlowError
from fastflow.io import load_model, read_model_file, save_model
from fastflow.metrics import calibrate_threshold
from fastflow.model.fastflow import FastFlowModel
from fastflow.model.inference import InferenceGraph
from fastflow.presets import FastFlowConfig, get_config, get_recipe
from fastflow.train import TrainConfig, TrainState, extract_features, fit_flows

if TYPE_CHECKING:
    from fastflow.export import Engine

__all__ = ["FastFlow", "Prediction", "as_samples"]

ImagesLike = str | Path | Sequence[str | Path | Sample]


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
        backbone: a preset name (``list_presets()``) or any timm CNN.
        recipe: ``"improved"`` (default) or ``"reference"`` (the paper's scoring and loss); it
            sets the scoring fields of the model config (``overrides`` win) and the training
            fields left at ``None`` (``exact_nll``).
        weights: backbone weights: ``None`` for timm's hub, a local file, or ``"random"`` (tests).
        training: optimisation settings (epochs, batch size, lr, patience, seed).
        holdout_fraction: share of normal training images held out for model selection and
            threshold calibration.
        threshold_quantile: deployment threshold = this quantile of held-out normal scores.
        **overrides: architecture fields of ``FastFlowConfig`` (``input_size``, ``layers``, ...).

    Example:
        >>> detector = FastFlow("tf_efficientnet_lite0", weights="lite0.safetensors").fit("bottle")
        >>> detector.predict(["bottle/test/broken_large/000.png"])
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        *,
        recipe: str = "improved",
        weights: str | Path | None = None,
        training: TrainConfig | None = None,
        holdout_fraction: float = 0.1,
        threshold_quantile: float = 0.99,
        **overrides: Any,
    ) -> None:
        self.backbone = backbone
        self.recipe = recipe
        self.weights = weights
        # The recipe fills in training fields left unset (None); explicit settings win.
        training = training or TrainConfig()
        unset = {k: v for k, v in get_recipe(recipe).training.items() if getattr(training, k) is None}
        self.training = dataclasses.replace(training, **unset)
        self.holdout_fraction = holdout_fraction
        self.threshold_quantile = threshold_quantile
        self.overrides = overrides

    # ------------------------------------------------------------------ fitting
    def fit(self, X: ImagesLike, y: Any = None, checkpoint: str | Path | None = None) -> FastFlow:
        """Train on the normal images of ``X`` (a dataset folder or a list of image paths).

        Args:
            X: training images; anomalous samples (label 1) are ignored.
            y: unused, for scikit-learn compatibility.
            checkpoint: optional path of a resumable checkpoint, rewritten after every epoch; if
                it exists, training resumes from it.
        """
        del y
        samples = [s for s in as_samples(X, "train") if s.label == 0]
        validate_samples(samples)
        train_samples, holdout_samples = split_holdout(samples, self.holdout_fraction, self.training.seed)
        torch.manual_seed(self.training.seed)
        config = get_config(self.backbone, self.recipe, **self.overrides)
        resume = Path(checkpoint) if checkpoint is not None and Path(checkpoint).exists() else None
        state = None
        if resume is not None:
            self.model_, state = _load_checkpoint(resume, config)
        else:
            self.model_ = FastFlowModel(config, self.weights)
        self.config_ = self.model_.config
        train_features = extract_features(self.model_, self._loader(train_samples), "train features")
        holdout_features = extract_features(self.model_, self._loader(holdout_samples), "held-out features")
        on_epoch_end = None
        if checkpoint is not None:
            on_epoch_end = lambda s: _save_checkpoint(Path(checkpoint), self.model_, s, self.training)
        state = fit_flows(self.model_, train_features, holdout_features, self.training, state, on_epoch_end)
        self.history_ = state.history
        self.best_epoch_ = state.best_epoch
        self._reset_inference()
        holdout_scores, holdout_maps = self._score_features(holdout_features)
        self.holdout_scores_ = holdout_scores
        # Typical normal pixel value: the dark end of heat-map pictures.
        self.map_floor_ = float(np.median(holdout_maps))
        self.threshold_ = calibrate_threshold(holdout_scores, self.threshold_quantile)
        return self

    # ------------------------------------------------------------------ inference
    def _loader(self, samples: list[Sample]) -> DataLoader:
        dataset = ImageDataset(samples, self.model_.config.input_size, self.model_.mean, self.model_.std)
        return DataLoader(dataset, batch_size=self.training.batch_size, shuffle=False)

    def _score_features(self, features: list[Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps of cached raw backbone features, through the inference graph's flows and scorer."""
        graph = self._graph_for(threshold=math.inf)
        scores, maps = [], []
        with torch.no_grad():
            for start in range(0, features[0].shape[0], self.training.batch_size):
                amap, score, _ = graph.score_features([f[start : start + self.training.batch_size] for f in features])
                scores.append(score.numpy())
                maps.append(amap.numpy())
        return np.concatenate(scores), np.concatenate(maps)

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise FastFlowError("this FastFlow detector is not fitted; call fit(...) or FastFlow.load(path) first")

    def _reset_inference(self) -> None:
        """Forget the inference graph and engines built from an earlier model."""
        self._graph: InferenceGraph | None = None
        self._engines: dict[tuple[str, str, float], Engine] = {}

    def _graph_for(self, threshold: float) -> InferenceGraph:
        if getattr(self, "_graph", None) is None:
            self._graph = InferenceGraph(self.model_, threshold)
        self._graph.set_threshold(threshold)
        return self._graph

    def inference_graph(self) -> InferenceGraph:
        """The module every engine runs: raw pixels -> (anomaly_map, score, label); see ``fastflow.export``.

        Built (flows folded) from the fitted model when first needed; ``fit`` and ``load`` rebuild it.
        """
        self._check_fitted()
        return self._graph_for(self.threshold_)

    def engine(self, name: str = "torch", precision: str = "f32") -> Engine:
        """An inference engine for this detector: ``"torch"`` (the graph in PyTorch), or ``"onnx"`` /
        ``"openvino"`` (the graph exported to a temporary folder and loaded; needs the ``export`` extra).

        ``precision="bf16"`` (torch autocast, OpenVINO hint) trades exactness for speed.
        """
        from fastflow.export import ENGINES, TorchEngine, export_engine

        if name not in ENGINES:
            raise FastFlowError(f"unknown engine '{name}'; use one of {', '.join(ENGINES)}")
        graph = self.inference_graph()
        if not hasattr(self, "_engines"):
            self._reset_inference()
        key = (name, precision, float(graph.threshold))
        if key not in self._engines:
            self._engines[key] = TorchEngine(graph, precision) if name == "torch" else export_engine(self, name, precision)
        return self._engines[key]

    def raw_batches(self, X: ImagesLike) -> Iterator[tuple[list[Sample], dict[str, Any]]]:
        """(samples, batch) per batch of ``X``: decoded uint8 images of one size, masks at the model's size."""
        self._check_fitted()
        samples = as_samples(X)
        dataset = ImageDataset(samples, self.model_.config.input_size, self.model_.mean, self.model_.std, raw=True)
        loader = DataLoader(dataset, batch_sampler=same_size_batches(samples, self.training.batch_size))
        done = 0
        for batch in loader:
            count = len(batch["path"])
            yield samples[done : done + count], batch
            done += count

    def iter_predictions(
        self, X: ImagesLike, engine: str = "torch", precision: str = "f32"
    ) -> Iterator[tuple[list[Sample], Prediction, dict[str, Tensor]]]:
        """Score ``X`` batch by batch: (samples, prediction, batch dict with masks) per batch.

        Every engine runs the same ``inference_graph()`` on the decoded pixels (resize and
        normalisation included). Streaming keeps memory flat on large folders; ``predict`` and
        friends collect it.
        """
        run = self.engine(engine, precision)
        for samples, batch in self.raw_batches(X):
            amap, scores, labels = run(batch["image"])
            yield samples, Prediction(scores, amap, labels.astype(np.int64)), batch

    def score(self, X: ImagesLike, engine: str = "torch", precision: str = "f32") -> Prediction:
        """Scores, anomaly maps and labels of every image in ``X`` (see ``engine`` for the options)."""
        parts = [prediction for _, prediction, _ in self.iter_predictions(X, engine, precision)]
        return Prediction(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("scores", "maps", "labels")))

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
        """Write the fitted detector to one safetensors file (weights, config, threshold), atomically."""
        self._check_fitted()
        extra = {
            "recipe": self.recipe,
            "threshold": self.threshold_,
            "threshold_quantile": self.threshold_quantile,
            "holdout_scores": [float(s) for s in self.holdout_scores_],
            "map_floor": self.map_floor_,
            "best_epoch": self.best_epoch_,
            "history": self.history_,
            "training": asdict(self.training),
        }
        return save_model(path, self.model_, extra)

    @classmethod
    def load(cls, path: str | Path) -> FastFlow:
        """Load a detector saved by ``save`` (or a RUN folder of ``fastflow train``); works offline."""
        model, extra = load_model(path)
        if "threshold" not in extra:
            raise FastFlowError(f"{path} holds no calibrated threshold (a training checkpoint?); pass the final model.safetensors")
        detector = cls(model.config.backbone, training=TrainConfig(**extra.get("training", {})))
        detector.recipe = extra.get("recipe", detector.recipe)
        detector.threshold_quantile = extra.get("threshold_quantile", detector.threshold_quantile)
        detector.model_, detector.config_ = model, model.config
        detector._reset_inference()
        detector.threshold_ = float(extra["threshold"])
        detector.holdout_scores_ = np.asarray(extra.get("holdout_scores", []), dtype=np.float64)
        detector.map_floor_ = float(extra.get("map_floor", min(detector.holdout_scores_, default=0.0)))
        detector.best_epoch_ = extra.get("best_epoch", 0)
        detector.history_ = extra.get("history", [])
        return detector


def _save_checkpoint(path: Path, model: FastFlowModel, state: TrainState, training: TrainConfig) -> None:
    """Resumable checkpoint: current weights, best weights, optimizer state and history."""
    tensors = {f"best.{k}": v for k, v in (state.best_weights or {}).items()}
    optimizer = state.optimizer or {"state": {}, "param_groups": []}
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    extra = {
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_nll": state.best_val_nll if math.isfinite(state.best_val_nll) else None,
        "progress_epoch": state.progress_epoch,
        "progress_val_nll": state.progress_val_nll if math.isfinite(state.progress_val_nll) else None,
        "history": state.history,
        "param_groups": optimizer["param_groups"],
        "training": asdict(training),
    }
    save_model(path, model, extra, tensors)


def _load_checkpoint(path: Path, config: FastFlowConfig) -> tuple[FastFlowModel, TrainState]:
    """Model and training state from a checkpoint written by ``_save_checkpoint``."""
    saved_config, _, extra, tensors = read_model_file(path)
    if saved_config != config:
        raise FastFlowError(
            f"checkpoint {path} was trained with a different model config ({saved_config}); "
            "resume with the same options or use a new --output folder"
        )
    model, _ = load_model(path)
    best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
    optimizer_state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    state = TrainState(
        epoch=extra["epoch"],
        best_epoch=extra["best_epoch"],
        best_val_nll=_finite_or_inf(extra["best_val_nll"]),
        progress_epoch=extra["progress_epoch"],
        progress_val_nll=_finite_or_inf(extra["progress_val_nll"]),
        history=extra["history"],
        best_weights=best or None,
        optimizer={"state": optimizer_state, "param_groups": extra["param_groups"]},
    )
    return model, state


def _finite_or_inf(value: float | None) -> float:
    """JSON has no infinity: ``None`` stands for "no value yet"."""
    return math.inf if value is None else float(value)

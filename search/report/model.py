"""The best model's figures: its confusion matrix on the test split and its capsule diagnostics
(``drcapsnet.diagnostics``: coupling entropy per routing iteration, capsule lengths of correct and wrong predictions,
reconstructions, the paper's dimension-perturbation grid)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search import tracking
from search.report.data import DIAGNOSTIC_IMAGES, RECONSTRUCTIONS, SearchData, Section, run_label, trial_params

if TYPE_CHECKING:
    import plotly.graph_objects as go
    import torch

    from drcapsnet.model import CapsNet

def _best_model(data: SearchData, uri: str, tmp: Path) -> tuple[CapsNet, Any]:
    """The best model (the registered ``@best`` version, else the best run's checkpoint) and its RunConfig."""
    from drcapsnet.checkpoint import load_model
    from search.space import apply_params

    assert data.best is not None
    run = apply_params(data.experiment, trial_params(data.experiment, data.best))
    model_uri = data.parent.tags.get("drcaps.model_uri")
    if model_uri:
        return tracking.load_model(uri, model_uri).capsnet.eval(), run
    folder = tracking.download_artifacts(uri, data.best.run_id, "checkpoint", tmp)
    capsnet, _, _ = load_model(next(Path(folder).glob("*.pt")))
    return capsnet, run


def tile_images(grid: torch.Tensor, rows: int) -> Any:
    """A (rows*cols, C, H, W) batch in [0, 1] tiled into one (H', W'[, 3]) uint8 picture, 2 white pixels between
    tiles (torchvision's ``make_grid`` layout, without importing torchvision: seconds at the end of a search)."""
    import torch

    n, c, h, w = grid.shape
    cols, pad = n // rows, 2
    canvas = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)      # (C, H', W')
    for i in range(rows * cols):
        r, k = divmod(i, cols)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = \
            grid[i].clamp(0, 1)
    if c == 1:
        return (canvas[0] * 255).round().byte().numpy()                                      # (H', W')
    return (canvas.permute(1, 2, 0) * 255).round().byte().numpy()                             # (H', W', 3)


# key -> (title, caption) of the five figures, in the page's order
_MODEL_FIGURES: dict[str, tuple[str, str]] = {
    "confusion_matrix": (
        "Confusion matrix of the best model (test split)",
        "Rows: true class; columns: the class of the longest capsule; counts over the whole test split. "
        "Off-diagonal cells are the mistakes."),
    "coupling_entropy": (
        "Routing: coupling entropy per iteration",
        "Entropy (nats) of each primary capsule's coupling over the class capsules, averaged per test image, at "
        "each routing iteration. Iteration 1 is uniform coupling (log K, the dashed line); if routing sharpens, "
        "later iterations are lower."),
    "capsule_lengths": (
        "Class-capsule lengths, correct vs wrong predictions",
        "Length of the predicted (longest) class capsule, the network's confidence, over the test split, for "
        "correct and for wrong predictions (percent of each group)."),
    "reconstructions": (
        "Inputs and their reconstructions",
        "Top row: test images; bottom row: the decoder's image of each from its predicted capsule (the other class "
        "capsules masked to zero)."),
    "perturbation_grid": (
        "Dimension perturbations of the predicted capsule",
        "The predicted capsule of one test image decoded with one dimension moved by -0.25 .. 0.25 in steps of "
        "0.05 (Sabour et al. 2017, figure 4): a row per dimension, the middle column unmoved. A dimension that "
        "changes the stroke encodes a property of it."),
}


def _section(key: str, fig: Any, note: str = "") -> Section:
    title, caption = _MODEL_FIGURES[key]
    return Section(key, title, caption, fig, note)


def _missing(reason: str, keys: list[str] | None = None) -> list[Section]:
    return [Section(k, *_MODEL_FIGURES[k], None, f"Not drawn: {reason}") for k in keys or list(_MODEL_FIGURES)]


@dataclass(frozen=True)
class _Predictions:
    """The best model over the test split: what every figure is drawn from."""

    lengths: torch.Tensor             # (N, K) class-capsule lengths, CPU
    labels: torch.Tensor              # (N,)
    pred: torch.Tensor                # (N,) the longest capsule's class
    images: torch.Tensor              # (B, C, H, W) the first DIAGNOSTIC_IMAGES test images, on the model's device


def _predict(model: CapsNet, test: Any, device: torch.device) -> _Predictions:
    import torch

    from drcapsnet import diagnostics
    from drcapsnet.data import iterate_batches

    lengths, labels, images = [], [], []
    for x, y in iterate_batches(test, 256, shuffle=False, device=device):
        lengths.append(diagnostics.capsule_lengths(model, x).cpu())
        labels.append(y.cpu())
        if sum(len(i) for i in images) < DIAGNOSTIC_IMAGES:
            images.append(x)
    lengths_all = torch.cat(lengths)                                              # (N, K)
    return _Predictions(lengths_all, torch.cat(labels), lengths_all.argmax(dim=1),
                        torch.cat(images)[:DIAGNOSTIC_IMAGES])


def model_sections(data: SearchData, uri: str) -> list[Section]:
    """The five figures of the best model, each a Section (with a "Not drawn: why" note where it cannot be)."""
    import tempfile

    import torch

    from drcapsnet.checkpoint import CheckpointError
    from drcapsnet.data import DataError, load_datasets

    if data.best is None:
        return _missing("no trial logged the metric")
    try:
        with tempfile.TemporaryDirectory(prefix="drcaps-report-") as tmp:
            model, run = _best_model(data, uri, Path(tmp))
        test = load_datasets(run.data).test
    except (tracking.TrackingError, CheckpointError, DataError, StopIteration, OSError) as e:
        return _missing(f"cannot load the best model or its test split ({type(e).__name__}: {e})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    p = _predict(model, test, device)
    sections = [_confusion(p, model.cfg.num_classes,
                           f"Best trial: {run_label(data.best)} (run {data.best.run_id})."),
                _entropy(model, p), _lengths(p)]
    if model.decoder is None:
        return sections + _missing("the best model has no decoder (model.decoder: false)",
                                   ["reconstructions", "perturbation_grid"])
    return sections + [_reconstructions(model, p), _perturbations(model, p)]


def _confusion(p: _Predictions, k: int, best: str) -> Section:
    import plotly.express as px
    import torch

    cm = torch.bincount(p.labels * k + p.pred, minlength=k * k).reshape(k, k).numpy()   # (true, predicted)
    fig = px.imshow(cm, text_auto=True, color_continuous_scale="Blues", x=[str(i) for i in range(k)],
                    y=[str(i) for i in range(k)], labels={"x": "predicted", "y": "true", "color": "images"})
    accuracy = float((p.pred == p.labels).float().mean())
    return _section("confusion_matrix", fig,
                    f"{best} Test accuracy {100 * accuracy:.2f}% over {len(p.labels)} images.")


def _entropy(model: CapsNet, p: _Predictions) -> Section:
    import pandas as pd
    import plotly.express as px

    from drcapsnet import diagnostics

    k = model.cfg.num_classes
    entropy = diagnostics.coupling_entropy_per_iteration(model, p.images).cpu()   # (T, B)
    df = pd.DataFrame({"iteration": [t + 1 for t in range(len(entropy)) for _ in range(entropy.shape[1])],
                       "entropy (nats)": entropy.flatten().numpy()})
    fig = px.box(df, x="iteration", y="entropy (nats)", points=False, range_y=[0, 1.1 * math.log(k)])
    fig.add_hline(y=math.log(k), line_dash="dot", line_color="gray", opacity=0.6,
                  annotation_text="log K: uniform", annotation_position="top left")
    fig.update_xaxes(dtick=1)
    means = ", ".join(f"{float(m):.3f}" for m in entropy.mean(dim=1))
    single = " (one iteration: uniform coupling, nothing to sharpen)" if len(entropy) == 1 else ""
    return _section("coupling_entropy", fig,
                    f"{model.cfg.routing} routing, {model.cfg.routing_iterations} iterations{single}, "
                    f"{entropy.shape[1]} test images; mean entropy per iteration: {means}.")


def _lengths(p: _Predictions) -> Section:
    import pandas as pd
    import plotly.express as px

    df = pd.DataFrame({"length of the predicted capsule": p.lengths.max(dim=1).values.numpy(),
                       "prediction": ["correct" if c else "wrong" for c in (p.pred == p.labels).tolist()]})
    fig = px.histogram(df, x="length of the predicted capsule", color="prediction", barmode="overlay",
                       histnorm="percent", nbins=40, range_x=[0, 1],
                       color_discrete_map={"correct": "#2ca02c", "wrong": "#d62728"})
    wrong = int((p.pred != p.labels).sum())
    return _section("capsule_lengths", fig, f"{len(p.labels) - wrong} correct, {wrong} wrong predictions.")


def _reconstructions(model: CapsNet, p: _Predictions) -> Section:
    import plotly.express as px
    import torch

    from drcapsnet import diagnostics

    x = p.images[:RECONSTRUCTIONS]
    rec = diagnostics.reconstructions(model, x)
    return _section("reconstructions",
                    _plain_image(px.imshow(tile_images(torch.cat([x, rec]).cpu(), rows=2), binary_string=True)))


def _perturbations(model: CapsNet, p: _Predictions) -> Section:
    import plotly.express as px

    from drcapsnet import diagnostics

    n = len(p.images)
    correct = (p.pred[:n] == p.labels[:n]).nonzero()
    i = int(correct[0]) if len(correct) else 0
    grid = diagnostics.perturbation_grid(model, p.images[i: i + 1])[0].cpu()     # (D, S, C, H, W)
    d, s = grid.shape[:2]
    fig = _plain_image(px.imshow(tile_images(grid.flatten(0, 1), rows=d), binary_string=True))
    size = grid.shape[-1] + 2                                                    # tile + make_grid's padding
    deltas = [f"{float(v):+.2f}" for v in diagnostics.PERTURBATIONS]
    fig.update_xaxes(visible=True, tickvals=[2 + size * j + size / 2 - 1 for j in range(s)], ticktext=deltas,
                     title_text="change of the dimension")
    fig.update_yaxes(visible=True, tickvals=[2 + size * j + size / 2 - 1 for j in range(d)],
                     ticktext=[str(j) for j in range(d)], title_text="capsule dimension")
    fig.update_layout(height=max(400, 40 * d + 120), width=max(500, 40 * s + 160))
    return _section("perturbation_grid", fig,
                    f"Test image {i} (true class {int(p.labels[i])}, predicted {int(p.pred[i])}); "
                    f"{d} dimensions x {s} steps.")


def _plain_image(fig: go.Figure) -> go.Figure:
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig

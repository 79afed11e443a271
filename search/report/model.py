"""The best model's figures: its confusion matrix on the test split and its capsule diagnostics
(``drcapsnet.diagnostics``: coupling entropy per routing iteration, capsule lengths of correct and wrong predictions,
reconstructions, the paper's dimension-perturbation grid)."""

from __future__ import annotations

import math
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


def model_sections(data: SearchData, uri: str) -> list[Section]:
    import tempfile

    import pandas as pd
    import plotly.express as px
    import torch
    from sklearn.metrics import confusion_matrix

    from drcapsnet import diagnostics
    from drcapsnet.checkpoint import CheckpointError
    from drcapsnet.data import DataError, iterate_batches, load_datasets

    titles = {"confusion_matrix": "Confusion matrix of the best model (test split)",
              "coupling_entropy": "Routing: coupling entropy per iteration",
              "capsule_lengths": "Class-capsule lengths, correct vs wrong predictions",
              "reconstructions": "Inputs and their reconstructions",
              "perturbation_grid": "Dimension perturbations of the predicted capsule"}
    captions = {
        "confusion_matrix": "Rows: true class; columns: the class of the longest capsule; counts over the whole "
                            "test split. Off-diagonal cells are the mistakes.",
        "coupling_entropy": "Entropy (nats) of each primary capsule's coupling over the class capsules, averaged "
                            "per test image, at each routing iteration. Iteration 1 is uniform coupling (log K, "
                            "the dashed line); if routing sharpens, later iterations are lower.",
        "capsule_lengths": "Length of the predicted (longest) class capsule, the network's confidence, over the "
                           "test split, for correct and for wrong predictions (percent of each group).",
        "reconstructions": "Top row: test images; bottom row: the decoder's image of each from its predicted "
                           "capsule (the other class capsules masked to zero).",
        "perturbation_grid": "The predicted capsule of one test image decoded with one dimension moved by -0.25 .. "
                             "0.25 in steps of 0.05 (Sabour et al. 2017, figure 4): a row per dimension, the "
                             "middle column unmoved. A dimension that changes the stroke encodes a property of it.",
    }

    def missing(reason: str) -> list[Section]:
        return [Section(k, titles[k], captions[k], None, f"Not drawn: {reason}") for k in titles]

    if data.best is None:
        return missing("no trial logged the metric")
    try:
        with tempfile.TemporaryDirectory(prefix="drcaps-report-") as tmp:
            model, run = _best_model(data, uri, Path(tmp))
        test = load_datasets(run.data).test
    except (tracking.TrackingError, CheckpointError, DataError, StopIteration, OSError) as e:
        return missing(f"cannot load the best model or its test split ({type(e).__name__}: {e})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    best = f"Best trial: {run_label(data.best)} (run {data.best.run_id})."

    lengths, labels, images = [], [], []
    for x, y in iterate_batches(test, 256, shuffle=False, device=device):
        lengths.append(diagnostics.capsule_lengths(model, x).cpu())
        labels.append(y.cpu())
        if sum(len(i) for i in images) < DIAGNOSTIC_IMAGES:
            images.append(x)
    lengths_all, y_all = torch.cat(lengths), torch.cat(labels)                  # (N, K), (N,)
    x_diag = torch.cat(images)[:DIAGNOSTIC_IMAGES]                               # (B, C, H, W) on device
    pred = lengths_all.argmax(dim=1)
    k = model.cfg.num_classes
    accuracy = float((pred == y_all).float().mean())

    cm = confusion_matrix(y_all.numpy(), pred.numpy(), labels=list(range(k)))
    fig_cm = px.imshow(cm, text_auto=True, color_continuous_scale="Blues", x=[str(i) for i in range(k)],
                       y=[str(i) for i in range(k)], labels={"x": "predicted", "y": "true", "color": "images"})
    sections = [Section("confusion_matrix", titles["confusion_matrix"], captions["confusion_matrix"], fig_cm,
                        f"{best} Test accuracy {100 * accuracy:.2f}% over {len(y_all)} images.")]

    entropy = diagnostics.coupling_entropy_per_iteration(model, x_diag).cpu()   # (T, B)
    df_h = pd.DataFrame({"iteration": [t + 1 for t in range(len(entropy)) for _ in range(entropy.shape[1])],
                         "entropy (nats)": entropy.flatten().numpy()})
    fig_h = px.box(df_h, x="iteration", y="entropy (nats)", points=False, range_y=[0, 1.1 * math.log(k)])
    fig_h.add_hline(y=math.log(k), line_dash="dot", line_color="gray", opacity=0.6,
                    annotation_text="log K: uniform", annotation_position="top left")
    fig_h.update_xaxes(dtick=1)
    means = ", ".join(f"{float(m):.3f}" for m in entropy.mean(dim=1))
    single = " (one iteration: uniform coupling, nothing to sharpen)" if len(entropy) == 1 else ""
    sections.append(Section("coupling_entropy", titles["coupling_entropy"], captions["coupling_entropy"], fig_h,
                            f"{model.cfg.routing} routing, {model.cfg.routing_iterations} iterations{single}, "
                            f"{entropy.shape[1]} test images; mean entropy per iteration: {means}."))

    top = lengths_all.max(dim=1).values
    df_l = pd.DataFrame({"length of the predicted capsule": top.numpy(),
                         "prediction": ["correct" if c else "wrong" for c in (pred == y_all).tolist()]})
    fig_l = px.histogram(df_l, x="length of the predicted capsule", color="prediction", barmode="overlay",
                         histnorm="percent", nbins=40, range_x=[0, 1],
                         color_discrete_map={"correct": "#2ca02c", "wrong": "#d62728"})
    wrong = int((pred != y_all).sum())
    sections.append(Section("capsule_lengths", titles["capsule_lengths"], captions["capsule_lengths"], fig_l,
                            f"{len(y_all) - wrong} correct, {wrong} wrong predictions."))

    if model.decoder is None:
        return sections + missing("the best model has no decoder (model.decoder: false)")[-2:]
    x_rec = x_diag[:RECONSTRUCTIONS]
    rec = diagnostics.reconstructions(model, x_rec)
    fig_r = px.imshow(tile_images(torch.cat([x_rec, rec]).cpu(), rows=2), binary_string=True)
    sections.append(Section("reconstructions", titles["reconstructions"], captions["reconstructions"],
                            _plain_image(fig_r)))

    correct = (pred[: len(x_diag)] == y_all[: len(x_diag)]).nonzero()
    i = int(correct[0]) if len(correct) else 0
    grid = diagnostics.perturbation_grid(model, x_diag[i: i + 1])[0].cpu()     # (D, S, C, H, W)
    d, s = grid.shape[:2]
    fig_p = _plain_image(px.imshow(tile_images(grid.flatten(0, 1), rows=d), binary_string=True))
    size = grid.shape[-1] + 2                                                    # tile + make_grid's padding
    deltas = [f"{float(v):+.2f}" for v in diagnostics.PERTURBATIONS]
    fig_p.update_xaxes(visible=True, tickvals=[2 + size * j + size / 2 - 1 for j in range(s)], ticktext=deltas,
                       title_text="change of the dimension")
    fig_p.update_yaxes(visible=True, tickvals=[2 + size * j + size / 2 - 1 for j in range(d)],
                       ticktext=[str(j) for j in range(d)], title_text="capsule dimension")
    fig_p.update_layout(height=max(400, 40 * d + 120), width=max(500, 40 * s + 160))
    sections.append(Section("perturbation_grid", titles["perturbation_grid"], captions["perturbation_grid"], fig_p,
                            f"Test image {i} (true class {int(y_all[i])}, predicted {int(pred[i])}); "
                            f"{d} dimensions x {s} steps."))
    return sections


def _plain_image(fig: go.Figure) -> go.Figure:
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig

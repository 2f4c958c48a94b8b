"""Figures render headless, say what they should, and leave no pyplot state behind."""

from __future__ import annotations

import io

import numpy as np
import pytest

from bimors.plots import class_map_preview, confusion_matrix_figure, curves_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def test_small_confusion_matrix_is_row_normalised_and_annotated():
    names = ["beach", "dense_residential", "forest"]
    matrix = np.array([[8, 2, 0], [1, 1, 0], [0, 0, 0]])  # the last class has no test tiles
    fig = confusion_matrix_figure(matrix, names, "val")
    main, colorbar = fig.axes
    assert [t.get_text() for t in main.get_xticklabels()] == ["beach", "dense residential", "forest"]
    assert [t.get_text() for t in main.get_yticklabels()] == ["beach", "dense residential", "forest"]
    assert main.get_xlabel() == "predicted" and main.get_ylabel() == "true"
    assert "val" in main.get_title() and "75.0%" in main.get_title()  # 9 of 12 right
    shown = main.images[0].get_array()
    np.testing.assert_allclose(shown, [[0.8, 0.2, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    assert sorted(t.get_text() for t in main.texts) == ["1", "1", "2", "8"]  # zeros are left blank
    assert png_bytes(fig).startswith(PNG_MAGIC)


def test_45_class_confusion_matrix_renders_without_cell_counts():
    rng = np.random.default_rng(0)
    names = [f"class_{i}" for i in range(45)]
    matrix = rng.integers(0, 20, (45, 45)) + np.eye(45, dtype=int) * 100
    fig = confusion_matrix_figure(matrix, names, "RESISC45")
    main = fig.axes[0]
    assert len(main.get_xticklabels()) == 45 and len(main.get_yticklabels()) == 45
    assert len(main.texts) == 0
    data = png_bytes(fig)
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_confusion_matrix_shape_must_match_the_classes():
    with pytest.raises(ValueError, match=r"shape \(2, 2\), expected \(3, 3\)"):
        confusion_matrix_figure(np.zeros((2, 2)), ["a", "b", "c"], "x")


def test_curves_show_loss_accuracies_and_log_scaled_lr_per_epoch():
    history = [
        {"epoch": e, "loss": 2.0 / (e + 1), "train_acc": 0.2 + 0.1 * e, "val_acc": 0.15 + 0.1 * e,
         "lr": 1e-5 if e == 0 else 0.009 * (0.5 ** e)}
        for e in range(5)
    ]  # fmt: skip
    fig = curves_figure(history)
    top, bottom, accuracy = fig.axes  # the twin axis is added last
    assert [line.get_label() for line in top.lines] == ["train loss"]
    assert [line.get_label() for line in accuracy.lines] == ["train accuracy", "val accuracy"]
    np.testing.assert_allclose(accuracy.lines[1].get_ydata(), [h["val_acc"] for h in history])
    np.testing.assert_allclose(top.lines[0].get_xdata(), range(5))
    assert bottom.get_yscale() == "log" and bottom.get_xlabel() == "epoch"
    assert sorted(t.get_text() for t in top.get_legend().get_texts()) == ["train accuracy", "train loss", "val accuracy"]
    assert png_bytes(fig).startswith(PNG_MAGIC)


def test_class_map_preview_has_a_legend_of_present_classes_and_no_data():
    names = ["beach", "forest", "river", "storage_tank"]
    class_map = np.full((30, 40), -1)
    class_map[:10] = 0
    class_map[10:20, :20] = 3
    fig = class_map_preview(class_map, names, nodata_value=-1)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["beach", "storage tank", "no data"]
    shown = ax.images[0].get_array()
    assert shown.mask[25, 0] and not shown.mask[0, 0]  # nodata is masked (transparent over grey)
    assert png_bytes(fig).startswith(PNG_MAGIC)


def test_class_map_preview_without_nodata_has_no_nodata_entry():
    fig = class_map_preview(np.array([[0, 1], [1, 0]]), ["a", "b"])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a", "b"]


def test_figures_leave_no_pyplot_state():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    confusion_matrix_figure(np.eye(3), ["a", "b", "c"], "t")
    curves_figure([{"epoch": 0, "loss": 1.0, "train_acc": 0.5, "val_acc": 0.5, "lr": 0.01}])
    class_map_preview(np.zeros((4, 4), int), ["a"])
    assert plt.get_fignums() == before

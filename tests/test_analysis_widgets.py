"""The analysis notebooks' selectors: controls redraw one HTML view; nothing goes through an Output widget."""

import base64
import io

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from PIL import Image

from libmoe_core.analysis.widgets import render_html, selector


def _controls(box):
    return {c.description: c for c in box.children[0].children}


def _view(box):
    return box.children[1].value


def _png_size(view_html: str) -> tuple[int, int]:
    data = view_html.split("base64,", 1)[1].split('"', 1)[0]
    return Image.open(io.BytesIO(base64.b64decode(data))).size


def test_selector_renders_the_defaults_then_redraws_on_every_change():
    calls = []

    def show(place="llm", layer=1, lift=False):
        calls.append((place, layer, lift))
        return f"{place}/{layer}/{lift}"

    box = selector(show, place=["vision", "llm"], layer=[0, 1, 2], lift=True)
    controls = _controls(box)
    assert calls == [("llm", 1, False)]  # the function's defaults, not the first option / the bool given
    assert _view(box) == "<pre>llm/1/False</pre>"
    controls["place"].value = "vision"
    controls["lift"].value = True
    assert calls[1:] == [("vision", 1, False), ("vision", 1, True)]
    assert _view(box) == "<pre>vision/1/True</pre>"


def test_selector_starts_at_the_first_option_when_the_default_is_not_one():
    box = selector(lambda layer=7: str(layer), layer=[3, 4])
    assert _controls(box)["layer"].value == 3
    assert _view(box) == "<pre>3</pre>"


def test_a_figure_becomes_an_inline_png_and_is_closed():
    plt.close("all")

    def show(width=2):
        fig, ax = plt.subplots(figsize=(width, 1))
        ax.plot([0, 1], [1, 0])
        return fig

    box = selector(show, width=[2, 4])
    first = _png_size(_view(box))
    _controls(box)["width"].value = 4
    second = _png_size(_view(box))
    assert second[0] > first[0] * 1.5  # redrawn at the new width
    assert plt.get_fignums() == []  # closed: the inline backend would show each one again


def test_a_table_becomes_html_and_text_is_escaped():
    table = pd.DataFrame({"layer": [0, 1], "load": [0.25, 0.75]})
    assert render_html(table) == table.to_html()
    assert render_html("a < b") == "<pre>a &lt; b</pre>"
    with pytest.raises(TypeError, match="got NoneType"):
        render_html(None)


def test_errors_fail_the_first_draw_and_show_in_the_view_later():
    def show(layer=0):
        if layer == 1:
            raise KeyError("layer 1 has no rows")
        return "ok"

    box = selector(show, layer=[0, 1])
    _controls(box)["layer"].value = 1
    assert "KeyError" in _view(box) and "layer 1 has no rows" in _view(box)
    with pytest.raises(KeyError, match="no rows"):
        selector(show, layer=[1])
    with pytest.raises(TypeError, match="must return"):
        selector(lambda layer=0: None, layer=[0])


def test_bad_controls_are_errors_naming_them():
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['layr'\]"):
        selector(lambda layer=0: "", layr=[0])
    with pytest.raises(ValueError, match="control 'layer'.*non-empty"):
        selector(lambda layer=0: "", layer=[])
    with pytest.raises(ValueError, match="control 'layer'"):
        selector(lambda layer=0: "", layer=3)

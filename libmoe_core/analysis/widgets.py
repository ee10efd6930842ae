"""Interactive selectors for the analysis notebooks: controls over one view, no ``Output`` widget.

``ipywidgets.interact`` shows its function's output in an ``Output`` widget. Headless runners
(papermill, nbclient) emulate that widget by sending its state back to the kernel on the shell
socket while they wait on the same socket for the cell's reply; measured here (3 of 58 papermill
runs of expert_collapse) the runner then missed the reply and waited out the cell's whole timeout
(forever without one).
:func:`selector` renders into an ``HTML`` widget whose value only the kernel sets (a figure as an
inline PNG, a table as HTML), so a headless run sends nothing back.
"""

from __future__ import annotations

import base64
import html
import inspect
import io
from collections.abc import Callable
from typing import Any


def render_html(result: Any) -> str:
    """HTML for what a selector's function returned: a matplotlib Figure (closed once drawn),
    a pandas DataFrame or a string."""
    from matplotlib.figure import Figure

    if isinstance(result, Figure):
        buffer = io.BytesIO()
        result.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(result)  # or the inline backend shows it a second time at the end of the cell
        return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"/>'
    if hasattr(result, "to_html"):
        return result.to_html()
    if isinstance(result, str):
        return f"<pre>{html.escape(result)}</pre>"
    raise TypeError(f"a selector's function must return a matplotlib Figure, a DataFrame or a str, "
                    f"got {type(result).__name__}")


def _control(name: str, choice: Any, default: Any):
    import ipywidgets as widgets

    if isinstance(choice, bool):
        return widgets.Checkbox(value=choice if default is inspect.Parameter.empty else bool(default),
                                description=name)
    options = list(choice) if isinstance(choice, (list, tuple)) else None
    if not options:
        raise ValueError(f"selector control {name!r}: give a non-empty list of options or a bool, got {choice!r}")
    return widgets.Dropdown(options=options, description=name,
                            value=default if default in options else options[0])


def selector(render: Callable[..., Any], **choices: Any):
    """Dropdowns (a list of options) or checkboxes (a bool) for ``render``'s
    keyword arguments over a view of what ``render`` returns, redrawn on every change.

    Each control starts at ``render``'s default for that argument when it is one of the options.
    The first view is rendered now, so a headless run fails on an error in ``render``; a later
    error is shown in the view. Return the widget (the cell's last expression displays it).
    """
    import ipywidgets as widgets

    parameters = inspect.signature(render).parameters
    unknown = sorted(set(choices) - set(parameters))
    if unknown:
        raise ValueError(f"selector: {getattr(render, '__name__', render)!r} takes no argument(s) {unknown}; "
                         f"it takes {list(parameters)}")
    controls = {name: _control(name, choice, parameters[name].default) for name, choice in choices.items()}
    view = widgets.HTML()

    def redraw(_change=None) -> None:
        values = {name: control.value for name, control in controls.items()}
        try:
            view.value = render_html(render(**values))
        except Exception as error:  # shown to the person who changed the control
            if _change is None:
                raise
            view.value = f"<pre>{html.escape(f'{type(error).__name__}: {error}')}</pre>"

    redraw()
    for control in controls.values():
        control.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox(list(controls.values())), view])

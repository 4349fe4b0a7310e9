"""The chat panel's input box (a small anywidget) and the panel's styles.

ipywidgets' ``Textarea`` cannot tell Enter from Shift+Enter (both just change the
value), and ``Text`` has no newlines, hence a widget of our own. Its front-end code also
notices when the kernel restarts and says so in the panel, which can then no longer
speak for itself.
"""

from __future__ import annotations

import anywidget
import traitlets

__all__ = ["ChatInput"]

_INPUT_ESM = """
function render({ model, el }) {
  const box = document.createElement("textarea");
  box.className = "nbchat-textarea";
  box.rows = 2;
  const sync = () => {
    box.placeholder = model.get("placeholder");
    box.disabled = model.get("disabled");
    if (box.value !== model.get("value")) box.value = model.get("value");
  };
  const push = () => { model.set("value", box.value); model.save_changes(); };
  box.addEventListener("input", push);
  // Keys typed here are not notebook shortcuts (JupyterLab and Notebook 7 run the cell on
  // Shift+Enter anywhere in a notebook). Lumino skips shortcuts for elements marked with
  // this attribute; Notebook 7 sees the key before the box does, so stopping it is not
  // enough there. Stopping it too keeps other hosts out of the way.
  box.setAttribute("data-lm-suppress-shortcuts", "true");
  box.addEventListener("keypress", (event) => event.stopPropagation());
  box.addEventListener("keydown", (event) => {
    event.stopPropagation();
    // Shift+Enter is left to the browser, which inserts a newline.
    if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
    event.preventDefault();
    if (!box.value.trim()) return;
    // A reply is still streaming: keep the text for later, and let the panel say why
    // nothing was sent (the status line), rather than doing nothing at all.
    if (model.get("busy")) { model.send({ type: "busy" }); return; }
    const text = box.value;
    box.value = "";
    push();
    model.send({ type: "submit", text });
  });
  for (const name of ["value", "placeholder", "disabled"]) model.on(`change:${name}`, sync);
  // The kernel restarted (or went away): every widget of the panel lost its comm, so
  // the panel can no longer say anything itself. Say it here, once, and stop taking
  // input. ipywidgets fires this event when a model's comm goes dead.
  const disconnected = () => {
    const panel = el.closest(".nbchat-panel");
    if (!panel || panel.classList.contains("nbchat-disconnected")) return;
    panel.classList.add("nbchat-disconnected");
    box.disabled = true;
    box.placeholder = "The kernel restarted: run the panel's cell again.";
    const status = panel.querySelector(".nbchat-status");
    if (status) {
      status.textContent = "⚠ The kernel restarted: this panel is disconnected. " +
        "Run its cell again to chat (the conversation is in the store).";
      status.classList.add("nbchat-state-error");
    }
  };
  model.on("comm_live_update", disconnected);
  sync();
  el.classList.add("nbchat-input");
  el.appendChild(box);
  return () => {
    for (const name of ["value", "placeholder", "disabled"]) model.off(`change:${name}`, sync);
    model.off("comm_live_update", disconnected);
  };
}
export default { render };
"""

# Theme variables with fallbacks, so the panel looks right in JupyterLab (light and
# dark), Notebook 7 and Voila alike.
_PANEL_CSS = """
.nbchat-panel { border: 1px solid var(--jp-border-color2, #ddd); border-radius: 8px;
  padding: 8px; max-width: 920px; background: var(--jp-layout-color0, #fff); }
.nbchat-panel .nbchat-header { align-items: center; gap: 6px; }
.nbchat-panel .nbchat-title { font-weight: 600; margin-right: auto; }
.nbchat-panel .nbchat-scroll { display: flex; flex-direction: column-reverse;
  overflow-y: auto; min-height: 8em; max-height: 30em; margin: 6px 0;
  border-top: 1px solid var(--jp-border-color3, #eee);
  border-bottom: 1px solid var(--jp-border-color3, #eee); }
.nbchat-panel .nbchat-messages { flex-shrink: 0; padding: 4px 2px; }
.nbchat-panel .nbchat-msg { margin: 4px 0; padding: 2px 12px; border-radius: 10px;
  height: auto; min-width: 0; box-sizing: border-box; }
/* Long words and URLs wrap anywhere; only code blocks and tables scroll sideways. */
.nbchat-panel .nbchat-msg .widget-html-content,
.nbchat-panel .nbchat-msg .widget-htmlmath-content,
.nbchat-panel .nbchat-msg .jupyter-widget-html-content { line-height: 1.45;
  white-space: normal; overflow-wrap: anywhere; word-break: break-word; min-width: 0;
  max-width: 100%; }
.nbchat-panel .nbchat-msg p { margin: 0.45em 0; }
.nbchat-panel .nbchat-msg pre { background: var(--jp-layout-color2, #f4f4f4);
  padding: 6px 8px; border-radius: 4px; overflow-x: auto; line-height: 1.3;
  white-space: pre; overflow-wrap: normal; word-break: normal; max-width: 100%; }
.nbchat-panel .nbchat-msg table { display: block; overflow-x: auto; max-width: 100%;
  border-collapse: collapse; }
.nbchat-panel .nbchat-msg td, .nbchat-panel .nbchat-msg th { overflow-wrap: normal;
  word-break: normal; border: 1px solid var(--jp-border-color2, #ddd); padding: 2px 6px; }
.nbchat-panel .nbchat-msg blockquote { margin: 0.45em 0; }
.nbchat-panel .nbchat-math { font-family: var(--jp-code-font-family, monospace);
  font-size: 0.95em; }
.nbchat-panel .nbchat-approval { align-items: center; gap: 6px; margin: 2px 0 6px 12px; }
.nbchat-panel.nbchat-disconnected .nbchat-buttons,
.nbchat-panel.nbchat-disconnected .nbchat-header { opacity: 0.5; pointer-events: none; }
.nbchat-panel .nbchat-msg details { margin: 4px 0; font-size: 0.92em; }
/* The user's bubble: a tint of the brand colour over the page's own background, with the
   theme's text colour, so it reads in light and dark themes (--jp-brand-color3 is a light
   blue in both: the dark theme's light text on it was unreadable). */
.nbchat-panel .nbchat-user { align-self: flex-end; max-width: 85%;
  color: var(--jp-content-font-color1, #000); background: #dbe9f7;
  background: color-mix(in srgb, var(--jp-brand-color1, #1976d2) 18%,
    var(--jp-layout-color0, #fff)); }
.nbchat-panel .nbchat-assistant { align-self: stretch;
  background: var(--jp-cell-editor-background, #f7f7f7); }
.nbchat-panel .nbchat-badge { font-weight: 600; margin: 0.45em 0; }
.nbchat-panel .nbchat-notice { margin: 0.45em 0;
  border-left: 3px solid var(--jp-warn-color1, #e0a000);
  padding-left: 8px; margin: 0.45em 0; }
.nbchat-panel .nbchat-footer { color: var(--jp-ui-font-color2, #777); font-size: 0.85em; }
.nbchat-panel .nbchat-typing { color: var(--jp-ui-font-color2, #777); }
.nbchat-panel .nbchat-row { align-items: flex-start; gap: 6px; }
.nbchat-panel .nbchat-input { flex: 1 1 auto; }
.nbchat-panel .nbchat-textarea { width: 100%; box-sizing: border-box; resize: vertical;
  font: inherit; padding: 6px 8px; border-radius: 6px;
  border: 1px solid var(--jp-border-color1, #bbb);
  background: var(--jp-layout-color0, #fff); color: var(--jp-ui-font-color0, #000); }
.nbchat-panel .nbchat-buttons { gap: 4px; }
.nbchat-panel .nbchat-status { color: var(--jp-ui-font-color2, #666); font-size: 0.88em; }
.nbchat-panel .nbchat-status .widget-html-content { line-height: 1.6; }
.nbchat-panel .nbchat-dot { font-size: 0.9em; }
.nbchat-panel .nbchat-state-idle .nbchat-dot { color: #3a3; }
.nbchat-panel .nbchat-state-error .nbchat-dot { color: #c33; }
.nbchat-panel .nbchat-state-busy .nbchat-dot { color: #e0a000; }
"""


class ChatInput(anywidget.AnyWidget):
    """A text box where Enter sends (a ``submit`` message) and Shift+Enter adds a line.

    ``value`` follows what is typed; while ``busy`` is true, Enter keeps the text and
    sends a ``busy`` message instead, so the panel can say why nothing was sent.
    """

    _esm = _INPUT_ESM
    _css = _PANEL_CSS
    value = traitlets.Unicode("").tag(sync=True)
    placeholder = traitlets.Unicode("").tag(sync=True)
    disabled = traitlets.Bool(False).tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)

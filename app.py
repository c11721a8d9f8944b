"""ACIP Studio web app (Gradio). Placeholder until the explorer issue lands: it serves the size query."""

import gradio as gr

from acip_core.pipeline import open_artifact

ARTIFACT = "precomputed/smollm2-135m-instruct"


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="ACIP Studio") as demo:
        gr.Markdown("# ACIP Studio\nThe explorer is being built; this page answers size queries.")
        ratio = gr.Slider(0.3, 1.0, value=1.0, step=0.01, label="size ratio")
        out = gr.JSON()
        ratio.release(on_size, ratio, out, api_name="size")
    return demo


_MODEL = None


def on_size(ratio: float) -> dict:
    global _MODEL
    if _MODEL is None:
        _MODEL = open_artifact(ARTIFACT)
    size = _MODEL.size_for_ratio(ratio)
    return dict(size_ratio=size.size_ratio, params=size.params, dense_layers=size.dense_layers)


if __name__ == "__main__":
    build_demo().launch()

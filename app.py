"""ACIP Studio web app (Gradio): layout and wiring; the handlers are in app_handlers.py.

Run `python app.py` (or `make run`). The artifact shown first is $ACIP_ARTIFACT, else
precomputed/smollm2-135m-instruct, else any other artifact found (precomputed/*, finished runs/*).
The UI is built from a StudioConfig (acip_core/serving/studio.py). Models live in its registry of Explorers;
what belongs to one visitor (measurements, the fitted budget) lives in gr.State, and the selected
size is the slider's value: every view updates on its change and every job reads it.
"""

from __future__ import annotations

import logging
import os

import gradio as gr
import pandas as pd

from acip_core import DATA_CHOICES, DEFAULT_DATA, EMBEDDED, REPETITION_PENALTY, eval_set_label
from acip_core.serving import public
from acip_core.serving import texts as text
from acip_core.serving.chat import MAX_PROMPT_CHARS
from acip_core.serving.checks import FORMAT_CHOICES
from acip_core.serving.studio import Studio, StudioConfig
from app_handlers import EXPLORE_VIEWS, EXPORT_KINDS, X_AXES, Handlers  # noqa: F401  (EXPORT_KINDS: tests)
from app_handlers import score_plan

EXAMPLES = ["What is the capital of France?", "Explain what a package manager does, in two sentences.",
            "Write a haiku about autumn.", "Give three tips for writing clear emails."]
CSS = """
#title h1 {margin-bottom: 0}
#status {min-height: 1.5em}
#size-badge {text-align: right}
#artifact {min-width: 340px}
#lm-table {overflow-x: auto}
#budget-text {overflow-x: auto}
#budget-text table {font-size: 0.9em}
#budget-text td, #budget-text th {padding: 4px 6px; white-space: nowrap}  /* 0.900, not 0.90 / 0 */
footer {display: none !important}
/* 1024-1400 px: numbers and headers whole (issue 28: "25" for 256, lm-eval headers split mid-word) */
#sweep-new input[type=number], #max-new input[type=number], #windows input[type=number],
#ratio-b input[type=number], #size-slider input[type=number] {min-width: 4.5em}
#lm-table th, #lm-table th *, #layers th, #layers th * {word-break: keep-all; overflow-wrap: normal; hyphens: none}
#summary td, #summary td * {overflow-wrap: anywhere; white-space: normal}
"""
# Enter in the size slider's number box applies the typed value at once (Gradio applies it on blur)
JS = """() => { document.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && e.target.matches('#size-slider input[type=number], #ratio-b input[type=number]')) {
    e.target.blur(); } }); }"""



class _ChatHistory(gr.Chatbot.data_model):
    """Gradio's chat history model, whose refusal is one short line: Gradio's own prints the payload
    and every validation error (a 0.5 MB forged history wrote 3.7 MB to the log); this logs a
    summary (how many messages, how many errors) and shows the visitor a toast."""

    @classmethod
    def model_validate(cls, obj, *args, **kwargs):
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValueError as err:  # pydantic's ValidationError
            count = len(obj) if isinstance(obj, (list, tuple)) else -1
            errors = err.error_count() if hasattr(err, "error_count") else 1
            logging.getLogger("acip_studio").info("malformed chat history refused: %d messages, %d errors",
                                                  count, errors)
            raise gr.Error("The chat history is not in the chat's message format: press Clear and start "
                           "again.", print_exception=False) from None


def TextChatbot(**kwargs) -> gr.Chatbot:
    """A chat pane: no Markdown (the handlers send HTML-escaped text, app_handlers.shown: Gradio's
    chatbot renders HTML even then), and a malformed history refused by _ChatHistory. (An instance
    attribute, not a subclass: Gradio writes a .pyi beside the module of every component subclass.)"""
    chat = gr.Chatbot(render_markdown=False, sanitize_html=True, **kwargs)
    chat.data_model = _ChatHistory
    return chat


# -- layout -------------------------------------------------------------------------------------
def build_demo(config: StudioConfig | None = None) -> gr.Blocks:
    """The whole UI for a StudioConfig (default: from the environment); wiring only."""
    h = Handlers(Studio(config or StudioConfig.from_env()))
    offline_tasks, all_tasks = h.app.lm_eval_tasks()
    choices = h.app.artifact_choices()  # by name: never a server path (Studio.folder_of)
    lim = public.limits()
    # Gradio's cache (uploads, downloads) is cleaned of files older than lim.cache_seconds
    with gr.Blocks(title="ACIP Studio", delete_cache=(lim.cache_seconds, lim.cache_seconds)) as demo:
        demo.handlers = h  # for tests and for preloading
        known, results, fitted = gr.State({}), gr.State([]), gr.State(None)
        with gr.Row(equal_height=True):
            gr.Markdown("# ACIP Studio\nScore a model once, then get a model of **any size** in milliseconds: "
                        "pick a size or a memory budget, see the trade-off, chat, measure, export.",
                        elem_id="title")
            artifact = gr.Dropdown(choices=choices, label="artifact", scale=0, min_width=340, elem_id="artifact")
            format_choice = gr.Dropdown(list(FORMAT_CHOICES), value="float32", label="format (weights)", scale=0,
                                        min_width=220, elem_id="format",
                                info="float32/bfloat16, or weight-only int8 / int4 (groups of 32) / float8 "
                                     "(e4m3: fast on GPUs with fp8 units); +emb8: the embedding / LM head in "
                                     "int8 too; +fast: a layer factorized only where that decodes faster "
                                     "(never slower than the original, more GB)")
        with gr.Row():
            status = gr.Markdown("Loading the model…", elem_id="status")
            badge = gr.Markdown(elem_id="size-badge")
        with gr.Accordion("What am I looking at?", open=False, elem_id="help"):
            gr.Markdown(text.HELP)
        with gr.Tabs():
            with gr.Tab("Explore", id="explore"):
                with gr.Row():
                    with gr.Column(scale=3):
                        curve = gr.Plot(label="compression–performance curve", show_label=False, elem_id="curve")
                        with gr.Row():
                            x_axis = gr.Radio(list(X_AXES), value="size ratio", label="x axis")
                            metric = gr.Dropdown(choices=[], label="evaluation set", elem_id="metric", min_width=300)
                    with gr.Column(scale=2):
                        ratio = gr.Slider(0.0, 1.0, value=1.0, step=0.001, label="size ratio",
                                          info="kept fraction of the compressed layers (1 = original); "
                                               "arrow keys and typed values (Enter) apply at once",
                                          elem_id="size-slider")
                        with gr.Row(equal_height=True):
                            budget = gr.Number(label="memory budget (GB)", value=None,
                                               elem_id="budget", scale=2)
                            fit = gr.Button("fit budget", scale=1, elem_id="fit")
                        budget_md = gr.Markdown(elem_id="budget-text")
                        summary = gr.Dataframe(label="this size", interactive=False, wrap=True, headers=["", "this size"],
                                               column_widths=["40%", "60%"], max_height=800, elem_id="summary")
                        with gr.Accordion("Recover this size: fine-tune it", open=False, elem_id="finetune"):
                            gr.Markdown(text.FINETUNE_HELP)
                            with gr.Row(equal_height=True):
                                ft_objective = gr.Radio(["lm+kd", "kd", "lm"], value="lm+kd", label="objective",
                                                        elem_id="ft-objective")
                                ft_steps = gr.Number(value=60, precision=0, label="steps",
                                                     elem_id="ft-steps")
                                ft_start = gr.Button("fine-tune this size", elem_id="ft-start",
                                                     interactive=lim.scoring != "off")
                            if lim.scoring == "off":
                                gr.Markdown("Fine-tuning runs are off on this public Space (the owner can enable "
                                            "them with the secret `ACIP_ADMIN_TOKEN`); run ACIP Studio locally "
                                            "(`make run`) to fine-tune any size.", elem_id="ft-off")
                with gr.Row():
                    with gr.Column(scale=1):
                        heatmap = gr.Plot(label="kept rank per layer", show_label=False, elem_id="heatmap")
                    with gr.Column(scale=1):
                        layers = gr.Dataframe(label="kept rank per module type", interactive=False, wrap=True,
                                              headers=["module", "layers", "full rank", "kept rank", "kept %",
                                                       "dense", "low-rank"], elem_id="layers")
            with gr.Tab("Chat", id="chat"):
                gr.Markdown("Greedy decoding, so two sizes can be compared word for word. "
                            "**A** uses the selected size; **B** any size of this or another artifact.")
                with gr.Row():
                    chat_a = TextChatbot(label="A: the selected size", height=420, elem_id="chat-a")
                    chat_b = TextChatbot(label="B: the comparison size", height=420, elem_id="chat-b")
                with gr.Row():
                    message = gr.Textbox(placeholder=f"Message (≤ {MAX_PROMPT_CHARS:,} characters)",
                                         show_label=False, scale=5, max_lines=8, elem_id="chat-input")
                    send = gr.Button("Send", variant="primary", scale=1)
                    stop = gr.Button("Stop", scale=0)
                    clear = gr.Button("Clear", scale=0)
                speed = gr.Markdown(elem_id="speed")
                gr.Examples(EXAMPLES, inputs=message)
                with gr.Row():
                    side_by_side = gr.Checkbox(value=True, label="side by side with B")
                    artifact_b = gr.Dropdown(choices=choices, label="B: artifact", elem_id="artifact-b", min_width=340)
                    ratio_b = gr.Slider(0.0, 1.0, value=1.0, step=0.001, label="B: size ratio", elem_id="ratio-b")
                    max_new = gr.Slider(1, 512, value=128, step=1, label="max new tokens", elem_id="max-new")
                    penalty = gr.Slider(1.0, 2.0, value=REPETITION_PENALTY, step=0.01, label="repetition penalty")
            with gr.Tab("Sweep", id="sweep"):
                gr.Markdown("One prompt answered by many sizes, one after another (greedy), so the trade-off "
                            "can be read. Sizes: a list (1.0, 0.8, 0.6) or a range high:low:step.")
                with gr.Row():
                    sweep_prompt = gr.Textbox(value=EXAMPLES[0], label="prompt", scale=4, elem_id="sweep-prompt")
                    sweep_sizes = gr.Textbox(value="1.0:0.4:0.1", label="sizes", scale=2, elem_id="sweep-sizes")
                    sweep_new = gr.Slider(1, 256, value=48, step=1, label="max new tokens", elem_id="sweep-new",
                                          min_width=240)
                    sweep_btn = gr.Button("Run sweep", variant="primary", elem_id="run-sweep")
                sweep_grid = gr.Dataframe(headers=["size", "params", "reply", "tok/s"], interactive=False,
                                          wrap=True, column_widths=["8%", "10%", "72%", "10%"], elem_id="sweep-grid")
            with gr.Tab("Measure", id="measure"):
                gr.Markdown("Measurements at the selected size; each one becomes a point on the curve "
                            "(yours only: results belong to this browser session).")
                with gr.Row():
                    with gr.Column():
                        data = gr.Dropdown([(eval_set_label("ppl_" + d.removeprefix("corpus:")) + f" ({d})", d)
                                            if d in ("corpus:heldout", "corpus:domain") else d for d in DATA_CHOICES],
                                           value="corpus:heldout", label="text")
                        with gr.Row():
                            windows = gr.Slider(1, 64, value=32, step=1, label="windows", elem_id="windows")
                            seq_len = gr.Dropdown([128, 256, 512, 1024], value=256, label="tokens per window")
                        with gr.Row():
                            run_ppl = gr.Button("Measure perplexity", variant="primary", elem_id="run-ppl")
                            cancel = gr.Button("Cancel")
                    with gr.Column():
                        tasks = gr.Dropdown(all_tasks, value=offline_tasks[:1], multiselect=True,
                                            allow_custom_value=True, label="lm-eval tasks",
                                            info="offline tasks run here; the paper's tasks need the internet")
                        with gr.Row():
                            limit = gr.Number(value=50, precision=0, label="limit (items per task)")
                            batch = gr.Number(value=8, precision=0, label="batch size")
                        run_eval = gr.Button("Run lm-eval")
                measure_text = gr.Markdown(elem_id="measure-text")
                results_table = gr.Dataframe(label="results", interactive=False, wrap=True, elem_id="lm-table",
                                             headers=["time", "kind", "size_ratio", "format", "data", "perplexity"])
                with gr.Row():
                    download = gr.DownloadButton("Download CSV", value=None)
                    clear_results = gr.Button("Clear results")
            with gr.Tab("Export", id="export"):
                gr.Markdown("Writes the selected size as a folder (zipped): safetensors, config, tokenizer "
                            "and a model card. Downloads are kept for an hour.")
                with gr.Row():
                    kind = gr.Radio(list(EXPORT_KINDS), value=next(iter(EXPORT_KINDS)), label="export as")
                    export_btn = gr.Button("Export", variant="primary")
                export_text = gr.Markdown(elem_id="export-text")
                export_file = gr.File(label="download", interactive=False)
                share_btn = None
                if not public.is_public():  # uploads with a token typed in: a local feature only
                    with gr.Accordion("Share on the Hugging Face hub", open=False):
                        with gr.Row():
                            repo_id = gr.Textbox(label="repo id", placeholder="user/name")
                            hf_token = gr.Textbox(label="access token (write)", type="password")
                            private = gr.Checkbox(label="private", value=True)
                            share_btn = gr.Button("Export and upload")
                        share_text = gr.Markdown(elem_id="share-text")
            with gr.Tab("Score", id="score") as score_tab:
                gr.Markdown("Start a new scoring run in the background (a separate process: it survives page "
                            "reloads). A finished run appears in the artifact list at the top. A run has two "
                            "phases: scoring (until the stop ratio or max steps) then post-tuning the LoRA. "
                            f"Scoring runs on **{h.app.device_name()}** here. {public.describe(lim)}")
                with gr.Row():
                    run_name = gr.Textbox(label="run name", placeholder="e.g. smollm2-quick (letters, digits, -_.)")
                    model = gr.Textbox(value=EMBEDDED, label="model", info="embedded default or hub id" if lim.public
                                       else "embedded default, local folder, .gguf file or hub id")
                    score_data = gr.Dropdown(DATA_CHOICES, value=DEFAULT_DATA, allow_custom_value=True,
                                             label="calibration text")
                with gr.Row():
                    steps = gr.Number(value=200, precision=0, label="max scoring steps")
                    post_tune = gr.Number(value=150, precision=0, label="post-tune steps")
                    basis = gr.Radio(["whitened", "svd"], value="whitened", label="basis")
                    stop_ratio = gr.Slider(0.05, 0.95, value=0.4, step=0.05, label="stop at size ratio", min_width=220)
                    batch_size = gr.Number(value=2, precision=0, label="batch size")
                    score_seq = gr.Number(value=128, precision=0, label="tokens per sequence")
                    score_targets = gr.Textbox(value="", label="targets", placeholder="e.g. q_proj,o_proj",
                                               info="empty: every linear projection of the decoder blocks")
                with gr.Row():
                    # off on a public Space without the admin token: the text above says why, and a
                    # click would only be refused (the handlers refuse it all the same)
                    start = gr.Button("Start run", variant="primary", interactive=lim.scoring != "off")
                    runs = gr.Dropdown(choices=[], label="run", allow_custom_value=False)
                    cancel_run = gr.Button("Cancel run")
                    resume_run = gr.Button("Resume run", interactive=lim.scoring != "off")
                    delete_run = gr.Button("Delete run")
                with gr.Row():
                    score_upload = gr.File(label="or upload calibration text (UTF-8 .txt)", file_types=[".txt"],
                                           type="filepath")
                    token = gr.Textbox(label="admin token", type="password", visible=lim.scoring == "token")
                plan_md = gr.Markdown(elem_id="score-plan")  # memory plan of the typed model (acip_core/training/plan.py)
                run_text = gr.Markdown()
                runs_table = gr.Dataframe(label="runs", interactive=False, headers=["run", "state", "step", "phase", "loss",
                                                                                   "λ", "size_ratio", "elapsed_s", "ETA"],
                                          elem_id="runs-table")
                run_plot = gr.Plot(label="progress")
                timer = gr.Timer(3.0)
                if not lim.public:
                    _official_import_box(h)

        # -- wiring ---------------------------------------------------------------------------
        view = [artifact, ratio, x_axis, format_choice, metric, results, fitted]
        explore_out = [summary, layers, heatmap, curve, badge, budget, budget_md]
        assert len(explore_out) == len(EXPLORE_VIEWS), "app_handlers.EXPLORE_VIEWS names what size() returns"
        demo.load(h.start, None, [artifact, status, ratio, metric] + explore_out, api_name="start",
                  show_progress="minimal").then(lambda f: gr.update(choices=h.app.artifact_choices(), value=f),
                                                artifact, artifact_b, api_name=False)
        demo.load(lambda: gr.update(choices=h.app.run_names()), None, runs, api_name="runs")
        artifact.input(h.artifact, [artifact, ratio, x_axis, format_choice],
                       [status, metric, ratio, format_choice] + explore_out, api_name="artifact")
        # one selected size: every change of the slider (drag, keys, typed, budget) redraws everything
        gr.on([ratio.change, x_axis.input, format_choice.change, metric.input], h.on_size, view, explore_out,
              api_name="size", concurrency_limit=4, trigger_mode="always_last", show_progress="hidden")
        gr.on([fit.click, budget.submit], h.budget, [artifact, budget], [ratio, format_choice, budget_md, fitted],
              api_name="budget")

        ft_start.click(h.finetune_start, [artifact, ratio, format_choice, ft_objective, ft_steps, token], runs,
                       api_name="finetune_start")

        artifact_b.input(h.artifact_b, artifact_b, ratio_b, api_name="artifact_b")  # a tuned size: its size

        chat_inputs = [artifact, ratio, artifact_b, ratio_b, side_by_side, message, chat_a, chat_b, max_new,
                       penalty, format_choice]
        chat_event = gr.on([send.click, message.submit], h.chat, chat_inputs, [chat_a, chat_b, speed, message],
                           api_name="chat", concurrency_limit=2, concurrency_id="chat")
        sweep_event = sweep_btn.click(h.sweep, [artifact, sweep_sizes, sweep_prompt, sweep_new, format_choice],
                                      sweep_grid, api_name="sweep", concurrency_limit=2, concurrency_id="chat")
        # a chat or sweep still waiting for a slot is dropped at its turn, a running one stops at its next
        # token (app_queue.py: Gradio's cancels put an "Error" overlay on every output of a running one)
        stop.click(h.chat_stop, None, None, api_name="chat_stop", queue=False)
        clear.click(lambda: ([], [], ""), None, [chat_a, chat_b, speed], api_name="chat_clear", queue=False,
                    cancels=[chat_event, sweep_event])

        measure_out = [measure_text, results_table, download, results]
        run_ppl.click(h.perplexity, [artifact, ratio, data, windows, seq_len, format_choice, results],
                      measure_out, api_name="perplexity", concurrency_limit=1, concurrency_id="heavy"
                      ).then(h.on_size, view, explore_out, api_name=False, show_progress="hidden")
        run_eval.click(h.lm_eval, [artifact, ratio, tasks, limit, batch, format_choice, results],
                       measure_out, api_name="lm_eval", concurrency_limit=1, concurrency_id="heavy")
        # a measurement still waiting for the heavy slot when Cancel is pressed is dropped at its turn,
        # a running one stops at its next window or batch (app_queue.py: not Gradio's cancels)
        cancel.click(h.measure_cancel, None, measure_text, api_name="cancel", queue=False)
        clear_results.click(lambda: (pd.DataFrame(), None, []), None, [results_table, download, results],
                            api_name="results_clear").then(h.on_size, view, explore_out, api_name=False,
                                                           show_progress="hidden")

        export_btn.click(h.export, [artifact, ratio, kind, format_choice, results], [export_text, export_file],
                         api_name="export", concurrency_limit=1, concurrency_id="heavy")
        if share_btn is not None:
            share_btn.click(h.share, [artifact, ratio, kind, format_choice, repo_id, hf_token, private], [share_text],
                            api_name="share", concurrency_limit=1, concurrency_id="heavy")

        run_view = [runs_table, run_plot, run_text]
        start.click(h.score_start, [run_name, model, score_data, steps, basis, stop_ratio, batch_size, score_seq,
                                    post_tune, token, score_upload, score_targets], [runs_table, runs, run_plot, run_text],
                    api_name="score_start")
        # opening the tab shows the plan of what the form holds (the embedded model at first): ~1 s
        gr.on([score_tab.select, model.submit, model.blur, batch_size.blur, score_seq.blur], score_plan,
              [model, batch_size, score_seq],
              plan_md, api_name="score_plan", concurrency_limit=2, trigger_mode="always_last")
        cancel_run.click(h.score_cancel, [runs, token], run_view, api_name="score_cancel")
        resume_run.click(h.score_resume, [runs, token], run_view, api_name="score_resume")
        delete_run.click(h.score_delete, [runs, token], [runs_table, runs, run_plot, run_text],
                         api_name="score_delete")
        runs.input(lambda r: (h.runs_frame(),) + h.run_view(r), runs, run_view, api_name="score_view")
        timer.tick(h.score_poll, [runs, known], [runs_table, runs, run_plot, run_text, artifact, artifact_b, known],
                   api_name="score_poll", show_progress="hidden")
    return demo


def _official_import_box(h: Handlers) -> None:
    """Import an official ACIP model (hub id or folder) into precomputed/<name>; local mode only. The
    artifact list picks it up on the next poll tick like a finished run."""
    from app_handlers import official_import

    with gr.Accordion("Import an official ACIP model", open=False, elem_id="official-import"):
        with gr.Row():
            source = gr.Textbox(label="hub id or folder", placeholder="MerantixMomentum/acip_llama31_8b")
            name = gr.Textbox(label="artifact name", placeholder="default: the repository's name")
            go = gr.Button("Import")
        note = gr.Markdown()
    go.click(lambda s, n, progress=gr.Progress(): official_import(h.app, s, n, progress), [source, name], note,
             api_name="official_import", concurrency_limit=1, concurrency_id="heavy")


def launch_options() -> dict:
    # uploads above the cap are refused by Gradio itself (413), before any handler runs; the bytes one
    # visitor and all visitors may upload, non-text files, and files named by URL in a public Space's
    # API calls, by the app's middleware (app_uploads.py)
    from starlette.middleware import Middleware

    from app_queue import ArrivalStamp
    from app_uploads import RemoteFileGuard, UploadGuard

    return dict(theme=gr.themes.Soft(primary_hue="indigo"), css=CSS, js=JS,
                max_file_size=public.limits().upload_bytes,
                app_kwargs=dict(middleware=[Middleware(ArrivalStamp), Middleware(UploadGuard),
                                            Middleware(RemoteFileGuard)]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    demo = build_demo()
    studio = demo.handlers.app
    studio.clean_at_start()
    first = studio.default_artifact()[0]
    if first:  # start loading now, so the first visitor does not wait
        studio.preload(first)
    demo.queue(default_concurrency_limit=2, max_size=64 if public.is_public() else None).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT") or 7860), **launch_options())

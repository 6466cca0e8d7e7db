"""`llava-smoe web`: a Gradio chat page over the engine.

Upload an image, chat with streamed replies, tune sampling, and see which experts each MoE
layer used for the last reply, split into image and text tokens.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from typing import TYPE_CHECKING, Any

from llava_smoe.serve.config import add_engine_arguments, bind_warning, engine_config_from_args

AUTH_ENV = "LLAVA_SMOE_WEB_AUTH"

if TYPE_CHECKING:
    from llava_smoe.inference import Completion, Engine

EXAMPLES = [
    "What is in this image?",
    "Describe the image in one sentence.",
    "How many shapes are there, and what colours are they?",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--system", default=None, help="system prompt (default: the checkpoint's template default)")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                        help=f"put the page behind a login (default: ${AUTH_ENV}, which keeps the password out of "
                             "the process list)")


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """'USER:PASSWORD' -> (user, password); None stays None."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--auth / ${AUTH_ENV} must be USER:PASSWORD with both parts non-empty")
    return user, password


def routing_html(completion: "Completion | None") -> str:
    """Per MoE layer and expert: tokens routed there for the last reply, text and image bars."""
    if completion is None:
        return "<p class='routing-empty'>Send a message to see which experts each layer used.</p>"
    if not completion.routing:
        return "<p class='routing-empty'>This model has no MoE layers.</p>"
    num_experts = len(completion.routing[0]["text"])
    head = "".join(f"<th>expert {e}</th>" for e in range(num_experts))
    rows = []
    for row in completion.routing:
        peak = max([*row["text"], *row["image"], 1])
        cells = []
        for text, image in zip(row["text"], row["image"]):
            cells.append(
                "<td>"
                f"<div class='bar text' style='width:{100 * text / peak:.0f}%'></div><span>text {text}</span>"
                f"<div class='bar image' style='width:{100 * image / peak:.0f}%'></div><span>image {image}</span>"
                "</td>"
            )
        rows.append(f"<tr><th>{html.escape(row['layer'])}</th>{''.join(cells)}</tr>")
    return (
        "<table class='routing'><thead><tr><th>MoE layer</th>" + head + "</tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>"
    )


CSS = """
table.routing { border-collapse: collapse; width: 100%; font-size: 0.85em; }
table.routing th, table.routing td { border: 1px solid #ddd; padding: 4px 6px; text-align: left; }
table.routing td span { display: block; }
table.routing .bar { height: 6px; border-radius: 3px; margin-top: 3px; }
table.routing .bar.text { background: #3b82f6; }
table.routing .bar.image { background: #f59e0b; }
"""


def build_demo(engine: "Engine", system: str | None = None) -> Any:
    import gradio as gr

    from llava_smoe.processing import load_image
    from llava_smoe.serve.conversation import Conversation
    from llava_smoe.inference import RequestError, SamplingParams

    default_tokens = min(engine.config.default_max_new_tokens, engine.max_context // 2)

    def respond(text, image_path, temperature, top_p, max_tokens, stop, history, conversation):
        text = (text or "").strip()
        if not text:
            raise gr.Error("Type a message first.")
        history = list(history or [])
        if image_path:
            try:
                conversation.pending_images.append(load_image(image_path))
            except (OSError, ValueError) as e:
                raise gr.Error(f"Cannot open the image: {e}") from None
            history.append({"role": "user", "content": {"path": image_path}})
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": ""})
        try:
            params = SamplingParams(max_new_tokens=int(max_tokens), temperature=float(temperature),
                                    top_p=float(top_p), stop=[s for s in (stop or "").split(",") if s.strip()])
            for delta in conversation.reply(engine, text, params):
                history[-1]["content"] += delta
                yield "", None, history, conversation, gr.skip()
        except RequestError as e:
            conversation.pending_images = []
            history[-1]["content"] = f"⚠️ {e}"
            yield "", None, history, conversation, gr.skip()
            return
        yield "", None, history, conversation, routing_html(conversation.last)

    def reset():
        return [], Conversation(system=system), routing_html(None), None

    with gr.Blocks(title="LLaVA-SMoE") as demo:
        gr.Markdown(f"## LLaVA-SMoE · `{engine.model_name}`  \n"
                    f"{engine.device.type.upper()}, {str(engine.dtype).replace('torch.', '')}, "
                    f"context {engine.max_context} tokens")
        conversation = gr.State(Conversation(system=system))
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image (attached to your next message)",
                                 sources=["upload", "clipboard"], elem_id="image-input", height=260)
                with gr.Accordion("Sampling", open=True):
                    temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                    max_tokens = gr.Slider(1, engine.max_context, value=default_tokens, step=1, label="Max new tokens")
                    stop = gr.Textbox(label="Stop strings (comma-separated)", placeholder="e.g. ###")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420)
                with gr.Row():
                    message = gr.Textbox(placeholder="Ask about the image…", show_label=False, scale=5,
                                         elem_id="message")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[message], label="Example prompts")
                clear = gr.Button("New conversation", elem_id="reset")
        gr.Markdown("### Experts used by the last reply (tokens per expert, text vs image)")
        routing = gr.HTML(routing_html(None), elem_id="routing")

        inputs = [message, image, temperature, top_p, max_tokens, stop, chatbot, conversation]
        outputs = [message, image, chatbot, conversation, routing]
        send.click(respond, inputs, outputs)
        message.submit(respond, inputs, outputs)
        clear.click(reset, None, [chatbot, conversation, routing, image])
    demo.queue(default_concurrency_limit=engine.config.max_batch_size)
    return demo


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from llava_smoe.inference import Engine

    try:
        auth = parse_auth(args.auth or os.environ.get(AUTH_ENV) or None)
        engine = Engine(engine_config_from_args(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = bind_warning(args.host, auth is not None, "the model", "set --auth USER:PASSWORD or $" + AUTH_ENV)
    if warning:
        print(warning, file=sys.stderr)
    demo = build_demo(engine, system=args.system)
    print(f"web chat for {engine.model_name} on http://{args.host}:{args.port}", flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, css=CSS,
                    footer_links=[], auth=auth)
    finally:
        engine.close()
    return 0

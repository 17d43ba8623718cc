"""The Spaces demo's UI: Gradio Blocks with Image, Audio and Text tabs over the rounds `mmft.serving` loads.

Importable and testable without `app.py`: `create_app(Settings(...))` builds the Blocks, `launch`
starts them with the serving limits (queue of one model call at a time, upload cap, messages
without tracebacks). This file only lays out the page and turns errors into messages: the round
cache (`mmft.serving.Rounds`) loads weights, once per round, never per request; the model layer
serialises adapter switching and generation. Model calls still share one concurrency slot: a CPU
Space has 2 cores, and two generations at once would each run at half speed.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path

import gradio as gr
from PIL import Image

from mmft import shapes
from mmft.hub import RoundNotFound
from mmft.prompt import blank, strip_control_text
from mmft.quantize import int8_linears
from mmft.serving import DEMO_KEY, Rounds, Settings  # noqa: F401 (Settings: for app.py and tests)
from mmft.speech import (DEFAULT_MODEL_ID, GO_ONLINE, MAX_SECONDS, AudioError, SpeechUnavailable, Transcriber,
                         prepare_audio)
from mmft.vision import RESIZE_HINT, ImageError, load_image

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 20_000  # cut before tokenizing; the Pipeline then cuts to its token budget
MAX_FILE_SIZE = "20mb"
MODEL_SLOT = "model"  # the one concurrency group every model call shares
# The demo round names colours far more reliably than shapes: mostly colour questions.
EXAMPLES = [("red", "circle", "What colour is the shape?"),
            ("blue", "square", "What color is the object in the picture?"),
            ("green", "triangle", "What shape is this?")]
HOW_TO_POINT = ("To serve a trained round instead, run `python app.py --repo OWNER/NAME --revision round-N` "
                "(or set `MMFT_REPO` and `MMFT_REVISION`, e.g. in the Space's settings).")


ANSWER_LABEL, DRAFT_LABEL = "Answer (base model, refining the draft)", "Draft (fine-tuned model, sees the image)"
BOTH_STAGES = ("The draft comes from the fine-tuned (LoRA) model, which sees the image; the answer is the base "
               "model's rewrite of it.")


def banner(rounds: Rounds, key: str, problem: str | None = None) -> str:
    """Markdown saying plainly which round answers, and how to point the app at another one."""
    pipe = rounds.cache.get(key)
    where, stages = "", BOTH_STAGES
    if pipe is not None:
        dtype = str(next(pipe.model.lm.parameters()).dtype).removeprefix("torch.")
        if int8_linears(pipe.model.lm):  # the embedding's dtype is not the story
            dtype = f"int8 linears, {dtype} around them"
        elif getattr(pipe.model.lm.get_base_model() if pipe.model.has_adapter else pipe.model.lm, "is_loaded_in_4bit",
                     False):
            dtype = f"4-bit NF4, {dtype} around it"
        where = f" on {pipe.model.device.type}, {dtype}"
        cfg = pipe.model.cfg
        if not cfg.pipe_refine:
            stages = "The answer is the fine-tuned (LoRA) model's, which sees the image: this round does not rewrite it."
        elif not cfg.pipe_draft:
            stages = "This round has no draft stage: the base model answers, without the image."
    if key == DEMO_KEY:
        text = (f"**Serving the bundled shapes demo round**{where}: a tiny model trained on synthetic "
                "coloured shapes (circles, squares, triangles in six colours). Ask about the colour or the "
                "shape in a picture; it knows nothing else. " + HOW_TO_POINT)
        if problem:
            text = f"**Could not load the configured round:** {problem}\n\n{text}"
        return text
    served = f"`{rounds.repo}` at `{key}`" if rounds.on_hub else f"the round folder `{rounds.repo}`"
    return f"**Serving {served}**{where}. {stages} Pick another round below to compare."


def image_labels(rounds: Rounds, key: str) -> tuple[str, str]:
    """The Image tab's answer and draft boxes name the model that writes each: a round may skip a stage."""
    pipe = rounds.cache.get(key)
    if pipe is not None and not pipe.model.cfg.pipe_refine:
        return "Answer (the draft as it is: this round has no refine stage)", DRAFT_LABEL
    if pipe is not None and not pipe.model.cfg.pipe_draft:
        return "Answer (base model, without the image: this round has no draft stage)", "Draft (none)"
    return ANSWER_LABEL, DRAFT_LABEL


def audio_help(model_id: str) -> str:
    """The Audio tab's text; offline (the bundled demo), it says plainly how to let speech download."""
    text = (f"Record or upload a spoken question (WAV, FLAC, OGG or MP3; the first {MAX_SECONDS:.0f} s are used). "
            f"Transcribed by `{model_id}`, loaded on first use, then answered by the base model.")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        text += (f"\n\n**This app runs offline** (HF_HUB_OFFLINE=1): speech works only if `{model_id}` is "
                 f"already cached. To let it download once, {GO_ONLINE}.")
    return text


def draw_examples(folder: Path) -> list[list[str]]:
    """A few shapes pictures (drawn, not committed) with questions, for gr.Examples."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (color, shape, question) in enumerate(EXAMPLES):
        path = folder / f"{color}-{shape}.png"
        if not path.is_file():
            tmp = folder / f".{path.name}.{os.getpid()}"
            shapes.draw(color, shape, random.Random(i)).save(tmp, format="PNG")
            os.replace(tmp, path)  # other processes may draw the same file at the same time
        rows.append([str(path), question])
    return rows


def _bad(message: str) -> gr.Error:
    """A message for the person at the browser; no traceback in the server log either (expected input)."""
    return gr.Error(message, title="Cannot answer", print_exception=False)


def _scrub(message: str, upload) -> str:
    """Name an upload by its file name: the server's temp path means nothing to the visitor."""
    if isinstance(upload, (str, os.PathLike)):
        message = message.replace(str(upload), Path(upload).name)
    return message


def _notes(notes: list[str]) -> str:
    return "\n".join(f"- {note}" for note in notes)


def _unexpected(err: Exception) -> gr.Error:
    """A short message for anything unexpected; the traceback goes to the log, not the page."""
    log.error("a request failed", exc_info=err)
    return gr.Error(f"Something went wrong while answering ({type(err).__name__}: {str(err)[:200]}). "
                    "The server keeps running: try again, or with another input.", title="Error",
                    print_exception=False)


def guarded_image(**kwargs) -> gr.Image:
    """gr.Image whose unreadable uploads get a one-line message instead of Gradio's own, which names the
    server's temp path. Gradio opens the upload (the header only, with type="filepath" and no image_mode)
    before any handler runs. Wrapped, not subclassed: a Component subclass makes Gradio write a .pyi file."""
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    stock = image.preprocess

    def preprocess(payload):
        name = getattr(payload, "orig_name", None) or "the upload"
        try:
            return stock(payload)
        except Image.DecompressionBombError as err:  # PIL's guard, in Gradio's own open
            raise _bad(f"{name} is too large to decode safely: {RESIZE_HINT}.") from err
        except Exception as err:
            raise _bad(f"{name} cannot be read as an image ({type(err).__name__}): upload a PNG, JPEG or "
                       "WebP picture.") from err

    image.preprocess = preprocess
    return image


class Handlers:
    """What each tab does; model calls go through the round cache, errors become messages."""

    def __init__(self, rounds: Rounds, transcriber: Transcriber):
        self.rounds = rounds
        self.transcriber = transcriber

    def _pipeline(self, key: str, question: str):
        """The round's pipeline (loaded once; the model layer makes a load wait for generation on its base),
        for a question that is more than the control-token text its prompt builder drops."""
        try:
            pipe = self.rounds.get(key or DEMO_KEY)
        except (RoundNotFound, FileNotFoundError) as err:
            raise _bad(f"The round {key!r} cannot be loaded: {err}") from err
        except Exception as err:
            raise _unexpected(err) from err
        if blank(strip_control_text(pipe.tokenizer, question)):  # the pipeline's own rule (`Pipeline._notes`)
            raise _bad("The question is only control-token text (such as <|end|>), which the model is never "
                       "shown: type a question, e.g. “What colour is the shape?”.")
        return pipe

    @staticmethod
    def _run(stream, *args):
        """Yield a Pipeline stream's partial answers. A visitor who leaves closes this generator, which
        closes the stream, which stops its generation at the next token (mmft.pipeline)."""
        answers = stream(*args)
        try:
            for answer in answers:
                yield answer
        except Exception as err:
            raise _unexpected(err) from err
        finally:
            answers.close()

    @staticmethod
    def _question(question: str | None) -> tuple[str, list[str]]:
        # a lone surrogate (JSON allows "\ud800") is no text the tokenizer takes: it becomes U+FFFD
        question = (question or "").encode("utf-16", "surrogatepass").decode("utf-16", "replace").strip()
        if blank(question):  # NULs and zero-width characters too
            raise _bad("The question is empty: type a question, e.g. “What colour is the shape?”.")
        if len(question) > MAX_QUESTION_CHARS:
            cut = f"The question was cut to its first {MAX_QUESTION_CHARS:,} characters."
            return question[:MAX_QUESTION_CHARS], [cut]
        return question, []

    def image(self, image, question, key):
        if image is None:
            raise _bad("No image: upload a picture (PNG or JPEG), paste one, or click an example below.")
        question, notes = self._question(question)
        pipe = self._pipeline(key, question)
        try:
            picture = load_image(image, pipe.cfg.vit_max_pixels)
        except ImageError as err:
            raise _bad(f"This image cannot be used: {_scrub(str(err), image)}.") from err
        except Exception as err:  # anything else PIL raises: a message, not its internals
            raise _unexpected(err) from err
        for answer in self._run(pipe.stream_image, picture, question):
            yield answer.final, answer.draft or "", _notes(notes + answer.notes)

    def text(self, question, key):
        question, notes = self._question(question)
        pipe = self._pipeline(key, question)
        for answer in self._run(pipe.stream_text, question):
            yield answer.final, _notes(notes + answer.notes)

    def audio(self, audio, key):
        try:
            clip = prepare_audio(audio)
        except AudioError as err:
            raise _bad(_scrub(str(err), audio)) from err
        except Exception as err:  # anything else the decoder raises: a message, not its internals
            raise _unexpected(err) from err
        notes = []
        if clip.trimmed:
            notes.append(f"The recording is {clip.original_seconds:.0f} s long: only its first "
                         f"{MAX_SECONDS:.0f} s were transcribed.")
        try:
            transcript = self.transcriber.transcribe(clip)
        except SpeechUnavailable as err:
            gr.Warning(str(err), title="Speech recognition unavailable")
            yield "", "", _notes([f"{err}", "The Image and Text tabs still work; type your question there."])
            return
        except Exception as err:
            raise _unexpected(err) from err
        if not transcript:
            raise _bad("No words were recognised in the recording: speak clearly, close to the microphone, "
                       "and try again.")
        question, more = self._question(transcript)
        yield "", transcript, _notes(notes + more)
        pipe = self._pipeline(key, question)
        for answer in self._run(pipe.stream_text, question):
            yield answer.final, transcript, _notes(notes + more + answer.notes)

    def select(self, choice, current):
        """The round picker: load the chosen round (once; cached; "main (latest)" and tags re-checked
        against the Hub, as a forced re-publish moves a tag) and say so, or keep the current one. A new round
        empties the Image tab's answer, draft and notes and names who writes them (a round may skip a stage)."""
        try:
            self.rounds.get(choice, refresh=True)
        except Exception as err:  # RoundNotFound, a broken round, no memory: the current round stays
            log.warning("could not load round %s: %s", choice, err)
            gr.Warning(f"Round {choice!r} cannot be loaded: {err}", title="Round not loaded")
            return current, banner(self.rounds, current), current, gr.skip(), gr.skip(), gr.skip()
        # the labels name commits: re-listed, as picking a tag may have found it moved
        return (choice, banner(self.rounds, choice), gr.Dropdown(choices=self.rounds.choices(choice), value=choice),
                *(gr.Textbox(label=label, value="") for label in image_labels(self.rounds, choice)), "")

    def listing(self, current):
        """The picker as a page opens: the repo's rounds now (one listing; nothing is loaded or re-checked), so
        a round published after the app started is there without pressing Refresh."""
        choices = self.rounds.choices(current)
        return gr.Dropdown(choices=choices, value=current, interactive=len(choices) > 1)

    def refresh(self, current):
        """The picker with the repo's rounds now (usable again if listing them had failed at start-up), and
        the served round re-checked as a pick re-checks it: a label names the commit that answers (a forced
        re-publish moves a tag), and the banner says what is served."""
        try:
            self.rounds.get(current, refresh=True)
        except Exception as err:  # the round served so far stays
            log.warning("could not re-check round %s: %s", current, err)
        choices = self.rounds.choices(current)
        return gr.Dropdown(choices=choices, value=current, interactive=len(choices) > 1), banner(self.rounds, current)


def create_app(settings: Settings, transcriber: Transcriber | None = None,
               examples_dir: Path | None = None) -> gr.Blocks:
    """Load the start-up round (falling back to the demo when it cannot be had) and build the page."""
    rounds = Rounds(settings)
    start, problem = rounds.start()
    log.info("serving %s", "the bundled demo round" if start == DEMO_KEY else f"{settings.repo} at {start}")
    handlers = Handlers(rounds, transcriber or Transcriber(settings.asr_model or DEFAULT_MODEL_ID,
                                                         device=settings.device))
    examples = draw_examples(examples_dir or Path(tempfile.gettempdir()) / "mmft-examples")
    choices = rounds.choices(start)

    with gr.Blocks(title="mmft: a language model that sees") as app:
        gr.Markdown("# mmft: a language model that sees\nCLIP image features → projector → Phi-3.5-mini with "
                    "LoRA drafts an answer; the base model (adapter off, same weights) refines it.")
        page_banner = gr.Markdown(banner(rounds, start, problem), label="Served round", elem_id="banner")
        key = gr.State(start)
        with gr.Row():
            picker = gr.Dropdown(choices=choices, value=start, label="Round", interactive=len(choices) > 1,
                                 scale=4)
            refresh = gr.Button("Refresh the list of rounds", scale=1, size="sm", visible=rounds.on_hub)
        with gr.Tabs():
            with gr.Tab("Image", id="image"):
                with gr.Row():
                    with gr.Column():
                        image = guarded_image(label="Image", height=280)
                        question = gr.Textbox(label="Question", placeholder="What colour is the shape?", lines=2)
                        ask_image = gr.Button("Ask", variant="primary")
                    with gr.Column():
                        answer_label, draft_label = image_labels(rounds, start)
                        image_answer = gr.Textbox(label=answer_label, lines=3, elem_id="image-answer")
                        image_draft = gr.Textbox(label=draft_label, lines=2, elem_id="image-draft")
                        image_notes = gr.Markdown(label="Notes")
                gr.Examples(examples, inputs=[image, question], cache_examples=False)
            with gr.Tab("Audio", id="audio"):
                gr.Markdown(audio_help(handlers.transcriber.model_id), elem_id="audio-help")
                with gr.Row():
                    with gr.Column():
                        audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Spoken question")
                        ask_audio = gr.Button("Ask", variant="primary")
                    with gr.Column():
                        audio_answer = gr.Textbox(label="Answer (base model)", lines=3)
                        transcript = gr.Textbox(label="Transcript", lines=2)
                        audio_notes = gr.Markdown(label="Notes")
            with gr.Tab("Text", id="text"):
                with gr.Row():
                    with gr.Column():
                        typed = gr.Textbox(label="Question", placeholder="What colours can a shape have?", lines=2)
                        ask_text = gr.Button("Ask", variant="primary")
                    with gr.Column():
                        text_answer = gr.Textbox(label="Answer (base model)", lines=3)
                        text_notes = gr.Markdown(label="Notes")

        model_call = dict(concurrency_id=MODEL_SLOT, concurrency_limit=1)
        gr.on([ask_image.click, question.submit], handlers.image, [image, question, key],
              [image_answer, image_draft, image_notes], api_name="image", **model_call)
        gr.on([ask_audio.click], handlers.audio, [audio, key], [audio_answer, transcript, audio_notes],
              api_name="audio", **model_call)
        gr.on([ask_text.click, typed.submit], handlers.text, [typed, key], [text_answer, text_notes],
              api_name="text", **model_call)
        picker.input(handlers.select, [picker, key],
                     [key, page_banner, picker, image_answer, image_draft, image_notes], api_name="select_round",
                     **model_call)
        refresh.click(handlers.refresh, [key], [picker, page_banner], api_name="rounds", **model_call)
        if rounds.on_hub:  # not in the model slot: a page must not wait for someone else's answer to open
            app.load(handlers.listing, [key], [picker], api_name="list_rounds", show_progress="hidden",
                     concurrency_limit=None)  # a Hub listing, no model: any number at once
    app.mmft_rounds, app.mmft_handlers, app.mmft_examples = rounds, handlers, Path(examples[0][0]).parent
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Serve with the limits the Space needs: one model call at a time, bounded uploads, short messages."""
    app.queue(default_concurrency_limit=1, max_size=64)
    return app.launch(server_name=host, server_port=port, show_error=True, max_file_size=MAX_FILE_SIZE,
                      ssr_mode=False, allowed_paths=[str(app.mmft_examples)], **kwargs)

"""The Spaces app end to end: launched in-process and driven through gradio_client, as any API caller would.

Offline throughout: the round is a local folder (a tiny stand-in for demo/round unless a test needs the
trained demo), speech is an injected transcriber, and Hub rounds come from the local Hub test server.
"""

import contextlib
import math
import os
import random
import struct
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app as app_py
from mmft import shapes
from mmft.app_ui import EXAMPLES, Handlers, banner, create_app, draw_examples, launch
from mmft.serving import DEMO_KEY, MAIN_KEY, Rounds, Settings
from mmft.config import MMFTConfig, load_config, save_config
from mmft.hub import RoundNotFound, plan_upload, publish
from mmft.loading import build_model
from mmft.speech import SpeechUnavailable, Transcriber
from tests.hub_server import DUMMY_TOKEN, free_port

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What colour is the shape?"
SPOKEN = "What colours can a shape have?"
REPO = "user/mmft-app"
SPEECH = {"available": True}  # what the injected transcriber does


def fake_asr(waveform: torch.Tensor) -> str:
    if not SPEECH["available"]:
        raise SpeechUnavailable("Speech recognition is unavailable: could not load speechbrain/asr "
                                "(offline and not cached?)")
    return SPOKEN


def tiny_round(tiny_dir, folder: Path, number: int, base: Path | None = None) -> Path:
    """A round folder over the session's tiny models; LoRA B made non-zero so rounds differ."""
    base = base or tiny_dir
    cfg = MMFTConfig(lm_model_id=str(base / "lm"), vit_model_id=str(base / "clip"), vit_feature_mode="patch",
                     lora_r=8, lora_alpha=16, lora_dropout=0.0, gen_max_new_tokens=8,
                     prompt_max_question_tokens=64, prompt_max_answer_tokens=64)
    torch.manual_seed(number)
    model = build_model(cfg, device="cpu", dtype=torch.float32, trainable=True)
    with torch.no_grad():
        for name, param in model.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.save_pretrained(folder, {"round": number})


@pytest.fixture(scope="module")
def standin_round(tiny_dir, tmp_path_factory):
    """Stands in for demo/round: a round naming its base models `../base/lm`, `../base/clip`."""
    root = tmp_path_factory.mktemp("demo")
    (root / "base").symlink_to(tiny_dir, target_is_directory=True)
    folder = tiny_round(tiny_dir, root / "round", 1, base=root / "base")
    cfg, info = load_config(folder)
    cfg.lm_model_id, cfg.vit_model_id = "../base/lm", "../base/clip"
    save_config(folder, cfg, info)
    return folder


def serve(app) -> Client:
    """Launch in this process on a free local port; a client that never calls the Hub (URL, no telemetry)."""
    _, url, _ = launch(app, port=free_port(), prevent_thread_lock=True, quiet=True)
    return Client(url, verbose=False, analytics_enabled=False, download_files=False)


@pytest.fixture(scope="module")
def served(standin_round, tmp_path_factory):
    app = create_app(Settings(demo_round=standin_round), transcriber=Transcriber(fn=fake_asr),
                     examples_dir=tmp_path_factory.mktemp("examples"))
    try:
        yield app, serve(app)
    finally:
        app.close()


def last(stream):
    """The finished Answer of a Pipeline stream (it yields one Answer, updated in place)."""
    for answer in stream:
        pass
    return answer


def component(client: Client, **match) -> dict:
    """A component's props as the page's config serves them (what the browser renders)."""
    return next(c["props"] for c in client.config["components"]
                if all(c["props"].get(k) == v for k, v in match.items()))


def component_id(client: Client, **match) -> int:
    return next(c["id"] for c in client.config["components"]
                if all(c["props"].get(k) == v for k, v in match.items()))


def picture(path: Path, color="red", shape="circle", seed=0) -> Path:
    shapes.draw(color, shape, random.Random(seed)).save(path)
    return path


def wav(path: Path, seconds=1.0, rate=16_000, amplitude=8000) -> Path:
    """A tone (or silence, amplitude 0) as 16-bit mono WAV, written with the stdlib."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        n = int(seconds * rate)
        out.writeframes(struct.pack(f"<{n}h", *(int(amplitude * math.sin(i * 0.1)) for i in range(n))))
    return path


# -- the three endpoints -----------------------------------------------------------------------
def test_endpoints_are_named_with_the_final_answer_first(served):
    _, client = served
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    params = {name: [p["parameter_name"] for p in api[name]["parameters"]] for name in ("/image", "/audio", "/text")}
    assert params == {"/image": ["image", "question"], "/audio": ["audio"], "/text": ["question"]}
    for name in ("/image", "/audio", "/text"):
        assert api[name]["returns"][0]["label"].startswith("Answer"), name


def test_image_audio_and_text_answer_like_the_pipeline(served, tmp_path):
    app, client = served
    pipe = app.mmft_rounds.get(DEMO_KEY)
    image = picture(tmp_path / "red.png")
    final, draft, notes = client.predict(handle_file(image), QUESTION, api_name="/image")
    want = last(pipe.stream_image(str(image), QUESTION))
    assert (final, draft, notes) == (want.final, want.draft, "") and final and draft

    answer, notes = client.predict("Hello", api_name="/text")
    assert (answer, notes) == (last(pipe.stream_text("Hello")).final, "") and answer

    answer, transcript, notes = client.predict(handle_file(wav(tmp_path / "q.wav")), api_name="/audio")
    assert (answer, transcript, notes) == (last(pipe.stream_text(SPOKEN)).final, SPOKEN, "")


def test_image_answers_stream_draft_then_refined_answer(served, tmp_path):
    _, client = served
    job = client.submit(handle_file(picture(tmp_path / "p.png")), QUESTION, api_name="/image")
    final, draft, _ = job.result()
    outputs = job.outputs()
    assert len(outputs) > 2 and outputs[-1] == (final, draft, "")
    assert outputs[0][0] == "" and outputs[0][1]  # the draft arrives first, token by token ...
    assert any(out[0] and out[0] != final for out in outputs)  # ... then the refined answer


def test_an_abandoned_answer_stops_and_the_next_one_uses_the_adapter(served, tmp_path, monkeypatch):
    app, _ = served
    pipe = app.mmft_rounds.get(DEMO_KEY)
    image = str(picture(tmp_path / "p.png"))
    want = last(pipe.stream_image(image, QUESTION))
    lm, calls, generate = pipe.model.lm, [], pipe.model.lm.generate

    def watched(*args, **kwargs):  # inside the model's lock: what really runs on the weights
        calls.append(pipe.model.switch.enabled)
        out = generate(*args, **kwargs)
        calls[-1] = (calls[-1], out.shape[1])
        return out

    monkeypatch.setattr(lm, "generate", watched)
    left = app.mmft_handlers.image(image, QUESTION, DEMO_KEY)
    next(left)  # the first tokens of the draft arrived ...
    left.close()  # ... and the visitor went away: the draft stops, no refine starts
    assert len(calls) == 1 and calls[0][0] is True
    assert not [t for t in threading.enumerate() if t.name == "mmft-generate"]  # the worker has ended
    answer = list(app.mmft_handlers.image(image, QUESTION, DEMO_KEY))[-1]
    assert answer[:2] == (want.final, want.draft)  # drafted with the adapter on, refined with it off
    assert [on for on, _ in calls[1:]] == [True, False]


def test_page_says_the_demo_round_is_served_and_how_to_change_it(served):
    _, client = served
    text = component(client, elem_id="banner")["value"]
    # loaded as its evaluation loads it: int8 linears (the embedding's float32 alone told half the story)
    assert "bundled shapes demo round" in text and "on cpu, int8 linears, float32 around them" in text
    assert "--repo OWNER/NAME --revision round-N" in text and "MMFT_REPO" in text
    picker = component(client, label="Round")
    assert picker["choices"] == [["shapes demo (bundled)", DEMO_KEY]] and not picker["interactive"]


def test_example_images_are_shapes_with_questions(served):
    files = sorted(served[0].mmft_examples.glob("*.png"))
    assert [f.name for f in files] == ["blue-square.png", "green-triangle.png", "red-circle.png"]
    assert all(Image.open(f).size == (64, 64) for f in files)


# -- bad input: a clear message, and the next request is answered --------------------------------
def upload(tmp: Path, name: str, data: bytes) -> dict:
    (tmp / name).write_bytes(data)
    return handle_file(tmp / name)


def _truncated_png(tmp):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp / "whole.png")
    return upload(tmp, "cut.png", (tmp / "whole.png").read_bytes()[:3000]), QUESTION


def _huge_image(tmp):
    Image.new("1", (8000, 7000)).save(tmp / "huge.png")  # 56 million pixels in a few kB
    return handle_file(tmp / "huge.png"), QUESTION


def _bomb_png(tmp):
    """A PNG header claiming 20000 x 20000 pixels (over twice PIL's limit: its DecompressionBombError)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return upload(tmp, "holiday.png", data), QUESTION


BAD_INPUTS = {
    "no image": ("/image", lambda tmp: (None, QUESTION), "No image"),
    "not an image": ("/image", lambda tmp: (upload(tmp, "notes.png", b"notes, not a picture"), QUESTION),
                     "notes.png cannot be read as an image"),
    "truncated image": ("/image", _truncated_png, "damaged or truncated"),
    "huge image": ("/image", _huge_image, "56,000,000 pixels, over the limit"),
    "bomb image": ("/image", _bomb_png, "holiday.png is too large to decode safely: resize it"),
    "empty question": ("/image", lambda tmp: (handle_file(picture(tmp / "ok.png")), "   "), "question is empty"),
    "empty text": ("/text", lambda tmp: ("",), "question is empty"),
    "invisible text": ("/text", lambda tmp: ("\x00\u200b\x00\u2028",), "question is empty"),  # NUL, zero-width
    "image, invisible question": ("/image", lambda tmp: (handle_file(picture(tmp / "ok.png")), "\u200b\u200b"),
                                  "question is empty"),
    "control tokens only": ("/text", lambda tmp: ("<|end|><|assistant|>",), "question is only control-token text"),
    "control tokens and invisible text": ("/text", lambda tmp: ("<|end|>\u200b<s>",),
                                          "question is only control-token text"),  # was "Something went wrong"
    "image, control tokens only": ("/image", lambda tmp: (handle_file(picture(tmp / "ok.png")), " <|e<s>nd|> "),
                                   "question is only control-token text"),
    "no audio": ("/audio", lambda tmp: (None,), "No audio was received"),
    "broken audio": ("/audio", lambda tmp: (upload(tmp, "broken.wav", b"RIFF\0\0\0\0WAVEjunk" * 50),),
                     "Could not read the audio file broken.wav"),
    "headerless audio": ("/audio", lambda tmp: (upload(tmp, "clip.raw", wav(tmp / "r.wav").read_bytes()),),
                         "Could not read the audio file clip.raw"),  # soundfile wants a rate for .raw: TypeError
    "image as audio": ("/audio", lambda tmp: (handle_file(picture(tmp / "a.png")),), "unsupported format"),
    "silent audio": ("/audio", lambda tmp: (handle_file(wav(tmp / "s.wav", amplitude=0)),), "silent"),
    "too short audio": ("/audio", lambda tmp: (handle_file(wav(tmp / "t.wav", seconds=0.05)),), "too short"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_message_and_the_next_request_is_answered(served, tmp_path, case):
    _, client = served
    endpoint, make_args, message = BAD_INPUTS[case]
    with pytest.raises(AppError, match=message) as bad:
        client.predict(*make_args(tmp_path), api_name=endpoint)
    assert "Traceback" not in str(bad.value) and "/tmp/" not in str(bad.value)
    good = {"/image": (handle_file(picture(tmp_path / "good.png")), QUESTION),
            "/audio": (handle_file(wav(tmp_path / "good.wav")),), "/text": ("Hello",)}[endpoint]
    assert client.predict(*good, api_name=endpoint)[0]


def test_long_questions_are_cut_with_a_note(served, tmp_path):
    _, client = served
    image = handle_file(picture(tmp_path / "p.png"))
    answer, _, notes = client.predict(image, "What colour is it? " * 527, api_name="/image")  # 10,013 chars
    assert answer and "shortened to its first 64 tokens" in notes
    answer, notes = client.predict("x" * 25_000, api_name="/text")
    assert answer and "cut to its first 20,000 characters" in notes and "64 tokens" in notes


def test_a_lone_surrogate_in_a_question_is_answered(served, tmp_path):
    """JSON can carry "\\ud800", no text a tokenizer takes: it was "Something went wrong (TypeError ...)"."""
    app, _ = served  # the handlers as the server calls them (httpx, in the client, cannot send one)
    answer, notes = list(app.mmft_handlers.text("\ud800 what colour is the shape?", DEMO_KEY))[-1]
    assert answer and not notes
    answer, draft, notes = list(app.mmft_handlers.image(Image.open(picture(tmp_path / "p.png")), "\ud800 colour?",
                                                        DEMO_KEY))[-1]
    assert answer and draft and not notes


def test_long_audio_is_trimmed_with_a_note(served, tmp_path):
    _, client = served
    answer, transcript, notes = client.predict(handle_file(wav(tmp_path / "long.wav", 35, rate=8000)),
                                               api_name="/audio")
    assert answer and transcript == SPOKEN and "35 s long: only its first 30 s" in notes


def test_oversized_upload_is_refused_and_the_server_keeps_serving(served, tmp_path):
    _, client = served
    big = tmp_path / "big.wav"
    big.write_bytes(os.urandom(21 * 1024 * 1024))
    with pytest.raises(ValueError, match="exceeds the maximum file size of 20971520 bytes"):
        client.predict(handle_file(big), api_name="/audio")  # the client reads the limit from the page
    refused = httpx.post(client.src_prefixed + "upload", files={"files": ("big.wav", big.read_bytes())})
    assert refused.status_code == 413  # and the server enforces it for any caller
    assert client.predict("Hello", api_name="/text")[0]


def test_audio_tab_says_when_speech_is_unavailable_and_the_rest_works(served, tmp_path):
    _, client = served
    SPEECH["available"] = False
    try:
        answer, transcript, notes = client.predict(handle_file(wav(tmp_path / "q.wav")), api_name="/audio")
        assert (answer, transcript) == ("", "")
        assert "Speech recognition is unavailable" in notes and "Image and Text tabs still work" in notes
        assert client.predict("Hello", api_name="/text")[0]
        assert client.predict(handle_file(picture(tmp_path / "p.png")), QUESTION, api_name="/image")[0]
    finally:
        SPEECH["available"] = True
    assert client.predict(handle_file(wav(tmp_path / "q.wav")), api_name="/audio")[1] == SPOKEN
    help_text = component(client, elem_id="audio-help")["value"]  # offline (conftest): how to let speech download
    assert "runs offline" in help_text and "HF_HUB_OFFLINE=0 python app.py" in help_text and "--repo" in help_text
    assert "local_files_only" not in help_text


# -- the trained demo ----------------------------------------------------------------------------
@pytest.mark.skipif(not app_py.DEMO_ROUND.is_dir(), reason=f"the trained demo round {app_py.DEMO_ROUND} is not "
                    "built yet (python -m train.build_demo)")
def test_trained_demo_names_the_colour_of_a_fresh_shape_and_answers_its_examples(tmp_path):
    app = create_app(Settings(demo_round=app_py.DEMO_ROUND), transcriber=Transcriber(fn=fake_asr),
                     examples_dir=tmp_path / "examples")
    cases = [(picture(tmp_path / f"{c}.png", c, s, seed), QUESTION, c)
             for c, s, seed in (("red", "square", 101), ("blue", "circle", 102), ("yellow", "triangle", 103))]
    examples = zip(draw_examples(app.mmft_examples), EXAMPLES)
    cases += [(path, q, c if "col" in q else s) for (path, q), (c, s, _) in examples]
    try:
        client = serve(app)
        for image, question, expected in cases:
            final, draft, _ = client.predict(handle_file(image), question, api_name="/image")
            assert expected in final.lower(), (question, expected, draft, final)
    finally:
        app.close()


# -- where the model comes from ------------------------------------------------------------------
def test_serves_a_hub_round_by_revision_and_the_picker_switches_rounds(hub_online, tiny_dir, standin_round,
                                                                       tmp_path):
    shas = [publish(plan_upload(tiny_round(tiny_dir, tmp_path / f"round-{n}", n), REPO)).commit_id for n in (1, 2)]
    app = create_app(Settings(demo_round=standin_round, repo=REPO, revision="round-1", cache_size=2),
                     transcriber=Transcriber(fn=fake_asr), examples_dir=tmp_path / "examples")
    try:
        client = serve(app)
        hub_online.requests.clear()
        assert f"Serving `{REPO}` at `round-1`" in component(client, elem_id="banner")["value"]
        picker = component(client, label="Round")
        assert picker["choices"] == [["main (latest)", MAIN_KEY], [f"round-2 ({shas[1][:7]})", "round-2"],
                                     [f"round-1 ({shas[0][:7]})", "round-1"]]
        rounds = app.mmft_rounds
        assert client.predict("Hello", api_name="/text")[0] == last(rounds.get("round-1").stream_text("Hello")).final

        banner, picked, *_ = client.predict("round-2", api_name="/select_round")  # this session now asks round-2
        assert f"at `round-2`" in banner and picked["value"] == "round-2"  # the picker, its labels re-listed
        assert picked["choices"] == picker["choices"]
        image = picture(tmp_path / "p.png")
        final = client.predict(handle_file(image), QUESTION, api_name="/image")[0]
        assert final == last(rounds.get("round-2").stream_image(str(image), QUESTION)).final
        client.predict(MAIN_KEY, api_name="/select_round")
        assert rounds.loaded() == ["round-2", MAIN_KEY]  # at most two rounds, least recently used dropped
        assert rounds.cache.bases() == 1 and rounds.get("round-2").model.lm is rounds.get(MAIN_KEY).model.lm
        assert not [r for r in hub_online.requests if "telemetry" in r[1]]

        publish(plan_upload(tiny_round(tiny_dir, tmp_path / "round-3", 3), REPO))
        assert "round-3" in [key for _, key in rounds.choices("round-1")]  # what "Refresh" shows
        # ... and what a page opened now lists, without Refresh: the picker is re-listed on every page load
        load = [d for d in client.config["dependencies"] if d.get("api_name") == "list_rounds"]
        assert [t[1] for t in load[0]["targets"]] == ["load"]
        assert load[0]["outputs"] == [component_id(client, label="Round")]
        visitor = Client(client.src, verbose=False, analytics_enabled=False, download_files=False)  # a new page
        opened = visitor.predict(api_name="/list_rounds")
        assert opened["value"] == "round-1" and "round-3" in [key for _, key in opened["choices"]]
        assert client.predict(api_name="/list_rounds")["value"] == MAIN_KEY  # each page, its own round
        refreshed, _ = app.mmft_handlers.refresh("round-1")  # enabled again, had the listing failed at start-up
        assert refreshed.interactive and "round-3" in [key for _, key in refreshed.choices]
        # a forced re-publish moves round-1's tag: after "Refresh", its label names the commit that answers
        moved = publish(plan_upload(tiny_round(tiny_dir, tmp_path / "round-1b", 4), REPO, number=1), force=True)
        refreshed, text = app.mmft_handlers.refresh("round-1")
        assert (f"round-1 ({moved.commit_id[:7]})", "round-1") in refreshed.choices
        assert rounds.cache.folder("round-1").name == moved.commit_id and "round-1" in text
    finally:
        app.close()


def test_a_refused_token_serves_the_demo_and_names_the_token(hub_online, tiny_dir, standin_round, tmp_path,
                                                              monkeypatch):
    publish(plan_upload(tiny_round(tiny_dir, tmp_path / "round-1", 1), REPO))
    hub_online.revoked.add(DUMMY_TOKEN)  # a Space whose HF_TOKEN secret has expired
    rounds = Rounds(Settings(demo_round=standin_round, repo=REPO, revision="round-1"))
    key, problem = rounds.start()
    assert key == DEMO_KEY and problem.startswith(f"cannot pull {REPO} at revision 'round-1': the Hub refused the "
                                                  "token (HTTP 401: invalid or expired)")
    assert "could not be reached" not in banner(rounds, key, problem)
    hub_online.revoked.clear()
    monkeypatch.setenv("HF_TOKEN", "hf_abc\u00e9")  # mistyped: nothing is pulled, so nothing "was pulled"
    key, problem = Rounds(Settings(demo_round=standin_round, repo=REPO, revision="round-1")).start()
    assert key == DEMO_KEY and problem == (f"cannot pull {REPO} at revision 'round-1': the Hub token (HF_TOKEN or the "
                                           "one `hf auth login` stored) holds a character that is not ASCII (U+00E9): "
                                           "copy it again")


def test_offline_with_nothing_cached_serves_the_demo_and_says_why(standin_round):
    rounds = Rounds(Settings(demo_round=standin_round, repo="user/never-pulled", revision="round-3"))
    key, problem = rounds.start()
    assert key == DEMO_KEY and "offline" in problem and rounds.loaded() == [DEMO_KEY]
    text = banner(rounds, key, problem)
    assert text.startswith("**Could not load the configured round:**") and "user/never-pulled" in text
    assert "Serving the bundled shapes demo round" in text and "--revision round-N" in text

    # a branch named "demo" is the repo's, not the bundled round: asked for, and its absence explained
    key, problem = Rounds(Settings(demo_round=standin_round, repo="user/never-pulled", revision="demo")).start()
    assert key == DEMO_KEY != "demo" and "'demo'" in problem and "user/never-pulled" in problem


def test_the_speech_model_runs_on_the_device_asked_for(standin_round, tmp_path, monkeypatch):
    """--device / MMFT_DEVICE is the speech model's too: it went to CUDA whenever there was one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU, on which
    monkeypatch.setattr(Rounds, "start", lambda self: (DEMO_KEY, None))  # no round is loaded here
    app = create_app(Settings(demo_round=standin_round, device="cpu"), examples_dir=tmp_path / "examples")
    try:
        assert app.mmft_handlers.transcriber.device == "cpu"
    finally:
        app.close()


def test_an_unexpected_image_error_gets_the_apps_message(standin_round, monkeypatch):
    """Whatever PIL raises that is not an ImageError (struct.error from a damaged EXIF block was one) is
    the app's one-line message, not PIL's internals."""
    import struct

    import gradio as gr

    from mmft import app_ui

    def broken(*args, **kwargs):
        raise struct.error("required argument is not an integer")

    monkeypatch.setattr(app_ui, "load_image", broken)
    handlers = Handlers(Rounds(Settings(demo_round=standin_round)), Transcriber(fn=fake_asr))
    with pytest.raises(gr.Error, match=r"Something went wrong while answering \(error: required argument"):
        list(handlers.image(Image.new("RGB", (8, 8)), QUESTION, DEMO_KEY))

def test_a_hub_round_that_pulls_but_cannot_load_serves_the_demo_and_says_why(hub_online, standin_round):
    publish(plan_upload(standin_round, "user/relative-base"))  # its base, "../base/lm", is on no Hub
    rounds = Rounds(Settings(demo_round=standin_round, repo="user/relative-base"))
    key, problem = rounds.start()
    assert key == DEMO_KEY and rounds.loaded() == [DEMO_KEY]
    assert problem.startswith("user/relative-base at 'main' was pulled but cannot be loaded: ")
    assert "\n" not in problem and problem.endswith("snapshots/base/lm' is neither a model folder on disk nor a Hub "
                                                     "repo id (OWNER/NAME)")  # the base it looked for


def test_a_round_that_cannot_be_loaded_keeps_the_current_one(standin_round, tmp_path):
    rounds = Rounds(Settings(demo_round=standin_round, repo=str(tmp_path / "x")))
    rounds.get(DEMO_KEY)

    def locate(key):
        raise RoundNotFound("user/x has no revision 'round-9'")

    rounds._locate = locate
    with pytest.warns(UserWarning, match="'round-9' cannot be loaded: user/x has no revision"):  # the visitor is told
        kept = Handlers(rounds, Transcriber(fn=fake_asr)).select("round-9", DEMO_KEY)
    assert kept[0] == kept[2] == DEMO_KEY and "bundled shapes demo round" in kept[1]  # and the demo stays
    assert rounds.loaded() == [DEMO_KEY]  # nothing was dropped for a round that is not there


def test_banner_says_what_a_round_serves(standin_round, tmp_path):
    """A round without its refine stage answers with the draft: the banner said "the base model's rewrite"."""
    rounds = Rounds(Settings(demo_round=standin_round, repo=str(standin_round), quantize="none", dtype="float32"))
    pipe = rounds.get(MAIN_KEY)
    assert "on cpu, float32." in banner(rounds, MAIN_KEY) and "the answer is the base model's rewrite" in banner(
        rounds, MAIN_KEY)
    pipe.model.cfg.pipe_refine = False
    try:
        assert "this round does not rewrite it" in banner(rounds, MAIN_KEY)
    finally:
        pipe.model.cfg.pipe_refine = True


def test_the_image_boxes_name_the_model_that_writes_them(hub_online, tiny_dir, standin_round, tmp_path):
    """A round without a refine stage answers with its draft: the box said "base model, refining the draft"."""
    publish(plan_upload(tiny_round(tiny_dir, tmp_path / "round-1", 1), REPO))
    folder = tiny_round(tiny_dir, tmp_path / "round-2", 2)
    cfg, info = load_config(folder)
    cfg.pipe_refine = False
    save_config(folder, cfg, info)
    publish(plan_upload(folder, REPO))
    app = create_app(Settings(demo_round=standin_round, repo=REPO, revision="round-2", cache_size=2),
                     transcriber=Transcriber(fn=fake_asr), examples_dir=tmp_path / "examples")
    try:
        client = serve(app)
        assert component(client, elem_id="image-answer")["label"] == (
            "Answer (the draft as it is: this round has no refine stage)")
        assert component(client, elem_id="image-draft")["label"] == "Draft (fine-tuned model, sees the image)"
        image = picture(tmp_path / "p.png")
        final, draft, _ = client.predict(handle_file(image), QUESTION, api_name="/image")
        assert final == draft and final  # what the label says: the draft, not rewritten
        _, _, answer, draft, notes = client.predict("round-1", api_name="/select_round")
        assert answer == dict(answer, label="Answer (base model, refining the draft)", value="")  # emptied
        assert draft == dict(draft, label="Draft (fine-tuned model, sees the image)", value="") and notes == ""
        _, _, answer, *_ = client.predict("round-2", api_name="/select_round")
        assert answer["label"] == "Answer (the draft as it is: this round has no refine stage)"
    finally:
        app.close()


def test_the_picker_keeps_its_rounds_and_the_served_one_when_a_listing_fails(standin_round, monkeypatch):
    """A Hub 503 on Refresh left the picker with `main` alone, without the round being served, and disabled."""
    from mmft import serving

    rounds = Rounds(Settings(demo_round=standin_round, repo="user/rounds", revision="round-2"))
    monkeypatch.setattr(serving, "list_rounds", lambda repo: [("round-1", "a" * 40), ("round-2", "b" * 40)])
    listed = rounds.choices("round-2")
    assert listed == [("main (latest)", MAIN_KEY), ("round-2 (bbbbbbb)", "round-2"), ("round-1 (aaaaaaa)", "round-1")]

    def unavailable(repo):
        raise RuntimeError("503 Service Unavailable")

    monkeypatch.setattr(serving, "list_rounds", unavailable)
    assert rounds.choices("round-2") == listed  # the last listing stays
    assert ("round-7", "round-7") in Rounds(Settings(demo_round=standin_round, repo="user/rounds")).choices("round-7")


# -- app.py --------------------------------------------------------------------------------------
def test_a_revision_without_a_repo_is_said_to_be_ignored(capsys):
    assert app_py.parse_args(["--revision", "round-2"], environ={}).repo is None
    assert "'round-2' is ignored: there is no --repo / MMFT_REPO" in capsys.readouterr().err


def test_flags_and_environment():
    env = {"MMFT_REPO": "o/n", "MMFT_REVISION": "round-2", "GRADIO_SERVER_NAME": "0.0.0.0", "MMFT_ASR_MODEL": "a/b"}
    a = app_py.parse_args([], environ=env)
    assert (a.repo, a.revision, a.host, a.port, a.asr_model) == ("o/n", "round-2", "0.0.0.0", 7860, "a/b")
    assert app_py.parse_args(["--revision", "round-1", "--quantize"], environ=env).revision == "round-1"
    assert app_py.parse_args([], environ={}).host == "127.0.0.1" and app_py.parse_args([], environ={}).quantize is None
    assert app_py.parse_args(["--repo", ""], environ=env).repo is None  # as MMFT_REPO="" is
    space = {"MMFT_QUANTIZE": "int8", "MMFT_DTYPE": "float32", "MMFT_CACHE_SIZE": "8", "MMFT_MAX_BASES": "2",
             "MMFT_THREADS": "2", "MMFT_DEVICE": "cpu", "MMFT_DEMO": "1", "GRADIO_SERVER_PORT": "7861"}
    a = app_py.parse_args([], environ=space)
    assert (a.quantize, a.dtype, a.cache_size, a.max_bases, a.threads, a.device, a.demo, a.port) == (
        "int8", "float32", 8, 2, 2, "cpu", True, 7861)
    a = app_py.parse_args(["--quantize", "none", "--cache-size", "3"], environ=space)  # a flag given wins
    assert (a.quantize, a.cache_size) == ("none", 3)
    assert (a.cache_size, a.max_bases) == (3, 2) and app_py.parse_args([], environ={}).cache_size == 4
    for name, value, message in (("MMFT_QUANTIZE", "int4", "choose one of nf4, int8, none"),
                                 ("MMFT_CACHE_SIZE", "many", "not a positive whole number"),
                                 ("MMFT_THREADS", "²", "'²' is not a positive whole number"),  # "²".isdigit()
                                 ("MMFT_DEMO", "maybe", "use one of 1, true, yes, on"),
                                 ("MMFT_DEVICE", "gpu", "use cpu, cuda, cuda:N or mps"),
                                 ("MMFT_THREADS", "99999999999", "use 1 to 1024"),  # torch overflowed, traceback
                                 ("MMFT_DTYPE", "f8", "use one of bf16, bfloat16, float16, float32, fp16, fp32"),
                                 ("GRADIO_SERVER_PORT", "70000", "use a port from 1 to 65535")):  # not at launch
        with pytest.raises(SystemExit):
            app_py.parse_args([], environ={name: value})
        done = subprocess.run([sys.executable, str(ROOT / "app.py")], env={**os.environ, name: value},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    for argv, message in ((["--threads", "-2"], "'-2' is not a positive whole number"),
                          (["--device", "cuda:7"], "no such device here")):  # flags too; no CI machine has 8 GPUs
        done = subprocess.run([sys.executable, str(ROOT / "app.py"), *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    checked = subprocess.run([sys.executable, str(ROOT / "app.py"), "--check"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "MMFT_QUANTIZE": "int8", "MMFT_THREADS": "2"})
    assert (checked.returncode, checked.stdout) == (0, "app.py: the flags and environment are usable\n"), checked.stderr
    with socket.socket() as busy:  # a port in use: one line, before any model loads
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", str(port)], capture_output=True,
                              text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == f"app.py: cannot listen on 127.0.0.1:{port} (--host / --port): Address already in use"
    assert app_py.parse_args([], environ={"MMFT_DEMO": "Yes"}).demo and not app_py.parse_args([], environ={"MMFT_DEMO": "off"}).demo
    for argv, before, offline in (([], {}, "1"), (["--repo", "o/n"], {}, None), (["--repo", "o/n", "--demo"], {}, "1"),
                                  ([], {"HF_HUB_OFFLINE": "0"}, "0")):
        environ = dict(before)
        app_py.set_env_defaults(app_py.parse_args(argv, environ={}), environ)
        assert environ.get("HF_HUB_OFFLINE") == offline, argv


@pytest.mark.slow
def test_app_py_serves_a_round_folder(standin_round, tmp_path):
    port, log = free_port(), tmp_path / "app.log"
    url = f"http://127.0.0.1:{port}/"
    with open(log, "w") as out:  # HF_HUB_OFFLINE=1 comes from conftest: no Hub
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--repo", str(standin_round), "--port",
                                 str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(180):
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "config").status_code == 200:
                    break
            time.sleep(1)
        client = Client(url, verbose=False, analytics_enabled=False)
        assert client.predict("Hello", api_name="/text")[0]
        assert "round folder" in component(client, elem_id="banner")["value"]
        assert f"serving {standin_round} at main" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""Staged inference: the LoRA model *drafts* from image + question, the base model *refines*.

Both stages run on one copy of the base weights: the refine stage switches the adapter off
(`MultimodalModel.adapter(False)`) instead of loading a second model or merging (the original merged the
adapter into the "base" and so refined with the fine-tuned model). The user's question is in both
prompts. Typed text and speech transcripts go to the base model alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from mmft.data import pad_batch
from mmft.model import MultimodalModel
from mmft.prompt import Encoded, blank, encode_chat, refine_prompt, strip_control_text
from mmft.text import tidy

NO_DRAFT_NOTE = "The draft stage is off, so the image was not used."


@dataclass
class Answer:
    question: str
    final: str = ""
    draft: str | None = None  # None when there was no draft stage (text, speech)
    notes: list[str] = field(default_factory=list)  # things the user should know (truncation...)


class StopOnEvent(StoppingCriteria):
    """Stops generation once `event` is set: the stream's consumer went away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Pipeline:
    def __init__(self, model: MultimodalModel):
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = model.tokenizer
        if not (self.cfg.pipe_draft or self.cfg.pipe_refine):
            raise ValueError("at least one of pipe_draft and pipe_refine must be on")

    @classmethod
    def from_round(cls, folder, **kwargs) -> "Pipeline":
        from mmft.loading import load_round

        model, _ = load_round(folder, **kwargs)
        return cls(model)

    # -- building blocks ---------------------------------------------------------------------
    def _encode(self, question: str, with_image: bool) -> Encoded:
        n = self.model.vision.num_tokens if with_image else 0
        return encode_chat(self.tokenizer, self.cfg, [("user", question)], num_image_tokens=n)

    def _notes(self, question: str) -> list[str]:
        """What the user should be told about their question: control-token text was dropped, or it was
        cut to the token budget, as the prompt builder did (after stripping it: trailing blank lines are no
        reason for a note)."""
        if not isinstance(question, str):
            raise TypeError(f"a question is a string, got {type(question).__name__}")
        notes, found = [], []
        if blank(strip_control_text(self.tokenizer, question, found)):  # no question: no confident answer to it
            raise ValueError("the question is empty" + (f" once its control-token text ({', '.join(found)}) is "
                                                        "removed" if found else ""))
        if found:
            notes.append(f"Removed from the question: {', '.join(f'`{c}`' for c in found)} (the model would read "
                         "it as its own control tokens).")
        if self._encode(question, False).truncated:
            notes.append(f"The question was shortened to its first {self.cfg.prompt_max_question_tokens} tokens.")
        return notes

    def _batch(self, prompts: list[Encoded], pixel_values=None) -> dict:
        batch = pad_batch([vars(p) for p in prompts], self.tokenizer.pad_token_id, padding_side="left")
        batch.pop("labels")
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
        return batch

    @staticmethod
    def _one_answer_each(gen: dict) -> None:
        """Texts are paired with their questions: several sequences per question would pair question 2
        with question 1's second one."""
        if gen.get("num_return_sequences", 1) != 1:
            raise ValueError("the pipeline gives one answer per question: num_return_sequences must be 1")

    def _generate(self, batch: dict, use_adapter: bool, **gen) -> list[str]:
        self._one_answer_each(gen)
        new_tokens = self.model.generate(**batch, use_adapter=use_adapter, **gen)  # [B, T_new]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def _tidied(self, prompts: list[Encoded], questions: list[str], use_adapter: bool, pixel_values=None,
                capitalize: bool = True, **gen) -> list[str]:
        texts = self._generate(self._batch(prompts, pixel_values), use_adapter, **gen)
        return [tidy(t, q, capitalize) for t, q in zip(texts, questions)]

    def _stream(self, batch: dict, use_adapter: bool, **gen) -> Iterator[str]:
        """Yield the text so far as tokens arrive (generation runs in a worker thread). A consumer that
        stops early (`close()`, or dropping the generator) stops the generation at its next token, and
        the close returns once the worker has ended: nothing keeps generating with the adapter off."""
        self._one_answer_each(gen)
        owned = getattr(self.model.switch.lock, "_is_owned", None)
        if owned is not None and owned():  # the worker would wait for this thread, which waits for it
            raise RuntimeError("stream outside `model.adapter(...)`: the stream's worker needs the adapter lock "
                               "this thread holds (use the non-streaming answer inside it)")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop, errors = threading.Event(), []
        criteria = StoppingCriteriaList([StopOnEvent(stop), *(gen.pop("stopping_criteria", None) or [])])

        def work():
            try:
                self.model.generate(**batch, use_adapter=use_adapter, streamer=streamer,
                                    stopping_criteria=criteria, **gen)
            except BaseException as err:  # re-raised in the caller's thread below; the stream must end
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, name="mmft-generate", daemon=True)
        thread.start()
        text = ""
        try:
            for chunk in streamer:
                text += chunk
                yield text
        finally:  # normal end, an error, or GeneratorExit from an abandoning consumer
            stop.set()
            thread.join()
        if errors:
            raise errors[0]

    # -- stages ------------------------------------------------------------------------------
    def draft(self, images, questions: list[str], **gen) -> list[str]:
        """LoRA model on (image + question): short, keyword-like answers. `images` may be pixel values
        `[B, 3, H, W]` already preprocessed: an evaluation asking several questions per picture then
        resizes each picture once."""
        pixel_values = images if torch.is_tensor(images) else self.model.vision.preprocess(images)  # [B, 3, H, W]
        prompts = [self._encode(q, True) for q in questions]
        return self._tidied(prompts, questions, True, pixel_values, capitalize=False, **gen)

    def refine(self, questions: list[str], drafts: list[str], **gen) -> list[str]:
        """Base model (adapter off) rewrites each draft into a clean sentence answering the question."""
        prompts = [self._encode_refine(q, d) for q, d in zip(questions, drafts)]
        return self._tidied(prompts, questions, False, **gen)

    def text(self, questions: list[str], **gen) -> list[str]:
        """Base model alone, no image: typed questions and speech transcripts."""
        return self._tidied([self._encode(q, False) for q in questions], questions, False, **gen)

    # -- user-facing -------------------------------------------------------------------------
    def answer_images(self, images: list, questions: list[str], batch_size: int = 16, **gen) -> list[Answer]:
        if len(images) != len(questions):  # else the error would be about image slots, not about the cause
            raise ValueError(f"one question per image: got {len(images)} images and {len(questions)} questions")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        notes = [self._notes(q) for q in questions]  # every question checked before any is answered
        answers = []
        for i in range(0, len(questions), batch_size):
            imgs, qs = images[i : i + batch_size], questions[i : i + batch_size]
            chunk = [Answer(q, notes=n) for q, n in zip(qs, notes[i : i + batch_size])]
            if self.cfg.pipe_draft:
                drafts = self.draft(imgs, qs, **gen)
                finals = self.refine(qs, drafts, **gen) if self.cfg.pipe_refine else drafts
            else:
                drafts, finals = [None] * len(qs), self.text(qs, **gen)
                for a in chunk:
                    a.notes.append(NO_DRAFT_NOTE)
            for a, d, f in zip(chunk, drafts, finals):
                a.draft, a.final = d, f
            answers += chunk
        return answers

    def answer_image(self, image, question: str, **gen) -> Answer:
        return self.answer_images([image], [question], **gen)[0]

    def answer_text(self, question: str, **gen) -> Answer:
        """Typed text or a speech transcript: straight to the base model."""
        notes = self._notes(question)  # checks it, before anything runs
        return Answer(question, final=self.text([question], **gen)[0], notes=notes)

    def stream_image(self, image, question: str, **gen) -> Iterator[Answer]:
        """Like `answer_image`, yielding the partial Answer as each stage's tokens arrive."""
        answer = Answer(question, notes=self._notes(question))
        if not self.cfg.pipe_draft:
            answer.notes.append(NO_DRAFT_NOTE)
            yield from self.stream_text(question, answer=answer, **gen)
            return
        pixel_values = self.model.vision.preprocess([image])
        for text in self._stream(self._batch([self._encode(question, True)], pixel_values), True, **gen):
            answer.draft = text
            yield answer
        answer.draft = tidy(answer.draft or "", question, capitalize=False)
        if not self.cfg.pipe_refine:
            answer.final = answer.draft
            yield answer
            return
        yield from self._stream_final(answer, self._encode_refine(question, answer.draft), **gen)

    def stream_text(self, question: str, answer: Answer | None = None, **gen) -> Iterator[Answer]:
        answer = answer or Answer(question, notes=self._notes(question))
        yield from self._stream_final(answer, self._encode(question, False), **gen)

    def _encode_refine(self, question: str, draft: str) -> Encoded:
        """Only the question is cut to its budget; the draft and the instruction stay whole."""
        message = refine_prompt(self.cfg, question, draft, self.tokenizer)
        return encode_chat(self.tokenizer, self.cfg, [("user", message)], budget_questions=False)

    def _stream_final(self, answer: Answer, prompt: Encoded, **gen) -> Iterator[Answer]:
        """The base model's reply to `prompt`, streamed into `answer.final` and tidied at the end."""
        for text in self._stream(self._batch([prompt]), False, **gen):
            answer.final = text
            yield answer
        answer.final = tidy(answer.final, answer.question)
        yield answer

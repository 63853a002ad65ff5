"""Speech recognition's validation counts: the teacher-forced loss over the transcript tokens and the
word error rate of the generated transcripts. Imports neither Ray nor DeepSpeed.

As for every task's metrics (sft_dist.tasks.heads), WER is made from counts summed over ranks, never from per-rank
rates: word edits (substitutions + deletions + insertions, the Levenshtein distance between word
sequences) summed over clips, over the reference words summed over clips. So `eval_wer` equals the
corpus WER of a single process over the whole validation set (jiwer's `wer` of the two lists), not a
mean of per-clip or per-rank rates.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.tasks.heads import tag_loss_sums

# Word characters and apostrophes ("don't" is one word); everything else separates words.
_NOT_WORD = re.compile(r"[^\w']+")


def transcript_words(text: str) -> list[str]:
    """The words WER compares: lowercased, punctuation dropped (`"Turn left."` and `" turn left"`, as
    Whisper writes it with its leading space, are the same two words). No spelling normalisation beyond
    that: Whisper's English normaliser would turn "three five" into "35", one word instead of two."""
    return [word for word in _NOT_WORD.split(text.lower()) if word.strip("'")]


def word_edits(hypothesis: list[str], reference: list[str]) -> int:
    """The fewest substitutions, deletions and insertions that turn `hypothesis` into `reference`.

    Written out (one row of the O(n*m) table at a time) rather than a dependency for these few lines:
    transcripts are a few dozen words. The tests check it against jiwer."""
    previous = list(range(len(hypothesis) + 1))  # edits of the empty reference prefix
    for i, ref_word in enumerate(reference, start=1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1,  # reference word deleted
                               current[j - 1] + 1,  # hypothesis word inserted
                               previous[j - 1] + (ref_word != hyp_word)))  # matched or substituted
        previous = current
    return previous[-1]


class SpeechCounts:
    """Speech recognition: loss sum, transcript tokens, correct tokens (teacher-forced, from the logits of
    the decoder's aligned targets), then word edits, reference words and clips (from generated text)."""

    size = 6

    def counts(self, logits: torch.Tensor, labels: torch.Tensor, hypotheses: list[str],
               references: list[str]) -> torch.Tensor:
        """One micro-batch's counts; `hypotheses[i]` is the generated transcript of reference `i`."""
        assert len(hypotheses) == len(references), "one generated transcript per reference"
        loss_sum, tokens, correct = tag_loss_sums(logits, labels)  # logits line up with labels: no shift
        edits = reference_words = 0
        for hypothesis, reference in zip(hypotheses, references):
            ref = transcript_words(reference)
            edits += word_edits(transcript_words(hypothesis), ref)
            reference_words += len(ref)
        head = torch.stack([loss_sum.double().cpu(), tokens.double().cpu(), correct.double().cpu()])
        return torch.cat([head, torch.tensor([edits, reference_words, len(references)], dtype=torch.float64)])

    def metrics(self, totals: list[float]) -> dict[str, float]:
        loss_sum, tokens, correct, edits, reference_words, clips = totals
        return {"eval_loss": loss_sum / tokens, "eval_token_acc": correct / tokens,
                "eval_wer": word_error_rate(edits, reference_words), "eval_words": int(reference_words),
                "eval_clips": int(clips)}


def word_error_rate(edits: float, reference_words: float) -> float:
    """Edits per reference word. With no reference word at all (only silent clips) each inserted word
    counts as one error: finite, so metrics.jsonl stays JSON (jiwer refuses empty references)."""
    return edits / max(reference_words, 1)


NUM_SAMPLES = 4  # transcripts of this rank's first held-out clips, written to samples.jsonl
TRANSCRIPT_MARGIN = 8  # tokens a transcript may run past the batch's longest reference


class TranscriptCounts(SpeechCounts):
    """SpeechCounts of a validation batch: the teacher-forced forward, then greedy transcripts (one beam,
    as `pipeline(..., generate_kwargs={"num_beams": 1})` decodes) compared with the reference
    transcripts, which are the batch's targets decoded. `samples`: the first transcripts, as records."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.samples: list[dict[str, Any]] = []

    def batch_counts(self, engine: Any, batch: dict[str, torch.Tensor], indices: Any, synced: bool) -> torch.Tensor:
        from sft_dist.data.batches import model_inputs

        logits = engine(**model_inputs(batch)).logits
        labels = batch["labels"]
        # `synced` (more than one rank): every rank runs the same number of batches (evaluate.eval_batches);
        # each decoding step under ZeRO-3 gathers parameters, so ranks step together until all have finished.
        features = batch["input_features"]
        # Every frame is real: clips are padded to the model's window by its feature extractor, as in its
        # pretraining. Said, because a batch without a mask makes generate warn (pad and end of text are
        # one token for Whisper).
        frames = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=features.device)
        generated = engine.module.generate(input_features=features, attention_mask=frames, do_sample=False,
                                           num_beams=1, max_new_tokens=labels.shape[1] + TRANSCRIPT_MARGIN,
                                           synced_gpus=synced)
        hypotheses = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        references = self.tokenizer.batch_decode([row[row != IGNORE_INDEX] for row in labels.cpu()],
                                                 skip_special_tokens=True)
        room = NUM_SAMPLES - len(self.samples)
        for index, hypothesis, reference in list(zip(indices, hypotheses, references))[:room]:
            self.samples.append({"prompt": f"held-out clip {int(index)}", "expected": reference.strip(),
                                 "answer": hypothesis.strip(), "exact_match": transcript_words(hypothesis)
                                 == transcript_words(reference), "match": None})
        return self.counts(logits, labels, hypotheses, references)

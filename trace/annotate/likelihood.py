"""The likelihood annotator: model-based span annotation for models too small to follow a prompt.

The paper's self / frozen / static annotator tiers PROMPT a model with the annotation prompt
(``mode: prompted``, see local.py). The toy world's ~1M-parameter models cannot follow that
prompt, so at toy scale (``mode: likelihood``) the same tiers mark spans from the annotator
model's own token likelihoods instead. What stays identical across tiers: segmentation, the
contract's JSON reply, parsing and validation, segment→token mapping, the α coverage cap and the
counters (``AnnotationStats``: annotated / failed / repaired / empty / capped / span coverage),
so every tier is compared on the same footing.

Scoring (one batched no-grad forward per chunk of ``batch_size`` rollouts):

1. Context. ``context: problem`` (default): the student's own chat prompt for the problem, so the
   annotator re-reads the problem and "re-solves" it while reading the rollout.
   ``context: reference``: the same prompt with the reference solution in a private system turn
   (the SDPO teacher's privileged context), for annotator models that can read it. On the toy
   bases the reference turn is out of distribution (SFT never showed one): it roughly triples
   their total surprisal on toy-small's own rollouts, and its error spans match the oracle's on
   204/234 incorrect rollouts -- exactly the "always step 1" baseline -- against 215/234
   (toy-small) and 226/234 (toy-large) with ``problem``; hence the default.
2. Surprisal. The response text is re-tokenised with the ANNOTATOR's tokenizer (so any model
   folder works) and every token gets s_t = -log p_A(y_t | context, y_<t) at temperature 1.
3. Segment score. score(seg) = sum of s_t over the tokens overlapping the segment (nats): the
   information the annotator would have to be given to accept that step. (A per-token MEAN
   dilutes a one-digit slip among a step's format tokens and agreed with the oracle only ~50%.)
4. Spans (reply in the contract's 1-based segment numbers):
   * incorrect rollout -> error span = the EARLIEST segment with score >= ``error_threshold``
     (the root cause precedes what it propagates to); if none reaches it, the most surprising
     segment (the verifier says something is wrong). One span.
   * correct rollout -> key spans = the segments with the highest scores (the steps the annotator
     found hardest, yet the rollout got right: where a teacher-supported lift matters most),
     added best-first while their annotator tokens fit in floor(α·|y|); at least the best one
     when its score exceeds ``key_threshold``, else ``[]`` (status ``empty``).
5. Label (closed vocabulary of contract.py), a documented rule on the annotator's peak-surprisal
   token of the chosen segment, for step-structured math ("a op b = c"):
   * key: ``decisive_computation`` when the segment contains "=", else ``other_key_step``;
   * error: peak token after the segment's last "=" -> ``arithmetic_slip`` (the result is
     doubted); before it -> ``misread_problem`` (operands / operation disagree with the problem
     as the annotator reads it); no "=": ``incomplete_solution`` for an answer line (``\\boxed``),
     else ``unjustified_step``.

Measured quality (256 toy-small rollouts at T=1, oracle = toy_oracle): error span equal to
the oracle's on 215/234 (toy-small as annotator: self / static at step 0) and 226/234 (toy-large:
frozen); type label equal on 150 / 170; key spans equal on 5/22 (the oracle's key rule,
"the multiplications", is a convention, not ground truth). Limitation: on text that is not the
annotator's own kind of sample (a reference solution with one corrupted step) the earliest
step over the threshold is often step 1, whose reading the tiny models are unsure of: the
corrupted step is marked in only ~30% of such cases (~55% with the pure most-surprising rule,
which in turn drops to ~45% on real rollouts).

Toy tiers (what stands in for what; paper Table 3):
    api    <-> toy_oracle (toy_oracle.py): the perfect programmatic annotator (strong-API tier)
    self   <-> likelihood annotator on the LIVE policy (the same object: it sees every update)
    static <-> likelihood annotator on a frozen copy of the initial student (the base folder)
    frozen <-> likelihood annotator on a larger frozen model folder (toy study: the toy-large
               base when training toy-small; paper: Qwen3-32B)

Cost per training step (64 rollouts, ~57 response tokens, one busy CPU core): 0.17-0.30 s with
toy-small as the annotator, 0.42-0.58 s with toy-large (``annotator/wall_s`` in the metrics).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .backends import AnnotationRequest, LocalReplyAnnotator
from .contract import ERROR_LABELS, KEY_LABELS, Segment, coverage_budget

CONTEXTS = ("problem", "reference")
DEFAULT_ERROR_THRESHOLD = 1.5   # nats per segment (?): tuned on toy rollouts; robust over 1.0-2.0
DEFAULT_KEY_THRESHOLD = 0.0     # nats: a correct rollout gets a key span unless every step is certain


@dataclass(frozen=True)
class SegmentScore:
    """Summed surprisal of one segment and where its most surprising token sits."""
    surprisal: float        # nats, sum over the segment's tokens (0.0 for a segment with no token)
    n_tokens: int           # annotator tokens overlapping the segment
    peak_start: int         # char offset (in the response) of the most surprising token; -1 if none


def segment_scores(token_surprisal: Sequence[float], token_offsets: Sequence[tuple[int, int]],
                   segments: Sequence[Segment]) -> list[SegmentScore]:
    """Aggregate per-token surprisal (nats) onto segments: a token belongs to every segment its
    non-empty char range overlaps (the rule of ``spans_to_token_mask``)."""
    scores = []
    for seg in segments:
        members = [t for t, (a, b) in enumerate(token_offsets) if b > a and a < seg.end and seg.start < b]
        if not members:
            scores.append(SegmentScore(0.0, 0, -1))
            continue
        peak = max(members, key=lambda t: (token_surprisal[t], -t))
        scores.append(SegmentScore(float(sum(token_surprisal[t] for t in members)), len(members),
                                   max(token_offsets[peak][0], seg.start)))
    return scores


def choose_segments(scores: Sequence[SegmentScore], is_correct: bool, alpha: float,
                    error_threshold: float = DEFAULT_ERROR_THRESHOLD,
                    key_threshold: float = DEFAULT_KEY_THRESHOLD) -> list[int]:
    """0-based indices of the segments to mark (see the module docstring, step 4)."""
    if not scores:
        return []
    if not is_correct:
        for i, score in enumerate(scores):
            if score.surprisal >= error_threshold:
                return [i]
        return [max(range(len(scores)), key=lambda i: (scores[i].surprisal, -i))]
    ranked = sorted((i for i, s in enumerate(scores) if s.surprisal > key_threshold),
                    key=lambda i: (-scores[i].surprisal, i))
    budget = coverage_budget(sum(s.n_tokens for s in scores), alpha)
    chosen, used = [], 0
    for i in ranked:
        if chosen and used + scores[i].n_tokens > budget:
            continue
        chosen.append(i)
        used += scores[i].n_tokens
    return sorted(chosen)


def choose_label(segment: Segment, peak_start: int, is_correct: bool) -> str:
    """The type label for a marked segment (module docstring, step 5)."""
    text = segment.text
    if is_correct:
        label = "decisive_computation" if "=" in text else "other_key_step"
        assert label in KEY_LABELS
        return label
    if "=" in text:
        equals_at = segment.start + (len(text) - len(text.lstrip())) + text.rfind("=")
        label = "arithmetic_slip" if peak_start > equals_at else "misread_problem"
    else:
        label = "incomplete_solution" if "\\boxed" in text else "unjustified_step"
    assert label in ERROR_LABELS
    return label


def likelihood_reply(segments: Sequence[Segment], scores: Sequence[SegmentScore], is_correct: bool, alpha: float,
                     error_threshold: float = DEFAULT_ERROR_THRESHOLD,
                     key_threshold: float = DEFAULT_KEY_THRESHOLD) -> str:
    """The reply an annotator with these likelihoods writes, in the contract's JSON format."""
    chosen = choose_segments(scores, is_correct, alpha, error_threshold, key_threshold)
    field = "key_spans" if is_correct else "error_spans"
    if not chosen:
        return json.dumps({field: [], "label": "other_key_step" if is_correct else "other_error"})
    # the label describes the most surprising marked segment
    lead = max(chosen, key=lambda i: (scores[i].surprisal, -i))
    label = choose_label(segments[lead], scores[lead].peak_start, is_correct)
    return json.dumps({field: [[i + 1, i + 1] for i in chosen], "label": label})


@torch.no_grad()
def response_surprisal(model, tokenizer, contexts: Sequence[str], responses: Sequence[str],
                       batch_size: int = 64, chunk_size: int = 1024) -> list[tuple[list[float], list[tuple[int, int]]]]:
    """Per response: (surprisal of each of its annotator tokens in nats, their char offsets).

    Same layout as the trainer (contexts left-padded to one width, responses right-padded), the
    transformer body once per chunk of ``batch_size`` rows, the vocabulary projection only at
    response positions. Rows are processed in length order (less padding) and returned in order.
    """
    from trace.logprobs import completion_hidden_states, gather_logprobs

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = []
    for context, response in zip(contexts, responses):
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        encoded.append((list(ctx), list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]))
    out: list[Any] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]) + len(encoded[i][1]), i))
    W = model.get_output_embeddings().weight
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        P = max(len(encoded[i][0]) for i in rows)
        T = max(max(len(encoded[i][1]) for i in rows), 1)
        ids = torch.full((len(rows), P + T), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), P + T), dtype=torch.long)
        for r, i in enumerate(rows):
            ctx, resp, _ = encoded[i]
            ids[r, P - len(ctx):P] = torch.tensor(ctx, dtype=torch.long)
            attention[r, P - len(ctx):P] = 1
            if resp:
                ids[r, P:P + len(resp)] = torch.tensor(resp, dtype=torch.long)
                attention[r, P:P + len(resp)] = 1
        ids, attention = ids.to(device), attention.to(device)
        hidden = completion_hidden_states(model, ids, attention, P)
        mask = attention[:, P:].bool()
        logp, _ = gather_logprobs(hidden[mask], W, ids[:, P:][mask], 1.0, chunk_size)
        surprisal = (-logp.float()).cpu().tolist()
        at = 0
        for i in rows:
            n = len(encoded[i][1])
            out[i] = (surprisal[at:at + n], encoded[i][2])
            at += n
    return out


class LikelihoodAnnotator(LocalReplyAnnotator):
    """Marks spans from an annotator model's likelihoods (module docstring) behind the contract.

    ``model`` is the annotator network itself -- for the self tier the LIVE policy object, so
    the annotation follows every optimizer step. The model is put in eval mode for the forward
    and its train/eval mode is restored afterwards.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, context: str = "problem",
                 error_threshold: float = DEFAULT_ERROR_THRESHOLD, key_threshold: float = DEFAULT_KEY_THRESHOLD,
                 batch_size: int = 64, thinking: bool = False, name: str = "likelihood", **kwargs: Any):
        if context not in CONTEXTS:
            raise ValueError(f"unknown likelihood context {context!r} (annotator.likelihood.context); "
                             f"choose from {CONTEXTS}")
        if batch_size < 1:
            raise ValueError(f"annotator.batch_size must be >= 1, got {batch_size}")
        super().__init__(**kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.context, self.thinking, self.batch_size, self.name = context, thinking, batch_size, name
        self.error_threshold, self.key_threshold = float(error_threshold), float(key_threshold)

    def context_text(self, request: AnnotationRequest) -> str:
        from trace.prompting import reference_context, render_prompt

        record = {"problem": request.problem, "kind": "math"}
        prefix = (reference_context({"solution": request.reference_solution})
                  if self.context == "reference" and request.reference_solution.strip() else None)
        return render_prompt(self.tokenizer, record, self.thinking, system_prefix=prefix)

    def score(self, requests: Sequence[AnnotationRequest],
              segmented: Sequence[Sequence[Segment]]) -> list[list[SegmentScore] | None]:
        """Per request, the annotator's SegmentScore of each segment (None: no segments)."""
        todo = [i for i, segments in enumerate(segmented) if segments]
        scores: list[list[SegmentScore] | None] = [None] * len(requests)
        if not todo:
            return scores
        model = self.model
        was_training = model.training
        model.eval()
        try:
            scored = response_surprisal(model, self.tokenizer, [self.context_text(requests[i]) for i in todo],
                                        [requests[i].response_text for i in todo], self.batch_size)
        finally:
            model.train(was_training)
        for i, (surprisal, offsets) in zip(todo, scored):
            scores[i] = segment_scores(surprisal, offsets, segmented[i])
        return scores

    def replies(self, requests: Sequence[AnnotationRequest],
                segmented: Sequence[Sequence[Segment]]) -> list[str | None]:
        return [None if scores is None else
                likelihood_reply(segments, scores, bool(request.is_correct), self.alpha, self.error_threshold,
                                 self.key_threshold)
                for request, segments, scores in zip(requests, segmented, self.score(requests, segmented))]

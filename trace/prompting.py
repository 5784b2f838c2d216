"""The one place where a record becomes a chat prompt — shared by SFT, RL rollouts and lm-eval,
so the policy is always evaluated on exactly the prompt it was trained on — and where the teacher's
private turn is written: the diagnostic label vocabulary, its prefix, and the teacher's prompt."""
from __future__ import annotations

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of the correct option within \\boxed{}."
# the private turn of the reference-solution teachers (SDPO, SRPO, RLSD), followed by the solution
REFERENCE_PREFIX = "A reference solution to the problem the user will ask (do not mention it):\n"


def reference_context(record: dict) -> str | None:
    """The reference-solution teacher's private system turn for one record (None without a solution)."""
    return REFERENCE_PREFIX + record["solution"] if record.get("solution") else None


def user_message(record: dict) -> str:
    """Problem text plus the answer-format instruction (options are listed for multiple choice)."""
    problem = record["problem"]
    if record.get("kind") == "mc":
        if record.get("choices") and "(A)" not in problem:
            problem += "\n" + "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(record["choices"]))
        return f"{problem}\n{CHOICE_INSTRUCTION}"
    return f"{problem}\n{MATH_INSTRUCTION}"


def render_prompt(tokenizer, record: dict, thinking: bool, system_prefix: str | None = None) -> str:
    """Chat-templated prompt text ending where the assistant starts writing.

    ``system_prefix`` is the teacher's private context (e.g. TRACE's diagnostic label); it goes
    in a system turn so the completion tokens stay aligned with the student's.
    """
    messages = [{"role": "system", "content": system_prefix}] if system_prefix else []
    messages.append({"role": "user", "content": user_message(record)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)


# ----------------------------------------------------------------------------------------------
# The annotators' label vocabulary (the paper names only `case_split` and `missed_case`; the rest is ours (?)).
# ----------------------------------------------------------------------------------------------
# Each description is written so that it reads well both in the annotator's menu and in the
# teacher's private prefix.
KEY_LABELS: dict[str, str] = {
    "key_insight": "a non-obvious observation or reformulation that unlocks the problem",
    "correct_setup": "translating the problem into the right variables, equations or model",
    "case_split": "splitting into exhaustive cases and handling each one",
    "known_result": "invoking the right theorem, identity or standard formula",
    "decisive_computation": "the calculation or simplification that actually yields the answer",
    "self_verification": "checking an intermediate result and catching or fixing a mistake",
    "other_key_step": "a decisive step of another kind",
}
ERROR_LABELS: dict[str, str] = {
    "misread_problem": "solving a different question than the one asked (wrong target or ignored condition)",
    "wrong_setup": "variables, equations or model that do not match the problem",
    "missed_case": "a case, branch, root or boundary condition that was not considered",
    "wrong_formula": "a misremembered or misapplied theorem, identity or formula",
    "arithmetic_slip": "a calculation mistake inside otherwise sound reasoning",
    "sign_error": "a sign that was dropped or flipped",
    "unjustified_step": "a claim asserted without justification that does not actually hold",
    "incomplete_solution": "stopping, looping or running out of room before reaching a justified answer",
    "other_error": "a root-cause error of another kind",
}
LABELS: dict[str, str] = {**KEY_LABELS, **ERROR_LABELS}
FALLBACK_KEY_LABEL = "other_key_step"
FALLBACK_ERROR_LABEL = "other_error"
assert not set(KEY_LABELS) & set(ERROR_LABELS), "a label must belong to exactly one kind"


def label_to_teacher_prefix(label: str) -> str:
    """Private text the teacher is conditioned on: the label and its description only.

    Deliberately carries neither the span text nor span positions (paper §2, step 3).
    """
    if label not in LABELS:
        raise ValueError(f"unknown annotation label {label!r}; expected one of {sorted(LABELS)}")
    pretty = label.replace("_", " ")
    if label in KEY_LABELS:
        return f"Private hint: the decisive step in this problem is of type '{pretty}' ({LABELS[label]})."
    return (f"Private hint: a likely pitfall in this problem is of type '{pretty}' ({LABELS[label]}); "
            "reason carefully at that point.")


def teacher_prompt(tokenizer, record: dict, context: str, label_prefix: str | None, thinking: bool) -> str:
    """The teacher's prompt for one rollout: the student's prompt plus a private system turn (if any).

    context='label': TRACE's diagnostic type label (no span text, no positions); a rollout without an
    annotation gets the plain student prompt (it has no routed tokens anyway).
    context='reference': the reference solution (SDPO/SRPO/RLSD-style privileged information).
    context='plain': no private turn, the student's own prompt (OPD's external teacher: a stronger model,
    not a better-informed copy).
    """
    if context == "label":
        prefix = label_prefix
    elif context == "reference":
        prefix = reference_context(record)
    elif context == "plain":
        prefix = None
    else:
        raise ValueError(f"unknown teacher context {context!r} (method.teacher_context): label | reference | plain")
    return render_prompt(tokenizer, record, thinking, system_prefix=prefix)

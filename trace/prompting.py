"""The one place where a record becomes a chat prompt — shared by SFT, RL rollouts and lm-eval,
so the policy is always evaluated on exactly the prompt it was trained on."""
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

"""Chat templates: prompts and conversations rendered as the model will see them, and the
assistant turns located in the rendering so that the loss can cover them and nothing else."""

from __future__ import annotations

from peftcli.config.recipe import DataConfig


def format_prompt(tokenizer, prompt: str, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


# Used for conversations when the tokenizer has no chat template of its own (or data.chat_template
# is false): ChatML, the layout most chat templates follow.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ChatRenderError(ValueError):
    """The chat template cannot render a conversation, or not so that its assistant turns can be found."""


def chat_template_of(tokenizer, cfg: DataConfig) -> str:
    own = getattr(tokenizer, "chat_template", None)
    return own if cfg.chat_template and isinstance(own, str) and own else FALLBACK_CHAT_TEMPLATE


def chat_segments(tokenizer, messages: list[dict[str, str]], template: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces; trained pieces are the assistant turns.

    Templates rarely carry `{% generation %}` markers, so each assistant turn is located by
    rendering incrementally: the conversation up to the turn with the generation prompt, then up
    to and including it. The difference is what the model must produce at inference: the reply
    and the template's end-of-turn marker (trailing whitespace after it is not trained). Both
    renderings must be prefixes of the whole conversation's, or the turn cannot be located. An
    assistant turn that opens the conversation answers nothing and stays untrained.
    """

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                 add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001  (jinja errors, raise_exception() in templates)
            first = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise ChatRenderError(f"the chat template cannot render it: {first}") from None

    full = render(messages, False)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:  # nothing prompts an opening assistant turn (a greeting): context, not a reply; and the
            continue  # template's default system prompt before it would otherwise be trained as if it were one
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)) or len(before) < done:
            raise ChatRenderError(f"the chat template renders assistant turn {i + 1} differently inside the "
                                  "whole conversation; its tokens cannot be located")
        end = max(len(before), len(upto.rstrip()))
        pieces += [(full[done : len(before)], False), (full[len(before) : end], True)]
        done = end
    pieces.append((full[done:], False))
    return [(t, trained) for t, trained in pieces if t]

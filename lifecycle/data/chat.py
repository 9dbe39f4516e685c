"""Chat templates: how a conversation becomes text, and which parts of it the model must learn to write.

A chat example is rendered with the tokenizer's chat template, or :data:`DEFAULT_CHAT_TEMPLATE`
when it has none (the prepare stage then writes it into the tokenizer folder, so training,
evaluation and serving all render the same way). Every assistant turn is labelled; the text the
template puts around it (role headers, the generation prompt) is context.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from lifecycle.data.tokenizer import EOS_TOKEN
from lifecycle.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")

#: The chat format used when the tokenizer has none: one ``"<role>: <content>"`` line per message,
#: EOS closing each assistant turn, and ``"assistant:"`` as the generation prompt. It renders a
#: conversation exactly as the serving stage's plain fallback does (lifecycle.serving.requests.
#: plain_chat_prompt), so a model served without the template still sees the same prompts.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- message['role'] + ': ' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant:' }}{%- endif %}"
)

#: One piece of an example: (text, labelled, followed by EOS).
Segment = tuple[str, bool, bool]


class ChatRenderer:
    """Renders chat messages with a Jinja chat template, the way transformers does.

    Built from plain strings (template, special tokens) so it pickles into worker processes and
    works before the tokenizer exists (a trained tokenizer is made after filtering).
    """

    def __init__(self, template: str, *, eos_token: str, bos_token: str | None = None, from_tokenizer: bool = False):
        self.template = template
        self.eos_token = eos_token
        self.bos_token = bos_token or ""
        self.from_tokenizer = from_tokenizer
        self._compiled: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None}

    def _compile(self) -> Any:
        if self._compiled is None:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise jinja2.exceptions.TemplateError(message)

            # The environment transformers' apply_chat_template uses.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(self.template)
            except jinja2.TemplateError as exc:
                raise ConfigError(f"the chat template does not compile: {exc}") from None
        return self._compiled

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The template applied to ``messages``."""
        import jinja2

        try:
            return self._compile().render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                          eos_token=self.eos_token, bos_token=self.bos_token)
        except jinja2.TemplateError as exc:
            raise DataError(f"the chat template refused a conversation: {exc}") from None


def renderer_for(tokenizer: Any | None) -> ChatRenderer:
    """The tokenizer's own chat template if it has one, else :data:`DEFAULT_CHAT_TEMPLATE`."""
    if tokenizer is None:
        return ChatRenderer(DEFAULT_CHAT_TEMPLATE, eos_token=EOS_TOKEN)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    eos = tokenizer.eos_token or EOS_TOKEN
    if template:
        return ChatRenderer(template, eos_token=eos, bos_token=tokenizer.bos_token, from_tokenizer=True)
    return ChatRenderer(DEFAULT_CHAT_TEMPLATE, eos_token=eos, bos_token=tokenizer.bos_token)


def _split_span(span: str, eos: str) -> tuple[str, str]:
    """A rendered assistant turn cut after its EOS: (response without EOS, what follows)."""
    at = span.find(eos) if eos else -1
    if at < 0:
        return span, ""
    return span[:at], span[at + len(eos):]


def chat_segments(messages: Sequence[dict[str, str]], renderer: ChatRenderer) -> list[Segment]:
    """Segments of a conversation: the template's text as context, each assistant turn labelled.

    Turn ``i``'s response is what the full rendering of ``messages[:i+1]`` adds to the rendering
    of ``messages[:i]`` with the generation prompt, i.e. exactly what the model must write after
    the prompt it is served. A template that does not render that way is refused.
    """
    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = renderer.render(messages[:i], add_generation_prompt=True)
        full = renderer.render(messages[:i + 1])
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError("the chat template does not render a conversation as prompt + answer "
                            "(a turn's rendering is not a prefix of the next); use a template that does")
        response, rest = _split_span(full[len(prefix):], renderer.eos_token)
        segments.append((prefix[len(done):], False, False))
        segments.append((response, True, True))
        done = full[:len(full) - len(rest)]
    return [s for s in segments if s[0] or s[2]]


def final_prompt(example: dict[str, Any], renderer: ChatRenderer) -> tuple[str, str]:
    """(prompt, reference): what to send the served model and the answer expected back."""
    if "messages" in example:
        messages = example["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return renderer.render(messages[:last], add_generation_prompt=True), messages[last]["content"]
    return example["prompt"], example["response"]


def example_segments(example: dict[str, Any], renderer: ChatRenderer) -> list[Segment]:
    """Segments of a cleaned example (see the module docstring)."""
    if "messages" in example:
        return chat_segments(example["messages"], renderer)
    return [(example["prompt"], False, False), (example["response"], True, True)]


"""Conversation templates the project adds to FastChat, and model-name routing to them.

FastChat builds prompts in two places: the API server asks the worker for its template,
while the web UI picks one from the model NAME through its model adapters. Every process
of the stack calls `use_for_models` with the same name → template map from conf/, so a
conversation becomes the same prompt string on both paths.
"""

from __future__ import annotations

import os

from fastchat.conversation import Conversation, SeparatorStyle, conv_templates, get_conv_template, register_conv_template

# SmolLM2-Instruct's own chat template (its tokenizer_config.json): ChatML with a default
# system prompt. FastChat's CHATML style renders exactly the same string.
SMOLLM2 = Conversation(
    name="smollm2",
    system_template="<|im_start|>system\n{system_message}",
    system_message="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    roles=("<|im_start|>user", "<|im_start|>assistant"),
    sep_style=SeparatorStyle.CHATML,
    sep="<|im_end|>",
    stop_str="<|im_end|>",
    stop_token_ids=[2],  # <|im_end|>
)

OWN = {conv.name: conv for conv in (SMOLLM2,)}


def known() -> set[str]:
    """Every template name a model config may use: FastChat's and the project's."""
    _register()
    return set(conv_templates)


def use_for_models(model_templates: dict[str, str]) -> None:
    """Make FastChat's name-based template lookup answer `model_templates[name]`."""
    _register()
    from fastchat.model import model_adapter

    class ConfiguredModels(model_adapter.BaseModelAdapter):
        def match(self, model_path: str) -> bool:
            return os.path.basename(model_path) in model_templates

        def get_default_conv_template(self, model_path: str) -> Conversation:
            return get_conv_template(model_templates[os.path.basename(model_path)])

    # First in the list: FastChat's own adapters match loosely by substring ("qwen", "chatglm").
    adapters = model_adapter.model_adapters
    adapters[:] = [a for a in adapters if type(a).__name__ != "ConfiguredModels"]
    adapters.insert(0, ConfiguredModels())
    model_adapter.get_model_adapter.cache_clear()


def _register() -> None:
    for conv in OWN.values():
        if conv.name not in conv_templates:
            register_conv_template(conv)

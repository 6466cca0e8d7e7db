"""Prompts, labels, image tensors and tokenizers: the layer training, evaluation and serving share."""

from llava_smoe.processing.images import (
    ImageProcessingConfig,
    load_image,
    pad_to_square,
    preprocess_image,
    to_rgb,
)
from llava_smoe.processing.processor import (
    IGNORE_INDEX,
    LlavaSmoeProcessor,
    ProcessorConfig,
)
from llava_smoe.processing.templates import (
    BUILTIN_TEMPLATES,
    TEMPLATE_NAMES,
    ChatTemplate,
    ConversationError,
    Message,
    Segment,
    TokenizerChatTemplate,
    check_turn_order,
    get_template,
    normalize_messages,
)
from llava_smoe.processing.tokenizer import (
    CHATML_JINJA,
    DEFAULT_IMAGE_TOKEN,
    ensure_special_tokens,
    template_control_tokens,
    train_bpe_tokenizer,
)

__all__ = [
    "BUILTIN_TEMPLATES",
    "CHATML_JINJA",
    "DEFAULT_IMAGE_TOKEN",
    "IGNORE_INDEX",
    "TEMPLATE_NAMES",
    "ChatTemplate",
    "ConversationError",
    "ImageProcessingConfig",
    "LlavaSmoeProcessor",
    "Message",
    "ProcessorConfig",
    "Segment",
    "TokenizerChatTemplate",
    "check_turn_order",
    "ensure_special_tokens",
    "get_template",
    "load_image",
    "normalize_messages",
    "pad_to_square",
    "preprocess_image",
    "template_control_tokens",
    "to_rgb",
    "train_bpe_tokenizer",
]

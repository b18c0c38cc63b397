"""Parameter-efficient fine-tuning as gin switches: `train.peft = @LoRA()` (gin/peft/lora.gin) etc.

See `core` for the shared interface; one module per method.
"""

from itjax.peft.core import AdapterParam, PeftConfigError, PeftMethod, adapter_dropout  # noqa: F401
from itjax.peft.lora import LoRA, merge_lora  # noqa: F401
from itjax.peft.prompt_tuning import PromptTuning  # noqa: F401
from itjax.peft.ia3 import IA3  # noqa: F401
from itjax.peft.prefix_tuning import PrefixTuning  # noqa: F401

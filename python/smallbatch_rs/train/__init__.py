"""Training the paper's transformer at small batch sizes with this package's optimizers.

``smallbatch-rs train`` is the command-line face of :func:`train`; ``suggest-batch-size`` of
:func:`suggest_batch_size`. The modules: :mod:`.model` (architecture and presets), :mod:`.data`
(corpus, tokenizer, shards), :mod:`.config` (settings), :mod:`.trainer` (the loop),
:mod:`.checkpoint` (safetensors checkpoints; under FSDP, sharded ones with
``torch.distributed.checkpoint``) and :mod:`.suggest` (the batch-size advisor).
"""

from .config import OPTIMIZERS, TrainConfig
from .model import PRESETS, ModelConfig, Transformer
from .trainer import TrainError, train

__all__ = ["OPTIMIZERS", "PRESETS", "ModelConfig", "TrainConfig", "TrainError", "Transformer", "train"]

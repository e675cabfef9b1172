from neuronx_distributed_inference.modules.lora_serving.config import LoraServingConfig
from neuronx_distributed_inference.modules.lora_serving.lora_model import LoraModelManager

__all__ = ["LoraModelManager", "LoraServingConfig"]

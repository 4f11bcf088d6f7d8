"""mae_hf: masked autoencoders as first-class Hugging Face Transformers models.

Importing the package registers the models with the Auto classes, and marks them so that `save_pretrained` copies
the code files next to the weights (`trust_remote_code=True` then loads them without this package).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from .configuration_mae import MAEConfig
from .modeling_mae import (
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    MAEPreTrainedModel,
    random_masking,
    sincos_position_embedding,
)

AutoConfig.register(MAEConfig.model_type, MAEConfig, exist_ok=True)
MAEConfig.register_for_auto_class()
for auto_class, model_class in ((AutoModel, MAEModel), (AutoModelForPreTraining, MAEForPreTraining),
                                 (AutoModelForImageClassification, MAEForImageClassification)):
    auto_class.register(MAEConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class.__name__)

__all__ = ["MAEConfig", "MAEForImageClassification", "MAEForPreTraining", "MAEModel", "MAEPreTrainedModel",
           "random_masking", "sincos_position_embedding"]

"""Networks, chosen by ``model.arch`` through :data:`ARCHS` (:mod:`.registry`): the MLP family (:mod:`.mlp`)
and WideResNet (:mod:`.wrn`). Importing this package registers them and the activations."""
from sparsebench.models.registry import ACTIVATIONS, ARCHS, build_model, check_model, check_model_fits_dataset
from sparsebench.models.mlp import MLP, BipolarSigmoid  # noqa: E402  (registers mlp and the activations)
from sparsebench.models.wrn import WideResNet  # noqa: E402  (registers wrn)

__all__ = ["ACTIVATIONS", "ARCHS", "build_model", "check_model", "check_model_fits_dataset", "MLP",
           "BipolarSigmoid", "WideResNet"]

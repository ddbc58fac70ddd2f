"""Models: the IND classifiers and the conditional VAEs, one family each for MNIST and CIFAR."""

from cmg.models.classifier import Classifier, build_classifier, ind_logits
from cmg.models.cvae import CVAE, build_cvae, cvae_loss

__all__ = ["CVAE", "Classifier", "build_classifier", "build_cvae", "cvae_loss", "ind_logits"]

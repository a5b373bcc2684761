"""Classifier training techniques: class weights, focal loss, R-Drop, FGM/PGD, EMA.

Each piece returns an object or a tensor; the training loop in train_classifier.py
decides when to call it. The README section "Classifier techniques" says when each
one helps and what it costs.
"""
import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError

CLASS_WEIGHT_SCHEMES = ("none", "balanced", "effective")
LOSSES = ("ce", "focal")
IGNORE_INDEX = -100


# ---------------------------------------------------------------- class imbalance

def compute_class_weights(label_counts: Sequence[int], scheme="none", beta=0.999):
    """Per-class loss weights from training label counts, or None for ``scheme="none"``.

    ``balanced``: ``n_samples / (n_classes * count)`` (scikit-learn's formula).
    ``effective``: ``(1 - beta) / (1 - beta**count)`` (Cui et al. 2019, the inverse of
    the "effective number of samples"), normalised to sum to ``n_classes``.
    A class with no training examples is weighted as if it had one, so no weight is
    infinite. Returns a float32 tensor of shape (n_classes,).
    """
    if scheme not in CLASS_WEIGHT_SCHEMES:
        raise UserError(f"--class-weights: unknown scheme {scheme!r} (choose from {', '.join(CLASS_WEIGHT_SCHEMES)})")
    if scheme == "none":
        return None
    counts = torch.tensor([max(int(count), 1) for count in label_counts], dtype=torch.float64)
    num_classes = len(counts)
    if scheme == "balanced":
        weights = counts.sum() / (num_classes * counts)
    else:
        if not 0.0 <= beta < 1.0:
            raise UserError(f"--class-weights-beta: must be in [0, 1), got {beta}")
        weights = (1.0 - beta) / (1.0 - torch.pow(beta, counts))
        weights = weights * num_classes / weights.sum()
    return weights.to(torch.float32)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017) with class weights and label smoothing.

    Per example: ``sum_k q_k * alpha_k * (1 - p_k)**gamma * -log p_k`` where ``q`` is the
    (smoothed) target distribution and ``alpha`` the class weights. The mean divides by
    the summed weight of the target classes, as ``F.cross_entropy`` does, so with
    ``gamma=0`` this equals cross-entropy exactly, weights and smoothing included.
    Labels equal to -100 are ignored.
    """

    def __init__(self, gamma=2.0, class_weights=None, label_smoothing=0.0):
        super().__init__()
        if gamma < 0:
            raise UserError(f"--focal-gamma: must be >= 0, got {gamma}")
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", None if class_weights is None else torch.as_tensor(class_weights))

    def forward(self, logits, labels):
        """logits (batch, classes), labels (batch,) -> scalar."""
        keep = labels != IGNORE_INDEX
        logits, labels = logits[keep], labels[keep]
        num_classes = logits.shape[-1]
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (batch, classes)
        targets = F.one_hot(labels, num_classes).to(log_probs.dtype)
        targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        # (batch, classes); the floor keeps the gradient of x**gamma finite at x = 0 when gamma < 1
        focus = (1.0 - log_probs.exp()).clamp(min=1e-6).pow(self.gamma)
        weights = (torch.ones(num_classes, device=logits.device) if self.class_weights is None
                   else self.class_weights.to(logits.device, log_probs.dtype))
        per_example = -(targets * weights * focus * log_probs).sum(-1)  # (batch,)
        return per_example.sum() / weights[labels].sum().clamp(min=torch.finfo(log_probs.dtype).tiny)


def build_loss(name="ce", class_weights=None, label_smoothing=0.0, focal_gamma=2.0):
    """``callable(logits, labels) -> scalar``: cross-entropy or focal loss.

    Both take the same class weights and label smoothing; -100 labels are ignored.
    """
    if name not in LOSSES:
        raise UserError(f"--loss: unknown loss {name!r} (choose from {', '.join(LOSSES)})")
    if not 0.0 <= label_smoothing < 1.0:
        raise UserError(f"--label-smoothing: must be in [0, 1), got {label_smoothing}")
    if name == "focal":
        return FocalLoss(focal_gamma, class_weights, label_smoothing)
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------- R-Drop

def symmetric_kl(logits_a, logits_b):
    """R-Drop's consistency term: batch mean of ``(KL(p||q) + KL(q||p)) / 2``.

    logits_a, logits_b: (batch, classes) from two dropout passes over the same inputs.
    """
    log_p = F.log_softmax(logits_a.float(), dim=-1)
    log_q = F.log_softmax(logits_b.float(), dim=-1)
    # kl_div(input, target) is KL(target || input)
    kl_p_q = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    kl_q_p = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    return (kl_p_q + kl_q_p) / 2


# ---------------------------------------------------------------- adversarial training

def find_embedding_parameter(model, embedding_name=None):
    """The word-embedding weight that FGM/PGD perturb.

    With ``embedding_name``, the one parameter whose name contains it; otherwise
    ``model.backbone.get_input_embeddings().weight`` (or the model's own input embeddings).
    """
    if embedding_name:
        matches = [parameter for name, parameter in model.named_parameters() if embedding_name in name]
        if len(matches) != 1:
            raise UserError(f"adversarial training: {len(matches)} parameters match {embedding_name!r}; "
                            "need exactly one")
        parameter = matches[0]
    else:
        owner = getattr(model, "backbone", model)
        if not hasattr(owner, "get_input_embeddings"):
            raise UserError("adversarial training: cannot find the word embeddings; pass embedding_name")
        parameter = owner.get_input_embeddings().weight
    if not parameter.requires_grad:
        raise UserError("--adversarial needs trainable word embeddings; it cannot be used with a frozen backbone")
    return parameter


def _unit_gradient(parameter):
    """``grad / ||grad||``, or None when the gradient is missing, zero or not finite
    (a step the GradScaler will skip: perturbing along inf would destroy the weights)."""
    if parameter.grad is None:
        return None
    norm = torch.linalg.vector_norm(parameter.grad.float())
    if not torch.isfinite(norm) or norm == 0:
        return None
    return parameter.grad / norm


class FGM:
    """Fast Gradient Method on the word embeddings (Miyato et al. 2017).

    After the clean backward: ``attack()`` adds ``epsilon * grad / ||grad||`` to the
    embedding matrix (keeping a copy), the loop runs a second forward/backward whose
    gradients add to the clean ones, then ``restore()`` puts the exact weights back
    before the optimizer step.
    """

    def __init__(self, model, epsilon=1.0, embedding_name=None):
        self.parameter = find_embedding_parameter(model, embedding_name)
        self.epsilon = epsilon
        self.backup = None

    @torch.no_grad()
    def attack(self):
        """Back up the embeddings and step epsilon along the normalised gradient."""
        self.backup = self.parameter.detach().clone()
        direction = _unit_gradient(self.parameter)
        if direction is not None:
            self.parameter.add_(self.epsilon * direction)

    @torch.no_grad()
    def restore(self):
        """Put the backed-up embeddings back exactly."""
        if self.backup is not None:
            self.parameter.copy_(self.backup)
        self.backup = None


class PGD:
    """Projected Gradient Descent on the word embeddings (Madry et al. 2018), K steps.

    Loop per batch: clean backward; ``backup_grad()``; for each step ``attack(first=
    step == 0)``, then zero the gradients except before the last step, where
    ``restore_grad()`` brings the clean gradients back so the last adversarial backward
    adds to them; finally ``restore()``. Each step moves ``alpha`` along the normalised
    gradient and projects the total perturbation back onto the ``epsilon`` ball
    (Frobenius norm over the embedding matrix).
    """

    def __init__(self, model, epsilon=1.0, alpha=0.3, steps=3, embedding_name=None):
        self.model = model
        self.parameter = find_embedding_parameter(model, embedding_name)
        self.epsilon = epsilon
        self.alpha = alpha
        self.steps = steps
        self.backup = None
        self.grad_backup = {}

    @torch.no_grad()
    def attack(self, first=False):
        """One step of alpha along the normalised gradient, projected; ``first`` backs up the clean weights."""
        if first or self.backup is None:
            self.backup = self.parameter.detach().clone()
        direction = _unit_gradient(self.parameter)
        if direction is not None:
            self.parameter.add_(self.alpha * direction)
            self.parameter.copy_(self.project(self.parameter))

    def project(self, weights):
        """``weights`` moved back inside the epsilon ball around the clean weights."""
        delta = weights - self.backup
        norm = torch.linalg.vector_norm(delta.float())
        if norm > self.epsilon:
            delta = delta * (self.epsilon / norm)
        return self.backup + delta

    @torch.no_grad()
    def restore(self):
        """Put the clean embeddings back exactly."""
        if self.backup is not None:
            self.parameter.copy_(self.backup)
        self.backup = None

    def backup_grad(self):
        """Keep the clean gradients of every trainable parameter (one extra copy of the gradients)."""
        self.grad_backup = {name: None if parameter.grad is None else parameter.grad.clone()
                            for name, parameter in self.model.named_parameters() if parameter.requires_grad}

    def restore_grad(self):
        """Put the clean gradients back, so the next backward adds the adversarial ones to them."""
        for name, parameter in self.model.named_parameters():
            if name in self.grad_backup:
                parameter.grad = self.grad_backup[name]
        self.grad_backup = {}


# ---------------------------------------------------------------- weight averaging

class ExponentialMovingAverage:
    """An exponential moving average of a model's weights, for evaluation and saving.

    ``update(model)`` after each optimizer step: ``shadow = decay * shadow + (1 - decay)
    * param`` for floating-point parameters; buffers (and integer tensors) are copied.
    The average remembers about the last ``1 / (1 - decay)`` steps; after N steps the
    starting weights still weigh ``decay ** N``, so pick decay with that in mind.
    """

    def __init__(self, model, decay=0.999):
        if not 0.0 <= decay <= 1.0:
            raise UserError(f"--ema-decay: must be in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: tensor.detach().clone() for name, tensor in self._tensors(model)}

    @staticmethod
    def _tensors(model):
        """(name, tensor) for every parameter, then every buffer."""
        for name, parameter in model.named_parameters():
            yield name, parameter
        for name, buffer in model.named_buffers():
            yield name, buffer

    @torch.no_grad()
    def update(self, model):
        """Fold the model's current weights into the average (call after each optimizer step)."""
        parameter_names = {name for name, _ in model.named_parameters()}
        for name, tensor in self._tensors(model):
            shadow = self.shadow[name]
            if name in parameter_names and tensor.is_floating_point():
                shadow.mul_(self.decay).add_(tensor.detach(), alpha=1.0 - self.decay)
            else:
                shadow.copy_(tensor.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model):
        """Overwrite the model's weights with the averaged ones."""
        for name, tensor in self._tensors(model):
            tensor.copy_(self.shadow[name])

    @contextlib.contextmanager
    def average_parameters(self, model):
        """Swap the averaged weights in (for evaluation or saving) and the training weights back after."""
        backup = {name: tensor.detach().clone() for name, tensor in self._tensors(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, tensor in self._tensors(model):
                    tensor.copy_(backup[name])

    def state_dict(self):
        """Decay, update count and the averaged tensors, for the training checkpoint."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {name: tensor.clone() for name, tensor in self.shadow.items()}}

    def load_state_dict(self, state):
        """Restore what ``state_dict`` returned (on resume)."""
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, tensor in self.shadow.items():
                tensor.copy_(state["shadow"][name])

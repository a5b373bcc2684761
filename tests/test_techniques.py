"""common/techniques.py: class weights, losses, R-Drop's KL, FGM/PGD, EMA."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import techniques
from common.errors import UserError


# ---------------------------------------------------------------- class weights

def test_no_class_weights():
    assert techniques.compute_class_weights([5, 5], "none") is None


def test_balanced_weights_follow_sklearn():
    from sklearn.utils.class_weight import compute_class_weight
    labels = [0] * 90 + [1] * 8 + [2] * 2
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.array(labels))
    weights = techniques.compute_class_weights([90, 8, 2], "balanced")
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float32))
    assert weights[2] == pytest.approx(100 / (3 * 2))


def test_effective_number_weights_sum_to_the_class_count():
    beta = 0.9
    weights = techniques.compute_class_weights([10, 1], "effective", beta)
    raw = torch.tensor([(1 - beta) / (1 - beta ** 10), (1 - beta) / (1 - beta)])
    assert torch.allclose(weights, raw * 2 / raw.sum())
    assert weights.sum().item() == pytest.approx(2.0)
    assert weights[1] > weights[0]


@pytest.mark.parametrize("scheme", ["balanced", "effective"])
def test_a_class_without_examples_gets_a_finite_weight(scheme):
    weights = techniques.compute_class_weights([50, 0, 10], scheme)
    assert torch.isfinite(weights).all() and weights[1] >= weights[2] > weights[0]


def test_unknown_scheme_is_a_user_error():
    with pytest.raises(UserError, match="inverse"):
        techniques.compute_class_weights([1, 2], "inverse")


# ---------------------------------------------------------------- losses

def random_batch(seed=0, batch=16, classes=4):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=generator) * 3
    return logits, torch.randint(0, classes, (batch,), generator=generator)


@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 2.0, 0.5, 4.0])])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_with_gamma_zero_equals_cross_entropy(weights, smoothing):
    logits, labels = random_batch()
    focal = techniques.build_loss("focal", weights, smoothing, focal_gamma=0.0)(logits, labels)
    expected = F.cross_entropy(logits, labels, weight=weights, label_smoothing=smoothing)
    assert focal.item() == pytest.approx(expected.item(), rel=1e-5)
    ce = techniques.build_loss("ce", weights, smoothing)(logits, labels)
    assert ce.item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_down_weights_easy_examples():
    loss_fn = techniques.build_loss("focal", focal_gamma=2.0)
    labels = torch.tensor([0])
    easy, hard = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.5, 0.0]])
    ce = nn.CrossEntropyLoss()
    easy_ratio = loss_fn(easy, labels) / ce(easy, labels)
    hard_ratio = loss_fn(hard, labels) / ce(hard, labels)
    p_easy = torch.softmax(easy, -1)[0, 0]
    assert easy_ratio.item() == pytest.approx(((1 - p_easy) ** 2).item(), rel=1e-5)
    assert easy_ratio < hard_ratio < 1


def test_losses_ignore_unlabelled_rows():
    logits, labels = random_batch()
    masked = labels.clone()
    masked[:4] = -100
    for name in ("ce", "focal"):
        loss_fn = techniques.build_loss(name, focal_gamma=1.0)
        assert loss_fn(logits, masked).item() == pytest.approx(loss_fn(logits[4:], labels[4:]).item(), rel=1e-6)


def test_focal_loss_backpropagates():
    logits, labels = random_batch()
    logits.requires_grad_(True)
    techniques.build_loss("focal", torch.ones(4), 0.1, 2.0)(logits, labels).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bad_loss_options_are_user_errors():
    with pytest.raises(UserError, match="--loss"):
        techniques.build_loss("hinge")
    with pytest.raises(UserError, match="--label-smoothing"):
        techniques.build_loss("ce", label_smoothing=1.5)
    with pytest.raises(UserError, match="--focal-gamma"):
        techniques.build_loss("focal", focal_gamma=-1)


# ---------------------------------------------------------------- R-Drop

def test_symmetric_kl():
    logits_a, _ = random_batch(1)
    logits_b, _ = random_batch(2)
    assert techniques.symmetric_kl(logits_a, logits_a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    forward = techniques.symmetric_kl(logits_a, logits_b)
    assert forward.item() > 0.01
    assert forward.item() == pytest.approx(techniques.symmetric_kl(logits_b, logits_a).item(), rel=1e-6)
    p, q = torch.softmax(logits_a, -1), torch.softmax(logits_b, -1)
    by_hand = ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean() / 2
    assert forward.item() == pytest.approx(by_hand.item(), rel=1e-4)


# ---------------------------------------------------------------- FGM / PGD

class TinyTextModel(nn.Module):
    """Embedding -> mean -> linear, with a ``backbone`` exposing get_input_embeddings like ours."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Module()
        self.backbone.embeddings = nn.Embedding(20, 8)
        self.backbone.get_input_embeddings = lambda: self.backbone.embeddings
        self.classifier = nn.Linear(8, 3)

    def forward(self, input_ids):
        return self.classifier(self.backbone.embeddings(input_ids).mean(1))


def clean_backward(model):
    input_ids, labels = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([0, 2])
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(input_ids), labels)
    loss.backward()
    return lambda: F.cross_entropy(model(input_ids), labels).item(), loss.item()


def test_fgm_restores_the_embeddings_bit_exactly_and_raises_the_loss():
    model = TinyTextModel()
    weights = model.backbone.embeddings.weight
    original = weights.detach().clone()
    compute_loss, clean_loss = clean_backward(model)
    fgm = techniques.FGM(model, epsilon=0.05)
    fgm.attack()
    perturbation = weights.detach() - original
    assert torch.linalg.vector_norm(perturbation).item() == pytest.approx(0.05, rel=1e-4)
    assert compute_loss() > clean_loss  # a small step along the gradient increases the loss
    fgm.restore()
    assert torch.equal(weights.detach(), original)


def test_fgm_finds_embeddings_by_name():
    model = TinyTextModel()
    assert techniques.FGM(model, embedding_name="embeddings").parameter is model.backbone.embeddings.weight
    with pytest.raises(UserError, match="exactly one"):
        techniques.FGM(model, embedding_name="weight")


def test_fgm_skips_a_non_finite_gradient():
    model = TinyTextModel()
    weights = model.backbone.embeddings.weight
    original = weights.detach().clone()
    weights.grad = torch.full_like(weights, float("inf"))
    fgm = techniques.FGM(model, epsilon=1.0)
    fgm.attack()
    assert torch.equal(weights.detach(), original)


def test_adversarial_training_refuses_frozen_embeddings():
    model = TinyTextModel()
    model.backbone.embeddings.weight.requires_grad_(False)
    with pytest.raises(UserError, match="frozen"):
        techniques.FGM(model)


def test_pgd_stays_in_the_epsilon_ball_and_restores_weights_and_gradients():
    model = TinyTextModel()
    weights = model.backbone.embeddings.weight
    original = weights.detach().clone()
    compute_loss, clean_loss = clean_backward(model)
    clean_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    pgd = techniques.PGD(model, epsilon=0.1, alpha=0.08, steps=3)
    pgd.backup_grad()
    input_ids, labels = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([0, 2])
    for step in range(pgd.steps):
        pgd.attack(first=step == 0)
        assert torch.linalg.vector_norm(weights.detach() - original).item() <= 0.1 + 1e-6
        if step < pgd.steps - 1:
            model.zero_grad(set_to_none=True)
        else:
            pgd.restore_grad()
        F.cross_entropy(model(input_ids), labels).backward()
    # three steps of 0.08 would reach 0.24: the projection held it at the ball's edge
    assert torch.linalg.vector_norm(weights.detach() - original).item() == pytest.approx(0.1, rel=1e-4)
    assert compute_loss() > clean_loss
    pgd.restore()
    assert torch.equal(weights.detach(), original)
    for name, parameter in model.named_parameters():  # clean gradient + last adversarial gradient
        assert not torch.equal(parameter.grad, clean_grads[name])


def test_pgd_restore_grad_puts_back_the_clean_gradients():
    model = TinyTextModel()
    clean_backward(model)
    clean_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    pgd = techniques.PGD(model, epsilon=1.0, alpha=0.3, steps=2)
    pgd.backup_grad()
    model.zero_grad(set_to_none=True)
    pgd.restore_grad()
    assert all(torch.equal(p.grad, clean_grads[name]) for name, p in model.named_parameters())


# ---------------------------------------------------------------- EMA

class ParameterAndBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.register_buffer("steps", torch.tensor(0))


def test_ema_update_by_hand():
    model = ParameterAndBuffer()
    ema = techniques.ExponentialMovingAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([3.0, 2.0]))
        model.steps.fill_(7)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.tensor([0.9 * 1 + 0.1 * 3, 2.0]))
    assert ema.shadow["steps"].item() == 7  # buffers are copied, not averaged
    with torch.no_grad():
        model.weight.copy_(torch.tensor([5.0, 0.0]))
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.tensor([0.9 * 1.2 + 0.1 * 5, 0.9 * 2.0]))
    assert ema.num_updates == 2


def test_ema_average_parameters_swaps_in_and_back():
    model = ParameterAndBuffer()
    ema = techniques.ExponentialMovingAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([3.0, 4.0]))
    ema.update(model)
    with ema.average_parameters(model):
        assert torch.equal(model.weight.detach(), torch.tensor([2.0, 3.0]))
    assert torch.equal(model.weight.detach(), torch.tensor([3.0, 4.0]))
    ema.copy_to(model)
    assert torch.equal(model.weight.detach(), torch.tensor([2.0, 3.0]))


def test_ema_average_parameters_restores_after_an_exception():
    model = ParameterAndBuffer()
    ema = techniques.ExponentialMovingAverage(model, decay=0.0)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([3.0, 4.0]))
    ema.shadow["weight"].fill_(0.0)
    with pytest.raises(RuntimeError):
        with ema.average_parameters(model):
            raise RuntimeError("evaluation failed")
    assert torch.equal(model.weight.detach(), torch.tensor([3.0, 4.0]))


def test_ema_state_dict_round_trip(tmp_path):
    model = ParameterAndBuffer()
    ema = techniques.ExponentialMovingAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    restored = techniques.ExponentialMovingAverage(ParameterAndBuffer(), decay=0.5)
    restored.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert restored.decay == 0.9 and restored.num_updates == 1
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def test_ema_on_the_tiny_bert(tiny_model_dir):
    from common.heads import SequenceClassifier
    from common.modeldir import load_pretrained_backbone
    model = SequenceClassifier(load_pretrained_backbone(str(tiny_model_dir)), 2)
    ema = techniques.ExponentialMovingAverage(model, decay=1.0)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    ema.update(model)
    with ema.average_parameters(model):
        assert all(torch.equal(p.detach(), start[name]) for name, p in model.named_parameters())
    assert not torch.equal(model.head.classifier.weight.detach(), start["head.classifier.weight"])

"""CFD (sferd/methods/cfd.py, sferd/nn/classifiers.py): the loss against the paper's formula written out in numpy,
gradients that reach only the student, coverage groups that make the result independent of the batch split, and
the classifier networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sferd.diffusion.denoiser import NetworkDenoiser
from sferd.methods.cfd import GroupError, cfd_loss, cfd_objective, coverage_groups
from sferd.methods.draws import SampleDraws
from sferd.nn.classifiers import Classifier, load_classifier, save_classifier
from sferd.nn.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def reference(logits_s, feat_s, feat_t, tau, beta, gamma, groups):
    """CFD's objective per sample (Sun et al. §3; baselines.md §4), one sample at a time in float64 numpy:
    KL(softmax(f_T/τ) ‖ softmax(f_S)) + β[γ·H(softmax(p_S)) + (1 − γ)·Σ_c p̄_c log p̄_c of the sample's group]."""
    n = len(logits_s)
    probs = [_softmax(logits_s[i]) for i in range(n)]
    out = []
    for i in range(n):
        q, s = _softmax(feat_t[i] / tau), _softmax(feat_s[i])
        kl = sum(q[k] * (np.log(q[k]) - np.log(s[k])) for k in range(len(q)))
        if beta == 0:
            out.append(kl)
            continue
        h = -sum(p * np.log(p) for p in probs[i])
        members = [j for j in range(n) if groups[j] == groups[i]]
        p_bar = sum(probs[j] for j in members) / len(members)
        d = sum(p * np.log(p) for p in p_bar if p > 0)
        out.append(kl + beta * (gamma * h + (1 - gamma) * d))
    return np.array(out)


@pytest.mark.parametrize("tau, beta, gamma", [(0.95, 0.003, 0.75), (0.9, 0.0, None), (0.5, 2.0, 0.3), (1.0, 1.0, 0.0)])
def test_objective_equals_the_formula(tau, beta, gamma):
    rng = np.random.default_rng(1)
    logits, fs, ft = rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 7)), rng.normal(size=(6, 7))
    groups = np.array([0, 0, 0, 1, 1, 1])
    got = cfd_objective(torch.tensor(logits), torch.tensor(fs), torch.tensor(ft), temperature=tau, beta=beta,
                        gamma=gamma, groups=torch.tensor(groups))
    np.testing.assert_allclose(got.double().numpy(), reference(logits, fs, ft, tau, beta, gamma, groups), rtol=2e-5,
                               atol=1e-6)


def test_objective_is_zero_for_a_student_equal_to_an_unsharpened_teacher():
    f = torch.randn(4, 9)
    kl = cfd_objective(torch.randn(4, 3), f, f, temperature=1.0, beta=0.0, gamma=None, groups=torch.zeros(4).long())
    assert torch.allclose(kl, torch.zeros(4), atol=1e-6)


def test_coverage_rewards_a_batch_spread_over_the_classes():
    """D = Σ p̄ log p̄ is lowest (−log K) when the batch covers every class, 0 when every sample is one class."""
    confident = torch.eye(4) * 30  # four samples, four different classes
    same = torch.zeros(4, 4)
    same[:, 0] = 30
    f = torch.zeros(4, 2)
    args = dict(temperature=1.0, beta=1.0, gamma=0.0, groups=torch.zeros(4).long())
    assert torch.allclose(cfd_objective(confident, f, f, **args), torch.full((4,), -float(np.log(4))), atol=1e-5)
    assert torch.allclose(cfd_objective(same, f, f, **args), torch.zeros(4), atol=1e-5)


def test_groups_follow_global_indices_and_refuse_a_split_group():
    assert coverage_groups(4, 2, [10, 11, 8, 9]).tolist() == [0, 0, 1, 1]
    assert coverage_groups(3, None, None).tolist() == [0, 0, 0]
    with pytest.raises(GroupError, match="coverage group 5 has 1 of its 2 samples"):
        coverage_groups(3, 2, [8, 9, 10])


def _tiny_unet(seed):
    torch.manual_seed(seed)
    net = UNet(UNetConfig(1, 1, 8, 8, (1, 2), 1, (4,), norm_groups=4))
    with torch.no_grad():  # zero-initialised output layers would make every prediction 0
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _tiny_classifier(seed=3):
    torch.manual_seed(seed)
    return Classifier({"architecture": "digits-cnn", "channels": 1, "resolution": 8, "num_classes": 10,
                       "pretrained": False, "width": 8, "feature_dim": 8})


def test_gradients_reach_only_the_student(tmp_path):
    """Teacher and classifier as the stage builds them (frozen by load_model / load_classifier): after backward
    only the student's parameters hold gradients, and every student parameter that affects x̂₀ gets one."""
    save_classifier(tmp_path / "c.pt", _tiny_classifier())
    classifier = load_classifier(tmp_path / "c.pt")
    teacher_net, student_net = _tiny_unet(0).eval().requires_grad_(False), _tiny_unet(1)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = cfd_loss(NetworkDenoiser(student_net, "x"), NetworkDenoiser(teacher_net, "x"), x0, 4,
                    SampleDraws(0, 1, range(4)), classifier=classifier, temperature=0.9, beta=0.5, gamma=0.5)
    loss.mean().backward()
    assert all(p.grad is None for p in teacher_net.parameters())
    assert all(not p.requires_grad and p.grad is None for p in classifier.parameters())
    grads = [p.grad for p in student_net.parameters()]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2


def test_the_teacher_side_carries_no_gradient():
    """Even with a classifier whose parameters would train, the teacher target's features are constants: the
    gradient of the loss with respect to them is zero (only the student branch differentiates)."""
    classifier = _tiny_classifier()
    teacher_net, student_net = _tiny_unet(0).requires_grad_(False), _tiny_unet(1)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    seen = []

    def spy(x):
        out = classifier(x)
        seen.append(x.requires_grad)
        return out

    cfd_loss(NetworkDenoiser(student_net, "x"), NetworkDenoiser(teacher_net, "x"), x0, 2, SampleDraws(0, 1, range(2)),
             classifier=spy, temperature=0.9, beta=0.0).sum().backward()
    assert seen == [False, True]  # the teacher target (no_grad), then the student's x̂₀


def test_per_sample_losses_do_not_depend_on_the_batch_split():
    """Two micro-batches of whole coverage groups give the per-sample losses of the whole batch."""
    classifier = _tiny_classifier().requires_grad_(False)
    teacher, student = NetworkDenoiser(_tiny_unet(0), "x"), NetworkDenoiser(_tiny_unet(1), "x")
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    kw = dict(classifier=classifier, temperature=0.95, beta=0.3, gamma=0.75, coverage_group_size=4)
    with torch.no_grad():
        whole = cfd_loss(student, teacher, x0, 4, SampleDraws(5, 9, range(8)), **kw)
        parts = torch.cat([cfd_loss(student, teacher, x0[:4], 4, SampleDraws(5, 9, range(4)), **kw),
                           cfd_loss(student, teacher, x0[4:], 4, SampleDraws(5, 9, range(4, 8)), **kw)])
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch, feat", [("resnet18", 512), ("densenet201", 1920)])
def test_cifar_classifiers_keep_32x32_resolution_and_use_group_norm(arch, feat):
    net = Classifier({"architecture": arch, "channels": 3, "resolution": 32, "num_classes": 10, "pretrained": False})
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    first = net.net.conv1 if arch == "resnet18" else net.net.features.conv0
    assert first.kernel_size == (3, 3) and first.stride == (1, 1)
    with torch.no_grad():
        logits, f = net.eval()(torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, 10) and f.shape == (1, feat)
    # our split into (logits, feature) must give torchvision's own forward of the same network, for both
    torch.testing.assert_close(logits, net.net.eval()(torch.zeros(1, 3, 32, 32)))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], net.net(x))


def test_pretrained_input_is_mapped_as_torchvision_does():
    """[-1, 1] → [0, 1] → bilinear resize → ImageNet mean/std, then torchvision's resnet18 unchanged."""
    torch.manual_seed(0)
    net = Classifier({"architecture": "resnet18", "channels": 3, "resolution": 8, "num_classes": 1000,
                      "pretrained": True, "input_resolution": 32}).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    up = torch.nn.functional.interpolate((x + 1) / 2, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits, _ = net(x)
        torch.testing.assert_close(logits, net.net((up - mean) / std))

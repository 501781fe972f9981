"""CFD loss: classifier-based feature distillation (Sun et al., "Accelerating Diffusion Sampling with
Classifier-based Feature Distillation", ICME 2023, §3; released code zju-SWJ/RCFD; baselines.md §4).

A CFD halving is a PD halving (same student grid, same teacher target x̃ from two teacher DDIM sub-steps,
sferd.methods.pd) whose pixel loss is replaced by a loss in the feature space of a frozen classifier C. C maps an
image to class logits p and its pooled penultimate feature f. With x̃ the teacher target and x̂ the student's
predicted x₀ (both unclipped, as in PD's loss):

    feature term   KL( softmax(f_T / τ) ‖ softmax(f_S) ),   f_T = f(x̃), f_S = f(x̂)     (τ < 1 sharpens the teacher)
    dataset term   β·[ γ·H̄ + (1 − γ)·D ],   H̄ = mean_i H(softmax(p_S,i)),   D = Σ_c p̄_c log p̄_c,
                   p̄ = mean_i softmax(p_S,i) over a group of samples (the batch: class coverage)

Minimising H̄ makes each student sample confidently one class; minimising D (= −H(p̄)) spreads the batch over all
classes. There is **no pixel MSE term** beside them in a CFD halving (the paper and baselines.md §4: the pixel loss
is *replaced*); the halvings before the first CFD halving are plain PD (`pd_loss`). Names follow the paper: β is
RCFD's code flag `--alpha`, γ its flag `--beta`.

Per-sample form. The training engine averages per-sample losses (so results do not depend on how a batch is split),
but D is a function of a whole group. Sample i's loss is KL_i + β(γ·H_i + (1 − γ)·D_{g(i)}), which averages to the
objective above when every group has the same size; groups are consecutive global sample indices (`draws.indices`),
and a group split across processes or micro-batches is refused rather than silently computed on a part of it.

Gradients reach only the student: the teacher target is computed under no_grad, the classifier's parameters are
frozen (the caller passes it with requires_grad False), and its input gradient flows back to x̂ only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from sferd.diffusion.denoiser import Denoiser
from sferd.methods.draws import Draws
from sferd.methods.pd import pd_target, sample_training_point

# image in the model range [-1, 1], B×C×H×W → (logits B×K, pooled feature B×F)
ClassifierFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class GroupError(ValueError):
    """A coverage group is not wholly inside the batch this process computes."""


def coverage_groups(batch: int, group_size: int | None, indices: Sequence[int] | None) -> torch.Tensor:
    """Group id (0 … G−1, in order of first appearance) of each of the `batch` samples.

    `indices`: the samples' global indices in the stage's stream of samples (update u holds u·B … u·B + B − 1), so a
    group is the same samples however the global batch is cut; without them (a bench's plain batch) groups are
    consecutive runs of the batch. `group_size` None: the whole batch is one group."""
    if group_size is None:
        return torch.zeros(batch, dtype=torch.long)
    ids = list(indices) if indices is not None else list(range(batch))
    raw = [g // group_size for g in ids]
    order = {g: k for k, g in enumerate(dict.fromkeys(raw))}
    for g in order:
        n = raw.count(g)
        if n != group_size:
            raise GroupError(f"coverage group {g} has {n} of its {group_size} samples in this batch: each process and "
                             "micro-batch must hold whole groups (make the per-process batch and micro_batch "
                             "multiples of coverage_group_size)")
    return torch.tensor([order[g] for g in raw], dtype=torch.long)


def cfd_objective(
    logits_student: torch.Tensor,
    feat_student: torch.Tensor,
    feat_teacher: torch.Tensor,
    *,
    temperature: float,
    beta: float,
    gamma: float | None,
    groups: torch.Tensor,
) -> torch.Tensor:
    """Per-sample CFD loss (B,) from the classifier outputs (float32 whatever the autocast dtype)."""
    f_s, f_t, p_s = feat_student.float(), feat_teacher.float().detach(), logits_student.float()
    log_q = F.log_softmax(f_t / temperature, dim=1)  # teacher, sharpened
    kl = (log_q.exp() * (log_q - F.log_softmax(f_s, dim=1))).sum(1)
    if beta == 0:
        return kl
    log_p = F.log_softmax(p_s, dim=1)
    prob = log_p.exp()
    entropy = -(prob * log_p).sum(1)
    groups = groups.to(prob.device)
    n_groups = int(groups.max()) + 1
    sums = torch.zeros(n_groups, prob.shape[1], dtype=prob.dtype, device=prob.device).index_add(0, groups, prob)
    counts = torch.bincount(groups, minlength=n_groups).to(prob.dtype)
    p_bar = sums / counts[:, None]
    # Σ p̄ log p̄ with 0·log 0 = 0 (xlogy), so an unused class contributes nothing and no NaN gradient appears
    coverage = torch.special.xlogy(p_bar, p_bar).sum(1)
    assert gamma is not None  # validated: beta > 0 needs gamma
    return kl + beta * (gamma * entropy + (1.0 - gamma) * coverage[groups])


def cfd_loss(
    student: Denoiser,
    teacher: Denoiser,
    x0: torch.Tensor,
    num_steps: int,
    draws: Draws,
    *,
    classifier: ClassifierFn,
    temperature: float,
    beta: float,
    gamma: float | None = None,
    coverage_group_size: int | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample CFD training loss (B,) on clean data x0: `pd_loss`'s training point and target, the classifier
    loss in place of the pixel MSE."""
    groups = coverage_groups(x0.shape[0], coverage_group_size, getattr(draws, "indices", None)) if beta > 0 else None
    i, t, x_t = sample_training_point(x0, num_steps, draws)
    target = pd_target(teacher, x_t, i, num_steps, y)
    x0_student, _ = student(x_t, t, y)
    with torch.no_grad():
        _, feat_teacher = classifier(target)
    logits_student, feat_student = classifier(x0_student)
    return cfd_objective(logits_student, feat_student, feat_teacher, temperature=temperature, beta=beta, gamma=gamma,
                         groups=groups if groups is not None else torch.zeros(x0.shape[0], dtype=torch.long))

"""Stage `fid_sferd`: FID of a SFERD student (sferd-method.md §10, D14).

Sampling: z_T ~ N(0, I) from the sample's own seed (latent stream) → latent DDIM with the prior → denormalise →
K student steps with the predictor's shift while it is active. Metrics add `nfe_with_predictor` (K + steps with
the predictor branch) and `latent_prior_steps` to the usual FID record (which `fid.run` writes, with its
`"machine"` record).
"""

from __future__ import annotations

from sferd.metrics import keys
from sferd.util.artifacts import torch_load
from sferd.util.errors import StageError
from sferd.pipeline.stages import fid


def make_sampler(src: dict, net, num_steps: int):
    """Build `sample(noise, seeds, y)` for a SFERD student: latent prior → z → shifted student steps."""
    from sferd.diffusion.sampler import per_sample_noise
    from sferd.methods.latent_prior import LatentDiffusion, LatentStats
    from sferd.methods.sferd import sample_sferd, trained_shift_parameterization
    from sferd.nn.latent_mlp import LatentMLP, LatentMLPConfig
    from sferd.nn.predictor import GradientPredictor

    pred_ckpt = torch_load(src["predictor"]["checkpoint"])
    if pred_ckpt["config"]["student"]["checkpoint"] != src["checkpoint"]:
        raise StageError(f"{src['predictor']['checkpoint']} was trained for another student; re-run its stage")
    # D15: the same G means a different shift under another c_t, so sampling must use the form training used.
    shift_form = src["predictor"]["shift_parameterization"]
    trained_form = trained_shift_parameterization(pred_ckpt)
    if trained_form != shift_form:
        raise StageError(
            f"{src['predictor']['checkpoint']} was trained with shift_parameterization {trained_form!r}, but this "
            f"stage samples with {shift_form!r}; re-run the predictor stage (and its prior) with the spec's form"
        )
    predictor = GradientPredictor(net, latent_dim=src["predictor"]["latent_dim"],
                                  init_from_student=src["predictor"]["init_from_student"])
    predictor.load_state_dict_own(pred_ckpt["predictor"])
    predictor.eval()
    prior_ckpt = torch_load(src["prior"]["checkpoint"])
    mlp = LatentMLP(LatentMLPConfig(**prior_ckpt["mlp_config"]))
    mlp.load_state_dict(prior_ckpt["mlp"])
    device = next(net.parameters()).device  # the stage put the student on its rank's device; the rest follows
    mlp.eval().to(device)
    stats = LatentStats.from_state_dict(prior_ckpt["stats"])
    diffusion = LatentDiffusion()
    latent_dim = prior_ckpt["mlp_config"]["latent_dim"]
    pr = src["prior"]

    def sample(noise, seeds, y):
        z_t = per_sample_noise(seeds, (latent_dim,), stream="latent").to(device)  # drawn on the CPU, as x_1
        z_n = diffusion.ddim_sample(mlp, z_t, steps=pr["sampling_steps"], y=y, clip_noise=pr["clip_noise"], clip_x0=pr["clip_x0"])
        return sample_sferd(predictor=predictor, student=net, parameterization=src["parameterization"], noise=noise,
                            z=stats.denormalize(z_n), num_steps=num_steps,
                            cutoff_fraction=src["predictor"]["shift_cutoff_fraction"],
                            shift_parameterization=shift_form, y=y)

    return sample


def extra_metrics(params: dict) -> dict:
    from sferd.methods.sferd import shifted_steps

    src, steps = params["source"], params["steps"]
    return {keys.NFE_WITH_PREDICTOR: steps + shifted_steps(steps, src["predictor"]["shift_cutoff_fraction"]),
            "latent_prior_steps": src["prior"]["sampling_steps"]}


def run(name: str, params: dict) -> None:
    fid.run(name, params, make_sampler=make_sampler, extra_metrics=extra_metrics)

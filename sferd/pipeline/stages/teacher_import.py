"""Stage `teacher_import`: a teacher trained elsewhere enters the pipeline (issue 4: path + sha256 in the spec).

The file's SHA-256 must match the spec before anything is loaded; it must then load with
`torch.load(weights_only=True)` and fit the spec's U-Net exactly (strict state_dict). Accepted: a `model.pt` of
this suite's teacher stage (its EMA weights) or a bare state_dict of the same network. The output is the
ordinary teacher `model.pt`, so the chains downstream cannot tell an imported teacher from a trained one.
"""

from __future__ import annotations

from pathlib import Path

from sferd.util.artifacts import fresh_dir, sha256_file, torch_load, torch_save, write_json
from sferd.util.errors import StageError
from sferd.pipeline.stages.common import checkpoint_payload


def run(name: str, params: dict) -> None:
    from sferd.nn.build import build_unet

    src = params["source"]
    path = Path(src["path"])
    if not path.is_file():
        raise StageError(f"teacher checkpoint {path} not found: put the file there or fix `teacher.path` in the spec")
    digest = sha256_file(path)
    if digest != src["sha256"]:
        raise StageError(f"teacher checkpoint {path} has sha256 {digest}, the spec expects {src['sha256']}: "
                         "a different or corrupted file (fix the file or `teacher.sha256`)")
    ckpt = torch_load(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise StageError(f"{path} holds no state_dict (expected a teacher model.pt or a bare state_dict)")
    net = build_unet(params["model"])
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        raise StageError(
            f"{path} does not fit the spec's teacher U-Net: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} wrongly shaped tensors (first: {(missing + unexpected + wrong)[:3]}); check `teacher.model`"
        )
    net.load_state_dict(state)
    out = fresh_dir(params["outputs"]["dir"])
    torch_save(out / "model.pt", checkpoint_payload(net, params, weights="imported"))
    write_json(out / "config.json", params)
    n = sum(p.numel() for p in net.parameters())
    write_json(params["outputs"]["metrics"], {"stage": name, "source": str(path), "sha256": digest, "parameters": n})
    print(f"{name}: imported {path} ({n / 1e6:.2f}M parameters, sha256 {digest[:12]}…)")

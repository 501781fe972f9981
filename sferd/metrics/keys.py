"""Key names of the flat metrics JSON each evaluation stage writes, and the known feature-extractor names.

Kept free of imports so that the CLI, the table renderer and the spec checks can share the spelling without
loading torch.
"""

# ---- metrics JSON keys
FID = "fid"
NFE = "nfe"  # network evaluations per sample spent by the sampler itself
NFE_WITH_PREDICTOR = "nfe_with_predictor"  # ... plus any auxiliary predictor network (SFERD)
STEPS = "steps"
NUM_SAMPLES = "num_samples"
SEEDS = "seeds"
REF = "ref"
REF_SHA256 = "ref_sha256"
FID_IMPL = "fid_impl"
FEATURE_EXTRACTOR = "feature_extractor"
WEIGHTS_SHA256 = "weights_sha256"
STAGE = "stage"

ALL_KEYS = (
    FID,
    NFE,
    NFE_WITH_PREDICTOR,
    STEPS,
    NUM_SAMPLES,
    SEEDS,
    REF,
    REF_SHA256,
    FID_IMPL,
    FEATURE_EXTRACTOR,
    WEIGHTS_SHA256,
    STAGE,
)

# ---- values of FEATURE_EXTRACTOR (the names registered in torch-fidelity's extractor registry)
EXTRACTOR_DIGITS_CNN = "digits-cnn"
EXTRACTOR_INCEPTION = "inception-v3-compat"

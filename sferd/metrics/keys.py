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
# the feature network's weights version (`features.weights.version`), when the spec fixes one; absent otherwise
WEIGHTS_VERSION = "weights_version"
STAGE = "stage"
# beyond FID, when the spec's `evaluation.metrics` asks for them (values first, then the settings behind them)
ISC = "isc"  # Inception Score: mean over the splits, from the extractor's class logits
ISC_STD = "isc_std"  # standard deviation of the Inception Score over the splits
ISC_SPLITS = "isc_splits"
ISC_SHUFFLE_SEED = "isc_shuffle_seed"  # torch-fidelity shuffles the samples before splitting them
PRECISION = "precision"  # fraction of samples inside the k-NN ball of some reference image's features
RECALL = "recall"  # fraction of reference images inside the k-NN ball of some sample's features
PRC_NEIGHBORHOOD = "prc_neighborhood"  # the k of those k-NN balls
PRC_NUM_REAL = "prc_num_real"  # reference images precision/recall compared against

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
    WEIGHTS_VERSION,
    STAGE,
    ISC,
    ISC_STD,
    ISC_SPLITS,
    ISC_SHUFFLE_SEED,
    PRECISION,
    RECALL,
    PRC_NEIGHBORHOOD,
    PRC_NUM_REAL,
)

# ---- values of FEATURE_EXTRACTOR (the names registered in torch-fidelity's extractor registry)
EXTRACTOR_DIGITS_CNN = "digits-cnn"
EXTRACTOR_INCEPTION = "inception-v3-compat"

# ---- metric options of a spec's `evaluation.metrics` (spelled as torch-fidelity's calculate_metrics flags)
METRIC_FID = "fid"
METRIC_ISC = "isc"
METRIC_PRC = "prc"
METRIC_OPTIONS = (METRIC_FID, METRIC_ISC, METRIC_PRC)
# the metrics-JSON values each option produces (also the values a spec's `reported` rows may carry)
METRIC_VALUES = {METRIC_FID: (FID,), METRIC_ISC: (ISC,), METRIC_PRC: (PRECISION, RECALL)}

# Which options each extractor supports. IS needs class logits: Inception has its `logits_unbiased` head, the
# digits CNN is a digit classifier with a `logits` head. A test keeps this table equal to what the registered
# torch-fidelity extractors provide; the spec checks read it here because they must not import torch.
EXTRACTOR_METRICS = {
    EXTRACTOR_DIGITS_CNN: (METRIC_FID, METRIC_ISC, METRIC_PRC),
    EXTRACTOR_INCEPTION: (METRIC_FID, METRIC_ISC, METRIC_PRC),
}

# torch-fidelity 0.4.0's defaults, which are the published settings (a test pins them to torch_fidelity.defaults):
ISC_SPLITS_DEFAULT = 10  # Salimans et al. 2016: IS as mean ± std over 10 splits
PRC_NEIGHBORHOOD_DEFAULT = 3  # Kynkäänniemi et al. 2019: k = 3 nearest neighbours

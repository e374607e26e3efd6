"""The contract between a GPU library's sampling kernels (compiler/sampling_kernels.py) and the
runtime that calls them (runtime/gpu_sampling.py): the functions' names and the layout of their
parameter table and bias/penalty entries."""

# The artifact's sampling functions.
FUNCTIONS = (
    "sample_gather_scores",
    "sample_from_scores",
    "sample_unfiltered",
    "sample_argmax",
    "sample_token_logprob",
)

# Columns of the parameter table, [batch, PARAMS] float32.
TEMPERATURE, TOP_K, TOP_P, MIN_P, UNIFORM, REPETITION = range(6)
PARAMS = 6
ENTRY_VALUES = 3  # an entry's values: bias, seen (1.0: repetition penalty applies), subtract
